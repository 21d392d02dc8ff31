"""Diffusion-DPO's loss against an independent implementation of the published formula (Wallace et al. 2023)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.loss import diffusion_dpo_loss


def reference_loss_and_grad(mw, ml, rw, rl, beta):
    """float64 numpy: loss = mean(log(1 + exp(-x))), x = -beta/2 ((mw - ml) - (rw - rl)); d loss / d mw, d ml."""
    x = -0.5 * beta * ((mw - ml) - (rw - rl))
    loss = np.mean(np.logaddexp(0.0, -x))
    dx = -1.0 / (1.0 + np.exp(x)) / len(x)  # d/dx log(1 + e^-x) = -sigmoid(-x)
    return loss, dx * (-0.5 * beta), dx * (0.5 * beta)


def test_loss_and_gradient_match_the_formula():
    rng = np.random.default_rng(0)
    mw, ml, rw, rl = (rng.uniform(0.05, 0.2, 16) for _ in range(4))
    model_w = torch.tensor(mw, requires_grad=True)
    model_l = torch.tensor(ml, requires_grad=True)
    loss, stats = diffusion_dpo_loss(model_w, model_l, torch.tensor(rw), torch.tensor(rl), beta=5000.0)
    loss.backward()
    expected, grad_w, grad_l = reference_loss_and_grad(mw, ml, rw, rl, 5000.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(model_w.grad.numpy(), grad_w, rtol=1e-6)
    np.testing.assert_allclose(model_l.grad.numpy(), grad_l, rtol=1e-6)
    x = -2500.0 * ((mw - ml) - (rw - rl))
    assert stats["implicit_accuracy"].item() == pytest.approx(np.mean(x > 0))


def test_the_policy_equal_to_its_reference_gives_log_2_and_no_implicit_accuracy():
    errors = torch.rand(2, 8, dtype=torch.float64)
    loss, stats = diffusion_dpo_loss(errors[0], errors[1], errors[0].clone(), errors[1].clone(), beta=5000.0)
    assert loss.item() == math.log(2) and stats["implicit_accuracy"].item() == 0.0
