"""Flow-GRPO's SDE step against an independent, element-by-element implementation of the published formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.families.ddim import gaussian_log_prob
from trainer.families.flow import flow_sde_mean_std


def reference(sigmas: list[float], i: int, v: float, x: float, noise_level: float) -> tuple[float, float]:
    s, s_next = sigmas[i], sigmas[i + 1]
    dt = s_next - s
    s_prime = sigmas[1] if s == 1.0 else s
    std_t = noise_level * math.sqrt(s / (1 - s_prime))
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    return mean, std_t * math.sqrt(-dt)


@pytest.fixture
def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's shift
    scheduler.set_timesteps(10)
    return scheduler


@pytest.mark.parametrize("noise_level", [0.7, 0.3])
def test_mean_std_and_log_prob_match_the_formula(scheduler, noise_level):
    rng = np.random.default_rng(0)
    sigmas = scheduler.sigmas.tolist()
    x, v = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal((4, 2, 3, 3))
    index = torch.tensor([0, 3, 7, 9])  # the first step (s == 1), middle ones and the last (s_next == 0)
    mean, std = flow_sde_mean_std(scheduler.sigmas, index, torch.tensor(v), torch.tensor(x), noise_level)
    x_next = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    for n, i in enumerate(index.tolist()):
        expected = np.vectorize(lambda a, b: reference(sigmas, i, b, a, noise_level))(x[n], v[n])
        np.testing.assert_allclose(mean[n].numpy(), expected[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(std[n].expand_as(mean[n]).numpy(), expected[1], rtol=1e-6, atol=1e-7)
        # log p averaged over C, H, W, as Flow-GRPO and DDPO
        sd = expected[1]
        log_p = np.mean(
            -((x_next[n].numpy() - expected[0]) ** 2) / (2 * sd**2) - np.log(sd) - math.log(math.sqrt(2 * math.pi))
        )
        assert gaussian_log_prob(x_next[n : n + 1], mean[n : n + 1], std[n : n + 1]).item() == pytest.approx(
            log_p, rel=1e-5
        )


def test_noise_level_zero_is_the_schedulers_euler_step(scheduler):
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for i, t in enumerate(scheduler.timesteps):
        mean, std = flow_sde_mean_std(scheduler.sigmas, i, v, x, noise_level=0.0)
        scheduler._step_index = None  # step() looks its index up from t
        euler = scheduler.step(v, t, x).prev_sample
        torch.testing.assert_close(mean, euler, rtol=1e-6, atol=1e-6)
        assert float(std.abs().max()) == 0.0


def cps_reference(sigmas: list[float], i: int, v: float, x: float, noise_level: float) -> tuple[float, float]:
    s, s_next = sigmas[i], sigmas[i + 1]
    std = s_next * math.sin(noise_level * math.pi / 2)
    x0, x1 = x - s * v, x + (1 - s) * v
    return x0 * (1 - s_next) + x1 * math.sqrt(s_next**2 - std**2), std


@pytest.mark.parametrize("noise_level", [0.8, 0.0])
def test_cps_step_matches_its_formula_and_is_euler_without_noise(scheduler, noise_level):
    from trainer.families.flow import flow_cps_mean_std

    rng = np.random.default_rng(2)
    sigmas = scheduler.sigmas.tolist()
    x, v = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal((4, 2, 3, 3))
    index = torch.tensor([0, 3, 7, 9])
    mean, std = flow_cps_mean_std(scheduler.sigmas, index, torch.tensor(v), torch.tensor(x), noise_level)
    for n, i in enumerate(index.tolist()):
        expected = np.vectorize(lambda a, b: cps_reference(sigmas, i, b, a, noise_level))(x[n], v[n])
        np.testing.assert_allclose(mean[n].numpy(), expected[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(std[n].expand_as(mean[n]).numpy(), expected[1], rtol=1e-6, atol=1e-7)
        if noise_level == 0:
            euler = x[n] + v[n] * (sigmas[i + 1] - sigmas[i])
            np.testing.assert_allclose(mean[n].numpy(), euler, rtol=1e-5, atol=1e-6)


def flow_grpo_kl_reference(
    sigmas: list[float], i: int, mean: np.ndarray, mean_ref: np.ndarray, noise_level: float, sde_type: str
) -> float:
    """The KL line of Flow-GRPO's scripts/train_sd3.py, mean((mean - mean_ref)^2) / (2 std_dev_t^2), with the
    std_dev_t its sde_step_with_logprob returns: noise_level sqrt(s / (1 - s')) for the SDE (no sqrt(-dt)),
    s_next sin(noise_level pi / 2) for CPS."""
    s, s_next = sigmas[i], sigmas[i + 1]
    if sde_type == "sde":
        std_dev_t = noise_level * math.sqrt(s / (1 - (sigmas[1] if s == 1.0 else s)))
    else:
        std_dev_t = s_next * math.sin(noise_level * math.pi / 2)
    return float(np.mean((mean - mean_ref) ** 2) / (2 * std_dev_t**2))


@pytest.mark.parametrize("sde_type, steps", [("sde", [0, 5, 9]), ("cps", [0, 5, 8])])  # first, middle, last trained
def test_kl_is_flow_grpos_at_the_first_a_middle_and_the_last_step(scheduler, sde_type, steps):
    from trainer.families.flow import FLOW_STEPS, flow_grpo_kl

    rng = np.random.default_rng(3)
    sigmas, noise_level = scheduler.sigmas.tolist(), 0.7
    x, v, v_ref = (torch.tensor(rng.standard_normal((3, 2, 4, 4))) for _ in range(3))
    index = torch.tensor(steps)
    mean, std = FLOW_STEPS[sde_type](scheduler.sigmas, index, v, x, noise_level)
    mean_ref, _ = FLOW_STEPS[sde_type](scheduler.sigmas, index, v_ref, x, noise_level)
    ours = flow_grpo_kl(scheduler.sigmas, index, mean, mean_ref, std, sde_type)
    expected = [
        flow_grpo_kl_reference(sigmas, i, mean[n].numpy(), mean_ref[n].numpy(), noise_level, sde_type)
        for n, i in enumerate(steps)
    ]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)
    # The exact KL of the two transitions (equal std) is |dt| times smaller for the SDE, the same for CPS.
    exact = ((mean - mean_ref) ** 2 / (2 * std**2)).mean(dim=(1, 2, 3)).numpy()
    dt = np.array([sigmas[i] - sigmas[i + 1] for i in steps])
    np.testing.assert_allclose(exact, np.array(expected) / (dt if sde_type == "sde" else 1), rtol=1e-5)


def test_cps_log_prob_drops_every_constant_and_the_ratio_keeps_its_scale(scheduler):
    """Flow-GRPO's CPS log-prob is -mean((x_next - mean)^2): the log-ratio of two means is its difference,
    not the Gaussian's, which is 1 / (2 std^2) times larger."""
    from trainer.families.flow import cps_log_prob, flow_cps_mean_std

    rng = np.random.default_rng(4)
    x, v = torch.tensor(rng.standard_normal((3, 2, 4, 4))), torch.tensor(rng.standard_normal((3, 2, 4, 4)))
    index = torch.tensor([0, 5, 8])
    mean, std = flow_cps_mean_std(scheduler.sigmas, index, v, x, 0.8)
    x_next = mean + std * torch.tensor(rng.standard_normal(mean.shape))
    expected = [-np.mean((x_next[n].numpy() - mean[n].numpy()) ** 2) for n in range(3)]
    np.testing.assert_allclose(cps_log_prob(x_next, mean, std).numpy(), expected, rtol=1e-6)
    shifted = mean + 0.01
    theirs = cps_log_prob(x_next, shifted) - cps_log_prob(x_next, mean)
    gaussian = gaussian_log_prob(x_next, shifted, std) - gaussian_log_prob(x_next, mean, std)
    np.testing.assert_allclose(gaussian.numpy(), (theirs / (2 * std.reshape(-1) ** 2)).numpy(), rtol=1e-4)
