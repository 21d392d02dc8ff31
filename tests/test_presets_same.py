"""Issue 40 moved DDPO's settings out of ``train`` into ``ddpo`` and the algorithms into trainer/algorithms/:
every preset must resolve to the configuration it resolved to before (recorded from main before the move in
tests/data/presets_before_40.json; reward.aggregation, added beside the move by the VLM-judge issue, entered at
its default "sum"), dict for dict once the moved keys are put back; and the old spellings
(``--train.clip_range``, a file's or a keyword's ``train.clip_range``) still work, naming the new one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import Config
from trainer.config.presets import PRESETS
from trainer.config.renamed import RENAMED

BEFORE = json.loads((Path(__file__).parent / "data" / "presets_before_40.json").read_text())
REPO = str(Path(__file__).resolve().parents[1])  # the recording's paths into the checkout are "<repo>/..."


# Settings added since the recording, which every recorded preset leaves at its default.
ADDED = {
    "run": {
        "sharding": "none",
        "reshard_after_forward": True,
        "shard_text_encoders": False,
        "offload_text_encoders": False,
        "cpu_offload": False,
        "stop_grace_s": 25.0,
        "eval_drift": True,
    },
    "train": {"norm_guard_coef": 0.0},
    "sample": {"num_frames": None, "width": None, "guidance_scale_2": None},  # the video and two-expert families'
    "pretrained": {"train_experts": None},
    "ddpo": {"timestep_window_earliest_start": 0},
}
# Groups added since (issue 45's dgpo), which every recorded preset leaves at their defaults.
NEW_GROUPS = ("dgpo",)


def _old_names(resolved: dict) -> dict:
    """A resolved configuration with each moved setting back under its old name, and without the settings
    added since (each at its default)."""
    for group, settings in ADDED.items():
        assert {name: resolved[group].pop(name) for name in settings} == settings
    for group in NEW_GROUPS:
        assert resolved.pop(group) == Config.model_fields[group].default.model_dump(mode="json")
    for old, new in RENAMED.items():
        (old_group, old_name), (new_group, new_name) = old.split("."), new.split(".")
        resolved[old_group][old_name] = resolved[new_group].pop(new_name)
    assert resolved.pop("ddpo") == {}  # every ddpo setting is one that moved
    return resolved


def test_every_recorded_preset_is_still_there():
    assert set(BEFORE) <= set(PRESETS)  # presets added since are new ones: nothing recorded to compare


@pytest.mark.parametrize("preset", sorted(BEFORE))
def test_preset_resolves_as_before(preset):
    resolved = json.loads(json.dumps(Config(preset=preset).model_dump(mode="json")).replace(REPO, "<repo>"))
    assert _old_names(resolved) == BEFORE[preset]


def test_old_spellings_still_work(tmp_path, capsys):
    from trainer.cli import CommandLine
    from trainer.config.renamed import moved_flags

    assert Config(train={"clip_range": 2e-4, "cfg": False}, sample={"guidance_scale": 1.0}).ddpo.clip_range == 2e-4
    assert "train.clip_range is now ddpo.clip_range" in capsys.readouterr().err
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"train": {"timestep_window": 2}}))
    assert Config(config=path).ddpo.timestep_window == 2
    args = moved_flags(["--train.clip_range", "3e-4", "--no-train.cfg", "--train.decoupled_ppo=on"])
    assert args == ["--ddpo.clip_range", "3e-4", "--no-ddpo.cfg", "--ddpo.decoupled_ppo=on"]
    assert "--train.clip_range is now --ddpo.clip_range" in capsys.readouterr().err
    given = Config(train={"clip_range": 1e-3}, ddpo={"clip_range": 5e-3})  # both: the new name wins
    assert given.ddpo.clip_range == 5e-3 and CommandLine.model_fields["ddpo"]
