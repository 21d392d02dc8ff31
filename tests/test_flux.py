"""The FLUX.1 family (trainer/families/flux.py) on tiny-flux: FluxPipeline's own sampling reproduced, its size-shifted
schedule and guidance input, exact re-scoring and resume, every algorithm, LoRA FluxPipeline loads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_families import assert_rescored_exactly
from trainer.config import Config
from trainer.families.flux import pack, unpack
from trainer.families.models import load_family, make_trainable
from trainer.sampling import sample

pytestmark = pytest.mark.slow

TOKENS = 32  # tiny-flux's T5 tokenizer's model_max_length, which the family encodes


def flux(tiny_cache, guidance: bool = True, **groups):
    from trainer.families.tiny_pipeline import tiny_flux_path

    cfg = Config(preset="tiny-flux", **groups, pretrained={"model": str(tiny_flux_path(tiny_cache, guidance=guidance))})
    family = load_family(cfg, torch.device("cpu"))
    assert type(family).__name__ == "Flux" and family.guided == guidance  # told by its pipeline class
    return cfg, family


def pipeline_latents(family, prompts, start, steps: int, guidance: float) -> torch.Tensor:
    """FluxPipeline's own sampling from the packed ``start``, unpacked: the reference our sampler must equal."""
    size = start.shape[-1]
    out = family.pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size * 8,
        width=size * 8,
        max_sequence_length=TOKENS,
        latents=pack(start.clone()),
        output_type="latent",
    ).images
    return unpack(out, size, size)


@pytest.mark.parametrize("guidance", [True, False])
def test_deterministic_sampling_is_the_pipelines_own(tiny_cache, guidance):
    """Noise level 0 is the scheduler's Euler step: our sampler and FluxPipeline agree exactly, the guidance input
    included (FLUX.1-dev-like) or absent (schnell-like, where the scale changes nothing; its fixed shift 1 gives
    the plain linspace sigmas)."""
    _, family = flux(tiny_cache, guidance)
    if not guidance:
        family.dynamics.timesteps(4, "cpu")
        np.testing.assert_allclose(family.pipe.scheduler.sigmas.numpy(), [1.0, 0.75, 0.5, 0.25, 0.0], rtol=1e-6)
        x0, eps, u = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([0.2, 0.7])
        noisy, timesteps, _ = family.dynamics.noised(x0, eps, u)  # DPO's noising: unshifted too
        torch.testing.assert_close(noisy, (1 - u.view(-1, 1, 1, 1)) * x0 + u.view(-1, 1, 1, 1) * eps)
        torch.testing.assert_close(timesteps, u * 1000)
    prompts, negative = ["a cat", "a red owl"], family.encode_prompts([""])
    start = family.initial_latents(2, 64, torch.Generator().manual_seed(3), "cpu")
    ours, final = sample(
        family,
        family.denoiser,
        prompts,
        [{}, {}],
        negative,
        8,
        0.0,
        3.5,
        64,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(ours.latents[:, 0], start) and final.shape == (2, 16, 8, 8)
    assert torch.equal(final, pipeline_latents(family, prompts, start, 8, 3.5))
    # the pipeline's own noise from the same generator is ours, packed
    drawn = family.pipe(
        prompts,
        num_inference_steps=8,
        guidance_scale=3.5,
        height=64,
        width=64,
        max_sequence_length=TOKENS,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    assert torch.equal(unpack(drawn, 8, 8), final)
    other = pipeline_latents(family, prompts, start, 8, 5.0)
    assert (float((other - final).abs().max()) > 1e-3) == guidance  # the guidance input is used, or there is none
    assert family.vae.to_uint8(final).shape == (2, 64, 64, 3)


def test_the_schedule_is_shifted_by_image_size_as_flux_computes_it(tiny_cache):
    """sigmas = exp(mu) / (exp(mu) + 1/t - 1) at t = linspace(1, 1/n, n), then 0, with mu linear in the image
    tokens (0.5 at 256, 1.15 at 4096); the noising for DPO follows the same warp of u at the latents' size."""
    for resolution in (64, 128):
        _, family = flux(tiny_cache, sample={"resolution": resolution})
        tokens = (resolution // 16) ** 2
        mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
        t = np.linspace(1.0, 1 / 6, 6)
        expected = np.append(math.exp(mu) / (math.exp(mu) + 1 / t - 1), 0.0)
        family.dynamics.timesteps(6, "cpu")
        np.testing.assert_allclose(family.pipe.scheduler.sigmas.numpy(), expected, rtol=1e-6)
        np.testing.assert_allclose(family.pipe.scheduler.timesteps.numpy(), expected[:-1] * 1000, rtol=1e-6)
        size = resolution // 8
        x0, eps = (
            torch.randn(3, 16, size, size, dtype=torch.float64),
            torch.randn(3, 16, size, size, dtype=torch.float64),
        )
        u = torch.tensor([0.0, 0.5, 0.9], dtype=torch.float64)
        noisy, timesteps, target = family.dynamics.noised(x0, eps, u)
        s = (math.exp(mu) * u / (math.exp(mu) * u + 1 - u)).view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, (1 - s) * x0 + s * eps)
        torch.testing.assert_close(timesteps, s.flatten() * 1000)
        torch.testing.assert_close(target, eps - x0)
    with pytest.raises(ValueError, match="sample.resolution: the FLUX schedule is shifted for 128 px"):
        family.initial_latents(1, 64, None, "cpu")


def test_settings_flux_cannot_honour_are_refused_before_loading(tiny_cache, monkeypatch):
    from diffusers import FluxPipeline

    monkeypatch.setattr(FluxPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(ValueError, match="pretrained.load_t5: false leaves SD3's T5 out; FLUX's prompt tokens"):
        load_family(
            Config(preset="tiny-flux", pretrained={"cache_dir": tiny_cache, "load_t5": False}), torch.device("cpu")
        )
    with pytest.raises(ValueError, match="max_sequence_length"):
        Config(preset="tiny-flux", pretrained={"max_sequence_length": 513})


def test_the_guidance_input_is_the_callers_scale_or_the_runs(tiny_cache):
    """With a negative (a caller asking for guidance) the scale is the transformer's guidance input; the plain
    conditional prediction (no negative) is the model at the run's sample.guidance_scale; the negative is
    never run (one transformer call)."""
    cfg, family = flux(tiny_cache)
    assert cfg.sample.guidance_scale == family.guidance == 3.5
    cond, negative = family.encode_prompts(["a cat", "a dog"]), family.encode_prompts([""])
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([900.0, 400.0])
    calls = []
    handle = family.denoiser.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["guidance"]), with_kwargs=True
    )
    with torch.no_grad():
        plain = family.predict(family.denoiser, x, t, cond, None, 1.0)
        guided = family.predict(family.denoiser, x, t, cond, negative, 3.5)
        other = family.predict(family.denoiser, x, t, cond, negative, 1.0)
    handle.remove()
    assert torch.equal(plain, guided) and float((plain - other).abs().max()) > 1e-3
    assert [g.tolist() for g in calls] == [[3.5, 3.5], [3.5, 3.5], [1.0, 1.0]]


@pytest.mark.parametrize("sde_type, eta", [("sde", 0.9), ("cps", 0.8)])
def test_first_step_importance_ratio_is_exactly_one(tiny_cache, sde_type, eta):
    cfg, family = flux(tiny_cache, sample={"sde_type": sde_type, "eta": eta})
    make_trainable(family.denoiser, cfg)
    negative = family.encode_prompts([""])
    torch.manual_seed(0)
    window = range(5) if sde_type == "cps" else None  # CPS's last step has std 0
    batch, _ = sample(family, family.denoiser, ["a cat", "an owl"], [{}, {}], negative, 6, eta, 3.5, 64, window=window)
    assert batch.latents.shape == (2, 5 if window else 6, 16, 8, 8) and torch.isfinite(batch.log_probs).all()
    assert_rescored_exactly(family, batch, negative, 3.5, eta)


def run_config(tmp_path, tiny_cache, epochs: int, sde_type: str = "sde", algorithm: str = "ddpo", **run) -> Config:
    sample_ = {"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 2, "images_per_prompt": 2}
    if sde_type == "cps":
        sample_ |= {"sde_type": "cps", "eta": 0.8}
    return Config(
        preset="tiny-flux",
        algorithm=algorithm,
        run={"output_dir": tmp_path, "num_epochs": epochs, "log_with": "none", "log_images_every": 0, **run},
        pretrained={"cache_dir": tiny_cache},
        sample=sample_,
        train={"batch_size": 2},
    )


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_flow_grpo_trains_resumes_exactly_and_saves_a_lora_flux_loads(tmp_path, tiny_cache, sde_type):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from trainer.algorithms.ddpo.loop import train
    from trainer.families.tiny_pipeline import tiny_flux_path

    history = train(run_config(tmp_path / "straight", tiny_cache, 3, sde_type))
    assert [m["epoch"] for m in history] == [0, 1, 2] and all(np.isfinite(m["loss"]) for m in history)
    assert all(m["kl_to_reference"] > 0 for m in history)  # the KL path ran, and the weights moved
    train(run_config(tmp_path / "resumed", tiny_cache, 2, sde_type, save_freq=1))
    again = train(run_config(tmp_path / "resumed", tiny_cache, 3, sde_type, resume_from=tmp_path / "resumed"))
    assert [m["epoch"] for m in again] == [2] and again[0]["loss"] == history[2]["loss"]
    one = load_file(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors")
    two = load_file(tmp_path / "resumed" / "lora" / "pytorch_lora_weights.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # Flow-GRPO's targets: the double blocks' attention and feed-forwards, the single blocks' q/k/v
    assert any(".ff_context.net.2." in k for k in one) and any(
        "single_transformer_blocks.0.attn.to_q" in k for k in one
    )

    pipe = FluxPipeline.from_pretrained(tiny_flux_path(tiny_cache))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, height=64, width=64, max_sequence_length=TOKENS, output_type="np")
    base = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path / "straight" / "lora", adapter_name="grpo")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="grpo")
    assert len(loaded) == len(one) and all(
        torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in one.items()
    )
    tuned = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(base - tuned).max() > 0
    pipe.unload_lora_weights()
    assert np.array_equal(pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images, base)


@pytest.mark.parametrize("algorithm", ["nft", "awm"])
def test_nft_and_awm_train_and_save(tmp_path, tiny_cache, algorithm):
    """From the deterministic sampler at the distilled guidance 3.5, which the training predictions also take."""
    from trainer import train

    cfg = run_config(tmp_path, tiny_cache, 2, algorithm=algorithm)
    cfg.sample.eta, cfg.train.timestep_fraction, cfg.train.timestep_selection, cfg.train.kl_coef = (
        0.0,
        0.5,
        "random",
        1e-4,
    )
    history = train(cfg)
    assert [m["epoch"] for m in history] == [0, 1] and all(np.isfinite(m["loss"]) for m in history)
    assert history[-1]["kl_to_reference"] > 0
    assert history[-1]["old_deviation" if algorithm == "nft" else "kl_to_average"] > 0
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_diffusion_dpo_starts_at_log_2_and_trains(tmp_path, tiny_cache):
    from tests.test_dpo import pick_a_pic_rows
    from trainer.config.presets import PRESETS
    from trainer.algorithms.dpo.loop import train
    from trainer.pairs import write_parquet

    write_parquet(pick_a_pic_rows(9), tmp_path / "pairs" / "train-0000.parquet")
    cfg = Config(
        algorithm="dpo",
        run={"output_dir": tmp_path / "run", "log_with": "none"},
        pretrained={"model": "tiny-flux", "cache_dir": tiny_cache},
        sample={"guidance_scale": 3.5},
        train={
            "batch_size": 2,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "lora_targets": PRESETS["tiny-flux"]["train"]["lora_targets"],
        },
        dpo={"dataset": str(tmp_path / "pairs"), "max_train_steps": 2, "checkpointing_steps": 0},
    )
    history = train(cfg)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and history[0]["implicit_accuracy"] == 0.0
    assert history[1]["loss"] != history[0]["loss"]
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_refl_steps_move_the_adapters(tmp_path, tiny_cache):
    from trainer import run as run_setup
    from trainer.algorithms.refl.loop import differentiable_reward, rollout

    cfg = Config(
        algorithm="refl",
        run={"output_dir": tmp_path / "run", "log_with": "none"},
        pretrained={"model": "tiny-flux", "cache_dir": tiny_cache},
        sample={"guidance_scale": 3.5},
        reward={"scorer": "aesthetic", "options": {"checkpoint": "tiny-shapes"}},
        train={"batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "adam_weight_decay": 0.0},
        refl={"mode": "draft", "draft_k": 2, "num_steps": 6, "mid_low": 3, "mid_high": 5, "max_train_steps": 1},
    )
    with run_setup.started(cfg, 1) as run:
        trained = run_setup.load_model(run, 1)
        before = {k: p.detach().clone() for k, p in trained.trainable.items()}
        stats: dict = {"grad_norm": []}
        x0, calls = rollout(run, trained, ["a red circle"] * 2, 64, None)
        rewards = differentiable_reward(run)(trained.family.vae.decode(x0), ["a red circle"] * 2)
        run_setup.backward_and_step(run, trained, torch.relu(100.0 - rewards).mean(), stats)
    assert calls == 2 and torch.isfinite(rewards).all() and float(stats["grad_norm"][0]) > 0
    assert sum(float((p.detach() - before[k]).abs().max()) > 0 for k, p in trained.trainable.items()) > 0


def test_evaluate_and_label_run_on_it(tmp_path, tiny_cache):
    from trainer.evaluate import evaluate
    from trainer.tools.label import LabelSettings, label
    from trainer.pairs import load_pairs
    from trainer.rewards import Rewards

    cfg, family = flux(tiny_cache)
    rewards = Rewards(cfg.reward)
    try:
        runs = [
            evaluate(
                family,
                family.denoiser,
                ["a cat", "an owl", "a dog"],
                [{}] * 3,
                rewards,
                num_steps=5,
                guidance_scale=3.5,
                resolution=64,
                seeds=[7, 8, 9],
                batch_size=b,
            )
            for b in (1, 3)
        ]
    finally:
        rewards.close()
    diff = np.abs(runs[0][0].astype(int) - runs[1][0])
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01 and len({im.tobytes() for im in runs[0][0]}) == 3
    # the evaluation is the pipeline's own deterministic sampling, image by image from its seed
    start = family.initial_latents(1, 64, torch.Generator().manual_seed(8), "cpu")
    theirs = family.vae.to_uint8(pipeline_latents(family, ["an owl"], start, 5, 3.5))
    assert np.abs(theirs.astype(int) - runs[0][0][1]).max() <= 1

    counts = label(
        LabelSettings(
            out=tmp_path / "pairs",
            model="tiny-flux",
            cache_dir=tiny_cache,
            prompt_fn="shapes",
            pairs=4,
            steps=3,
            guidance_scale=3.5,
            batch_size=8,
            scorer="compression",
        )
    )
    assert counts["pairs"] == 4 and counts["kept"] + counts["ties"] == 4
    assert len(load_pairs(str(tmp_path / "pairs"))) == counts["kept"]


def test_gpu_estimate_counts_the_flux_step_as_it_runs(tiny_cache):
    """bench.gpu_estimate's FLUX step (the family's own predict on packed tokens, Flow-GRPO's SDE log-prob) on
    fake tensors allocates what the same step on tiny-flux allocates for real."""
    from bench.gpu_estimate import calibrate

    for kind, c in calibrate(tiny_cache, ("tiny-flux",))["tiny-flux"].items():
        assert c["estimated_bytes"] == c["tracked_real_bytes"] and c["flops_estimated"] == c["flops_real"] > 0, kind
        assert 0 <= c["allocator_bytes"] - c["estimated_bytes"] < 512 * 1024, (kind, c)
