"""The Z-Image family (trainer/families/zimage.py) on tiny-zimage: ZImagePipeline's own sampling reproduced bit for
bit (its guidance convention, its sigmas, captions of different lengths), exact re-scoring, every algorithm
training it, the LoRA ZImagePipeline loads, the command line with an evaluation, and its shard blocks."""

from __future__ import annotations

import json
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

# Two short captions and one past 32 tokens: the transformer pads each caption to a multiple of 32 and masks
# the attention where they differ, which the pipeline's lists and ours must do alike.
PROMPTS = ["a cat", "a red owl riding a bike", "a small cute panda " * 6 + "playing chess with a fox"]


def zimage(tiny_cache, **groups):
    cfg = Config(preset="tiny-zimage", pretrained={"cache_dir": tiny_cache}, **groups)
    family = load_family(cfg, torch.device("cpu"))
    assert type(family).__name__ == "ZImage"  # told by its pipeline class
    return cfg, family


def pipeline_latents(family, prompts, start, steps: int, guidance: float) -> torch.Tensor:
    """ZImagePipeline's own sampling from ``start`` at our guidance w (its guidance_scale w - 1)."""
    return family.pipe(
        list(prompts),  # a copy: the pipeline writes the chat-templated prompts into the list it is given
        num_inference_steps=steps,
        guidance_scale=guidance - 1,
        height=64,
        width=64,
        latents=start.clone(),
        output_type="latent",
    ).images


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_deterministic_sampling_is_the_pipelines_own(tiny_cache, guidance):
    """Noise level 0 is the scheduler's Euler step: our sampler and ZImagePipeline agree bit for bit, unguided
    (w 1: one transformer pass, the pipeline's guidance 0) and guided (w 5: the pipeline's 4), on its sigmas."""
    _, family = zimage(tiny_cache)
    negative = family.encode_prompts([""])
    cond = family.encode_prompts(PROMPTS)
    lengths = cond["prompt_mask"].sum(1).tolist()
    assert cond["prompt_embeds"].shape == (3, 512, 32) and lengths[0] < lengths[1] < 32 < lengths[2]
    assert float(cond["prompt_embeds"][0, lengths[0] :].abs().max()) == 0  # zeros past the real tokens
    start = family.initial_latents(3, 64, torch.Generator().manual_seed(3), "cpu")
    ours, final = sample(
        family,
        family.denoiser,
        PROMPTS,
        [{}] * 3,
        negative,
        10,
        0.0,
        guidance,
        64,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(ours.latents[:, 0], start) and final.shape == (3, 16, 8, 8) and ours.latents.shape[1] == 10
    assert torch.equal(final, pipeline_latents(family, PROMPTS, start, 10, guidance))
    # its sigmas: float32 linspace(1, 1/10, 10) (in float64, 5 differ) shifted by 3 (Z-Image-Turbo's), exactly
    t = torch.linspace(1.0, 1 / 10, 10)
    assert torch.equal(family.pipe.scheduler.sigmas[:-1], (3 * t / (1 + 2 * t)).float())
    # the pipeline's own noise from the same generator is ours
    drawn = family.pipe(
        list(PROMPTS[:1]),
        num_inference_steps=10,
        guidance_scale=guidance - 1,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    _, alone = sample(
        family,
        family.denoiser,
        PROMPTS[:1],
        [{}],
        negative,
        10,
        0.0,
        guidance,
        64,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.equal(drawn, alone)
    other = pipeline_latents(family, PROMPTS, start, 10, guidance + 2)
    assert float((other - final).abs().max()) > 1e-3  # the guidance is used


def test_guidance_is_one_call_of_both_halves_in_the_pipelines_convention(tiny_cache):
    """w 1 is one pass of the conditional captions alone; w > 1 one pass of positives then negatives, combined
    as pos + (w - 1)(pos - neg) = neg + w (pos - neg); the prediction is minus the transformer's output."""
    _, family = zimage(tiny_cache)
    cond, negative = family.encode_prompts(PROMPTS[:2]), family.encode_prompts([""])
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([900.0, 400.0])
    calls = []
    handle = family.denoiser.register_forward_hook(
        lambda module, args, out: calls.append((len(args[0]), args[1].tolist(), [len(c) for c in args[2]]))
    )
    with torch.no_grad():
        plain = family.predict(family.denoiser, x, t, cond, None, 5.0)
        same = family.predict(family.denoiser, x, t, cond, negative, 1.0)
        guided = family.predict(family.denoiser, x, t, cond, negative, 3.0)
        raw = family.denoiser(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, [c for c in cond["prompt_embeds"]])
    handle.remove()
    n_pos, n_neg = cond["prompt_mask"].sum(1).tolist(), int(negative["prompt_mask"].sum())
    assert calls[:3] == [
        (2, pytest.approx([0.1, 0.6]), n_pos),
        (2, pytest.approx([0.1, 0.6]), n_pos),
        (4, pytest.approx([0.1, 0.6, 0.1, 0.6]), n_pos + [n_neg] * 2),
    ]
    assert torch.equal(plain, same)
    unconditional = family.predict(
        family.denoiser, x, t, {k: v.expand(2, *v.shape[1:]) for k, v in negative.items()}, None, 1.0
    )
    torch.testing.assert_close(guided, unconditional + 3.0 * (plain - unconditional), rtol=1e-5, atol=1e-5)
    # the padded positions reach the transformer as real tokens when not dropped: our unpadding matters
    assert float((torch.stack(raw[0]).squeeze(2) + plain).abs().max()) > 1e-3


@pytest.mark.parametrize("sde_type, eta", [("sde", 0.7), ("cps", 0.8)])
def test_first_step_importance_ratio_is_exactly_one(tiny_cache, sde_type, eta):
    cfg, family = zimage(tiny_cache, sample={"sde_type": sde_type, "eta": eta})
    make_trainable(family.denoiser, cfg)
    negative = family.encode_prompts([""])
    torch.manual_seed(0)
    window = range(5) if sde_type == "cps" else None  # CPS's last step has std 0
    batch, _ = sample(family, family.denoiser, PROMPTS, [{}] * 3, negative, 6, eta, 5.0, 64, window=window)
    assert batch.latents.shape == (3, 5 if window else 6, 16, 8, 8) and torch.isfinite(batch.log_probs).all()
    assert_rescored_exactly(family, batch, negative, 5.0, eta)


# -- training ----------------------------------------------------------------------------------------------
SMALL = {"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 1, "images_per_prompt": 2}
TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1")
# Each algorithm's settings on tiny-zimage (the preset's LoRA targets, Flow-Factory's), as their own tests set them.
ALGORITHMS = {
    "ddpo": {},
    "nft": {"sample": {**SMALL, "eta": 0.0}, "train": {"batch_size": 2, "timestep_fraction": 0.5, "kl_coef": 1e-4}},
    "awm": {"sample": {**SMALL, "eta": 0.0}, "train": {"batch_size": 2, "timestep_fraction": 0.5, "kl_coef": 1e-4}},
    "dgpo": {
        "sample": {**SMALL, "eta": 0.0, "guidance_scale": 2.0},
        "train": {"batch_size": 2, "kl_coef": 1e-4},
        "dgpo": {"num_timesteps": 2, "trunc": 0.75, "beta_dpo": 10.0, "clip": 1e-3, "switch_ema_ref": 2},
    },
    "refl": {
        "reward": {"scorer": "aesthetic", "options": {"checkpoint": "tiny-shapes"}},
        "train": {"batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3},
        "refl": {"mode": "draft", "draft_k": 2, "num_steps": 6, "mid_low": 3, "mid_high": 5, "max_train_steps": 2},
    },
    "dpo": {
        "sample": {"num_steps": 4, "batch_size": 8},
        "train": {"batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3},
        "dpo": {"online": True, "online_pairs": 8, "max_train_steps": 2, "checkpointing_steps": 0},
    },
}


def run_config(out, tiny_cache, algorithm: str = "ddpo", epochs: int = 2, **run) -> Config:
    groups = ALGORITHMS[algorithm]
    return Config(
        preset="tiny-zimage",
        algorithm=algorithm,
        run={"output_dir": out, "num_epochs": epochs, "log_with": "none", "log_images_every": 0, **run},
        pretrained={"cache_dir": tiny_cache},
        **{"sample": SMALL, "train": {"batch_size": 2}, **groups},
    )


@pytest.mark.parametrize("algorithm", ["nft", "awm", "dgpo", "refl", "dpo"])
def test_every_algorithm_trains_its_lora(tmp_path, tiny_cache, algorithm):
    """Each algorithm's loop on tiny-zimage: finite losses and LoRA B matrices that moved (peft starts them at
    zero), on every kind of target of every block (the refiners' and the main layers')."""
    from safetensors.torch import load_file

    from trainer import train

    history = train(run_config(tmp_path, tiny_cache, algorithm))
    assert_trained(tmp_path, [m["loss"] for m in history])
    weights = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    for block in ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"):
        for target in TARGETS:
            assert f"transformer.{block}.{target}.lora_B.weight" in weights, (block, target)
    if algorithm == "dpo":  # the online rounds' first step is at the reference: log 2
        assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and "online_reward_mean" in history[0]


def test_flow_grpo_trains_resumes_exactly_and_saves_a_lora_zimage_loads(tmp_path, tiny_cache):
    from diffusers import ZImagePipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from trainer.algorithms.ddpo.loop import train
    from trainer.families.tiny_zimage import tiny_zimage_path

    history = train(run_config(tmp_path / "straight", tiny_cache, epochs=3))
    assert [m["epoch"] for m in history] == [0, 1, 2] and all(m["kl_to_reference"] > 0 for m in history)
    train(run_config(tmp_path / "resumed", tiny_cache, epochs=2, save_freq=1))
    again = train(run_config(tmp_path / "resumed", tiny_cache, epochs=3, resume_from=tmp_path / "resumed"))
    assert [m["epoch"] for m in again] == [2] and again[0]["loss"] == history[2]["loss"]
    one = load_file(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors")
    two = load_file(tmp_path / "resumed" / "lora" / "pytorch_lora_weights.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)

    pipe = ZImagePipeline.from_pretrained(tiny_zimage_path(tiny_cache))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, height=64, width=64, guidance_scale=4.0, output_type="np")
    base = pipe(["a cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path / "straight" / "lora", adapter_name="grpo")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="grpo")
    assert len(loaded) == len(one) and all(
        torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in one.items()
    )
    tuned = pipe(["a cat"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(base - tuned).max() > 0
    pipe.unload_lora_weights()
    assert np.array_equal(pipe(["a cat"], generator=torch.Generator().manual_seed(0), **kwargs).images, base)


def test_full_finetuning_saves_a_transformer_the_pipeline_loads(tmp_path, tiny_cache):
    from diffusers import ZImageTransformer2DModel

    from trainer import train
    from trainer.families.tiny_zimage import tiny_zimage_path

    cfg = run_config(tmp_path, tiny_cache, "nft", epochs=1)
    cfg.train.lora, cfg.train.learning_rate = False, 1e-4
    history = train(cfg)
    assert all(np.isfinite(m["loss"]) for m in history) and history[-1]["kl_to_reference"] > 0  # the frozen copy
    tuned = ZImageTransformer2DModel.from_pretrained(tmp_path / "transformer").state_dict()
    base = ZImageTransformer2DModel.from_pretrained(tiny_zimage_path(tiny_cache) / "transformer").state_dict()
    moved = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert any(k.startswith("layers.") for k in moved) and any(k.startswith("noise_refiner.") for k in moved)


def test_the_cli_trains_nft_and_evaluates(tmp_path, tiny_cache):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "--preset", "tiny-zimage", "--algorithm", "nft", "--run.num_epochs", "1"]
        + ["--pretrained.cache_dir", str(tiny_cache), "--run.output_dir", str(out), "--run.log_with", "none"]
        + ["--run.eval_every", "1", "--sample.num_steps", "3", "--sample.eta", "0", "--sample.batch_size", "4"]
        + ["--sample.num_batches_per_epoch", "1", "--train.batch_size", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [0]
    assert_trained(out, [m["loss"] for m in history])
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 2 and all(np.isfinite(e["reward_mean"]) for e in evals)  # before and after the epoch
    assert evals[0]["reward_mean"] != evals[1]["reward_mean"]


def test_evaluation_is_the_pipelines_sampling_image_by_image(tiny_cache):
    from trainer.evaluate import evaluate
    from trainer.rewards import Rewards

    cfg, family = zimage(tiny_cache)
    rewards = Rewards(cfg.reward)
    try:
        runs = [
            evaluate(
                family,
                family.denoiser,
                PROMPTS,
                [{}] * 3,
                rewards,
                num_steps=5,
                guidance_scale=5.0,
                resolution=64,
                seeds=[7, 8, 9],
                batch_size=b,
            )
            for b in (1, 3)
        ]
    finally:
        rewards.close()
    diff = np.abs(runs[0][0].astype(int) - runs[1][0])
    assert diff.max() <= 1 and len({im.tobytes() for im in runs[0][0]}) == 3
    start = family.initial_latents(1, 64, torch.Generator().manual_seed(9), "cpu")
    theirs = family.vae.to_uint8(pipeline_latents(family, PROMPTS[2:], start, 5, 5.0))
    assert np.array_equal(theirs[0], runs[0][0][2])  # batch 1: the pipeline's own image, bit for bit


def test_shard_blocks_are_every_block_of_the_transformer(tiny_cache):
    """run.sharding's units (the family's shard_blocks) are the refiners' and the main layers' blocks, and
    nothing else of the transformer's is one."""
    _, family = zimage(tiny_cache)
    blocks = [n for n, m in family.denoiser.named_modules() if type(m).__name__ in family.shard_blocks]
    assert blocks == ["noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"]


def test_the_published_recipe():
    """zimage-pickscore-grpo as Flow-Factory's Z-Image GRPO example: guidance 4 in the pipeline's convention (5 in
    ours), one SDE step drawn from its sde_steps [1, 2, 3], lr 3e-4, weight decay 1e-4, 48 groups of 16 on 8 GPUs."""
    from trainer.plan import BatchPlan

    cfg = Config(preset="zimage-pickscore-grpo")
    d, t = cfg.ddpo, cfg.train
    assert (d.timestep_window, d.timestep_window_earliest_start, d.timestep_window_latest_start) == (1, 1, 3)
    assert (cfg.sample.guidance_scale, t.learning_rate, t.adam_weight_decay, d.clip_range) == (5.0, 3e-4, 1e-4, 1e-4)
    assert BatchPlan.of(cfg, 8).samples_per_epoch == 48 * 16
