"""DGPO (--algorithm dgpo; arXiv 2510.08425): its loss against an independent implementation of the published
formula, its group-shared steps and noise, short runs on the SD3 and SD1 tiny families, an exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer.algorithms.dgpo.loss import clip_mask, dgpo_loss, kl_to_base
from trainer.config import Config

torch.set_num_threads(1)


def published(dsm, ref, old, a, g, beta, clip, c):
    """DGPO's loss and its gradient in d(dsm), in float64 numpy, one (group, step) at a time: A clipped to
    [-c, c]; w = sigmoid(sum_i A_i beta (dsm_i - ref_i) / G), a constant; ratio exp(old - dsm); a sample's dsm
    gives no gradient when ratio > 1 + clip with A > 0 or ratio < 1 - clip with A <= 0; L = mean(w A dsm)."""
    a = np.clip(a, -c, c)
    b, k = dsm.shape
    loss, grad = 0.0, np.zeros_like(dsm)
    for start in range(0, b, g):
        for j in range(k):
            members = range(start, start + g)
            s = sum(a[i] * beta * (dsm[i, j] - ref[i, j]) / g for i in members)
            w = 1 / (1 + np.exp(-s))
            for i in members:
                loss += w * a[i] * dsm[i, j] / (b * k)
                r = np.exp(old[i, j] - dsm[i, j]) if old is not None else 1.0
                frozen = clip > 0 and ((r > 1 + clip and a[i] > 0) or (r < 1 - clip and a[i] <= 0))
                grad[i, j] = 0.0 if frozen else w * a[i] / (b * k)
    return loss, grad


@pytest.mark.parametrize("clip", [0.0, 1e-2])
@pytest.mark.parametrize("beta", [1.0, 100.0])
def test_the_loss_is_the_published_formula(clip, beta):
    generator = torch.Generator().manual_seed(0)
    b, k, g = 8, 3, 4
    dsm = (torch.rand(b, k, generator=generator, dtype=torch.float64) * 0.2 + 0.1).requires_grad_()
    ref = dsm.detach() + torch.randn(b, k, generator=generator, dtype=torch.float64) * 0.01
    old = dsm.detach() + torch.randn(b, k, generator=generator, dtype=torch.float64) * 0.02
    a = torch.randn(b, generator=generator, dtype=torch.float64) * 4  # some beyond the clip of 5
    a[0] = 7.0
    loss, stats = dgpo_loss(dsm, ref, old, a, g, beta, clip, 5.0)
    loss.backward()
    expected, grad = published(dsm.detach().numpy(), ref.numpy(), old.numpy(), a.numpy(), g, beta, clip, 5.0)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(dsm.grad.numpy(), grad, rtol=1e-10, atol=1e-15)
    if clip:  # the mask caught some samples and spared others
        assert 0 < stats["clip_fraction"] < 1
    weights = stats["group_weight"].item()
    assert 0 < weights < 1 and (beta == 1.0 or abs(weights - 0.5) > 1e-3)


def test_the_kl_mask_stops_the_masked_samples_kl_gradient_only():
    """dgpo.kl_mask: the KL's value is the unmasked mean of (v - v_ref)^2 and its gradient 2 (v - v_ref) / n on
    the rows the clip leaves, 0 on the rows it masks (written out per row here)."""
    generator = torch.Generator().manual_seed(1)
    b, k, size = 4, 2, 6  # B samples at k steps, each prediction of `size` elements, rows sample-major
    v = torch.randn(b * k, size, generator=generator, dtype=torch.float64, requires_grad=True)
    base = torch.randn(b * k, size, generator=generator, dtype=torch.float64)
    dsm = torch.rand(b, k, generator=generator, dtype=torch.float64) * 0.2 + 0.1
    old = dsm + torch.randn(b, k, generator=generator, dtype=torch.float64) * 0.05
    a = torch.tensor([1.0, -1.0, 2.0, -0.5], dtype=torch.float64)
    masked = clip_mask(dsm, old, a, 1e-2)
    assert 0 < masked.sum() < b * k
    kl = kl_to_base(v, base, masked)
    kl.backward()
    assert kl.item() == pytest.approx(((v - base) ** 2).mean().item(), rel=1e-12)
    vn, bn = v.detach().numpy(), base.numpy()
    for row in range(b * k):
        i, j = divmod(row, k)
        expected = 0.0 if masked[i, j] else 2 * (vn[row] - bn[row]) / (b * k * size)
        np.testing.assert_allclose(v.grad[row].numpy(), expected, rtol=1e-12, atol=1e-18)
    with pytest.raises(ValueError, match="dgpo.kl_mask applies dgpo.clip's mask"):
        Config(algorithm="dgpo", dgpo={"kl_mask": True}, train={"kl_coef": 0.0})


def test_the_gradient_fits_the_better_samples():
    """One descent step on dsm lowers it where A > 0, raises it where A < 0."""
    dsm = torch.full((4, 1), 0.3, requires_grad=True)
    a = torch.tensor([1.0, -1.0, 2.0, -2.0])
    dgpo_loss(dsm, dsm.detach(), None, a, 4, 10.0, 0.0, 5.0)[0].backward()
    assert (dsm.grad[:, 0] * a > 0).all()  # d L / d dsm has A's sign: descent lowers dsm where A > 0


# Groups of 2, 4 sampler steps with guidance (DGPO's rollouts are guided), one batch an epoch.
SAMPLE = dict(num_steps=4, eta=0.0, batch_size=4, num_batches_per_epoch=1, images_per_prompt=2, guidance_scale=2.0)


def cfg_for(tmp_path, tiny_cache, preset: str, dgpo: dict | None = None, **run) -> Config:
    return Config(
        preset=preset,
        algorithm="dgpo",
        run={"output_dir": tmp_path, "num_epochs": 2, "log_with": "none", "log_images_every": 0, **run},
        pretrained={"cache_dir": tiny_cache},
        sample=SAMPLE,
        train={"batch_size": 2, "kl_coef": 1e-4},
        dgpo={"num_timesteps": 2, "trunc": 0.75, "beta_dpo": 10.0, "clip": 1e-3, "switch_ema_ref": 2, **(dgpo or {})},
    )


def test_steps_and_noise_are_shared_by_each_group(tmp_path, tiny_cache):
    from trainer.algorithms.dgpo.loop import group_draws

    cfg = cfg_for(tmp_path, tiny_cache, "tiny")
    cfg.sample.images_per_prompt, cfg.sample.num_steps, cfg.dgpo.num_timesteps, cfg.dgpo.trunc = 4, 10, 4, 0.6
    steps, noise = group_draws(cfg, 3, 0, 12, (2, 3, 3))
    assert steps.shape == (12, 4) and noise.shape == (12, 4, 2, 3, 3)
    assert steps.max() < 6 and all(len(set(row.tolist())) == 4 for row in steps)  # distinct, of the first 6
    for start in range(0, 12, 4):
        assert (steps[start : start + 4] == steps[start]).all() and (noise[start : start + 4] == noise[start]).all()
    assert not torch.equal(noise[0], noise[4]) and not torch.equal(noise[0, 0], noise[0, 1])
    again, same = group_draws(cfg, 3, 0, 12, (2, 3, 3))  # every process (and a resumed run) draws the same
    assert torch.equal(again, steps) and torch.equal(same, noise)
    assert not torch.equal(group_draws(cfg, 4, 0, 12, (2, 3, 3))[1], noise)
    cfg.dgpo.use_shared_noise = False
    own = group_draws(cfg, 3, 0, 12, (2, 3, 3))[1]
    assert not torch.equal(own[0], own[1])


def test_the_settings_are_checked(tmp_path, tiny_cache):
    with pytest.raises(ValueError, match="dgpo.num_timesteps"):
        cfg_for(tmp_path, tiny_cache, "tiny", {"num_timesteps": 4})
    with pytest.raises(ValueError, match="multiple of sample.images_per_prompt"):
        Config(algorithm="dgpo", sample={"images_per_prompt": 4}, train={"batch_size": 2})
    with pytest.raises(ValueError, match="use_ema_ref"):
        Config(algorithm="dgpo", train={"lora": False})
    assert Config(algorithm="dgpo", train={"lora": False}, dgpo={"use_ema_ref": True}).dgpo.use_ema_ref
    assert Config(algorithm="dgpo", train={"lora": False, "kl_coef": 1e-3}).train.kl_coef  # the frozen copy
    from trainer.plan import BatchPlan

    assert BatchPlan.of(Config(algorithm="dgpo", dgpo={"num_timesteps": 3}), 1).train_timesteps == 3
    d = Config(algorithm="dgpo").dgpo
    assert [d.old_decay(s) for s in (0, 100, 1000)] == [0.0, pytest.approx(0.1), 0.3]


@pytest.mark.parametrize("preset", ["tiny-sd3", "tiny"])
def test_a_short_run_trains_on_each_family(tmp_path, tiny_cache, preset):
    from trainer import train

    history = train(cfg_for(tmp_path, tiny_cache, preset, {"kl_mask": preset == "tiny-sd3"}))  # one with the mask
    assert [m["epoch"] for m in history] == [0, 1] and all(np.isfinite(m["loss"]) for m in history)
    assert history[-1]["global_step"] == 4 and history[-1]["kl_to_reference"] > 0  # the weights moved
    assert 0 < history[-1]["group_weight"] < 1 and "clip_fraction" in history[-1]
    assert history[-1]["old_policy_decay"] == pytest.approx(0.003)  # stepped each optimizer step: min(0.3, 0.001 x 3)
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_full_finetuning_takes_the_frozen_copy_as_its_reference(tmp_path, tiny_cache):
    from trainer import train

    cfg = cfg_for(tmp_path, tiny_cache, "tiny")
    cfg.train.lora = False
    history = train(cfg)
    assert all(np.isfinite(m["loss"]) for m in history) and history[-1]["kl_to_reference"] > 0


def test_the_reference_is_guided_by_kl_cfg(tmp_path, tiny_cache):
    """dgpo.kl_cfg: the base's reference prediction guided against the empty prompt (DGPO's CFG-free mode). With
    the weights held at the base (lr 0), the conditional reference is the policy itself (dsm - ref and the KL
    exactly 0), the guided one is not."""
    from trainer import train

    runs = {}
    for kl_cfg in (1.0, 4.5):
        cfg = cfg_for(tmp_path / str(kl_cfg), tiny_cache, "tiny-sd3", {"kl_cfg": kl_cfg}, num_epochs=1)
        cfg.train.learning_rate = 0.0
        runs[kl_cfg] = train(cfg)[-1]
    assert runs[1.0]["dsm_minus_ref"] == 0 and runs[1.0]["kl_to_reference"] == 0
    assert runs[4.5]["dsm_minus_ref"] != 0 and runs[4.5]["kl_to_reference"] > 0


def test_a_resumed_run_continues_exactly(tmp_path, tiny_cache):
    from safetensors.torch import load_file

    from trainer import train

    ema = {"use_ema_ref": True, "clip": 1e-2, "beta_dpo": 1000.0, "old_decay_rate": 0.1}
    straight = train(cfg_for(tmp_path / "straight", tiny_cache, "tiny-sd3", ema, num_epochs=3))
    train(cfg_for(tmp_path / "resumed", tiny_cache, "tiny-sd3", ema, num_epochs=2, save_freq=1))
    checkpoint = tmp_path / "resumed" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "old_policy.safetensors").exists()
    resumed = train(
        cfg_for(tmp_path / "resumed", tiny_cache, "tiny-sd3", ema, num_epochs=3, resume_from=str(checkpoint))
    )
    assert resumed[-1]["loss"] == straight[-1]["loss"] and resumed[-1]["reward_mean"] == straight[-1]["reward_mean"]
    weights = [load_file(tmp_path / r / "lora" / "pytorch_lora_weights.safetensors") for r in ("straight", "resumed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    lines = [json.loads(line)["epoch"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [0, 1, 2]


def test_rollouts_switch_to_the_ema_weights(tmp_path, tiny_cache, monkeypatch):
    """Before dgpo.switch_ema_ref optimizer steps the rollouts use the trained weights, after it the EMA old
    model's (2 optimizer steps an epoch, the switch at 4: epoch 1 samples with the trained weights, which have
    left the EMA, epoch 2 with the EMA)."""
    from trainer import epoch as epoch_phases
    from trainer import train

    seen, real = [], epoch_phases.collect

    def recorded(run, online, *args, **kwargs):
        shadow = online.trained.old_policy.shadow
        sampled = online.trained.trainable
        seen.append(max((p.detach().float() - shadow[n]).abs().max().item() for n, p in sampled.items()))
        return real(run, online, *args, **kwargs)

    monkeypatch.setattr(epoch_phases, "collect", recorded)
    train(cfg_for(tmp_path, tiny_cache, "tiny-sd3", {"switch_ema_ref": 4, "old_decay_rate": 0.2}, num_epochs=3))
    assert seen[0] == 0 and seen[1] > 1e-5 and seen[2] == 0


def test_the_presets_are_dgpos_configs():
    """DGPO's GenEval and PickScore values (Luo-Yihong/DGPO config/dgpo.py) and the shapes preset."""
    from trainer.plan import BatchPlan

    geneval, pickscore = Config(preset="sd3-geneval-dgpo"), Config(preset="sd3-pickscore-dgpo")
    for cfg in (geneval, pickscore):
        assert cfg.algorithm == "dgpo" and cfg.sample.eta == 0 and cfg.sample.guidance_scale == 4.5
        assert cfg.sample.num_steps == 10 and cfg.sample.resolution == 512 and cfg.train.learning_rate == 3e-4
        assert cfg.dgpo.num_timesteps == 4 and cfg.dgpo.clip == 1e-2 and cfg.dgpo.use_shared_noise
        assert BatchPlan.of(cfg, 4).optimizer_steps_per_epoch == 1  # one step per epoch on 4 GPUs
    assert (geneval.sample.images_per_prompt, geneval.dgpo.beta_dpo, geneval.train.kl_coef) == (16, 100.0, 0.02)
    assert (geneval.dgpo.trunc_steps(10), geneval.dgpo.switch_ema_ref, geneval.reward.scorer) == (4, 500, "geneval")
    assert BatchPlan.of(geneval, 4).samples_per_epoch == 8 * 16  # 8 groups of 16
    assert (pickscore.sample.images_per_prompt, pickscore.dgpo.beta_dpo, pickscore.train.kl_coef) == (24, 10.0, 1e-3)
    assert (pickscore.dgpo.trunc_steps(10), pickscore.dgpo.switch_ema_ref, pickscore.reward.scorer) == (
        6,
        200,
        "pickscore",
    )
    assert pickscore.prompt.eval_path is None and pickscore.prompt.fn == "nouns_activities"
    shapes = Config(preset="shapes-sd3-dgpo")
    assert shapes.pretrained.model == "tiny-shapes-sd3" and shapes.algorithm == "dgpo" and shapes.sample.eta == 0
