"""NormGuard (arXiv 2606.27771): the hinge on the velocity's norm against an independent implementation, and
the drift every evaluation logs on the policy's own samples: 1 and the base's own loss before training, the
same whatever the batch, moved after it; with the hinge on, training logs it and the norm ratio."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.test_forward import nft_config
from trainer.loss import norm_hinge


def test_norm_hinge_is_the_published_hinge_and_pushes_only_where_the_norm_grew():
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((4, 2, 3, 3))
    scale = np.array([1.3, 0.8, 1.05, 1.0])[:, None, None, None]  # two above the base's norm, one below, one equal
    policy = reference * scale + 0.01 * rng.standard_normal((4, 2, 3, 3)) * (scale != 1.0)
    x = torch.tensor(policy, requires_grad=True)
    hinge, stats = norm_hinge(x, torch.tensor(reference))
    hinge.backward()

    def rms(a):
        return np.sqrt((a**2).reshape(len(a), -1).mean(axis=1))

    gap = rms(policy) - rms(reference)
    assert hinge.item() == pytest.approx(np.maximum(gap, 0).mean())
    assert stats["norm_ratio"].item() == pytest.approx((rms(policy) / rms(reference)).mean())
    # d rms / dx = x / (D rms): only the samples whose norm grew get a gradient, along themselves
    expected = (gap > 0)[:, None, None, None] * policy / (18 * rms(policy)[:, None, None, None]) / 4
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)
    assert torch.all(x.grad[1] == 0) and torch.all(x.grad[3] == 0)


def test_drift_does_not_depend_on_the_batch(tiny_cache):
    """Each image noised at its own seed's level with its own seed's noise: the same values in batches of 1 or 3,
    and with the policy as its own base, a norm ratio of exactly 1 and its two losses equal."""
    import contextlib

    from trainer.config import Config
    from trainer.drift import Drift
    from trainer.evaluate import evaluate
    from trainer.families.models import load_family
    from trainer.rewards import Rewards

    cfg = Config(preset="tiny-sd3", pretrained={"cache_dir": tiny_cache})
    family = load_family(cfg, torch.device("cpu"))
    rewards, runs = Rewards(cfg.reward), []
    try:
        for b in (1, 3):
            drift = Drift(
                family, family.denoiser, lambda: contextlib.nullcontext(family.denoiser), contextlib.nullcontext
            )
            kwargs = dict(num_steps=3, guidance_scale=1.0, resolution=64, seeds=[7, 8, 9], batch_size=b, probe=drift)
            evaluate(family, family.denoiser, ["a cat", "a fox", "an owl"], [{}] * 3, rewards, **kwargs)
            runs.append(drift.values)
    finally:
        rewards.close()
    for name in runs[0]:
        np.testing.assert_allclose(runs[0][name], runs[1][name], rtol=1e-4)
    assert runs[0]["norm_ratio"] == [1.0, 1.0, 1.0] and runs[0]["base_loss"] == runs[0]["policy_loss"]
    assert len(set(runs[0]["base_loss"])) == 3  # three images, three levels


@pytest.mark.slow
def test_a_guarded_run_logs_the_hinge_and_its_evaluations_the_drift(tmp_path, tiny_cache):
    from trainer import train

    cfg = nft_config(tmp_path, tiny_cache, "tiny-sd3", train={"norm_guard_coef": 1.0, "learning_rate": 1e-2})
    cfg.run.eval_every, cfg.prompt.eval_count = 2, 4
    history = train(cfg)
    assert all(m["norm_hinge"] >= 0 and np.isfinite(m["norm_ratio"]) for m in history)
    assert history[-1]["norm_ratio"] != 1.0
    before, after = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert before["drift/norm_ratio"] == 1.0  # LoRA's B starts at zero: the policy is the base
    assert before["drift/base_loss"] == pytest.approx(before["drift/policy_loss"])
    assert after["drift/norm_ratio"] != 1.0 and after["drift/base_loss"] != before["drift/base_loss"]
