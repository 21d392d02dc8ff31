"""tiny-shapes-sd3, the shapes world's flow-matching model: shipped, loaded by plain diffusers, pretrained for
real (a flow-matching loss checked against the formula), resumable bit for bit; every shapes-sd3 preset trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scorers import world
from tests.conftest import assert_trained
from scorers.tiny_models import SHIPPED as SHIPPED_CLIP
from trainer.tools import shapes_model, shapes_pipelines
from trainer.families.models import SHIPPED
from trainer.families.zero_t5 import use_one_zero_token

PIPELINE = SHIPPED["tiny-shapes-sd3"]


def test_shipped_weights_are_small_and_load_with_plain_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    folders = [*SHIPPED.values(), SHIPPED_CLIP["tiny-shapes", "clip"]]
    size = sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())
    assert size <= 40e6, f"{size / 1e6:.1f} MB shipped"
    # diffusers' documented way to load SD3 without T5 (its tokens are then zeros)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        PIPELINE, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and pipe.text_encoder_3 is None
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    # SD3's latent layout: the VAE config's shift and scale take its latents to zero mean and unit variance
    images = np.stack(
        [world.render(c, np.random.default_rng(i)) for i, c in enumerate(["a red circle", "two squares"] * 8)]
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = (pipe.vae.encode(x).latent_dist.mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert abs(float(z.mean())) < 0.3 and 0.6 < float(z.std()) < 1.5, (float(z.mean()), float(z.std()))


def test_the_trainer_loads_it_as_the_sd3_family():
    from trainer.config import Config
    from trainer.families.models import load_family
    from trainer.families.sd3 import SD3

    family = load_family(Config(pretrained={"model": "tiny-shapes-sd3"}), torch.device("cpu"))
    assert isinstance(family, SD3) and family.native_resolution() == world.RESOLUTION


def test_the_pretrained_model_has_learned_the_world():
    """Its flow loss on renders of held-out captions (compositions never named in pretraining), against the
    same architecture before training on the same VAE latents, noise and times."""
    from diffusers import StableDiffusion3Pipeline

    pretrained = StableDiffusion3Pipeline.from_pretrained(
        PIPELINE, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    use_one_zero_token(pretrained)  # as flow_loss encodes (build_sd3 installs it too)
    untrained = shapes_pipelines.build_sd3(0)
    rng = np.random.default_rng(0)
    captions = [world.sample_caption(rng, "heldout")[0] for _ in range(32)]
    x = torch.from_numpy(np.stack([world.render(c, rng) for c in captions])).permute(0, 3, 1, 2).float() / 127.5 - 1
    config = pretrained.vae.config
    with torch.no_grad():
        z = (pretrained.vae.encode(x).latent_dist.mean - config.shift_factor) * config.scaling_factor
        losses = [
            float(shapes_model.flow_loss(pipe, z, captions, torch.Generator().manual_seed(0)))
            for pipe in (pretrained, untrained)
        ]
    assert losses[0] < 0.5 * losses[1], losses


def test_the_flow_loss_is_sd3s_rectified_flow_objective():
    """flow_loss against the formula written out: t = sigmoid(n), x_t = (1 - t) x0 + t eps, target eps - x0,
    the transformer at t x 1000 on the pipeline's own prompt encoding."""
    pipe = shapes_pipelines.build_sd3(0)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = ["a red circle", "", "two squares"]
    loss = shapes_model.flow_loss(pipe, z, batch, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = 1 / (1 + torch.exp(-torch.randn(3, generator=gen)))
    eps = torch.randn(z.shape, generator=gen)
    embeds, _, pooled, _ = pipe.encode_prompt(batch, None, None, do_classifier_free_guidance=False)
    assert embeds.shape == (3, 77 + 256, 128)  # the CLIP pair side by side, then T5's 256 zeros (flow_loss: as one)
    x_t = torch.stack([(1 - t[i]) * z[i] + t[i] * eps[i] for i in range(3)])
    with torch.no_grad():
        v = pipe.transformer(
            hidden_states=x_t, timestep=1000 * t, encoder_hidden_states=embeds, pooled_projections=pooled
        ).sample
    assert float(loss.detach()) == pytest.approx(float(((v - (eps - z)) ** 2).mean()), rel=1e-5)


def _pretrain(out, *extra: str) -> None:
    shapes_model.Stage.taken = 0
    shapes_model.main(
        [
            "--family",
            "sd3",
            "--out",
            str(out),
            "--unet-steps",
            "3",
            "--unet-batch",
            "4",
            "--latents",
            "8",
            "--save-every",
            "100",
            *extra,
        ]
    )


def test_pretraining_stopped_and_resumed_is_bit_identical(tmp_path):
    _pretrain(tmp_path / "straight")
    _pretrain(tmp_path / "resumed", "--stop-after", "2")
    assert not (tmp_path / "resumed" / "pipeline").exists()
    _pretrain(tmp_path / "resumed", "--stop-after", "2")
    for part in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        a, b = (
            load_file(next((tmp_path / run / "pipeline" / part).glob("*.safetensors")))
            for run in ("straight", "resumed")
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    configs = [
        json.loads((tmp_path / run / "pipeline" / "vae" / "config.json").read_text()) for run in ("straight", "resumed")
    ]
    assert (
        configs[0]["shift_factor"] == configs[1]["shift_factor"] != 0
        and configs[0]["scaling_factor"] == configs[1]["scaling_factor"]
    )


@pytest.mark.slow
def test_the_grpo_preset_reports_accuracy_per_category(tmp_path):
    from tests.conftest import train_one_shapes_epoch

    out, evals = train_one_shapes_epoch(tmp_path, "shapes-sd3-grpo")
    assert [e["epoch"] for e in evals] == [0, 1]
    for record in evals:  # recomputed from the per-image scores: correct means every claim held
        scores = {p["prompt"]: p["reward_shapes"] for p in record["per_prompt"]}
        assert record["accuracy"] == pytest.approx(np.mean([s == 1.0 for p in scores.values() for s in p]))
        assert record["category/counting/accuracy"] == pytest.approx(
            np.mean([s == 1.0 for s in scores["three circles"]])
        )
        # per-image scores are logged to 6 decimals
        assert record["category/position/reward_mean"] == pytest.approx(
            np.mean(scores["a circle above a square"]), abs=1e-6
        )


SMALL = {
    "run": {"num_epochs": 2, "eval_every": 0, "log_with": "none", "log_images_every": 0},
    "sample": {"num_steps": 5, "batch_size": 4, "num_batches_per_epoch": 1},
    "train": {"batch_size": 2},
}  # 5: the fast window fits


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["shapes-sd3-grpo-fast", "shapes-sd3-nft", "shapes-sd3-awm"])
def test_the_online_presets_train_two_epochs(tmp_path, preset):
    from trainer import train
    from trainer.config import Config

    cfg = Config(preset=preset, **{**SMALL, "run": {**SMALL["run"], "output_dir": tmp_path}})
    history = train(cfg)
    assert len(history) == 2
    assert_trained(tmp_path, [m["loss"] for m in history])


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,steps",
    [
        ("shapes-sd3-dpo", {"dpo": {"online_pairs": 4, "max_train_steps": 2}}),
        ("shapes-sd3-refl", {"refl": {"max_train_steps": 2}}),
    ],
)
def test_the_dpo_and_refl_presets_train_two_steps(tmp_path, preset, steps):
    from trainer import train
    from trainer.config import Config

    cfg = Config(
        preset=preset,
        run={"output_dir": tmp_path, "eval_every": 0, "log_with": "none", "log_images_every": 0},
        sample={"num_steps": 4, "batch_size": 4},
        train={"batch_size": 2},
        **steps,
    )
    history = train(cfg)
    assert [m["step"] for m in history] == [0, 1]
    assert_trained(tmp_path, [m["loss"] for m in history])
