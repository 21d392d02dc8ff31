"""tiny-shapes and its tiny CLIP: shipped, loaded by plain diffusers / transformers, pretrained for real; the
pretraining scripts resume exactly; the shapes preset learns and reports held-out accuracy per category."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scorers import shapes_clip, world
from scorers.shapes import verify
from scorers.tiny_models import SHIPPED
from trainer.tools import shapes_model
from trainer.families.models import SHIPPED as SHIPPED_PIPELINES

PIPELINE, CLIP = SHIPPED_PIPELINES["tiny-shapes"], SHIPPED["tiny-shapes", "clip"]


def test_shipped_weights_are_small_and_load_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    size = sum(f.stat().st_size for folder in (PIPELINE, CLIP) for f in folder.rglob("*") if f.is_file())
    assert size <= 20e6, f"{size / 1e6:.1f} MB shipped"
    pipe = StableDiffusionPipeline.from_pretrained(PIPELINE, dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.config.scaling_factor != 0.18215


def test_the_pretrained_model_draws_what_it_is_told_and_a_random_one_does_not(tiny_cache):
    from diffusers import StableDiffusionPipeline

    from trainer.families.tiny_pipeline import tiny_pipeline_path

    captions = ["a red circle", "a blue square", "a green triangle", "a yellow circle"] * 4

    def score(path) -> float:
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            captions,
            num_inference_steps=20,
            guidance_scale=5.0,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        images = (images * 255).round().astype(np.uint8)
        return float(np.mean([verify(i, world.claims(c))[0] for i, c in zip(images, captions)]))

    pretrained, random_init = score(PIPELINE), score(tiny_pipeline_path(tiny_cache))
    assert pretrained >= 0.5 and random_init <= 0.2, (pretrained, random_init)  # a stray blob can pass by chance


def test_the_clip_ranks_true_captions_above_changed_ones():
    from scorers.clip import ClipScore

    scorer = ClipScore("tiny-shapes")
    scorer.load("cpu")
    rng = np.random.default_rng(0)
    captions = [world.sample_caption(rng, "heldout")[0] for _ in range(64)]
    images = np.stack([world.render(c, rng) for c in captions])
    changed = [shapes_clip.hard_negative(c, rng) for c in captions]
    right = scorer.cosine(images, captions) > scorer.cosine(images, changed)
    assert right.mean() >= 0.7


def _pretrain(out: Path, *extra: str) -> None:
    shapes_model.Stage.taken = 0
    shapes_model.main(
        [
            "--out",
            str(out),
            "--vae-steps",
            "3",
            "--vae-batch",
            "2",
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
    for _ in range(3):  # stops after vae step 2, then vae 3 + unet 1, then runs to the end
        _pretrain(tmp_path / "resumed", "--stop-after", "2")
    assert not (tmp_path / "resumed" / "pipeline").exists()
    _pretrain(tmp_path / "resumed", "--stop-after", "2")
    for part in ("unet", "vae", "text_encoder"):
        a, b = (
            load_file(next((tmp_path / run / "pipeline" / part).glob("*.safetensors")))
            for run in ("straight", "resumed")
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert (
        json.loads((tmp_path / "resumed" / "pipeline" / "vae" / "config.json").read_text())["scaling_factor"]
        == json.loads((tmp_path / "straight" / "pipeline" / "vae" / "config.json").read_text())["scaling_factor"]
    )


def test_the_shapes_preset_reports_accuracy_per_category(tmp_path):
    from tests.conftest import train_one_shapes_epoch

    out, evals = train_one_shapes_epoch(tmp_path, "shapes")
    assert [e["epoch"] for e in evals] == [0, 1] and (out / "eval" / "before_after.png").is_file()
    for record in evals:  # recomputed from the per-image scores: correct means every claim held
        scores = {p["prompt"]: p["reward_shapes"] for p in record["per_prompt"]}
        correct = [s == 1.0 for p in scores.values() for s in p]
        assert record["accuracy"] == pytest.approx(np.mean(correct))
        assert record["category/counting/accuracy"] == pytest.approx(
            np.mean([s == 1.0 for s in scores["three circles"]])
        )
        assert record["category/position/reward_mean"] == pytest.approx(np.mean(scores["a circle above a square"]))
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert metrics["accuracy"] == pytest.approx(np.mean([s["correct"] for s in samples]))
    for category in {s["category"] for s in samples}:
        mine = [s for s in samples if s["category"] == category]
        assert metrics[f"category/{category}/reward_mean"] == pytest.approx(np.mean([s["reward"] for s in mine]))
