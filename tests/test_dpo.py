"""Diffusion-DPO's loss against an independent implementation of the published formula (Wallace et al. 2023)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import assert_trained
from trainer.algorithms.dpo.loss import diffusion_dpo_loss


def reference_loss_and_grad(mw, ml, rw, rl, beta):
    """float64 numpy: loss = mean(log(1 + exp(-x))), x = -beta/2 ((mw - ml) - (rw - rl)); d loss / d mw, d ml."""
    x = -0.5 * beta * ((mw - ml) - (rw - rl))
    loss = np.mean(np.logaddexp(0.0, -x))
    dx = -1.0 / (1.0 + np.exp(x)) / len(x)  # d/dx log(1 + e^-x) = -sigmoid(-x)
    return loss, dx * (-0.5 * beta), dx * (0.5 * beta)


def test_loss_and_gradient_match_the_formula():
    rng = np.random.default_rng(0)
    mw, ml, rw, rl = (rng.uniform(0.05, 0.2, 16) for _ in range(4))
    model_w = torch.tensor(mw, requires_grad=True)
    model_l = torch.tensor(ml, requires_grad=True)
    loss, stats = diffusion_dpo_loss(model_w, model_l, torch.tensor(rw), torch.tensor(rl), beta=5000.0)
    loss.backward()
    expected, grad_w, grad_l = reference_loss_and_grad(mw, ml, rw, rl, 5000.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(model_w.grad.numpy(), grad_w, rtol=1e-6)
    np.testing.assert_allclose(model_l.grad.numpy(), grad_l, rtol=1e-6)
    x = -2500.0 * ((mw - ml) - (rw - rl))
    assert stats["implicit_accuracy"].item() == pytest.approx(np.mean(x > 0))


def test_the_policy_equal_to_its_reference_gives_log_2_and_no_implicit_accuracy():
    errors = torch.rand(2, 8, dtype=torch.float64)
    loss, stats = diffusion_dpo_loss(errors[0], errors[1], errors[0].clone(), errors[1].clone(), beta=5000.0)
    assert loss.item() == math.log(2) and stats["implicit_accuracy"].item() == 0.0


def test_ties_weighted_out():
    errors = torch.rand(4, 6, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    weighted, _ = diffusion_dpo_loss(*errors, beta=100.0, weights=weights)
    kept = weights.bool()
    alone, _ = diffusion_dpo_loss(*(e[kept] for e in errors), beta=100.0)
    assert weighted.item() == pytest.approx(alone.item(), rel=1e-12)


# -- the data: Pick-a-Pic's parquet layout and a folder of files, built from rendered shapes -------------------


def pick_a_pic_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs in Pick-a-Pic v2's schema: the true caption's render against a wrong one's; some ties, some
    pairs with the winner second."""
    from scorers import world
    from trainer.pairs import jpeg

    rng = np.random.default_rng(seed)
    captions = world.CAPTIONS["single_object"] + world.CAPTIONS["colors"]
    rows = []
    for i in range(n):
        true, wrong = rng.choice(captions, 2, replace=False)
        good, bad = jpeg(world.render(true, seed + i, 80)), jpeg(world.render(wrong, seed + i, 80))
        label = [1.0, 0.0, 0.5][i % 3]
        first, second = (bad, good) if label == 0.0 else (good, bad)
        rows.append(
            {"caption": str(true), "jpg_0": first, "jpg_1": second, "label_0": label, "best_image_uid": f"u{i}"}
        )
    return rows


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory):
    from trainer.pairs import write_parquet

    folder = tmp_path_factory.mktemp("pickapic")
    rows = pick_a_pic_rows(18)
    write_parquet(rows[:9], folder / "train-0000.parquet")
    write_parquet(rows[9:], folder / "train-0001.parquet")
    return folder


def test_pick_a_pic_parquet_ties_dropped_winner_first(pairs_folder):
    from trainer.pairs import Pairs, load_pairs

    pairs = load_pairs(str(pairs_folder))
    assert len(pairs) == 12 and set(pairs["label_0"]) == {0.0, 1.0}
    assert "best_image_uid" in pairs.column_names  # other columns are kept
    data = Pairs(pairs, 64, seed=0, hflip=False)
    rows = pick_a_pic_rows(18)
    kept = [r for r in rows if r["label_0"] != 0.5]
    for i in range(len(data)):
        item = data[(0, i)]
        assert item["pixels"].shape == (2, 3, 64, 64) and 0 <= item["pixels"].min() and item["pixels"].max() <= 1
        good = np.asarray(
            __import__("PIL.Image", fromlist=["Image"])
            .open(__import__("io").BytesIO(kept[i]["jpg_0" if kept[i]["label_0"] == 1 else "jpg_1"]))
            .convert("RGB")
            .resize((64, 64), 2)
        )
        first = (item["pixels"][0].permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(first - good).mean() < 2  # the winner, centre-cropped at 80 -> 64 (a square: a plain resize)
        assert item["time_ids"].tolist() == [80, 80, 0, 0, 64, 64]


def test_preprocessing_is_seeded_per_pair_and_epoch(tmp_path):
    from trainer.pairs import Pairs, jpeg, load_pairs, write_parquet

    wide = [
        dict(
            r,
            jpg_0=jpeg(
                np.pad(
                    np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(__import__("io").BytesIO(r["jpg_0"]))),
                    ((0, 0), (8, 8), (0, 0)),
                    mode="edge",
                )
            ),
        )
        for r in pick_a_pic_rows(6)
    ]
    write_parquet(wide, tmp_path / "wide.parquet")  # 96 x 80 first images
    pairs = load_pairs(str(tmp_path))
    assert Pairs(pairs, 64, seed=3)[(0, 0)]["time_ids"].tolist() == [80, 96, 0, 6, 64, 64]  # centre crop of 77 x 64
    data = Pairs(pairs, 48, seed=3, random_crop=True, hflip=True, proportion_empty_prompts=0.5)
    a, b = data[(0, 1)], data[(0, 1)]
    assert torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]
    epochs = [data[(e, i)] for e in range(8) for i in range(len(data))]
    empty = np.mean([it["caption"] == "" for it in epochs])
    assert 0.3 < empty < 0.7 and all(it["prompt"] for it in epochs)
    crops = {tuple(it["time_ids"][2:4].tolist()) for it in epochs if it["time_ids"][1] == 96}
    assert len(crops) > 3  # random crops along the 58 px of width (80 -> 48 x 58)
    assert not torch.equal(data[(0, 1)]["pixels"], data[(1, 1)]["pixels"])


def test_batches_cover_each_epoch_split_across_processes_and_resume():
    from trainer.pairs import PairBatches

    full = [PairBatches(10, 2, 2, rank, seed=1) for rank in (0, 1)]
    streams = [iter(b) for b in full]
    epoch0 = [next(s) for _ in range(2) for s in streams]
    indices = [i for batch in epoch0 for _, i in batch]
    assert len(set(indices)) == 8 and all(e == 0 for batch in epoch0 for e, _ in batch)  # 10 // 4 = 2 batches
    following = [next(streams[0]) for _ in range(3)]
    resumed = iter(PairBatches(10, 2, 2, 0, seed=1, skip=2))
    assert [next(resumed) for _ in range(3)] == following and following[0][0][0] == 1


def test_folder_layout_with_pairs_jsonl(tmp_path):
    import json as _json

    from trainer.pairs import Pairs, load_pairs

    rows = pick_a_pic_rows(4)
    lines = []
    for i, row in enumerate(rows):
        for k in (0, 1):
            (tmp_path / f"{i}_{k}.jpg").write_bytes(row[f"jpg_{k}"])
        lines.append(
            _json.dumps(
                {"caption": row["caption"], "image_0": f"{i}_0.jpg", "image_1": f"{i}_1.jpg", "label_0": row["label_0"]}
            )
        )
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    pairs = load_pairs(str(tmp_path))
    assert len(pairs) == 3
    item = Pairs(pairs, 32, seed=0, root=tmp_path)[(0, 1)]
    assert item["pixels"].shape == (2, 3, 32, 32)


def test_a_dataset_without_the_columns_is_named(tmp_path):
    from trainer.pairs import PairsError, load_pairs, write_parquet

    write_parquet([{"caption": "x", "image": b"..."}], tmp_path / "a.parquet")
    with pytest.raises(PairsError, match="no column.*jpg_0, jpg_1, label_0"):
        load_pairs(str(tmp_path))


# -- the loop ---------------------------------------------------------------------------------------------


def dpo_config(tmp_path, tiny_cache, pairs_folder, **dpo):
    from trainer.config import Config

    return Config(
        algorithm="dpo",
        run={"output_dir": tmp_path / "run", "log_with": "none"},
        pretrained={"cache_dir": tiny_cache},
        train={"batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3},
        dpo={"dataset": str(pairs_folder), "max_train_steps": 3, "checkpointing_steps": 1, **dpo},
    )


@pytest.mark.slow
def test_dpo_starts_at_log_2_and_moves_the_adapters_only(tmp_path, tiny_cache, pairs_folder):
    from trainer.algorithms.dpo.loop import train

    cfg = dpo_config(tmp_path, tiny_cache, pairs_folder)
    history = train(cfg)
    assert [m["step"] for m in history] == [0, 1, 2]
    first = history[0]  # the adapters' B matrices start at zero: the policy is its reference
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["implicit_accuracy"] == 0.0
    assert first["model_mse_winner"] == pytest.approx(first["reference_mse_winner"], abs=1e-7)
    assert history[-1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert all(0 <= m["data_wait_share"] < 1 and m["grad_norm"] > 0 for m in history)
    assert (cfg.run.output_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_dpo_resume_is_exact(tmp_path, tiny_cache, pairs_folder):
    from safetensors.torch import load_file

    from trainer.algorithms.dpo.loop import train

    def run(out, resume=None):
        cfg = dpo_config(tmp_path, tiny_cache, pairs_folder, max_train_steps=4)
        cfg.run.output_dir, cfg.run.resume_from = out, resume
        return cfg, train(cfg)

    _, straight = run(tmp_path / "straight")
    cfg, _ = run(tmp_path / "split")
    import shutil

    for later in ("checkpoint-3", "checkpoint-4"):  # as if killed after step 2
        shutil.rmtree(tmp_path / "split" / "checkpoints" / later)
    _, resumed = run(tmp_path / "split", resume=tmp_path / "split")
    assert [m["step"] for m in resumed] == [2, 3]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[2:]]
    one, two = (load_file(tmp_path / r / "lora" / "pytorch_lora_weights.safetensors") for r in ("straight", "split"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [__import__("json").loads(line)["step"] for line in lines] == [0, 1, 2, 3]


@pytest.mark.slow
def test_sft_and_full_finetuning_with_a_frozen_reference(tmp_path, tiny_cache, pairs_folder):
    from trainer.algorithms.dpo.loop import train

    sft = train(dpo_config(tmp_path / "sft", tiny_cache, pairs_folder, sft=True, max_train_steps=2))
    assert "implicit_accuracy" not in sft[0] and sft[0]["model_mse_winner"] > 0
    cfg = dpo_config(tmp_path / "full", tiny_cache, pairs_folder, max_train_steps=2)
    cfg.train.lora, cfg.train.learning_rate = False, 1e-5
    full = train(cfg)
    # the frozen copy equals the policy at step 0, up to float rounding (CPU kernels differ for weights that
    # require grad), which beta 5000 magnifies: 1e-7 in an error is 2.5e-4 in the margin
    assert full[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert abs(full[0]["model_mse_winner"] - full[0]["reference_mse_winner"]) < 1e-6
    assert full[1]["loss"] != full[0]["loss"]
    assert (cfg.run.output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_an_ema_reference_follows_the_policy(tmp_path, tiny_cache, pairs_folder):
    """dpo.reference ema: the reference is the policy's moving average, so it starts as the policy (log 2)
    and, with a fast average, stays near it where the base reference falls behind; it needs full finetuning
    with train.ema_decay, said before anything loads."""
    from pydantic import ValidationError

    from trainer.algorithms.dpo.loop import train

    with pytest.raises(ValidationError, match="dpo.reference ema .* train.lora false"):
        dpo_config(tmp_path, tiny_cache, pairs_folder, reference="ema")
    losses = {}
    for reference in ("base", "ema"):
        cfg = dpo_config(tmp_path / reference, tiny_cache, pairs_folder, max_train_steps=3)
        cfg.train.lora, cfg.train.learning_rate, cfg.train.ema_decay = False, 1e-4, 0.01
        cfg.dpo.reference = reference
        losses[reference] = [m["loss"] for m in train(cfg)]
    # both start at log 2: beta (5000) amplifies the base copy's float rounding (1e-7 in its errors) to 1e-4
    assert losses["ema"][0] == pytest.approx(math.log(2), abs=1e-3) and losses["base"][0] == pytest.approx(
        losses["ema"][0], abs=1e-3
    )
    far = [abs(a - math.log(2)) for a in losses["base"][1:]]
    near = [abs(b - math.log(2)) for b in losses["ema"][1:]]
    assert all(n < f / 2 for n, f in zip(near, far)), (losses, near, far)


def test_seed_flags_translate():
    from trainer.algorithms.dpo.seed_flags import translate

    seed = [
        "--pretrained_model_name_or_path=runwayml/stable-diffusion-v1-5",
        "--dataset_name=yuvalkirstain/pickapic_v2",
        "--train_batch_size=1",
        "--dataloader_num_workers=16",
        "--gradient_accumulation_steps=1",
        "--max_train_steps=2000",
        "--lr_scheduler=constant_with_warmup",
        "--lr_warmup_steps=500",
        "--learning_rate=1e-8",
        "--scale_lr",
        "--cache_dir=/data/pickapic/",
        "--checkpointing_steps",
        "500",
        "--beta_dpo",
        "5000",
        "--output_dir=tmp-sd15",
        "--sdxl",
        "--no_hflip",
        "--choice_model",
        "aes",
    ]
    assert translate(seed) == [
        "--pretrained.model",
        "runwayml/stable-diffusion-v1-5",
        "--dpo.dataset",
        "yuvalkirstain/pickapic_v2",
        "--train.batch_size",
        "1",
        "--dpo.dataloader_num_workers",
        "16",
        "--train.gradient_accumulation_steps",
        "1",
        "--dpo.max_train_steps",
        "2000",
        "--train.lr_scheduler",
        "constant_with_warmup",
        "--train.lr_warmup_steps",
        "500",
        "--train.learning_rate",
        "1e-8",
        "--dpo.scale_lr",
        "--dpo.cache_dir",
        "/data/pickapic/",
        "--dpo.checkpointing_steps",
        "500",
        "--dpo.beta",
        "5000",
        "--run.output_dir",
        "tmp-sd15",
        "--no-dpo.hflip",
        "--dpo.relabel",
        "--reward.scorer",
        "aesthetic",
    ]
    from pydantic_settings import CliApp

    from trainer.config import Config

    cfg = CliApp.run(Config, cli_args=["--algorithm", "dpo", *translate(seed[:-2])])
    assert (cfg.dpo.max_train_steps, cfg.dpo.beta, cfg.dpo.scale_lr, cfg.dpo.hflip) == (2000, 5000.0, True, False)
    assert cfg.train.learning_rate == 1e-8 and str(cfg.dpo.cache_dir) == "/data/pickapic"


# -- AI feedback: python -m trainer.label ------------------------------------------------------------------


def test_best_and_worst_pairs_each_groups_extremes_in_sampling_order():
    from trainer.rewards import best_and_worst

    scores = np.array([[0.2, 0.9, 0.1, 0.5], [1.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.3, 0.3, 1.0]])
    assert best_and_worst(scores).tolist() == [[1, 2], [0, 3], [0, 3], [0, 3]]
    # two images: the pair itself, whichever won
    assert best_and_worst(np.array([[0.3, 0.1], [0.1, 0.3], [0.2, 0.2]])).tolist() == [[0, 1]] * 3


@pytest.mark.slow
@pytest.mark.parametrize("images_per_prompt", [2, 4])
def test_label_samples_pairs_and_the_verifier_chooses(tmp_path, images_per_prompt):
    from trainer.tools.label import LabelSettings, label
    from trainer.pairs import load_pairs
    from scorers.shapes import ShapesVerifier

    settings = LabelSettings(
        out=tmp_path / "pairs",
        model="tiny-shapes",
        pairs=12,
        steps=4,
        shard_size=5,
        batch_size=8,
        scorer="shapes",
        images_per_prompt=images_per_prompt,
    )
    counts = label(settings)
    assert counts["pairs"] == 12 and counts["kept"] + counts["ties"] == 12 and counts["kept"] > 0
    assert sorted(p.name for p in (tmp_path / "pairs").glob("*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    pairs = load_pairs(str(tmp_path / "pairs"))
    assert len(pairs) == counts["kept"]
    verifier = ShapesVerifier()
    from PIL import Image
    import io

    kept_order = 0
    for row in pairs:
        images = np.stack([np.asarray(Image.open(io.BytesIO(row[f"jpg_{k}"])).convert("RGB")) for k in (0, 1)])
        assert row["score_0"] != row["score_1"] and row["label_0"] == float(row["score_0"] > row["score_1"])
        group = row["group_scores"]  # the prompt's best and worst of all its images
        assert len(group) == images_per_prompt and {row["score_0"], row["score_1"]} == {max(group), min(group)}
        # The scores are of the images as sampled. A JPEG copy may lose a claim to compression artefacts, which
        # can tie the pair (measured: 3 of 14 pairs), but never reverses it: a reversal is jpg_0 and jpg_1 swapped.
        again = verifier.score(images, [row["caption"]] * 2, [{}, {}]).scores
        assert (again[0] - again[1]) * (row["score_0"] - row["score_1"]) >= 0, (row["score_0"], row["score_1"], again)
        kept_order += bool((again[0] - again[1]) * (row["score_0"] - row["score_1"]) > 0)
    assert kept_order > len(pairs) / 2  # and mostly the copies keep the order strictly: ties are not the rule

    # resumable: a lost shard is rewritten, the others are skipped (their files untouched)
    first = (tmp_path / "pairs" / "part-00000.parquet").stat().st_mtime_ns
    (tmp_path / "pairs" / "part-00002.parquet").unlink()
    assert label(settings) == counts
    assert (tmp_path / "pairs" / "part-00000.parquet").stat().st_mtime_ns == first


@pytest.mark.slow
def test_label_relabels_pairs_through_a_live_reward_server(tmp_path, pairs_folder, start_server):
    from trainer.tools.label import LabelSettings, label
    from trainer.pairs import load_pairs

    server = start_server("--model", "shapes")
    counts = label(
        LabelSettings(
            out=tmp_path / "relabelled", source=str(pairs_folder), url=[server.url], resolution=64, shard_size=8
        )
    )
    assert counts["pairs"] == 18  # ties of the source are relabelled too
    pairs = load_pairs(str(tmp_path / "relabelled"))
    # the true caption's render satisfies every claim; the other caption's render does not: the verifier
    # prefers the true one, whichever side it was on
    truth = {r["best_image_uid"]: r["jpg_1" if r["label_0"] == 0 else "jpg_0"] for r in pick_a_pic_rows(18)}
    assert len(pairs) == counts["kept"] >= 12  # a wrong caption's render may satisfy the true one too: a tie
    for row in pairs:
        assert row["jpg_0" if row["label_0"] == 1 else "jpg_1"] == truth[row["best_image_uid"]]
    assert "best_image_uid" in pairs.column_names


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3"])
def test_dpo_on_the_other_families(tmp_path, tiny_cache, pairs_folder, model):
    from trainer.algorithms.dpo.loop import train

    cfg = dpo_config(tmp_path, tiny_cache, pairs_folder, max_train_steps=2)
    cfg.pretrained.model = model
    if model == "tiny-sd3":
        from trainer.config.presets import PRESETS

        cfg.train.lora_targets = PRESETS["tiny-sd3"]["train"]["lora_targets"]
    history = train(cfg)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and history[0]["implicit_accuracy"] == 0.0
    assert history[1]["loss"] != history[0]["loss"]


def test_noised_follows_the_forward_processes():
    """SD1: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with target eps (v = sqrt(abar) eps - sqrt(1 - abar) x0
    for v-prediction); SD3: x_s = (1 - s) x0 + s eps at s = shift u / (1 + (shift - 1) u), target eps - x0."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from trainer.families.ddim import DDIM
    from trainer.families.flow import FlowMatching

    x0, eps = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    u = torch.tensor([0.0, 0.5, 0.999], dtype=torch.float64)
    for prediction in ("epsilon", "v_prediction"):
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction)
        noisy, t, target = DDIM(scheduler).noised(x0, eps, u)
        assert t.tolist() == [0, 500, 999]
        abar = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
        expected = eps if prediction == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
        torch.testing.assert_close(target, expected)
    noisy, t, target = FlowMatching(FlowMatchEulerDiscreteScheduler(shift=3.0)).noised(x0, eps, u)
    s = 3 * u / (1 + 2 * u)
    torch.testing.assert_close(t, s * 1000)
    torch.testing.assert_close(noisy, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(target, eps - x0)


@pytest.mark.slow
def test_online_rounds_sample_label_and_train(tmp_path):
    from trainer.config import Config
    from trainer.algorithms.dpo.loop import train

    cfg = Config(
        algorithm="dpo",
        run={"output_dir": tmp_path / "run", "log_with": "none"},
        pretrained={"model": "tiny-shapes"},
        prompt={"fn": "shapes"},
        reward={"scorer": "shapes"},
        sample={"num_steps": 4, "batch_size": 8},
        train={"batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-4},
        dpo={"online": True, "online_pairs": 8, "max_train_steps": 4, "checkpointing_steps": 0},
    )
    history = train(cfg)
    assert [m["step"] for m in history] == [0, 1, 2, 3]
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # two steps per round of 8 pairs: rounds are sampled before steps 0 and 2, each logged with its first step
    assert [("online_reward_mean" in m) for m in history] == [True, False, True, False]
    assert_trained(cfg.run.output_dir, [m["loss"] for m in history])
    with pytest.raises(ValueError, match="dpo.online_pairs"):
        Config(algorithm="dpo", train={"batch_size": 8}, dpo={"online": True, "online_pairs": 4})


@pytest.mark.slow
def test_online_rounds_pair_each_prompts_best_and_worst_image(tmp_path, monkeypatch):
    """With four images per prompt, each pair trained is its prompt's best- and worst-scored image, winner first;
    with two passes per round, the second trains on the same pairs reshuffled, and no second round is sampled."""
    from scorers.shapes import ShapesVerifier
    from trainer.algorithms.dpo import loop as dpo
    from trainer.config import Config

    sampled, batches = [], []
    real_evaluate, real_pairs = dpo.evaluate, dpo._online_pairs

    def recording_evaluate(family, model, prompts, *args, **kwargs):
        images, scored = real_evaluate(family, model, prompts, *args, **kwargs)
        sampled.append((prompts, images))
        return images, scored

    def recording_pairs(*args):
        for batch in real_pairs(*args):
            batches.append(batch)
            yield batch

    monkeypatch.setattr(dpo, "evaluate", recording_evaluate)
    monkeypatch.setattr(dpo, "_online_pairs", recording_pairs)
    cfg = Config(
        algorithm="dpo",
        run={"output_dir": tmp_path / "run", "log_with": "none", "eval_every": 0},
        pretrained={"model": "tiny-shapes"},
        prompt={"fn": "shapes"},
        reward={"scorer": "shapes"},
        sample={"num_steps": 4, "batch_size": 16},
        train={"batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-4},
        dpo={
            "online": True,
            "online_pairs": 8,
            "online_images_per_prompt": 4,
            "online_epochs": 2,
            "max_train_steps": 4,
            "checkpointing_steps": 0,
        },
    )
    history = dpo.train(cfg)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (
        len(sampled) == 1
        and len(batches) == 4
        and [("online_reward_mean" in m) for m in history] == [True] + [False] * 3
    )
    prompts, images = sampled[0]
    first_pass = {
        "pixels": torch.cat([b["pixels"] for b in batches[:2]]),
        "weights": torch.cat([b["weights"] for b in batches[:2]]),
        "captions": batches[0]["captions"] + batches[1]["captions"],
    }
    assert len(prompts) == 32 and prompts[::4] == first_pass["captions"]
    second = torch.cat([batches[2]["pixels"], batches[3]["pixels"]])
    again = [next(i for i in range(8) if torch.equal(p, first_pass["pixels"][i])) for p in second]
    assert sorted(again) == list(range(8)) and again != list(range(8))  # the same pairs, reshuffled
    scores = ShapesVerifier().score(images, prompts, [{}] * len(prompts)).scores.reshape(8, 4)
    pairs = (first_pass["pixels"] * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    groups = images.reshape(8, 4, *images.shape[1:])
    for group, group_scores, pair, weight in zip(groups, scores, pairs, first_pass["weights"].tolist()):
        if group_scores.max() == group_scores.min():
            assert weight == 0.0  # a tie teaches nothing
            continue
        assert weight == 1.0
        best = [i for i in range(4) if (group[i] == pair[0]).all()]
        worst = [i for i in range(4) if (group[i] == pair[1]).all()]
        assert group_scores[best] == [group_scores.max()] and group_scores[worst] == [group_scores.min()]
    assert history[0]["online_ties"] == float((scores.max(1) == scores.min(1)).mean())
