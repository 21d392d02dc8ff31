"""DiffusionNFT and AWM: their losses against independent implementations of the published formulas for flow,
eps and v predictions, the properties the derivations imply, and short runs on every family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from trainer.config import Config
from trainer.families.ddim import ddim_x0
from trainer.algorithms.forward.loss import awm_loss, nft_loss, nft_optimality


def reference_loss(prediction, old, x0, to_x0, r, beta, c=5.0) -> float:
    """DiffusionNFT's train_nft_sd3.py loss, in float64 numpy, per sample: positive and negative predictions,
    their clean latents, squared errors over the detached mean absolute error (clipped at 1e-5)."""
    total = []
    for n in range(len(x0)):
        positive = beta * prediction[n] + (1 - beta) * old[n]
        negative = (1 + beta) * old[n] - beta * prediction[n]
        terms = []
        for mixed in (positive, negative):
            error = to_x0(mixed, n) - x0[n]
            terms.append(np.mean(error**2 / max(np.mean(np.abs(error)), 1e-5)))
        total.append(r[n] * terms[0] / beta + (1 - r[n]) * terms[1] / beta)
    return float(np.mean(np.array(total) * c))


def ddim_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )


@pytest.mark.parametrize("parametrisation", ["flow", "epsilon", "v_prediction"])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_is_the_published_formula(parametrisation, beta):
    rng = np.random.default_rng(0)
    x0, x_t, prediction, old = (rng.standard_normal((3, 2, 4, 4)) for _ in range(4))
    r = np.array([0.0, 0.3, 1.0])
    if parametrisation == "flow":
        t = np.array([0.9, 0.5, 0.1])
        ours_x0 = lambda p: torch.tensor(x_t) - torch.tensor(t).view(-1, 1, 1, 1) * p  # noqa: E731
        theirs_x0 = lambda p, n: x_t[n] - t[n] * p  # noqa: E731
    else:
        scheduler = ddim_scheduler(parametrisation)
        t = torch.tensor([901, 481, 41])
        a = scheduler.alphas_cumprod[t].double().numpy()
        ours_x0 = lambda p: ddim_x0(scheduler, p, t, torch.tensor(x_t)).double()  # noqa: E731
        if parametrisation == "epsilon":
            theirs_x0 = lambda p, n: (x_t[n] - np.sqrt(1 - a[n]) * p) / np.sqrt(a[n])  # noqa: E731
        else:
            theirs_x0 = lambda p, n: np.sqrt(a[n]) * x_t[n] - np.sqrt(1 - a[n]) * p  # noqa: E731
    loss, _ = nft_loss(
        torch.tensor(prediction), torch.tensor(old), torch.tensor(x0), ours_x0, torch.tensor(r), beta, 5.0
    )
    assert loss.item() == pytest.approx(reference_loss(prediction, old, x0, theirs_x0, r, beta), rel=1e-5)


def gradient(beta: float, r: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x0, x_t, start = (torch.randn(4, 2, 4, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    prediction = start.clone().requires_grad_(True)
    t = torch.tensor([0.8, 0.6, 0.4, 0.2], dtype=torch.float64).view(-1, 1, 1, 1)
    loss, _ = nft_loss(prediction, start if old is None else old, x0, lambda p: x_t - t * p, r, beta, 5.0)
    loss.backward()
    return prediction.grad


def test_no_signal_and_no_lag_give_no_gradient():
    """r = 0.5 for every sample and the old policy equal to the current one: the positive and negative
    losses pull equally in opposite directions."""
    grad = gradient(1.0, torch.full((4,), 0.5, dtype=torch.float64))
    assert float(grad.abs().max()) < 1e-15


def test_at_the_old_policy_the_gradient_does_not_depend_on_beta():
    """d/dpred of (1/b)[r l(b pred + ...) + (1 - r) l((1 + b) old - b pred)] at pred = old is (2r - 1) l'."""
    r = torch.tensor([0.0, 0.25, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(gradient(1.0, r), gradient(0.1, r), rtol=1e-10, atol=1e-14)
    assert float(gradient(1.0, r).abs().max()) > 1e-3  # and it is not zero


def test_optimality_and_the_old_policy_schedule():
    a = torch.tensor([-9.0, -5.0, -1.0, 0.0, 2.5, 7.0])
    torch.testing.assert_close(nft_optimality(a, 5.0), torch.tensor([0.0, 0.0, 0.4, 0.5, 0.75, 1.0]))
    nft = Config(algorithm="nft").nft
    assert [nft.old_decay(s) for s in (0, 1, 100, 499, 500, 10_000)] == [0.0, 0.001, 0.1, 0.499, 0.5, 0.5]
    ocr = Config(
        algorithm="nft", nft={"old_decay_flat_steps": 75, "old_decay_rate": 0.0075, "old_decay_max": 0.999}
    ).nft
    assert [ocr.old_decay(s) for s in (0, 74, 75, 175, 500)] == [0.0, 0.0, 0.0, pytest.approx(0.75), 0.999]


def nft_config(tmp_path, tiny_cache, preset: str, algorithm: str = "nft", train: dict | None = None, **run) -> Config:
    return Config(
        preset=preset,
        algorithm=algorithm,
        run={"output_dir": tmp_path, "num_epochs": 2, "log_with": "none", "log_images_every": 0, **run},
        pretrained={"cache_dir": tiny_cache},
        sample={
            "num_steps": 4,
            "eta": 0.0,
            "batch_size": 4,
            "num_batches_per_epoch": 1,
            "images_per_prompt": 2,
            "guidance_scale": 1.0,
        },
        train={"batch_size": 2, "timestep_fraction": 0.5, "kl_coef": 1e-4, **(train or {})},
        ddpo={"cfg": False},
    )


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["nft", "awm"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl", "tiny-sd3"])
def test_a_short_run_trains_and_saves_on_every_family(tmp_path, tiny_cache, preset, algorithm):
    from trainer import train

    # AWM's timesteps stratified over the schedule and shared by each batch, a prompt's images pooled, as its
    # code does
    awm = {"timestep_selection": "stratified", "timestep_shared": True, "group_by": "prompt"}
    cfg = nft_config(tmp_path, tiny_cache, preset, algorithm, awm if algorithm == "awm" else None)
    history = train(cfg)
    assert [m["epoch"] for m in history] == [0, 1] and all(np.isfinite(m["loss"]) for m in history)
    assert history[0]["old_policy_decay"] == pytest.approx(0.002)  # 2 optimizer steps into the run
    assert history[-1]["kl_to_reference"] > 0  # the weights moved
    assert history[-1]["old_deviation" if algorithm == "nft" else "kl_to_average"] > 0
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_awm_loss_is_the_published_formula_and_its_gradient_the_advantage_weighted_one():
    rng = np.random.default_rng(5)
    prediction, target = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal((4, 2, 3, 3))
    time, advantages, p = np.array([0.9, 0.6, 0.3, 0.1]), np.array([-7.0, -1.0, 2.0, 5.0]), 0.25
    x = torch.tensor(prediction, requires_grad=True)
    loss, stats = awm_loss(x, torch.tensor(target), torch.tensor(time), torch.tensor(advantages), 5.0, p)
    loss.backward()
    weight = np.clip(advantages, -5, 5) / 5
    error = ((prediction - target) ** 2).mean(axis=(1, 2, 3))
    log_p = -time * ((error + 1e-10) ** p - 1e-10**p) / p
    assert loss.item() == pytest.approx(-weight.mean()) and stats["log_p"].item() == pytest.approx(log_p.mean())
    # d/dx of -mean(w exp(log_p - sg(log_p))) = mean of w t (l + 1e-10)^(p - 1) dl/dx, dl/dx = 2 (x - y) / D
    expected = (weight * time * (error + 1e-10) ** (p - 1))[:, None, None, None] * 2 * (prediction - target) / 18 / 4
    np.testing.assert_allclose(x.grad.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("preset, kind", [("tiny", "epsilon"), ("tiny", "v_prediction"), ("tiny-sd3", "flow")])
def test_the_forward_process_at_the_samplers_steps(tiny_cache, preset, kind):
    """x_t, target and time of family.dynamics.noised_at against the formulas: DDIM's alphas, or the flow's sigmas."""
    from trainer.families.models import load_family

    family = load_family(Config(preset=preset, pretrained={"cache_dir": tiny_cache}), torch.device("cpu"))
    if kind == "v_prediction":
        family.pipe.scheduler.register_to_config(prediction_type="v_prediction")
    family.dynamics.timesteps(10, torch.device("cpu"))
    x0, noise, index = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 4, 9])
    x_t, t, target, time = family.dynamics.noised_at(x0, noise, index)
    scheduler = family.pipe.scheduler
    if kind == "flow":
        s = scheduler.sigmas[index].view(-1, 1, 1, 1)
        expected = ((1 - s) * x0 + s * noise, noise - x0, scheduler.sigmas[index])
    else:
        a = scheduler.alphas_cumprod[scheduler.timesteps[index]].view(-1, 1, 1, 1)
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        expected = (
            a.sqrt() * x0 + (1 - a).sqrt() * noise,
            v if kind == "v_prediction" else noise,
            scheduler.timesteps[index] / 1000,
        )
    for ours, theirs in zip((x_t, target, time), expected):
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(t, scheduler.timesteps[index])


@pytest.mark.slow
def test_nft_resumes_exactly_with_its_old_policy(tmp_path, tiny_cache):
    from safetensors.torch import load_file

    from trainer.algorithms.forward.loop import train

    straight = train(nft_config(tmp_path / "straight", tiny_cache, "tiny", num_epochs=3))
    train(nft_config(tmp_path / "resumed", tiny_cache, "tiny", num_epochs=2, save_freq=1))
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "old_policy.safetensors").exists()
    resumed = train(
        nft_config(
            tmp_path / "resumed",
            tiny_cache,
            "tiny",
            num_epochs=3,
            resume_from=str(tmp_path / "resumed" / "checkpoints" / "checkpoint-2"),
        )
    )
    assert resumed[-1]["loss"] == straight[-1]["loss"] and resumed[-1]["reward_mean"] == straight[-1]["reward_mean"]
    weights = [
        load_file(tmp_path / run / "lora" / "pytorch_lora_weights.safetensors") for run in ("straight", "resumed")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    lines = [json.loads(line)["epoch"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["old", "current"])
def test_nft_rolls_out_with_the_policy_it_is_told(tmp_path, tiny_cache, monkeypatch, policy):
    """nft.rollout_policy old samples an epoch's images with the lagging weights d theta_0 + (1 - d) theta_1
    (DiffusionNFT's old adapter), current with theta_1: the epoch's final latents, replayed from the same
    noise with each set of weights, equal the one and differ from the other."""
    from safetensors.torch import load_file

    from trainer import epoch as epoch_phases
    from trainer.algorithms.forward.loop import train

    calls, real = [], epoch_phases.sample

    def recorded(family, model, *args, **kwargs):  # the real sampler, its inputs and output kept for a replay
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        calls.append({"rng": torch.get_rng_state(), "weights": weights, "args": (family, model, *args), **kwargs})
        batch, final = real(family, model, *args, **kwargs)
        calls[-1]["final"] = final.clone()
        return batch, final

    monkeypatch.setattr(epoch_phases, "sample", recorded)
    cfg = nft_config(tmp_path, tiny_cache, "tiny-sd3", save_freq=1)
    cfg.nft.old_decay_rate, cfg.nft.old_decay_max, cfg.nft.rollout_policy = 0.2, 0.9, policy
    history = train(cfg)
    assert history[0]["global_step"] == 2 and history[0]["old_policy_decay"] == pytest.approx(0.4)  # min(0.2 x 2, 0.9)
    theta_0 = calls[0]["weights"]
    theta_1 = load_file(tmp_path / "checkpoints" / "checkpoint-1" / "trainable.safetensors")
    lagging = {n: 0.4 * theta_0[n] + 0.6 * theta_1[n] for n in theta_0}
    assert max((theta_1[n] - lagging[n]).abs().max().item() for n in theta_0) > 1e-4  # the two policies differ

    def replay(weights):
        call = calls[1]  # epoch 1's only batch
        model = call["args"][1]
        saved = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in weights:
                    p.copy_(weights[n])
        torch.set_rng_state(call["rng"])
        kwargs = {k: v for k, v in call.items() if k not in ("rng", "weights", "args", "final")}
        final = real(*call["args"], **kwargs)[1]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        return (final - call["final"]).abs().max().item()

    used, other = (lagging, theta_1) if policy == "old" else (theta_1, lagging)
    assert replay(used) < 1e-6 and replay(other) > 1e-4


def test_the_papers_recipes_are_their_configs():
    """DiffusionNFT's config/nft.py and AWM's configs, read by hand: OCR mixes at b 0.1 with a far slower old
    policy (0 for 75 steps, then 0.0075 a step up to 0.999) and AWM's KL to the base is 1e-3 (GenEval), 3e-3
    (OCR) and 1e-4 (PickScore); every NFT recipe samples with the old policy, AWM's share one draw of its 6
    strata per batch; all pool a prompt's images across the epoch."""
    ocr = Config(preset="sd3-ocr-nft")
    assert (ocr.nft.beta, ocr.nft.old_decay_flat_steps, ocr.nft.old_decay_rate, ocr.nft.old_decay_max) == (
        0.1,
        75,
        0.0075,
        0.999,
    )
    for task, kl in (("pickscore", 1e-4), ("geneval", 1e-3), ("ocr", 3e-3)):
        awm = Config(preset=f"sd3-{task}-awm")
        assert awm.train.kl_coef == kl and awm.train.timestep_shared and awm.train.timestep_span == 0.9
        nft = Config(preset=f"sd3-{task}-nft")
        assert nft.nft.rollout_policy == "old" and nft.train.group_by == awm.train.group_by == "prompt"
    assert Config(preset="sd3-pickscore-nft").nft.beta == 1.0


def test_stratified_steps_need_a_step_per_stratum():
    with pytest.raises(ValueError, match="timestep_span"):
        Config(
            preset="sd3-pickscore-awm",
            train={"timestep_fraction": 0.5, "timestep_selection": "stratified", "timestep_span": 0.5},
        )
