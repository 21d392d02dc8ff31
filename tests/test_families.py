"""Each model family behind the same rollout and DDPO loop: log-probs re-scored exactly, LoRA the family's own
diffusers pipeline loads, exact resume."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from tests.conftest import assert_trained
from trainer.config import Config
from trainer.algorithms.ddpo.loop import train
from trainer.families import Dynamics, Family
from trainer.families.models import FAMILIES, load_family, make_trainable
from trainer.families.vae import VAE
from trainer.sampling import rescore, sample

pytestmark = pytest.mark.slow


def assert_rescored_exactly(family, batch, negative, guidance: float, eta: float, shuffle: bool = True) -> None:
    """Training's re-scoring of every stored step equals the sampled log-prob bit for bit (first ratio 1), in
    the shuffled chunks training takes (or the batch as sampled)."""
    steps = batch.log_probs.shape[1]
    chunks = [batch.chunk(*pick) for pick in batch.shuffled(len(batch.prompts), steps)] if shuffle else [batch]
    for chunk in chunks:
        for j in range(steps):
            with torch.no_grad():
                log_prob, _, _ = rescore(family, family.denoiser, chunk, j, negative, guidance, eta)
            assert torch.equal(log_prob, chunk.log_probs[:, j]), j


def test_sdxl_first_step_importance_ratio_is_exactly_one(tiny_cache):
    cfg = Config(preset="tiny-sdxl", pretrained={"cache_dir": tiny_cache})
    family = load_family(cfg, torch.device("cpu"))
    assert type(family).__name__ == "SDXL"  # told by the pipeline's own class
    make_trainable(family.denoiser, cfg)
    negative = family.encode_prompts([""])
    assert float(negative["prompt_embeds"].abs().max()) == 0 and negative["time_ids"].tolist() == [
        [64, 64, 0, 0, 64, 64]
    ]
    torch.manual_seed(0)
    batch, final = sample(family, family.denoiser, ["a cat", "an owl"], [{}, {}], negative, 4, 1.0, 5.0, 64)
    assert family.vae.to_uint8(final).shape == (2, 64, 64, 3)
    assert_rescored_exactly(family, batch, negative, 5.0, 1.0)


def sdxl_run(tmp_path, tiny_cache, epochs: int, **run) -> Config:
    return Config(
        preset="tiny-sdxl",
        run={"output_dir": tmp_path, "num_epochs": epochs, "log_with": "none", "log_images_every": 0, **run},
        pretrained={"cache_dir": tiny_cache},
        sample={"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 2},
        train={"batch_size": 2},
    )


def test_sdxl_trains_saves_a_lora_its_pipeline_loads_and_resumes_exactly(tmp_path, tiny_cache):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    straight = sdxl_run(tmp_path / "straight", tiny_cache, 3)
    history = train(straight)
    assert [m["epoch"] for m in history] == [0, 1, 2] and all(np.isfinite(m["loss"]) for m in history)
    first = sdxl_run(tmp_path / "resumed", tiny_cache, 2, save_freq=1)
    train(first)
    again = sdxl_run(tmp_path / "resumed", tiny_cache, 3, resume_from=tmp_path / "resumed")
    assert [m["epoch"] for m in train(again)] == [2]
    one = load_file(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors")
    two = load_file(tmp_path / "resumed" / "lora" / "pytorch_lora_weights.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)

    from trainer.families.tiny_pipeline import tiny_sdxl_path

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path(tiny_cache))
    pipe.set_progress_bar_config(disable=True)
    base = pipe(
        "a cat",
        num_inference_steps=3,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    pipe.load_lora_weights(tmp_path / "straight" / "lora", adapter_name="ddpo")
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.unet, adapter_name="ddpo")
    assert len(loaded) == len(one) and all(torch.equal(loaded[k.removeprefix("unet.")], v) for k, v in one.items())
    tuned = pipe(
        "a cat",
        num_inference_steps=3,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert np.abs(base - tuned).max() > 0


# -- SD3 (flow matching, Flow-GRPO's SDE step) ----------------------------------------------------------------
def sd3(tiny_cache):
    cfg = Config(preset="tiny-sd3", pretrained={"cache_dir": tiny_cache})
    family = load_family(cfg, torch.device("cpu"))
    assert type(family).__name__ == "SD3" and family.pipe.text_encoder_3 is None  # told by its class; T5 absent
    return cfg, family


def test_sd3_first_step_importance_ratio_is_exactly_one(tiny_cache):
    cfg, family = sd3(tiny_cache)
    make_trainable(family.denoiser, cfg)
    negative = family.encode_prompts([""])
    torch.manual_seed(0)
    batch, final = sample(family, family.denoiser, ["a cat", "an owl"], [{}, {}], negative, 6, 0.7, 4.5, 64)
    assert family.vae.to_uint8(final).shape == (2, 64, 64, 3) and batch.latents.shape == (2, 6, 16, 8, 8)
    assert_rescored_exactly(family, batch, negative, 4.5, 0.7)


def test_sd3_deterministic_sampling_is_the_pipelines_own(tiny_cache):
    """noise level 0 is the scheduler's Euler step: our sampler and StableDiffusion3Pipeline agree, guidance
    included."""
    _, family = sd3(tiny_cache)
    negative = family.encode_prompts([""])
    start = family.initial_latents(2, 64, torch.Generator().manual_seed(3), "cpu")
    ours, final = sample(
        family,
        family.denoiser,
        ["a cat", "a red owl"],
        [{}, {}],
        negative,
        8,
        0.0,
        4.5,
        64,
        generator=torch.Generator().manual_seed(3),
    )
    theirs = family.pipe(
        ["a cat", "a red owl"],
        num_inference_steps=8,
        guidance_scale=4.5,
        height=64,
        width=64,
        latents=start.clone(),
        output_type="latent",
    ).images
    assert torch.allclose(final, theirs, atol=1e-5, rtol=1e-5), (final - theirs).abs().max()
    assert torch.equal(ours.latents[:, 0], start)


def test_sd3_window_stores_only_its_stochastic_steps_and_the_rest_is_the_ode(tiny_cache):
    _, family = sd3(tiny_cache)
    negative = family.encode_prompts([""])
    args = (family, family.denoiser, ["a cat", "an owl"], [{}, {}], negative, 8)
    ode, _ = sample(*args, 0.0, 4.5, 64, generator=torch.Generator().manual_seed(5))
    windowed, _ = sample(*args, 0.7, 4.5, 64, generator=torch.Generator().manual_seed(5), window=range(2, 5))
    assert windowed.steps.tolist() == [[2, 3, 4]] * 2 and windowed.latents.shape[1] == 3
    assert torch.equal(windowed.timesteps[0], family.dynamics.timesteps(8, "cpu")[2:5])
    assert torch.equal(windowed.latents[:, 0], ode.latents[:, 2])  # deterministic until the window opens
    assert not torch.equal(windowed.next_latents[:, 0], ode.next_latents[:, 2])  # then stochastic
    assert_rescored_exactly(family, windowed, negative, 4.5, 0.7, shuffle=False)


def family_run(preset, tmp_path, tiny_cache, epochs: int, **run) -> Config:
    return Config(
        preset=preset,
        run={"output_dir": tmp_path, "num_epochs": epochs, "log_with": "none", "log_images_every": 0, **run},
        pretrained={"cache_dir": tiny_cache},
        sample={"num_steps": 4, "batch_size": 4, "num_batches_per_epoch": 2},
        train={"batch_size": 2},
    )


def test_sd3_trains_with_kl_saves_a_lora_its_pipeline_loads_and_resumes_exactly(tmp_path, tiny_cache):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    straight = family_run("tiny-sd3", tmp_path / "straight", tiny_cache, 3)
    history = train(straight)
    assert [m["epoch"] for m in history] == [0, 1, 2] and all(np.isfinite(m["loss"]) for m in history)
    assert all(m["kl_to_reference"] > 0 for m in history)  # the KL path ran (and moved away from the reference)
    first = family_run("tiny-sd3", tmp_path / "resumed", tiny_cache, 2, save_freq=1)
    train(first)
    again = family_run("tiny-sd3", tmp_path / "resumed", tiny_cache, 3, resume_from=tmp_path / "resumed")
    assert [m["epoch"] for m in train(again)] == [2]
    one = load_file(tmp_path / "straight" / "lora" / "pytorch_lora_weights.safetensors")
    two = load_file(tmp_path / "resumed" / "lora" / "pytorch_lora_weights.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)

    from trainer.families.tiny_pipeline import tiny_sd3_path

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path(tiny_cache), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=3, height=64, width=64, output_type="np")
    base = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path / "straight" / "lora", adapter_name="grpo")
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="grpo")
    assert len(loaded) == len(one) and all(
        torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in one.items()
    )
    tuned = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(base - tuned).max() > 0


def test_sdxl_deterministic_sampling_off_its_native_size_is_the_pipelines_own(tiny_cache):
    """DDIM eta 0 at 96 px (the tiny SDXL's native size is 64): the micro-conditioning follows the size, as the
    pipeline's (original size = target size = the image's, no crop, also for the negative prompt)."""
    cfg = Config(preset="tiny-sdxl", pretrained={"cache_dir": tiny_cache}, sample={"num_steps": 6})
    family = load_family(cfg, torch.device("cpu"))
    negative = family.encode_prompts([""])
    start = family.initial_latents(2, 96, torch.Generator().manual_seed(4), "cpu")
    ours, final = sample(
        family,
        family.denoiser,
        ["a cat", "a red owl"],
        [{}, {}],
        negative,
        6,
        0.0,
        5.0,
        96,
        generator=torch.Generator().manual_seed(4),
    )
    assert ours.prompt_embeds["time_ids"].tolist() == [[96, 96, 0, 0, 96, 96]] * 2
    theirs = family.pipe(
        ["a cat", "a red owl"],
        num_inference_steps=6,
        guidance_scale=5.0,
        eta=0.0,
        height=96,
        width=96,
        latents=start.clone(),
        output_type="latent",
    ).images
    assert torch.allclose(final, theirs, atol=1e-5, rtol=1e-5), (final - theirs).abs().max()


def test_sd3_with_t5_encodes_its_tokens_and_leaves_them_out_when_asked(tiny_cache):
    from trainer.families.tiny_pipeline import tiny_sd3_path

    path = str(tiny_sd3_path(tiny_cache, t5=True))
    with_t5 = load_family(Config(preset="tiny-sd3", pretrained={"model": path}), torch.device("cpu"))
    without = load_family(Config(preset="tiny-sd3", pretrained={"model": path, "load_t5": False}), torch.device("cpu"))
    assert with_t5.pipe.text_encoder_3 is not None and without.pipe.text_encoder_3 is None
    a, b = with_t5.encode_prompts(["a red cat"]), without.encode_prompts(["a red cat"])
    # without T5 its 256 zeros are one token that the attention counts 256 times (tests/test_zero_t5.py)
    assert a["prompt_embeds"].shape == (1, 77 + 256, 64) and b["prompt_embeds"].shape == (1, 77 + 1, 64)
    assert torch.equal(a["prompt_embeds"][:, :77], b["prompt_embeds"][:, :77])  # the CLIP pair's, padded to T5's width
    assert float(b["prompt_embeds"][:, 77:].abs().max()) == 0 < float(a["prompt_embeds"][:, 77:].abs().max())
    assert torch.equal(a["pooled_projections"], b["pooled_projections"])


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-zimage"])
def test_offloaded_text_encoders_encode_as_the_resident_ones(tiny_cache, preset):
    """run.offload_text_encoders: the encoders' weights stay in CPU memory (the modules hold none: accelerate's
    hooks bring each layer's to the device for its forward) and the prompts encode the same."""
    from trainer.families import text_encoders

    cfg = Config(preset=preset, pretrained={"cache_dir": tiny_cache})
    resident = load_family(cfg, torch.device("cpu"))
    offloaded = load_family(
        cfg.model_copy(update={"run": cfg.run.model_copy(update={"offload_text_encoders": True})}), torch.device("cpu")
    )
    encoders = text_encoders(offloaded.pipe)
    assert len(encoders) == (1 if preset in ("tiny", "tiny-flux2", "tiny-zimage") else 2)
    assert all(p.device.type == "meta" for encoder in encoders.values() for p in encoder.parameters())
    assert all(p.device.type == "cpu" for p in offloaded.denoiser.parameters())
    a, b = (
        resident.encode_prompts(["a red cat", "two blue squares"]),
        offloaded.encode_prompts(["a red cat", "two blue squares"]),
    )
    a, b = (a, b) if isinstance(a, dict) else (vars(a), vars(b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-zimage"])
def test_the_cli_trains_each_family_preset(tmp_path, tiny_cache, preset):
    import subprocess
    import sys

    out = tmp_path / preset
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer",
            "--preset",
            preset,
            "--pretrained.cache_dir",
            str(tiny_cache),
            "--run.output_dir",
            str(out),
            "--run.num_epochs",
            "2",
            "--run.log_with",
            "none",
            "--sample.num_steps",
            "3",
            "--sample.batch_size",
            "4",
            "--sample.num_batches_per_epoch",
            "1",
            "--train.batch_size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [0, 1]
    assert_trained(out, [m["loss"] for m in history])
    assert (out / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_sd3_cps_first_ratio_is_one_and_sde_type_is_refused_for_ddim_families(tiny_cache):
    cfg = Config(preset="tiny-sd3", pretrained={"cache_dir": tiny_cache}, sample={"sde_type": "cps", "eta": 0.8})
    family = load_family(cfg, torch.device("cpu"))
    negative = family.encode_prompts([""])
    batch, _ = sample(
        family,
        family.denoiser,
        ["a cat", "an owl"],
        [{}, {}],
        negative,
        5,
        0.8,
        4.5,
        64,
        generator=torch.Generator().manual_seed(0),
    )
    assert_rescored_exactly(family, batch, negative, 4.5, 0.8, shuffle=False)
    with torch.no_grad():  # Flow-GRPO's CPS log-prob: -mean((x_next - mean)^2), no constants
        log_prob, mean, _ = rescore(family, family.denoiser, batch, 2, negative, 4.5, 0.8)
    expected = -((batch.next_latents[:, 2] - mean) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=0)
    ddim_cps = Config(
        pretrained={"cache_dir": tiny_cache},
        sample={"sde_type": "cps"},
        train={"timestep_selection": "first", "timestep_fraction": 0.9},
    )
    with pytest.raises(ValueError, match="sample.sde_type: cps is a flow-matching step; a StableDiffusionPipeline"):
        load_family(ddim_cps, torch.device("cpu"))


@pytest.mark.parametrize(
    "preset, name",
    [
        ("tiny", "SD1"),
        ("tiny-sdxl", "SDXL"),
        ("tiny-sd3", "SD3"),
        ("tiny-flux", "Flux"),
        ("tiny-flux2", "Flux2"),
        ("tiny-qwenimage", "QwenImage"),
        ("tiny-zimage", "ZImage"),
        ("tiny-wan", "Wan"),
    ],
)
def test_every_family_has_what_the_family_protocol_lists(tiny_cache, preset, name):
    """trainer.families.Family and Dynamics cannot drift from the families: each one loaded is an instance of
    Family, its ``dynamics`` of Dynamics and its ``vae`` the shared VAE, with every method taking the protocols'
    parameters."""
    family = load_family(Config(preset=preset, pretrained={"cache_dir": tiny_cache}), torch.device("cpu"))
    assert type(family).__name__ == name and isinstance(family, Family)
    assert FAMILIES[family.pipeline_class] is type(family) and isinstance(family.denoiser_name, str)
    assert isinstance(family.denoiser, torch.nn.Module) and family.denoiser is getattr(
        family.pipe, family.denoiser_name
    )
    assert isinstance(family.dynamics, Dynamics) and family.dynamics.scheduler is family.pipe.scheduler
    assert type(family.dynamics).__name__ == ("DDIM" if name in ("SD1", "SDXL") else "FlowMatching")
    assert isinstance(family.vae, VAE) and family.vae.autoencoder is family.pipe.vae
    for protocol, instance in ((Family, family), (Dynamics, family.dynamics)):
        for attribute, member in vars(protocol).items():
            if attribute.startswith("_") or isinstance(member, property) or not callable(member):
                continue
            wanted = list(inspect.signature(getattr(protocol, attribute)).parameters)
            wanted = wanted if isinstance(member, classmethod) else wanted[1:]  # self
            assert list(inspect.signature(getattr(instance, attribute)).parameters) == wanted, attribute


@pytest.mark.parametrize(
    "preset", ["tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-flux2", "tiny-qwenimage", "tiny-zimage", "tiny-wan"]
)
def test_no_family_borrows_another_objects_methods(tiny_cache, preset):
    """Families compose their dynamics and VAE (``family.dynamics``, ``family.vae``), never copy methods bound to
    another instance into their own attributes (as SDXL once took 11 of an SD1's): every bound method among the
    attributes of a family, its dynamics and its VAE is bound to that object itself, and none holds a family."""
    family = load_family(Config(preset=preset, pretrained={"cache_dir": tiny_cache}), torch.device("cpu"))
    for owner in (family, family.dynamics, family.vae):
        for attribute, value in vars(owner).items():
            assert getattr(value, "__self__", owner) is owner, f"{type(owner).__name__}.{attribute}"
            assert not isinstance(value, tuple(FAMILIES.values())), f"{type(owner).__name__}.{attribute}"
