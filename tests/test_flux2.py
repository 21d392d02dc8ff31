"""The FLUX.2 [klein] family (trainer/families/flux2.py) on tiny-flux2 and its base-model twin: Flux2KleinPipeline's
own sampling reproduced bit for bit (its guidance convention, its schedule shift, its latent normalisation), exact
re-scoring, every algorithm, LoRA the pipeline loads, the command line with evaluation, the shard units."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import assert_trained
from tests.test_families import assert_rescored_exactly
from trainer.config import Config
from trainer.families.models import load_family, make_trainable
from trainer.sampling import sample

pytestmark = pytest.mark.slow

TOKENS = 32  # tiny-flux2's tokenizer's model_max_length, which the family encodes
PROMPTS = ["a cat", "a red owl"]


def flux2(tiny_cache, distilled: bool = True, **groups):
    from trainer.families.tiny_flux2 import tiny_flux2_path

    path = str(tiny_flux2_path(tiny_cache, distilled=distilled))
    cfg = Config(preset="tiny-flux2", **groups, pretrained={"model": path})
    family = load_family(cfg, torch.device("cpu"))
    assert type(family).__name__ == "Flux2" and family.distilled == distilled  # told by its pipeline class
    return cfg, family


def pipeline_output(family, prompts, steps: int, guidance: float, seed: int, output_type: str = "latent"):
    """Flux2KleinPipeline's own sampling from its own noise (the generator's): the reference our sampler must
    equal. Its "latent" output is the VAE's raw latents (the normalisation undone, unpatchified)."""
    return family.pipe(
        prompt=prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=64,
        width=64,
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    ).images


def raw(family, latents: torch.Tensor) -> torch.Tensor:
    """Our (N, C, h, w) normalised latents as the pipeline un-normalises them before decoding."""
    from diffusers import Flux2KleinPipeline as P

    mean, std = family.vae._stats(latents)
    return P._unpatchify_latents(P._patchify_latents(latents) * std + mean)


@pytest.mark.parametrize("distilled", [True, False])
def test_deterministic_sampling_is_the_pipelines_own(tiny_cache, distilled):
    """Noise level 0 is the scheduler's Euler step: our sampler and Flux2KleinPipeline agree bit for bit from the
    same generator. The base model's guidance is real CFG (a second pass: scale 4 differs from 1); the distilled
    model's scale changes nothing, as the pipeline ignores it."""
    _, family = flux2(tiny_cache, distilled)
    negative = family.encode_prompts([""])
    ours, final = sample(
        family,
        family.denoiser,
        PROMPTS,
        [{}, {}],
        negative,
        4,
        0.0,
        4.0,
        64,
        generator=torch.Generator().manual_seed(3),
    )
    assert final.shape == (2, 8, 8, 8) and torch.equal(
        ours.latents[:, 0], family.initial_latents(2, 64, torch.Generator().manual_seed(3), "cpu")
    )
    assert torch.equal(raw(family, final), pipeline_output(family, PROMPTS, 4, 4.0, 3))
    unguided = pipeline_output(family, PROMPTS, 4, 1.0, 3)
    assert (float((unguided - raw(family, final)).abs().max()) > 1e-3) != distilled
    # the images: the pipeline's own decoding, to uint8 rounding
    theirs = pipeline_output(family, PROMPTS, 4, 4.0, 3, "np")
    assert np.abs(theirs * 255 - family.vae.to_uint8(final)).max() <= 0.5 + 1e-4


def test_the_schedule_is_flux2s_empirical_shift(tiny_cache):
    """sigmas = exp(mu) / (exp(mu) + 1/t - 1) at t = linspace(1, 1/n, n), then 0, with mu compute_empirical_mu's
    line in the steps (between its 10- and 200-step lines, linear in the image tokens); DPO's noising warps u by
    the mu of the sampler's step count."""
    for resolution, steps in ((64, 4), (128, 8)):
        _, family = flux2(tiny_cache, sample={"resolution": resolution, "num_steps": steps})
        tokens = (resolution // 16) ** 2
        m10, m200 = 8.73809524e-05 * tokens + 1.89833333, 0.00016927 * tokens + 0.45666666
        mu = m200 + (steps - 200) * (m200 - m10) / 190
        t = np.linspace(1.0, 1 / steps, steps)
        expected = np.append(math.exp(mu) / (math.exp(mu) + 1 / t - 1), 0.0)
        family.dynamics.timesteps(steps, "cpu")
        np.testing.assert_allclose(family.pipe.scheduler.sigmas.numpy(), expected, rtol=1e-6)
        size = resolution // 8
        x0, eps = torch.randn(3, 8, size, size, dtype=torch.float64), torch.randn(3, 8, size, size, dtype=torch.float64)
        u = torch.tensor([0.0, 0.5, 0.9], dtype=torch.float64)
        noisy, timesteps, target = family.dynamics.noised(x0, eps, u)
        s = (math.exp(mu) * u / (math.exp(mu) * u + 1 - u)).view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, (1 - s) * x0 + s * eps)
        torch.testing.assert_close(timesteps, s.flatten() * 1000)
        torch.testing.assert_close(target, eps - x0)
    with pytest.raises(ValueError, match="sample.resolution: the FLUX.2 schedule is shifted for 128 px"):
        family.initial_latents(1, 64, None, "cpu")


def test_the_vae_round_trips_through_the_pipelines_normalisation(tiny_cache):
    """encode is the inverse of the normalisation decode undoes: the latents of an image, decoded and encoded
    again with the posterior's mean, come back; and the normalisation is the VAE's batch-norm statistics."""
    _, family = flux2(tiny_cache)
    bn = family.pipe.vae.bn
    assert float(bn.running_mean.abs().max()) > 0.1 and float((bn.running_var - 1).abs().max()) > 0.1
    latents = torch.randn(2, 8, 8, 8)
    mean, std = family.vae._stats(latents)
    assert mean.shape == (1, 32, 1, 1) and torch.allclose(std.flatten(), (bn.running_var + 1e-4).sqrt())
    images = family.vae.decode(latents)
    assert images.shape == (2, 3, 64, 64) and 0 <= float(images.min()) <= float(images.max()) <= 1
    again = family.vae.encode(images, torch.Generator().manual_seed(0))
    assert again.shape == latents.shape and torch.isfinite(again).all()


@pytest.mark.parametrize("distilled, sde_type, eta", [(True, "sde", 0.5), (True, "cps", 0.8), (False, "sde", 0.7)])
def test_first_step_importance_ratio_is_exactly_one(tiny_cache, distilled, sde_type, eta):
    cfg, family = flux2(tiny_cache, distilled, sample={"sde_type": sde_type, "eta": eta})
    make_trainable(family.denoiser, cfg)
    negative = family.encode_prompts([""])
    torch.manual_seed(0)
    window = range(3) if sde_type == "cps" else None  # CPS's last step has std 0
    batch, _ = sample(family, family.denoiser, PROMPTS, [{}, {}], negative, 4, eta, 4.0, 64, window=window)
    assert batch.latents.shape == (2, 3 if window else 4, 8, 8, 8) and torch.isfinite(batch.log_probs).all()
    assert_rescored_exactly(family, batch, negative, 4.0, eta)


def run_config(tmp_path, tiny_cache, algorithm: str, lora: bool = True, **groups) -> Config:
    """2 epochs (or 2 steps) of ``algorithm`` on tiny-flux2, small batches."""
    settings = {
        "ddpo": {},
        "nft": {"sample": {"eta": 0.0}, "train": {"timestep_fraction": 0.5, "timestep_selection": "random"}},
        "awm": {"sample": {"eta": 0.0}, "train": {"timestep_fraction": 0.5, "timestep_selection": "random"}},
        "dgpo": {"sample": {"eta": 0.0}, "dgpo": {"num_timesteps": 2, "trunc": 0.75, "switch_ema_ref": 2}},
        "refl": {
            "reward": {"scorer": "aesthetic", "options": {"checkpoint": "tiny-shapes"}},
            "refl": {"num_steps": 4, "mid_low": 2, "mid_high": 3, "max_train_steps": 2},
        },
        "dpo": {
            "sample": {"eta": 0.0, "batch_size": 4},
            "dpo": {"online": True, "online_pairs": 4, "max_train_steps": 2, "checkpointing_steps": 0},
        },
    }[algorithm]
    sample_ = {"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 1, "images_per_prompt": 2}
    merged = {
        "sample": {**sample_, **settings.get("sample", {}), **groups.pop("sample", {})},
        "train": {"batch_size": 2, "gradient_accumulation_steps": 1, "lora": lora, **settings.get("train", {})},
    }
    merged |= {k: v for k, v in settings.items() if k not in merged}
    return Config(
        preset="tiny-flux2",
        algorithm=algorithm,
        run={"output_dir": tmp_path, "num_epochs": 2, "log_with": "none", "log_images_every": 0},
        pretrained={"cache_dir": tiny_cache},
        **merged,
        **groups,
    )


@pytest.mark.parametrize("algorithm", ["ddpo", "nft", "awm", "dgpo", "refl", "dpo"])
def test_every_algorithm_trains_the_lora(tmp_path, tiny_cache, algorithm):
    from trainer import train

    history = train(run_config(tmp_path, tiny_cache, algorithm))
    assert len(history) == 2
    assert_trained(tmp_path, [m["loss"] for m in history])
    keys = (tmp_path / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    for target in ("attn.to_add_out", "ff_context.linear_out", "single_transformer_blocks.1.attn.to_qkv_mlp_proj"):
        assert target.encode() in keys, target  # the anchors' targets, double- and single-stream


def test_a_full_finetune_trains_the_transformer(tmp_path, tiny_cache):
    from safetensors.torch import load_file

    from trainer import train
    from trainer.families.tiny_flux2 import tiny_flux2_path

    history = train(run_config(tmp_path, tiny_cache, "nft", lora=False))
    assert len(history) == 2 and all(math.isfinite(m["loss"]) for m in history)
    tuned = load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_flux2_path(tiny_cache) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert tuned.keys() == base.keys() and max(float((tuned[k] - base[k]).abs().max()) for k in base) > 0


def test_the_lora_loads_into_the_pipeline_and_changes_its_images(tmp_path, tiny_cache):
    from diffusers import Flux2KleinPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from trainer import train
    from trainer.families.tiny_flux2 import tiny_flux2_path

    train(run_config(tmp_path, tiny_cache, "ddpo"))
    saved = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_path(tiny_cache))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, height=64, width=64, max_sequence_length=TOKENS, output_type="np")
    base = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="grpo")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="grpo")
    assert len(loaded) == len(saved) and all(
        torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in saved.items()
    )
    tuned = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(base - tuned).max() > 0
    pipe.unload_lora_weights()
    assert np.array_equal(pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).images, base)


def test_the_cli_trains_nft_and_evaluates(tmp_path, tiny_cache):
    out = tmp_path / "run"
    flags = ["--pretrained.cache_dir", str(tiny_cache), "--run.output_dir", str(out), "--run.log_with", "none"]
    flags += ["--run.eval_every", "1", "--sample.batch_size", "4", "--sample.num_batches_per_epoch", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "--preset", "tiny-flux2", "--algorithm", "nft", "--run.num_epochs", "1"]
        + flags
        + ["--train.batch_size", "2", "--sample.eta", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [0]
    assert_trained(out, [m["loss"] for m in history])
    evaluations = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evaluations and all(math.isfinite(e["reward_mean"]) for e in evaluations)


def test_evaluation_is_the_pipelines_sampling_image_by_image(tiny_cache):
    from trainer.evaluate import evaluate
    from trainer.rewards import Rewards

    cfg, family = flux2(tiny_cache, distilled=False)
    rewards = Rewards(cfg.reward)
    try:
        images, _ = evaluate(
            family,
            family.denoiser,
            ["a cat", "an owl"],
            [{}] * 2,
            rewards,
            num_steps=4,
            guidance_scale=4.0,
            resolution=64,
            seeds=[7, 8],
            batch_size=2,
        )
    finally:
        rewards.close()
    theirs = pipeline_output(family, ["an owl"], 4, 4.0, 8, "np")
    assert np.abs(theirs[0] * 255 - images[1]).max() <= 0.5 + 1e-4


def test_the_shard_units_are_the_transformers_blocks(tiny_cache):
    _, family = flux2(tiny_cache)
    found = {type(m).__name__ for m in family.denoiser.modules()}
    assert set(family.shard_blocks) <= found
    counts = [sum(type(m).__name__ == name for m in family.denoiser.modules()) for name in family.shard_blocks]
    assert counts == [1, 2]  # tiny-flux2's one double-stream and two single-stream blocks


def test_the_flow_factory_recipes():
    """flux2-klein-pickscore-grpo and -nft as Flow-Factory's examples run them on 8 GPUs: 48 groups of 16 an
    epoch at 384 px, two optimizer steps (GRPO) or one (NFT), their steps, guidance, noise and learning rates."""
    from trainer.plan import BatchPlan

    grpo, nft = Config(preset="flux2-klein-pickscore-grpo"), Config(preset="flux2-klein-pickscore-nft")
    for cfg, steps in ((grpo, 2), (nft, 1)):
        plan = BatchPlan.of(cfg, 8)
        assert (plan.samples_per_epoch, plan.optimizer_steps_per_epoch) == (48 * 16, steps)
        assert (cfg.sample.resolution, cfg.sample.images_per_prompt, cfg.train.lora_rank, cfg.train.lora_alpha) == (
            384,
            16,
            64,
            128.0,
        )
        assert cfg.reward.scorer == "pickscore" and cfg.train.kl_coef == 0.0 and cfg.run.mixed_precision == "bf16"
    assert grpo.pretrained.model == "black-forest-labs/FLUX.2-klein-4B" and grpo.algorithm == "ddpo"
    assert (grpo.sample.num_steps, grpo.sample.guidance_scale, grpo.sample.eta, grpo.train.learning_rate) == (
        4,
        1.0,
        0.5,
        3e-4,
    )
    assert (grpo.ddpo.timestep_window, grpo.ddpo.clip_range) == (1, 1e-4)
    d = grpo.ddpo  # its sde_steps [1, 2]
    assert (d.timestep_window_earliest_start, d.timestep_window_latest_start) == (1, 2)
    assert nft.pretrained.model == "black-forest-labs/FLUX.2-klein-base-4B" and nft.algorithm == "nft"
    assert (nft.sample.num_steps, nft.sample.guidance_scale, nft.sample.eta, nft.train.learning_rate) == (
        8,
        4.0,
        0.0,
        1e-4,
    )
    assert nft.nft.beta == 0.1 and BatchPlan.of(nft, 8).train_timesteps == 2
