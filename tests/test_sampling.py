"""Sampling and training agree: before any update, re-scoring every stored step gives ratio exactly 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import Config
from trainer.families.models import family_of, load_pipeline, make_trainable
from trainer.sampling import Trajectories, rescore, sample


@pytest.fixture(scope="module")
def pipe(tiny_cache):
    cfg = Config(pretrained={"cache_dir": tiny_cache})
    pipe = load_pipeline(cfg, torch.device("cpu"))
    make_trainable(pipe.unet, cfg)
    return pipe


def test_first_step_importance_ratio_is_exactly_one(pipe):
    torch.manual_seed(0)
    negative = family_of(pipe).encode_prompts([""])
    prompts = ["cat", "dog", "a red fox", "owl"]
    trajectories, final = sample(
        family_of(pipe), pipe.unet, prompts, [{}] * 4, negative, num_steps=6, eta=1.0, guidance_scale=5.0, resolution=64
    )
    assert trajectories.latents.shape == (4, 6, 4, 8, 8) and trajectories.log_probs.shape == (4, 6)
    assert torch.isfinite(trajectories.log_probs).all()
    # x_{t-1} of step j is x_t of step j+1, stored once: both are views of one path
    assert torch.equal(trajectories.next_latents[:, :-1], trajectories.latents[:, 1:])
    assert trajectories.path.shape == (4, 7, 4, 8, 8)
    stored = sum(t.untyped_storage().nbytes() for t in (trajectories.path, trajectories.log_probs))
    assert stored == 4 * 7 * 4 * 8 * 8 * 4 + 4 * 6 * 4  # bytes: (T + 1) latents per sample, not 2 T

    images = family_of(pipe).vae.to_uint8(final)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8

    # The training path: shuffled samples, per-sample shuffled timesteps, same batch size as sampling.
    for pick in trajectories.shuffled(batch_size=4, num_timesteps=6):
        chunk = trajectories.chunk(*pick)
        for j in range(6):
            with torch.no_grad():
                log_prob, _, _ = rescore(family_of(pipe), pipe.unet, chunk, j, negative, 5.0, 1.0)
            ratio = torch.exp(log_prob - chunk.log_probs[:, j])
            assert torch.equal(ratio, torch.ones_like(ratio)), (j, ratio)
        # All six steps in one forward of 4 x 6 (train.timesteps_per_forward): another batch size, so other
        # float rounding in the kernels; the ratio is 1 within 1e-5 (a tenth of ddpo-pytorch's clip range).
        with torch.no_grad():
            log_prob, _, _ = rescore(family_of(pipe), pipe.unet, chunk, slice(0, 6), negative, 5.0, 1.0)
        assert float((log_prob - chunk.log_probs).abs().max()) < 1e-5


def test_shuffled_keeps_each_sample_consistent(pipe):
    torch.manual_seed(1)
    n, t = 6, 5
    traj = Trajectories(
        prompt_embeds=torch.arange(n).float()[:, None, None].expand(n, 2, 3),
        path=torch.arange(n * (t + 1)).float().reshape(n, t + 1, 1, 1, 1),
        log_probs=torch.arange(n * t).float().reshape(n, t),
        timesteps=torch.arange(t).repeat(n, 1) * 100,
        steps=torch.arange(t).repeat(n, 1),
    )
    seen = []
    for rows, steps_of in traj.shuffled(batch_size=2, num_timesteps=3):
        chunk = traj.chunk(rows, steps_of)
        assert chunk.latents.shape == (2, 3, 1, 1, 1)
        for i in range(2):
            sample_id = int(chunk.prompt_embeds[i, 0, 0])
            assert rows[i] == sample_id
            steps = (chunk.timesteps[i] // 100).tolist()
            assert len(set(steps)) == 3 and chunk.steps[i].tolist() == steps
            assert chunk.latents[i].flatten().tolist() == [sample_id * (t + 1) + s for s in steps]
            assert chunk.next_latents[i].flatten().tolist() == [sample_id * (t + 1) + s + 1 for s in steps]
            assert chunk.log_probs[i].tolist() == [sample_id * t + s for s in steps]
            seen.append(sample_id)
    assert sorted(seen) == list(range(n))
