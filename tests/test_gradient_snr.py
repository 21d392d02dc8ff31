"""bench.gradient_snr: its estimator against known signal and noise, and a real (tiny) recipe measured."""

from __future__ import annotations

import numpy as np
import pytest

from bench import gradient_snr


@pytest.mark.parametrize("signal_to_noise", [0.02, 0.5, 4.0])
def test_the_estimator_recovers_a_known_ratio(signal_to_noise):
    rng = np.random.default_rng(0)
    dims, k, sigma = 2000, 64, 0.3
    mu = rng.normal(size=dims)
    mu *= np.sqrt(signal_to_noise * dims * sigma**2) / np.linalg.norm(mu)  # |mu|^2 / E|noise|^2 as asked
    out = gradient_snr.snr(mu + sigma * rng.normal(size=(k, dims)))
    assert out["estimates"] == k
    # The estimate's own noise: sqrt(2 / (k dims)) of the noise term relative to the signal, plus sampling.
    assert out["signal_to_noise_per_step"] == pytest.approx(signal_to_noise, rel=0.1, abs=0.01)
    # Halves of k/2 estimates each: cos = s / (s + 2 / k) for signal share s, by the same independence.
    expected = signal_to_noise / (signal_to_noise + 2 / k)
    assert out["halves_cosine"] == pytest.approx(expected, abs=0.08)


def test_pure_noise_reads_zero():
    out = gradient_snr.snr(np.random.default_rng(1).normal(size=(32, 5000)))
    assert abs(out["signal_to_noise_per_step"]) < 0.01 and abs(out["halves_cosine"]) < 0.1


@pytest.mark.slow
def test_a_recipe_is_measured_without_moving_the_weights(tiny_cache):
    import torch

    torch.set_num_threads(1)
    args = [
        "--preset",
        "tiny",
        "--pretrained.cache_dir",
        str(tiny_cache),
        "--sample.num_steps",
        "4",
        "--sample.batch_size",
        "4",
        "--sample.num_batches_per_epoch",
        "1",
        "--train.batch_size",
        "2",
        "--train.gradient_accumulation_steps",
        "1",
    ]
    out = gradient_snr.measure(args, steps=4)
    assert out["estimates"] == 4 and out["effective_batch"] == 2 and out["gradient_norm"] > 0
    assert np.isfinite(out["signal_to_noise_per_step"]) and out["seconds_per_sample"] > 0
    # No optimizer step was taken, so every PPO ratio is exactly 1 and nothing is clipped.
    assert out["clipfrac"] == 0.0 and out["ratio"] == 1.0
