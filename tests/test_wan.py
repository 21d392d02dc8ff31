"""The Wan text-to-video family (trainer/families/wan.py) on tiny-wan and its Wan2.2-A14B-shaped twin (two experts):
WanPipeline's own sampling reproduced bit for bit (its two-pass CFG, its video latents, the experts' dispatch), exact
re-scoring, every algorithm on video latents, LoRA the pipeline loads, the command line with its evaluation's
animations, the scheduler replacement, the shard units."""

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

PROMPTS = ["a cat", "a red owl"]
HEIGHT, WIDTH, FRAMES = 48, 64, 5  # tiny-wan's preset: non-square, 2 latent frames


def wan(tiny_cache, experts: int = 1, **groups):
    from trainer.families.tiny_wan import tiny_wan_path

    path = str(tiny_wan_path(tiny_cache, experts=experts))
    pretrained = {"model": path, **groups.pop("pretrained", {})}
    cfg = Config(preset="tiny-wan", **groups, pretrained=pretrained)
    family = load_family(cfg, torch.device("cpu"))
    assert type(family).__name__ == "Wan"  # told by its pipeline class
    return cfg, family


def pipeline_output(family, prompts, steps: int, guidance: float, seed: int, output_type: str = "latent", **kw):
    """WanPipeline's own sampling from its own noise (the generator's): the reference our sampler must equal."""
    return family.pipe(
        prompt=prompts,
        height=HEIGHT,
        width=WIDTH,
        num_frames=FRAMES,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        **kw,
    ).frames


def ours(family, guidance: float, seed: int, steps: int = 4):
    negative = family.encode_prompts([""])
    generator = torch.Generator().manual_seed(seed)
    return sample(
        family, family.denoiser, PROMPTS, [{}, {}], negative, steps, 0.0, guidance, HEIGHT, generator=generator
    )


def test_deterministic_sampling_is_the_pipelines_own(tiny_cache):
    """Noise level 0 is the scheduler's Euler step: our video latents (N, 16, 2, 6, 8) equal WanPipeline's bit for
    bit from the same generator, its CFG at 4.5 included (a second pass: scale 1 differs), and our uint8 videos
    (N, 5, 48, 64, 3) its decoded ones to rounding."""
    _, family = wan(tiny_cache)
    trajectories, final = ours(family, 4.5, 3)
    assert final.shape == (2, 16, 2, HEIGHT // 8, WIDTH // 8) and torch.equal(
        trajectories.latents[:, 0], family.initial_latents(2, HEIGHT, torch.Generator().manual_seed(3), "cpu")
    )
    assert torch.equal(final, pipeline_output(family, PROMPTS, 4, 4.5, 3))
    assert float((pipeline_output(family, PROMPTS, 4, 1.0, 3) - final).abs().max()) > 1e-3
    videos = family.vae.to_uint8(final)
    assert videos.shape == (2, FRAMES, HEIGHT, WIDTH, 3) and videos.dtype == np.uint8
    theirs = pipeline_output(family, PROMPTS, 4, 4.5, 3, "np")
    assert np.abs(theirs * 255 - videos).max() <= 0.5 + 1e-4


def test_evaluation_is_the_pipelines_sampling_video_by_video(tiny_cache):
    from trainer.evaluate import evaluate
    from trainer.rewards import Rewards

    cfg, family = wan(tiny_cache)
    rewards = Rewards(cfg.reward)
    try:
        videos, scored = evaluate(
            family,
            family.denoiser,
            ["a cat", "an owl"],
            [{}] * 2,
            rewards,
            num_steps=4,
            guidance_scale=4.5,
            resolution=HEIGHT,
            seeds=[7, 8],
            batch_size=2,
        )
    finally:
        rewards.close()
    assert videos.shape == (2, FRAMES, HEIGHT, WIDTH, 3)
    (compression,) = scored.values()  # an image scorer's frame scores pooled per video: 5 each
    assert [len(f) for f in compression.info["frame_scores"]] == [FRAMES, FRAMES]
    assert np.allclose(compression.scores, [np.mean(f) for f in compression.info["frame_scores"]])
    # the pipeline with a generator per video (its randn_tensor draws each from its own, as evaluation seeds each)
    kwargs = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=4, guidance_scale=4.5)
    generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
    theirs = family.pipe(prompt=["a cat", "an owl"], generator=generators, output_type="np", **kwargs).frames
    assert np.abs(theirs * 255 - videos).max() <= 0.5 + 1e-4


@pytest.mark.parametrize("sde_type, eta, experts", [("sde", 0.7, 1), ("cps", 0.8, 1), ("sde", 0.7, 2)])
def test_first_step_importance_ratio_is_exactly_one(tiny_cache, sde_type, eta, experts):
    """Under CFG, on video latents; with two experts the re-scored chunks mix high- and low-noise steps."""
    cfg, family = wan(tiny_cache, experts, sample={"sde_type": sde_type, "eta": eta})
    make_trainable(family.denoiser, cfg)
    negative = family.encode_prompts([""])
    torch.manual_seed(0)
    window = range(3) if sde_type == "cps" else None  # CPS's last step has std 0
    batch, _ = sample(family, family.denoiser, PROMPTS, [{}, {}], negative, 4, eta, 4.5, HEIGHT, window=window)
    assert batch.latents.shape == (2, 3 if window else 4, 16, 2, 6, 8) and torch.isfinite(batch.log_probs).all()
    assert_rescored_exactly(family, batch, negative, 4.5, eta)
    if experts == 2:
        assert_rescored_exactly(family, batch, negative, 4.5, eta, shuffle=False)  # all steps of a sample at once
        from trainer.sampling import rescore

        with torch.no_grad():  # (N x k) rows of both experts in one call: each row its own expert
            log_probs, _, _ = rescore(family, family.denoiser, batch, slice(0, 4), negative, 4.5, eta)
        assert torch.equal(log_probs, batch.log_probs)


def test_two_experts_are_the_pipelines_dispatch(tiny_cache):
    """Wan2.2-A14B's shape: t >= 0.875 x 1000 to transformer, below to transformer_2 at guidance_scale_2, as
    WanPipeline; train_experts low trains transformer_2 with transformer frozen in its place."""
    cfg, family = wan(tiny_cache, 2, sample={"guidance_scale_2": 2.0})
    assert family.boundary == 875.0 and family.denoiser is family.pipe.transformer
    family.dynamics.timesteps(4, "cpu")
    assert (family.pipe.scheduler.timesteps >= 875).tolist() == [True, False, False, False]  # both experts run
    _, final = ours(family, 4.5, 5)
    assert torch.equal(final, pipeline_output(family, PROMPTS, 4, 4.5, 5, guidance_scale_2=2.0))
    assert not torch.equal(final, pipeline_output(family, PROMPTS, 4, 4.5, 5))  # the low expert's own scale
    _, low = wan(tiny_cache, 2, pretrained={"train_experts": "low"})
    assert low.denoiser is low.pipe.transformer_2 and low.denoiser_name == "transformer_2"
    with pytest.raises(ValueError, match="one transformer"):
        wan(tiny_cache, 1, pretrained={"train_experts": "low"})


def test_the_low_noise_experts_lora_loads_back_into_transformer_2(tmp_path, tiny_cache):
    """train_experts low saves a LoRA of transformer_2, named for it, that load_tuned puts back into transformer_2
    (WanPipeline's load_into_transformer_2), not into the high-noise transformer, in a family loaded as
    trainer.evaluate and trainer.before_after load it: from the model alone."""
    from trainer import train
    from trainer.families.models import load_tuned
    from trainer.families.wan import LOW_LORA

    cfg, _ = wan(tiny_cache, 2, pretrained={"train_experts": "low"})
    cfg.run.output_dir, cfg.run.num_epochs, cfg.run.log_with, cfg.algorithm = tmp_path, 1, "none", "nft"
    cfg.sample.eta = 0.0
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "lora").glob("*.safetensors")) == [LOW_LORA]
    _, fresh = wan(tiny_cache, 2)
    load_tuned(fresh, tmp_path / "lora")
    assert getattr(fresh.pipe.transformer_2, "peft_config", None) and not getattr(
        fresh.pipe.transformer, "peft_config", None
    )


def test_both_experts_train_and_their_loras_load_back_each_into_its_own(tmp_path, tiny_cache):
    """train_experts both (Flow-Factory's default): one LoRA per expert, each trained on its own timesteps, saved
    as two files that load_tuned (WanPipeline's load_lora_weights twice) puts back each into its transformer."""
    from safetensors.torch import load_file

    from trainer import train
    from trainer.families.models import load_tuned
    from trainer.families.wan import LOW_LORA

    with pytest.raises(ValueError, match="pretrained.train_experts: both experts train as LoRA only"):
        wan(tiny_cache, 2, pretrained={"train_experts": "both"}, train={"lora": False})
    cfg, _ = wan(tiny_cache, 2, pretrained={"train_experts": "both"})
    cfg.run.output_dir, cfg.run.num_epochs, cfg.run.log_with, cfg.algorithm = tmp_path, 1, "none", "nft"
    cfg.sample.eta, cfg.train.timestep_fraction = 0.0, 1.0  # every step trains: both experts' timesteps
    train(cfg)
    saved = {name: load_file(tmp_path / "lora" / name) for name in ("pytorch_lora_weights.safetensors", LOW_LORA)}
    for layers in saved.values():  # trained: peft's gaussian init starts lora_B at zero
        assert layers and max(float(v.abs().max()) for k, v in layers.items() if "lora_B" in k) > 0
    high, low = saved.values()
    assert high.keys() == low.keys() and any(not torch.equal(high[k], low[k]) for k in high)
    _, fresh = wan(tiny_cache, 2)  # as trainer.evaluate and trainer.before_after load it: the model alone
    load_tuned(fresh, tmp_path / "lora")
    for expert, layers in (("transformer", high), ("transformer_2", low)):
        from peft.utils import get_peft_model_state_dict

        loaded = get_peft_model_state_dict(getattr(fresh.pipe, expert), adapter_name="default_0")
        assert all(torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in layers.items()), expert

    # trainer.before_after on the run's LoRA: videos scored per frame, pooled by the worst, and animated
    from trainer.families.tiny_wan import tiny_wan_path
    from trainer.tools.before_after import SampleSettings, render

    settings = dict(model=str(tiny_wan_path(tiny_cache, experts=2)), lora=tmp_path / "lora", prompts=["a cat"])
    settings |= dict(per_prompt=1, steps=2, resolution=HEIGHT, num_frames=FRAMES, video_pooling="min")
    summary = render(SampleSettings(**settings, out=tmp_path / "before_after.png"))
    assert summary["reward"] == "compression" and summary["mean_before"] != summary["mean_after"]
    assert (tmp_path / "before_after.png").is_file() and (tmp_path / "before_after.gif").is_file()
    from trainer.tools.evaluate import EvalSettings, run_evaluation

    settings = dict(model=settings["model"], lora=tmp_path / "lora", count=2, steps=2, resolution=HEIGHT)
    result = run_evaluation(EvalSettings(**settings, num_frames=FRAMES, out=tmp_path / "eval"))
    assert result["lora"] and (tmp_path / "eval" / "eval.png").is_file() and (tmp_path / "eval" / "eval.gif").is_file()


def test_labelling_pairs_refuses_a_video_model(tmp_path, tiny_cache):
    """trainer.label writes image pairs; a video model's samples are refused by name, pointing to online DPO
    (which trains on tiny-wan below)."""
    from trainer.tools.label import LabelSettings, label

    settings = LabelSettings(out=tmp_path / "pairs", model="tiny-wan", cache_dir=tiny_cache, pairs=2, steps=2)
    with pytest.raises(ValueError, match="--model tiny-wan: a video model; preference pairs hold images"):
        label(settings)


def test_the_vae_decodes_and_encodes_videos(tiny_cache):
    """Video latents (N, 16, f, h, w) decode as WanPipeline decodes them (z / (1 / std) + mean per channel, the real
    checkpoints' statistics, far from 0 and 1) to (N, 3, F, H, W) in [0, 1], and encode back to their shape."""
    _, family = wan(tiny_cache)
    config = family.pipe.vae.config
    assert max(map(abs, config.latents_mean)) > 0.5 and max(abs(s - 1) for s in config.latents_std) > 0.5
    latents = torch.randn(2, 16, 2, 6, 8, generator=torch.Generator().manual_seed(0))
    videos = family.vae.decode(latents)
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        theirs = family.pipe.vae.decode(latents / inverse_std + mean, return_dict=False)[0]
    assert videos.shape == (2, 3, FRAMES, HEIGHT, WIDTH) and torch.equal(videos, (theirs / 2 + 0.5).clamp(0, 1))
    again = family.vae.encode(videos, torch.Generator().manual_seed(0))
    assert again.shape == latents.shape and torch.isfinite(again).all()


def test_video_settings_are_checked(tmp_path, tiny_cache):
    from diffusers import WanPipeline

    from trainer.families.tiny_wan import tiny_wan_path

    with pytest.raises(ValueError, match="1 \\+ 4 k"):
        wan(tiny_cache, sample={"num_frames": 6})
    with pytest.raises(ValueError, match="sample.num_frames: a FluxPipeline has no such setting"):
        load_family(Config(preset="tiny-flux", pretrained={"cache_dir": tiny_cache}, sample={"num_frames": 5}), "cpu")
    _, family = wan(tiny_cache, sample={"num_frames": 9})
    with pytest.raises(ValueError, match="multiples of 16"):
        family.initial_latents(1, 40, None, "cpu")
    assert family.initial_latents(1, 32, None, "cpu").shape == (1, 16, 3, 4, 8)  # 9 frames: 3 latent frames
    pipe = WanPipeline.from_pretrained(tiny_wan_path(tiny_cache))
    pipe.register_to_config(expand_timesteps=True)  # Wan2.2-TI2V-5B's per-token timesteps
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="expand_timesteps"):
        load_family(Config(preset="tiny-wan", pretrained={"model": str(tmp_path)}), "cpu")


def test_unipc_is_replaced_by_flow_euler_at_its_shift():
    """A real checkpoint's UniPCMultistepScheduler (flow sigmas, flow_shift 5 at 720p) becomes
    FlowMatchEulerDiscreteScheduler(shift=5): Euler's sigmas shift(u) at u = linspace(1, shift(1/1000), n), shift(u)
    = 5 u / (1 + 4 u) (its training sigmas' shifted minimum, shifted once more), then 0."""
    from diffusers import DDIMScheduler, UniPCMultistepScheduler

    from trainer.families.wan import flow_euler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    euler = flow_euler(unipc)
    assert type(euler).__name__ == "FlowMatchEulerDiscreteScheduler" and euler.config.shift == 5.0
    euler.set_timesteps(10)

    def shift(u):
        return 5 * u / (1 + 4 * u)

    u = torch.linspace(1, shift(1 / 1000), 10, dtype=torch.float64)
    torch.testing.assert_close(euler.sigmas[:-1].double(), shift(u), rtol=1e-6, atol=1e-6)
    assert float(euler.sigmas[-1]) == 0
    with pytest.raises(ValueError, match="DDIMScheduler"):
        flow_euler(DDIMScheduler())


def run_config(tmp_path, tiny_cache, algorithm: str, lora: bool = True, **groups) -> Config:
    """2 epochs (or 2 steps) of ``algorithm`` on tiny-wan, small batches."""
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
        preset="tiny-wan",
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
    for target in ("blocks.1.attn1.to_q", "blocks.1.attn2.to_v", "blocks.0.attn1.to_out.0"):
        assert target.encode() in keys, target  # self- and cross-attention


def test_a_full_finetune_trains_the_transformer(tmp_path, tiny_cache):
    from safetensors.torch import load_file

    from trainer import train
    from trainer.families.tiny_wan import tiny_wan_path

    history = train(run_config(tmp_path, tiny_cache, "nft", lora=False))
    assert len(history) == 2 and all(math.isfinite(m["loss"]) for m in history)
    tuned = load_file(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    base = load_file(tiny_wan_path(tiny_cache) / "transformer" / "diffusion_pytorch_model.safetensors")
    assert tuned.keys() == base.keys() and max(float((tuned[k] - base[k]).abs().max()) for k in base) > 0


def test_the_lora_loads_into_the_pipeline_and_changes_its_videos(tmp_path, tiny_cache):
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from trainer import train
    from trainer.families.tiny_wan import tiny_wan_path

    train(run_config(tmp_path, tiny_cache, "ddpo"))
    saved = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    pipe = WanPipeline.from_pretrained(tiny_wan_path(tiny_cache))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, height=HEIGHT, width=WIDTH, num_frames=FRAMES, output_type="np")
    base = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="grpo")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="grpo")
    assert len(loaded) == len(saved) and all(
        torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in saved.items()
    )
    tuned = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert np.abs(base - tuned).max() > 0
    pipe.unload_lora_weights()
    assert np.array_equal(pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs).frames, base)


def test_the_cli_trains_nft_scored_over_the_wire_and_evaluates_with_animations(tmp_path, tiny_cache, start_server):
    """The rollouts and evaluations scored as videos by a real reward-server (compression per frame, pooled by
    the worst frame), the evaluation written as animations."""
    from PIL import Image

    server = start_server("--model", "compression", "--video-pooling", "min")
    out = tmp_path / "run"
    flags = ["--pretrained.cache_dir", str(tiny_cache), "--run.output_dir", str(out), "--run.log_with", "none"]
    flags += ["--reward.scorer", "compression", "--reward.url", server.url]
    flags += ["--run.eval_every", "1", "--sample.batch_size", "4", "--sample.num_batches_per_epoch", "1"]
    flags += ["--prompt.eval_count", "4", "--run.log_images_every", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "--preset", "tiny-wan", "--algorithm", "nft", "--run.num_epochs", "1"]
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
    assert [e["epoch"] for e in evaluations] == [0, 1] and all(math.isfinite(e["reward_mean"]) for e in evaluations)
    # the epoch's 4 videos and two evaluations of 4, each batch one request (none refused)
    assert server.metric("reward_requests_total", status="200") >= 3
    assert server.metric("reward_requests_total", status="422") == 0
    for sheet in ("eval/after-0001", "eval/before_after", "images/epoch-0000"):
        with Image.open(out / f"{sheet}.gif") as animation:
            assert animation.n_frames == FRAMES, sheet  # one grid per video frame
        with Image.open(out / f"{sheet}.png") as strips:  # each cell its 5 frames side by side
            assert strips.width % (FRAMES * WIDTH) == 0, sheet


def test_the_shard_units_are_the_transformers_blocks(tiny_cache):
    _, family = wan(tiny_cache)
    counts = [sum(type(m).__name__ == name for m in family.denoiser.modules()) for name in family.shard_blocks]
    assert counts == [2]  # tiny-wan's two WanTransformerBlocks


def test_the_published_recipes():
    """wan21-t2v-ocr-grpo as flow_grpo's general_ocr_wan2_1 (per GPU: 2 batches of 8, groups of 4, two optimizer
    steps an epoch), wan22-t2v-pickscore-grpo as Flow-Factory's A14B example on 8 GPUs (48 groups of 16, two steps),
    wan21-t2v-pickscore-nft at 256 px and 5 frames."""
    from trainer.plan import BatchPlan

    ocr, a14b, nft = (
        Config(preset=p) for p in ("wan21-t2v-ocr-grpo", "wan22-t2v-pickscore-grpo", "wan21-t2v-pickscore-nft")
    )
    assert ocr.pretrained.model == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers" and ocr.algorithm == "ddpo"
    s, t = ocr.sample, ocr.train
    assert (s.resolution, s.width, s.num_frames, s.num_steps, s.eval_num_steps, s.guidance_scale) == (
        240,
        416,
        33,
        20,
        50,
        4.5,
    )
    assert (t.kl_coef, t.learning_rate, ocr.ddpo.clip_range, t.lora_rank, t.lora_alpha, t.group_std) == (
        0.004,
        1e-4,
        1e-3,
        32,
        64.0,
        "group",
    )
    assert t.ema_decay > 0 and ocr.reward.scorer == "ocr" and t.lora_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    plan = BatchPlan.of(ocr, 8)
    assert (plan.samples_per_epoch, plan.optimizer_steps_per_epoch) == (8 * 16, 2)
    assert a14b.pretrained.train_experts == "both" and a14b.pretrained.model == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert (a14b.sample.guidance_scale, a14b.sample.guidance_scale_2, a14b.sample.eta, a14b.sample.num_frames) == (
        4.0,
        3.0,
        0.9,
        5,
    )
    plan = BatchPlan.of(a14b, 8)
    assert (plan.samples_per_epoch, plan.optimizer_steps_per_epoch) == (48 * 16, 2)
    d = a14b.ddpo  # its sde_steps [1, 2, 3]: the window of one step starts at 1, 2 or 3
    assert (d.timestep_window, d.timestep_window_earliest_start, d.timestep_window_latest_start) == (1, 1, 3)
    assert (a14b.ddpo.clip_range, a14b.train.kl_coef, a14b.train.lora_rank, a14b.reward.scorer) == (
        1e-4,
        0.0,
        64,
        "pickscore",
    )
    assert nft.algorithm == "nft" and (nft.sample.resolution, nft.sample.width, nft.sample.num_frames) == (256, None, 5)
