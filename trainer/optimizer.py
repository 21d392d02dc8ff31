"""The optimizer of a run (trainer.run.load_model builds it over the trainable parameters)."""

from __future__ import annotations

import torch

from trainer.config import Config


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], learning_rate: float | None = None):
    """The optimizer the settings name over ``params``: AdamW (torch's, or bitsandbytes' 8-bit one) or Adafactor,
    at ``learning_rate`` (default train.learning_rate)."""
    t = cfg.train
    lr = t.learning_rate if learning_rate is None else learning_rate
    if t.use_adafactor:  # a fixed learning rate, as Diffusion-DPO runs it (no relative step, no parameter scaling)
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=t.adam_weight_decay,
        )
    if t.use_8bit_adam:  # availability was checked with the config
        import bitsandbytes as bnb

        adamw = bnb.optim.AdamW8bit
    else:
        adamw = torch.optim.AdamW
    return adamw(
        params, lr=lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay, eps=t.adam_epsilon
    )
