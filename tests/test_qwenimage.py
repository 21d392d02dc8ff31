"""The Qwen-Image family (trainer/families/qwenimage.py) on tiny-qwenimage: QwenImagePipeline's own sampling
reproduced bit for bit (its norm-rescaled true CFG, its size-shifted schedule with the terminal stretch, its
template-encoded prompts), exact re-scoring, every algorithm, LoRA the pipeline loads, the command line."""

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
from trainer.families.flux import pack, unpack
from trainer.families.models import load_family, make_trainable
from trainer.sampling import sample

pytestmark = pytest.mark.slow

PROMPTS = ["a cat", "a red owl playing chess"]  # different lengths: the cond batch is padded and masked


def qwen(tiny_cache, **groups):
    cfg = Config(preset="tiny-qwenimage", pretrained={"cache_dir": tiny_cache}, **groups)
    family = load_family(cfg, torch.device("cpu"))
    assert type(family).__name__ == "QwenImage"  # told by its pipeline class
    return cfg, family


def pipeline_latents(family, prompts, start, steps: int, scale: float, negative: bool = True) -> torch.Tensor:
    """QwenImagePipeline's own sampling from the packed ``start``, unpacked: the reference our sampler must equal."""
    size = start.shape[-1]
    out = family.pipe(
        prompts,
        negative_prompt=[""] * len(prompts) if negative else None,
        true_cfg_scale=scale,
        num_inference_steps=steps,
        height=size * 8,
        width=size * 8,
        latents=pack(start.clone()),
        output_type="latent",
    ).images
    return unpack(out, size, size)


def test_deterministic_sampling_is_the_pipelines_own(tiny_cache):
    """Noise level 0 is the scheduler's Euler step: our sampler equals QwenImagePipeline bit for bit, with its true
    CFG (a negative prompt, scale 4) and without (no negative), from our noise or from the pipeline's own draw."""
    _, family = qwen(tiny_cache)
    negative = family.encode_prompts([""])
    start = family.initial_latents(2, 64, torch.Generator().manual_seed(3), "cpu")
    args = (family, family.denoiser, PROMPTS, [{}, {}])
    ours, final = sample(*args, negative, 8, 0.0, 4.0, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours.latents[:, 0], start) and final.shape == (2, 16, 8, 8)
    assert torch.equal(final, pipeline_latents(family, PROMPTS, start, 8, 4.0))
    drawn = family.pipe(
        PROMPTS,
        negative_prompt=["", ""],
        num_inference_steps=8,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images  # true_cfg_scale: the pipeline's default 4.0
    assert torch.equal(unpack(drawn, 8, 8), final)
    _, plain = sample(*args, None, 8, 0.0, 4.0, 64, noise=start.clone())
    assert torch.equal(plain, pipeline_latents(family, PROMPTS, start, 8, 4.0, negative=False))
    assert float((plain - final).abs().max()) > 1e-2  # the guidance did something
    # decoded through the per-channel VAE as the pipeline decodes: the same uint8 images
    theirs = family.pipe(
        PROMPTS, negative_prompt=["", ""], num_inference_steps=8, height=64, width=64, latents=pack(start.clone())
    ).images
    assert np.array_equal(np.stack([np.asarray(im) for im in theirs]), family.vae.to_uint8(final))


def test_true_cfg_is_norm_rescaled_per_packed_token(tiny_cache):
    """predict's guidance is the pipeline's: neg + s (cond - neg), rescaled to the conditional prediction's norm
    over each packed token's 64 channels; scale 1 or no negative is the conditional prediction alone."""
    _, family = qwen(tiny_cache)
    cond, negative = family.encode_prompts(PROMPTS), family.encode_prompts([""])
    x, t = torch.randn(2, 16, 8, 8), torch.tensor([900.0, 400.0])
    model = family.denoiser
    with torch.no_grad():
        c = pack(family.predict(model, x, t, cond, None, 4.0))
        u = pack(family.predict(model, x, t, {k: v.expand(2, *v.shape[1:]) for k, v in negative.items()}, None, 4.0))
        guided = pack(family.predict(model, x, t, cond, negative, 4.0))
        unguided = family.predict(model, x, t, cond, negative, 1.0)
    combined = u + 4.0 * (c - u)
    torch.testing.assert_close(guided, combined * c.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(guided.norm(dim=-1), c.norm(dim=-1))  # each token keeps the conditional norm
    assert float((guided - combined).abs().max()) > 1e-2 and torch.equal(unguided, unpack(c, 8, 8))


def test_the_schedule_is_shifted_by_image_size_and_stretched_to_the_terminal(tiny_cache):
    """Qwen-Image's published scheduler: sigmas exp(mu) / (exp(mu) + 1/t - 1) at t = linspace(1, 1/n, n), mu linear
    in the packed tokens (0.5 at 256, 0.9 at 8192), then 1 - sigma stretched so that the last is 0.02, then 0."""
    for resolution in (64, 128):
        _, family = qwen(tiny_cache, sample={"resolution": resolution})
        tokens = (resolution // 16) ** 2
        mu = 0.5 + (tokens - 256) * (0.9 - 0.5) / (8192 - 256)
        t = np.linspace(1.0, 1 / 6, 6)
        shifted = math.exp(mu) / (math.exp(mu) + 1 / t - 1)
        stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.02))
        family.dynamics.timesteps(6, "cpu")
        np.testing.assert_allclose(family.pipe.scheduler.sigmas.numpy(), np.append(stretched, 0.0), rtol=1e-6)
        assert float(family.pipe.scheduler.sigmas[-2]) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="sample.resolution: the Qwen-Image schedule is shifted for 128 px"):
        family.initial_latents(1, 64, None, "cpu")


def test_prompts_are_the_templates_tail_with_their_mask(tiny_cache):
    """The tiny tokenizer splits the system template as Qwen's does, so the pipeline's 34 dropped tokens are the
    system part; encode_prompts is the pipeline's encode_prompt with the mask kept (also when all ones)."""
    _, family = qwen(tiny_cache)
    pipe = family.pipe
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    cond = family.encode_prompts(PROMPTS)
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["prompt_embeds_mask"], mask)
    # "a cat" (a, Ġcat) and its 5 closing tokens (<|im_end|> \n <|im_start|> assistant \n); the other 3 more
    assert cond["prompt_embeds_mask"].sum(dim=1).tolist() == [7, 10]
    same = family.encode_prompts(["a cat", "a dog"])
    assert same["prompt_embeds_mask"].tolist() == [[1] * 7] * 2  # the pipeline's None, kept as ones


def test_the_vae_is_per_channel_with_one_frame(tiny_cache):
    """vae.py on AutoencoderKLQwenImage: latents (N, 16, h, w) = (E(x) - latents_mean) / latents_std of the frame."""
    _, family = qwen(tiny_cache)
    vae = family.pipe.vae
    images = torch.rand(2, 3, 64, 64)
    latents = family.vae.encode(images, torch.Generator().manual_seed(0))
    raw = vae.encode(images[:, :, None] * 2 - 1).latent_dist.sample(torch.Generator().manual_seed(0))[:, :, 0]
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    torch.testing.assert_close(latents, (raw - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1))
    assert family.vae.decode(latents).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("sde_type, eta", [("sde", 1.2), ("cps", 0.8)])
def test_first_step_importance_ratio_is_exactly_one(tiny_cache, sde_type, eta):
    cfg, family = qwen(tiny_cache, sample={"sde_type": sde_type, "eta": eta})
    make_trainable(family.denoiser, cfg)
    negative = family.encode_prompts([""])
    torch.manual_seed(0)
    window = range(5) if sde_type == "cps" else None  # CPS's last step has std 0
    prompts = ["a cat", "an owl playing chess", "a dog", "a big red fox"]
    batch, _ = sample(family, family.denoiser, prompts, [{}] * 4, negative, 6, eta, 4.0, 64, window=window)
    assert batch.latents.shape == (4, 5 if window else 6, 16, 8, 8) and torch.isfinite(batch.log_probs).all()
    assert_rescored_exactly(family, batch, negative, 4.0, eta)


def run_config(tmp_path, tiny_cache, algorithm: str, **groups) -> Config:
    merged = {
        "run": {"output_dir": tmp_path, "num_epochs": 2, "log_with": "none", "log_images_every": 0},
        "sample": {"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 1, "images_per_prompt": 2},
        "train": {"batch_size": 2},
    }
    for group, values in groups.items():
        merged[group] = {**merged.get(group, {}), **values}
    return Config(preset="tiny-qwenimage", algorithm=algorithm, pretrained={"cache_dir": tiny_cache}, **merged)


def test_flow_grpo_trains_and_saves_a_lora_the_pipeline_loads(tmp_path, tiny_cache):
    from diffusers import QwenImagePipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from trainer import train
    from trainer.families.tiny_qwenimage import tiny_qwenimage_path

    history = train(run_config(tmp_path, tiny_cache, "ddpo"))
    assert [m["epoch"] for m in history] == [0, 1] and all(m["kl_to_reference"] > 0 for m in history)
    assert_trained(tmp_path, [m["loss"] for m in history])
    saved = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    for target in ("attn.add_k_proj", "attn.to_add_out", "img_mlp.net.0.proj", "txt_mlp.net.2"):  # flow_grpo's
        assert any(f"transformer_blocks.1.{target}.lora_B" in k for k in saved), target

    pipe = QwenImagePipeline.from_pretrained(tiny_qwenimage_path(tiny_cache))
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(negative_prompt=" ", num_inference_steps=3, height=64, width=64, output_type="np")
    base = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="grpo")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="grpo")
    assert len(loaded) == len(saved) and all(
        torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in saved.items()
    )
    tuned = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(base - tuned).max() > 0
    pipe.unload_lora_weights()
    assert np.array_equal(pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images, base)


FORWARD = {"sample": {"eta": 0.0}, "train": {"timestep_fraction": 0.5, "timestep_selection": "random"}}
DGPO = {
    "sample": {"eta": 0.0},
    "train": {"kl_coef": 1e-4},
    "dgpo": {"num_timesteps": 2, "trunc": 0.75, "beta_dpo": 10.0, "clip": 1e-3},
}


@pytest.mark.parametrize("algorithm, groups", [("nft", FORWARD), ("awm", FORWARD), ("dgpo", DGPO)])
def test_the_forward_process_algorithms_train(tmp_path, tiny_cache, algorithm, groups):
    from trainer import train

    history = train(run_config(tmp_path, tiny_cache, algorithm, **groups))
    assert [m["epoch"] for m in history] == [0, 1]
    assert_trained(tmp_path, [m["loss"] for m in history])


def test_online_dpo_and_refl_train(tmp_path, tiny_cache):
    from trainer import train

    step_loop = {"run": {"output_dir": tmp_path / "dpo", "log_with": "none"}, "sample": {"num_steps": 4}}
    dpo = train(
        Config(
            preset="tiny-qwenimage",
            algorithm="dpo",
            pretrained={"cache_dir": tiny_cache},
            **step_loop,
            train={"batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3},
            dpo={"online": True, "online_pairs": 4, "max_train_steps": 2, "checkpointing_steps": 0},
        )
    )
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and "online_reward_mean" in dpo[0]
    assert_trained(tmp_path / "dpo", [m["loss"] for m in dpo])
    step_loop["run"]["output_dir"] = tmp_path / "refl"
    refl = train(
        Config(
            preset="tiny-qwenimage",
            algorithm="refl",
            pretrained={"cache_dir": tiny_cache},
            **step_loop,
            reward={"scorer": "aesthetic", "options": {"checkpoint": "tiny-shapes"}},
            train={"batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-3},
            refl={"mode": "draft", "draft_k": 2, "num_steps": 4, "mid_low": 2, "mid_high": 3, "max_train_steps": 2},
        )
    )
    assert [m["step"] for m in refl] == [0, 1]
    assert_trained(tmp_path / "refl", [m["loss"] for m in refl])


def test_full_finetuning_saves_a_transformer_that_moved(tmp_path, tiny_cache):
    from diffusers import QwenImageTransformer2DModel

    from trainer import train
    from trainer.families.tiny_qwenimage import tiny_qwenimage_path

    history = train(run_config(tmp_path, tiny_cache, "ddpo", train={"lora": False, "learning_rate": 1e-4}))
    assert all(np.isfinite(m["loss"]) for m in history)
    tuned = QwenImageTransformer2DModel.from_pretrained(tmp_path / "transformer").state_dict()
    base = QwenImageTransformer2DModel.from_pretrained(tiny_qwenimage_path(tiny_cache), subfolder="transformer")
    moved = [k for k, w in base.state_dict().items() if not torch.equal(w, tuned[k])]
    assert len(moved) > len(tuned) // 2, (len(moved), len(tuned))


def test_the_command_line_trains_nft_and_evaluates(tmp_path, tiny_cache):
    out = tmp_path / "run"
    held_out = tmp_path / "eval.txt"
    held_out.write_text("a cat\na red owl\n")
    flags = {
        "--preset": "tiny-qwenimage",
        "--algorithm": "nft",
        "--run.num_epochs": "1",
        "--run.eval_every": "1",
        "--prompt.eval_path": str(held_out),
        "--pretrained.cache_dir": str(tiny_cache),
        "--run.output_dir": str(out),
        "--run.log_with": "none",
        "--sample.num_steps": "3",
        "--sample.eval_num_steps": "3",
        "--sample.batch_size": "4",
        "--sample.num_batches_per_epoch": "1",
        "--train.batch_size": "2",
    }
    command = [sys.executable, "-m", "trainer", *(x for pair in flags.items() for x in pair)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [0]
    assert_trained(out, [m["loss"] for m in history])
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert len(evals) >= 2 and all(math.isfinite(e["reward_mean"]) for e in evals)  # before and after


def test_shard_blocks_are_the_transformers_blocks_and_the_encoder_splits_by_layer(tiny_cache):
    """run.sharding's units (Family.shard_blocks) are classes the transformer holds, its whole depth; the text
    encoder names its decoder layer unsplittable, the unit run.shard_text_encoders uses."""
    _, family = qwen(tiny_cache)
    names = [type(m).__name__ for m in family.denoiser.modules()]
    assert family.shard_blocks == ("QwenImageTransformerBlock",)
    assert names.count("QwenImageTransformerBlock") == family.denoiser.config.num_layers == 2
    encoder = family.pipe.text_encoder
    units = set(encoder._no_split_modules)
    assert "Qwen2_5_VLDecoderLayer" in units
    assert sum(type(m).__name__ in units for m in encoder.modules()) >= 2
