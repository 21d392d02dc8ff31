"""The ``refl`` settings group (ReFL, DRaFT, AlignProp), part of trainer.config.Config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trainer.groups import _Steps


class ReFLConfig(_Steps):
    """Differentiable rewards (``--algorithm refl``): the reward's gradient through the VAE decoder and the
    last denoising step(s); counted in optimizer steps. The reward is ``reward.scorer`` in process (one with
    a tensor path: aesthetic, clipscore, pickscore, hpsv2, imagereward) or ``reward.url``, a server's /v1/score_grad."""

    mode: Literal["refl", "draft", "alignprop"] = Field(
        "refl",
        description="refl: one step with grad at a step "
        "drawn from [mid_low, mid_high], its predicted x0 scored "
        "(ImageReward's ReFL); draft: the whole sampler, grad through "
        "the last draft_k steps (DRaFT-K); alignprop: grad through "
        "the last k steps, k drawn from 1..num_steps, each step "
        "checkpointed (AlignProp)",
    )
    num_steps: int = Field(40, gt=0, description="sampler steps (DDIM eta 0 / the flow ODE)")
    mid_low: int = Field(30, ge=0, description="refl: the step with grad is drawn uniformly from mid_low..mid_high")
    mid_high: int = Field(39, ge=0)
    draft_k: int = Field(1, gt=0, description="draft: steps with grad at the end of the sampler")
    guidance_scale: float = Field(1.0, ge=1.0, description="1: no CFG (ReFL encodes the prompt alone)")
    margin: float = Field(2.0, description="refl: loss relu(margin - reward); draft/alignprop: loss -reward")
    grad_scale: float = Field(1e-3, ge=0, description="the loss is multiplied by this")
    pretrain_data: str | None = Field(
        None,
        description="real images with captions for ReFL's alternating "
        "pre-training step (the plain denoising loss, which keeps the model near "
        "the data): a folder with metadata.jsonl (file_name, text), a folder of "
        "parquet files with image and caption columns, or a preference dataset "
        "(its winners)",
    )
    pretrain_check_rows: int = Field(10_000, ge=0, description="as dpo.check_rows, for refl.pretrain_data")
    pretrain_allow_outside_paths: bool = Field(False, description="as dpo.allow_outside_paths, for refl.pretrain_data")
    pretrain_every: int = Field(1, gt=0, description="a pre-training optimizer step after every this many reward steps")
    pretrain_weight: float = Field(1.0, ge=0, description="the pre-training loss is multiplied by this")

    @model_validator(mode="after")
    def _steps(self) -> "ReFLConfig":
        if not self.mid_low <= self.mid_high < self.num_steps:
            raise ValueError(
                f"mid_low ({self.mid_low}) <= mid_high ({self.mid_high}) < num_steps ({self.num_steps}) must hold"
            )
        if self.draft_k > self.num_steps:
            raise ValueError(f"draft_k ({self.draft_k}) must not exceed num_steps ({self.num_steps})")
        return self
