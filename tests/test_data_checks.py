"""A user's data and files fail before work starts, each problem with its file and row, all at once;
rows too many to check up front stop the run at the first bad one, before it is trained on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scorers import world

pytestmark = pytest.mark.timeout(300)


def jpeg_of(caption: str, seed: int) -> bytes:
    from trainer.pairs import jpeg

    return jpeg(world.render(caption, seed, 64))


def jsonl_folder(folder: Path, lines: list) -> Path:
    """A pairs.jsonl folder: each entry a dict (written as JSON) or a str (written as is); good.jpg and
    other.jpg are real images beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "good.jpg").write_bytes(jpeg_of("a red circle", 0))
    (folder / "other.jpg").write_bytes(jpeg_of("a blue square", 1))
    (folder / "pairs.jsonl").write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return folder


def pair(image_0="good.jpg", image_1="other.jpg", label=1.0, caption="a red circle") -> dict:
    return {"caption": caption, "image_0": image_0, "image_1": image_1, "label_0": label}


def trainer_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", "--preset", "tiny", "--run.log_with", "none", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )


def trainer_main(capsys, *args: str, module: str = "trainer") -> tuple[int, str]:
    """The CLI's exit status and stderr, run in this process (a subprocess costs seconds of imports)."""
    from importlib import import_module

    main = import_module(f"{module}.__main__" if module == "trainer" else module).main
    prefix = ["--preset", "tiny", "--run.log_with", "none"] if module == "trainer" else []
    with pytest.raises(SystemExit) as raised:
        main([*prefix, *args])
    return raised.value.code, capsys.readouterr().err


# -- Diffusion-DPO data ----------------------------------------------------------------------------------------
def test_every_problem_of_a_pairs_file_is_named_with_its_line_before_any_model_loads(tmp_path):
    folder = jsonl_folder(
        tmp_path / "pairs",
        [
            pair(),  # line 1: good
            pair(image_0="missing.jpg"),  # 2
            pair(image_1="garbage.jpg"),  # 3
            pair(image_0="truncated.jpg"),  # 4
            pair(image_1="../../../../etc/passwd"),  # 5
            pair(label=2),
            pair(label="yes"),
            pair(label=None),  # 6, 7, 8
            "{not json",  # 9
            pair(label=-1),  # 10
            pair(label=0.5),  # 11: a tie is fine
        ],
    )
    (folder / "garbage.jpg").write_bytes(b"not an image at all")
    (folder / "truncated.jpg").write_bytes(jpeg_of("three squares", 2)[:300])
    out = tmp_path / "run"
    result = trainer_cli("--algorithm", "dpo", "--dpo.dataset", str(folder), "--run.output_dir", str(out))
    err = result.stderr
    assert result.returncode == 2 and "Traceback" not in err, err
    where = f"dpo.dataset: {folder / 'pairs.jsonl'}"
    for line, problem in [
        (2, "image_0: no such file missing.jpg"),
        (3, "image_1: garbage.jpg does not decode"),
        (4, "image_0: truncated.jpg does not decode"),
        (5, "image_1: ../../../../etc/passwd lies outside the dataset folder"),
        (6, "label_0: 2 is not 0, 0.5 or 1"),
        (7, "label_0: 'yes' is not 0, 0.5 or 1"),
        (8, "label_0: None is not 0, 0.5 or 1"),
        (9, "not a JSON object"),
        (10, "label_0: -1 is not 0, 0.5 or 1"),
    ]:
        assert f"{where} line {line}: {problem}" in err, (line, err)
    assert "line 1:" not in err and "line 11:" not in err
    assert "--dpo.allow_outside_paths" in err  # how to allow what lies elsewhere on purpose
    assert not out.exists()  # stopped in the pre-flight check: no run folder, no model


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "has no pairs"),
        ([pair(label=0.5), pair(label=0.5)], "has no pair with a preference (every label_0 is 0.5)"),
    ],
)
def test_an_empty_or_all_tied_pairs_file_is_named(tmp_path, lines, message):
    from trainer.algorithms.dpo.loop import train
    from trainer.preflight import PreflightError

    from tests.test_dpo import dpo_config

    folder = jsonl_folder(tmp_path / "pairs", lines)
    cfg = dpo_config(tmp_path, tmp_path / "cache", folder)
    with pytest.raises(PreflightError) as raised:
        train(cfg)
    assert f"dpo.dataset: {folder / 'pairs.jsonl'} {message}" in str(raised.value)
    assert not cfg.run.output_dir.exists()


def test_parquet_problems_are_named_with_their_file_and_row(tmp_path):
    from trainer.datacheck import pairs_problems
    from trainer.pairs import write_parquet

    good = jpeg_of("a red circle", 0)
    write_parquet(
        [{"caption": "a red circle", "jpg_0": good, "jpg_1": good, "label_0": 1.0}] * 2, tmp_path / "a.parquet"
    )
    write_parquet([{"caption": "x", "jpg_0": 7, "jpg_1": good, "label_0": 1.0}], tmp_path / "ints.parquet")
    write_parquet(
        [{"caption": "x", "jpg_0": good, "jpg_1": good, "label_0": v} for v in (2.0, -1.0, None, 0.0)],
        tmp_path / "labels.parquet",
    )
    write_parquet(
        [{"caption": "x", "jpg_0": good[:200], "jpg_1": b"\x00" * 50, "label_0": 0.0}], tmp_path / "bytes.parquet"
    )
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    (tmp_path / "truncated.parquet").write_bytes((tmp_path / "a.parquet").read_bytes()[:-100])
    problems = pairs_problems(str(tmp_path))
    assert problems == [
        f"{tmp_path / 'bytes.parquet'} row 0: jpg_0: the image bytes do not decode (Truncated File Read)",
        f"{tmp_path / 'bytes.parquet'} row 0: jpg_1: the image bytes do not decode (cannot identify image file)",
        f"{tmp_path / 'corrupt.parquet'}: not a readable parquet file (Parquet magic bytes not found in footer. "
        "Either the file is corrupted or this is not a parquet file.)",
        f"{tmp_path / 'ints.parquet'} row 0: jpg_0: an int (7), expected image bytes, a path or a "
        "{bytes, path} struct",
        f"{tmp_path / 'labels.parquet'} row 0: label_0: 2.0 is not 0, 0.5 or 1 (1: the first image preferred, 0: "
        "the second, 0.5: a tie)",
        f"{tmp_path / 'labels.parquet'} row 1: label_0: -1.0 is not 0, 0.5 or 1 (1: the first image preferred, 0: "
        "the second, 0.5: a tie)",
        f"{tmp_path / 'labels.parquet'} row 2: label_0: None is not 0, 0.5 or 1 (1: the first image preferred, 0: "
        "the second, 0.5: a tie)",
        f"{tmp_path / 'truncated.parquet'}: not a readable parquet file (Parquet magic bytes not found in footer. "
        "Either the file is corrupted or this is not a parquet file.)",
    ]


def test_paths_outside_the_dataset_folder_need_the_option(tmp_path):
    from trainer.datacheck import pairs_problems

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.jpg").write_bytes(jpeg_of("a red circle", 3))
    folder = jsonl_folder(tmp_path / "pairs", [pair(image_0=str(elsewhere / "x.jpg")), pair(image_1="link.jpg")])
    (folder / "link.jpg").symlink_to(elsewhere / "x.jpg")  # inside by name, outside in fact
    assert pairs_problems(str(folder)) == [
        f"{folder / 'pairs.jsonl'} line 1: image_0: {elsewhere / 'x.jpg'} lies outside the dataset folder (allow "
        "it with --dpo.allow_outside_paths)",
        f"{folder / 'pairs.jsonl'} line 2: image_1: link.jpg lies outside the dataset folder (allow it with "
        "--dpo.allow_outside_paths)",
    ]
    assert pairs_problems(str(folder), allow_outside=True) == []


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_rows_past_the_up_front_check_stop_the_run_before_they_are_trained_on(tmp_path, tiny_cache, workers):
    from trainer.algorithms.dpo.loop import train
    from trainer.pairs import PairsError

    from tests.test_dpo import dpo_config

    folder = jsonl_folder(
        tmp_path / "pairs", [pair(), pair(label=0.0)] + [pair(image_0=f"gone-{i}.jpg") for i in range(2)]
    )
    cfg = dpo_config(tmp_path, tiny_cache, folder, check_rows=2, dataloader_num_workers=workers)
    cfg.train.batch_size, cfg.train.gradient_accumulation_steps = 4, 1  # the first batch holds every row
    with pytest.raises(PairsError) as raised:
        train(cfg)
    message = str(raised.value)
    assert (
        message.startswith(f"dpo.dataset: {folder / 'pairs.jsonl'} line ")
        and ": image_0: no such file gone-" in message
    )
    assert "Traceback" not in message and "\n" not in message
    out = cfg.run.output_dir
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists() and not (out / "lora").exists()


def test_a_bad_row_read_mid_run_is_named_by_its_own_file_and_row(tmp_path):
    """Ties are dropped before training, so a row's place in the dataset is not its place in its file."""
    from trainer.datacheck import pairs_source
    from trainer.pairs import Pairs, PairsError, collate, load_pairs, next_batch, write_parquet

    good = jpeg_of("a red circle", 0)
    row = {"caption": "a red circle", "jpg_0": good, "jpg_1": good}
    write_parquet([{**row, "label_0": 1.0}, {**row, "label_0": 0.5}], tmp_path / "a" / "x.parquet")
    write_parquet(
        [{**row, "label_0": 0.0}, {**row, "jpg_1": b"garbage", "label_0": 1.0}], tmp_path / "a-b" / "x.parquet"
    )
    ds = load_pairs(str(tmp_path))
    data = Pairs(ds, 32, seed=0, root=tmp_path, check=pairs_source(str(tmp_path)).check)
    items = [data[(0, i)] for i in range(len(ds))]
    expected = (
        f"dpo.dataset: {tmp_path / 'a-b' / 'x.parquet'} row 1: jpg_1: the image bytes do not decode (cannot "
        "identify image file)"
    )
    assert [it.get("problem") for it in items] == [None, expected, None]  # files in string order: "a-b/" before "a/"
    with pytest.raises(PairsError, match="^" + expected.replace("(", r"\(").replace(")", r"\)") + "$"):
        next_batch(iter([collate(items)]))
    assert next_batch(iter([collate(items[::2])]))["pixels"].shape == (2, 2, 3, 32, 32)


def test_a_large_dataset_is_checked_up_to_check_rows_before_the_run(tmp_path):
    from trainer.datacheck import pairs_problems

    folder = jsonl_folder(tmp_path / "pairs", [pair()] * 3 + [pair(image_0="gone.jpg")])
    assert pairs_problems(str(folder), limit=3) == []  # the fourth is checked when it is read
    assert pairs_problems(str(folder), limit=4) == [f"{folder / 'pairs.jsonl'} line 4: image_0: no such file gone.jpg"]


# -- ReFL's pre-training data ----------------------------------------------------------------------------------
def test_pretraining_images_are_checked_file_by_file_before_the_model_loads(tmp_path):
    from trainer.preflight import PreflightError
    from trainer.algorithms.refl.loop import train

    from tests.test_refl import refl_config

    data = tmp_path / "real"
    data.mkdir()
    (data / "0.png").write_bytes(jpeg_of("a red circle", 0))  # a JPEG named .png decodes all the same
    (data / "metadata.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"file_name": "0.png", "text": "a red circle"}),
                json.dumps({"file_name": "1.png", "text": "a blue square"}),
                json.dumps({"file_name": "/etc/hostname", "text": "x"}),
                json.dumps({"file_name": "0.png", "text": 5}),
                "[1, 2]",
            ]
        )
        + "\n"
    )
    cfg = refl_config(tmp_path, pretrain_data=str(data))
    with pytest.raises(PreflightError) as raised:
        train(cfg)
    where = f"refl.pretrain_data: {data / 'metadata.jsonl'}"
    message = str(raised.value)
    for expected in [
        f"{where} line 2: file_name: no such file 1.png",
        f"{where} line 3: file_name: /etc/hostname lies outside the dataset folder (allow it with "
        "--refl.pretrain_allow_outside_paths)",
        f"{where} line 4: text: Input should be a valid string",
        f"{where} line 5: not a JSON object",
    ]:
        assert expected in message, message
    assert "line 1:" not in message and not cfg.run.output_dir.exists()


# -- prompt files and --config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [(b"", "has no prompts"), (b"\n  \n", "has no prompts"), (b"\xff\xfe\x00a", "is not UTF-8 text")],
)
@pytest.mark.parametrize("flag", ["prompt.path", "prompt.eval_path"])
def test_a_prompt_file_without_prompts_fails_in_the_config_naming_the_flag(tmp_path, capsys, content, message, flag):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    args = ["--prompt.fn", "from_file"] if flag == "prompt.path" else []
    code, err = trainer_main(capsys, *args, f"--{flag}", str(prompts), "--run.output_dir", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err, err
    assert f"--{flag}: {prompts} {message}" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", ["trainer.tools.evaluate", "trainer.tools.label"])
def test_the_other_commands_check_their_prompt_files_too(tmp_path, capsys, module):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xfe\x00a")
    args = ["--prompts", str(prompts)] + (
        ["--out", str(tmp_path / "out"), "--model", "tiny"] if module == "trainer.tools.label" else []
    )
    code, err = trainer_main(capsys, *args, module=module)
    assert code == 2 and "Traceback" not in err, err
    assert f"--prompts: {prompts} is not UTF-8 text (invalid start byte at byte 0)" in err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.json", b"{bad", "is not valid JSON (line 1 column 2: Expecting property name enclosed in double quotes)"),
        ("c.json", b"[1, 2]", "must hold a map of settings, not a list"),
        ("c.toml", b"a = ", "is not valid TOML (Invalid value (at end of document))"),
        ("c.json", b"\xff\xfe{}", "is not UTF-8 text"),
    ],
)
def test_a_config_file_that_does_not_parse_is_named(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    code, err = trainer_main(capsys, "--config", str(path), "--print-config")
    assert code == 2 and "Traceback" not in err, err
    assert f"config: {path} {message}" in err


# -- weights given to trainer.evaluate -------------------------------------------------------------------------
def test_a_lora_or_denoiser_folder_is_checked_before_the_model_loads(tmp_path, capsys):
    empty, damaged = tmp_path / "empty", tmp_path / "damaged"
    empty.mkdir()
    damaged.mkdir()
    (damaged / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    import torch
    from safetensors.torch import save_file

    cut = tmp_path / "cut"
    cut.mkdir()
    save_file({"lora_A": torch.zeros(4, 4)}, cut / "pytorch_lora_weights.safetensors")
    whole = (cut / "pytorch_lora_weights.safetensors").read_bytes()
    (cut / "pytorch_lora_weights.safetensors").write_bytes(whole[:-10])  # a copy cut short
    cases = [
        (["--lora", str(tmp_path / "nowhere")], f"--lora: {tmp_path / 'nowhere'}: no such folder"),
        (["--lora", str(empty)], f"--lora: {empty} holds no pytorch_lora_weights*.safetensors (a run's lora/ folder)"),
        (
            ["--lora", str(damaged)],
            f"--lora: {damaged / 'pytorch_lora_weights.safetensors'} is not a readable safetensors file",
        ),
        (
            ["--lora", str(cut)],
            f"--lora: {cut / 'pytorch_lora_weights.safetensors'} is not a readable safetensors "
            f"file (cut short: its tensors need {len(whole)} bytes, the file has {len(whole) - 10})",
        ),
        (
            ["--denoiser", str(empty)],
            f"--denoiser: {empty} holds no config.json (a run's unet/ or transformer/ folder)",
        ),
    ]
    for args, message in cases:
        code, err = trainer_main(capsys, *args, "--out", str(tmp_path / "eval"), module="trainer.tools.evaluate")
        assert code == 2 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "eval").exists()


# -- trainer.label resumes only under the settings that shaped its shards --------------------------------------
def test_label_refuses_to_resume_under_other_settings_and_relabels_when_asked(tmp_path, capsys, start_server):
    from trainer.tools.label import LabelSettings, label
    from trainer.pairs import load_pairs, write_parquet

    from tests.test_dpo import pick_a_pic_rows

    source = tmp_path / "source"
    write_parquet(pick_a_pic_rows(18), source / "train.parquet")
    server = start_server("--model", "shapes")
    url = server.url.replace("http://", "http://user:s3cretPW@")
    out = tmp_path / "labelled"
    first = label(LabelSettings(out=out, source=str(source), url=[url], resolution=64, shard_size=8))
    assert first["pairs"] == 18
    for later in ("part-00001.parquet", "part-00002.parquet"):  # as if stopped after the first shard
        (out / later).unlink()
    code, message = trainer_main(
        capsys,
        "--out",
        str(out),
        "--source",
        str(source),
        "--url",
        url,
        "--resolution",
        "64",
        "--shard_size",
        "12",
        module="trainer.tools.label",
    )  # 8 pairs in part-00000, not 12
    assert code == 2
    assert "shard_size: 8 when its shards were written, 12 now" in message and "--relabel" in message, message
    assert "s3cretPW" not in message
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet"]  # nothing touched
    again = label(LabelSettings(out=out, source=str(source), url=[url], resolution=64, shard_size=12, relabel=True))
    assert again["pairs"] == 18 and again["kept"] + again["ties"] == 18
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    kept = load_pairs(str(out))
    assert len(kept) == again["kept"] and len(set(kept["best_image_uid"])) == again["kept"]  # no pair twice
    resumed = label(LabelSettings(out=out, source=str(source), url=[url], resolution=64, shard_size=12, batch_size=4))
    assert resumed == again  # the same settings (the batch size shapes nothing) resume, skipping every shard
    written = "".join(p.read_text() for p in out.glob("*.json"))
    assert "s3cretPW" not in written and "user:**********@127.0.0.1" in written


def test_label_checks_its_source_before_the_scorer_loads(tmp_path, capsys):
    from trainer.pairs import write_parquet

    good = jpeg_of("a red circle", 0)
    write_parquet(
        [
            {"caption": "a red circle", "jpg_0": good, "jpg_1": good, "label_0": 0.5},
            {"caption": "a red circle", "jpg_0": good, "jpg_1": b"garbage", "label_0": 0.5},
        ],
        tmp_path / "source" / "a.parquet",
    )
    code, err = trainer_main(
        capsys,
        "--out",
        str(tmp_path / "out"),
        "--source",
        str(tmp_path / "source"),
        "--scorer",
        "shapes",
        module="trainer.tools.label",
    )
    assert code == 2 and "Traceback" not in err
    assert (
        f"--source: {tmp_path / 'source' / 'a.parquet'} row 1: jpg_1: the image bytes do not decode (cannot "
        "identify image file)"
    ) in err
    assert not (tmp_path / "out").exists()
