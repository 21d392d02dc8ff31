"""The DDIM log-prob step against independent computations: a Gaussian density and diffusers' own step."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from trainer.families.ddim import ddim_mean_std, ddim_step_with_logprob


def make_scheduler(prediction_type="epsilon", steps=10):
    s = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_sample_matches_diffusers_step_with_the_same_noise(prediction_type, eta):
    scheduler = make_scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    out = torch.randn(3, 4, 8, 8, generator=g)
    for t in scheduler.timesteps[[0, 5, -1]]:  # -1: the last step, where alpha_prev is final_alpha_cumprod
        ours, _ = ddim_step_with_logprob(scheduler, out, t, x, eta, generator=torch.Generator().manual_seed(1))
        mine_noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        theirs = scheduler.step(out, t, x, eta=eta, variance_noise=mine_noise).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_log_prob_is_the_mean_gaussian_log_density():
    scheduler = make_scheduler()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = scheduler.timesteps[3]
    prev, log_prob = ddim_step_with_logprob(scheduler, eps, t, x, eta=1.0, generator=g)

    # Independent: mean and std from the DDIM formulas in float64, density from torch.distributions.
    a = scheduler.alphas_cumprod.double()
    a_t, a_prev = a[t], a[t - 1000 // 10]
    x64, eps64 = x.double(), eps.double()
    x0 = (x64 - (1 - a_t).sqrt() * eps64) / a_t.sqrt()
    sigma = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps64
    expected = torch.distributions.Normal(mean, sigma).log_prob(prev.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-5)
    # Re-scoring the stored sample gives the same number.
    _, again = ddim_step_with_logprob(scheduler, eps, t, x, eta=1.0, prev_sample=prev)
    assert torch.equal(again, log_prob)


def test_per_sample_timesteps_equal_scalar_steps():
    scheduler = make_scheduler()
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ts = scheduler.timesteps[[0, 4, 9]]
    prev = torch.randn(3, 4, 8, 8, generator=g)
    _, batched = ddim_step_with_logprob(scheduler, eps, ts, x, 1.0, prev_sample=prev)
    for i, t in enumerate(ts):
        _, single = ddim_step_with_logprob(scheduler, eps[i : i + 1], t, x[i : i + 1], 1.0, prev_sample=prev[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=1e-6)


def test_eta_zero_gives_finite_log_probs():
    scheduler = make_scheduler()
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    prev, log_prob = ddim_step_with_logprob(scheduler, eps, scheduler.timesteps[2], x, eta=0.0)
    assert torch.isfinite(prev).all() and torch.isfinite(log_prob).all()
    # a deterministic step: the sample sits on the mean, density = -log(sigma_min) - log sqrt(2 pi)
    assert log_prob == pytest.approx(torch.full((2,), -math.log(1e-6) - 0.5 * math.log(2 * math.pi)), rel=1e-6)


def test_a_sampling_step_never_reads_a_tensor_on_the_host():
    """Sampling gives the step one timestep for the whole batch: indexing the schedule with it as a 0-d tensor
    would read it on the host, a GPU sync per step. Fake tensors raise on any such read."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer.families.flow import FLOW_STEPS

    ddim, flow = DDIMScheduler(set_alpha_to_one=False), FlowMatchEulerDiscreteScheduler(shift=3.0)
    ddim.set_timesteps(10)
    flow.set_timesteps(10)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 4, 8, 8)
        mean, sigma = ddim_mean_std(ddim, x, ddim.timesteps[3], x, 1.0)
        assert mean.shape == x.shape and sigma.numel() == 1
        for step in FLOW_STEPS.values():
            assert step(flow.sigmas, 3, x, x, 0.7)[0].shape == x.shape
