"""Hostile settings and files fail in the config, naming the setting, with exit 2 and no traceback, before any
model loads: every numeric setting (NaN, inf, negative, huge), deeply nested --config files, prompt files that
are not regular files, output folders that cannot be made, image symlink loops; each preset's own default
output folder; prompt files split on line ends only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import BaseModel

from tests.test_data_checks import jsonl_folder, pair, trainer_main
from trainer.config import Config

# Settings where a negative number means something: seeds, ReFL's margin (rewards may be negative), and a
# reward component's weight (a penalty).
NEGATIVE_ALLOWED = {"run.seed", "run.eval_seed", "refl.margin", "reward.components.weight"}


def numeric_settings(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, type]:
    """Every int and float setting by dotted flag (optional ones included), nested groups walked."""
    found = {}
    for name, field in model.model_fields.items():
        dotted, annotation = f"{prefix}{name}", field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= numeric_settings(annotation, f"{dotted}.")
        for kind in (int, float):
            if annotation in (kind, kind | None):
                found[dotted] = kind
    return found


SETTINGS = numeric_settings()


def test_the_fuzz_covers_the_settings_the_attack_found():
    assert {"train.adam_beta1", "train.adam_epsilon", "refl.margin", "reward.timeout", "sample.batch_size"} <= set(
        SETTINGS
    )
    assert len(SETTINGS) > 50


@pytest.mark.parametrize(
    "module, settings",
    [
        ("trainer.tools.evaluate", "EvalSettings"),
        ("trainer.tools.label", "LabelSettings"),
        ("trainer.tools.before_after", "SampleSettings"),
    ],
)
def test_the_other_commands_bound_their_numbers_too(capsys, module, settings):
    from importlib import import_module

    flags = numeric_settings(getattr(import_module(module), settings))
    assert flags
    for flag in flags:
        for value in ("nan", "inf", "1e300", str(10**30)):
            code, err = trainer_main(capsys, f"--{flag}", value, module=module)
            assert code == 2 and f"--{flag}:" in err and "Traceback" not in err, (flag, value, err)


def run_cli(capsys, *args):
    """trainer_main's exit status and stderr, --print-config returning normally counting as exit 0."""
    from trainer.__main__ import main

    try:
        main(["--preset", "tiny", "--run.log_with", "none", *args])
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err
    return 0, capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300", "-1e300", str(10**30), "-1"])
def test_every_numeric_setting_out_of_range_exits_2_naming_it(tmp_path, capsys, value):
    accepted = []
    for flag in SETTINGS:
        if flag.startswith("reward.components."):
            continue  # a list of groups: below
        code, err = run_cli(capsys, f"--{flag}", value, "--run.output_dir", str(tmp_path), "--print-config")
        if code == 0:
            accepted.append(flag)
            continue
        assert code == 2 and "Traceback" not in err, (flag, err)
        assert f"--{flag}:" in err, (flag, err)
    allowed = {f for f in NEGATIVE_ALLOWED if not f.startswith("reward.components.")} if value == "-1" else set()
    assert set(accepted) == allowed


@pytest.mark.parametrize(
    "flag, value",
    [
        ("train.adam_beta1", "1.5"),
        ("train.adam_beta1", "1"),
        ("train.adam_beta2", "-1"),
        ("train.adam_epsilon", "-1"),
        ("train.adam_epsilon", "0"),
        ("train.adam_weight_decay", "-1"),
        ("train.adam_beta1", "nan"),
        ("refl.margin", "nan"),
    ],
)
def test_optimizer_settings_are_bounded(tmp_path, capsys, flag, value):
    code, err = run_cli(capsys, f"--{flag}", value, "--run.output_dir", str(tmp_path), "--print-config")
    assert code == 2 and f"--{flag}:" in err and "Traceback" not in err, err


def test_the_attacks_optimizer_setting_exits_2_before_anything_loads(tmp_path):
    """As the attack ran it: the command line in a process of its own, NaN reaching torch's AdamW after the
    model had loaded."""
    from tests.test_data_checks import trainer_cli

    run = trainer_cli("--train.adam_beta1", "nan", "--run.output_dir", str(tmp_path / "run"))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "--train.adam_beta1: Input should be a finite number" in run.stderr
    assert not (tmp_path / "run").exists()


def test_a_reward_components_weight_must_be_finite(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        Config(reward={"components": [{"scorer": "compression", "weight": float("nan")}]})
    Config(reward={"components": [{"scorer": "compression", "weight": -1.0}]})  # a penalty


@pytest.mark.parametrize(
    "name, text",
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000),
        ("deep.json", '{"a": ' * 100_000 + "1" + "}" * 100_000),
        ("deep.toml", "a = " + "{b = " * 50_000 + "1" + "}" * 50_000),
        ("deep.json", '{"reward": {"options": ' + '{"a": ' * 500 + "1" + "}" * 500 + "}}"),
    ],
)
def test_a_deeply_nested_config_is_refused(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_text(text)
    code, err = trainer_main(capsys, "--config", str(path), "--print-config")
    assert code == 2 and "Traceback" not in err, err[-500:]
    assert f"config: {path} nests deeper than 32 levels" in err


@pytest.mark.parametrize("flag", ["prompt.path", "prompt.eval_path"])
@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "huge"])
@pytest.mark.timeout(60)
def test_prompt_files_must_be_regular_files_of_bounded_size(tmp_path, capsys, flag, kind):
    path = tmp_path / "prompts.txt"
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever
        expected = f"{path} is not a regular file"
    elif kind == "device":
        path = Path("/dev/zero")  # reading it would never end
        expected = "/dev/zero is not a regular file"
    elif kind == "folder":
        path.mkdir()
        expected = f"{path} is not a regular file"
    else:
        with open(path, "wb") as f:
            f.truncate(65 * 1024 * 1024)  # sparse: 65 MB of zeros, no disk used
        expected = f"{path} is 68157440 bytes; prompt files are at most 67108864"
    args = ["--prompt.fn", "from_file"] if flag == "prompt.path" else []
    code, err = trainer_main(capsys, *args, f"--{flag}", str(path), "--run.output_dir", str(tmp_path / "run"))
    assert code == 2 and "Traceback" not in err, err
    assert f"--{flag}: {expected}" in err, err


@pytest.mark.timeout(60)
def test_a_config_file_must_be_a_regular_file_too(tmp_path, capsys):
    fifo = tmp_path / "c.json"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        code, err = trainer_main(capsys, "--config", str(path), "--print-config")
        assert code == 2 and f"config: {path} is not a regular file" in err and "Traceback" not in err, err


def test_prompt_files_split_on_line_ends_only(tmp_path):
    from trainer.prompts import lines

    path = tmp_path / "prompts.txt"
    path.write_text("a sign\x0cboard\r\nan \u2028odd\x1c one\nthird\x85line\n", encoding="utf-8", newline="")
    assert lines(path) == ("a sign\x0cboard", "an \u2028odd\x1c one", "third\x85line")


@pytest.mark.parametrize("kind", ["long", "under a file", "a file"])
def test_an_output_folder_that_cannot_be_made_is_refused_before_anything_loads(tmp_path, capsys, kind):
    (tmp_path / "file").write_text("x")
    out = {
        "long": tmp_path / ("x" * 300),
        "under a file": tmp_path / "file" / "x",
        "a file": tmp_path / "file",
    }[kind]
    message = {
        "long": f"{out}: the name {'x' * 300!r} is longer than this file system's 255 characters",
        "under a file": f"{out}: {tmp_path / 'file'} is not a folder",
        "a file": f"{out} is not a folder",
    }[kind]
    code, err = trainer_main(capsys, "--run.output_dir", str(out))
    assert code == 2 and "Traceback" not in err, err
    assert f"--run.output_dir: {message}" in err
    code, err = trainer_main(capsys, "--run.output_dir", "/dev/null/x")
    assert code == 2 and "--run.output_dir: /dev/null/x: /dev/null is not a folder" in err
    code, err = trainer_main(capsys, "--out", str(out), "--model", "tiny", module="trainer.tools.label")
    assert code == 2 and f"--out: {message}" in err and "Traceback" not in err, err


def test_every_preset_has_its_own_default_output_folder():
    from trainer.config.presets import PRESETS

    folders = {name: Config(preset=name).run.output_dir for name in PRESETS}
    assert folders == {name: Path("outputs") / name for name in PRESETS}
    assert Config(preset="sd3-pickscore-nft", run={"output_dir": "mine"}).run.output_dir == Path("mine")


def test_an_image_symlink_loop_is_named(tmp_path):
    from trainer.datacheck import pairs_problems

    folder = jsonl_folder(tmp_path / "pairs", [pair(image_1="3.jpg")])
    (folder / "3.jpg").symlink_to(folder / "3.jpg")
    expected = [f"{folder / 'pairs.jsonl'} line 1: image_1: 3.jpg is a symlink loop"]
    assert pairs_problems(str(folder)) == expected
    assert pairs_problems(str(folder), allow_outside=True) == expected
