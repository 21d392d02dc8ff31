"""Settings that moved to another group keep their old spelling for one release (issue 40 moved DDPO's own
settings out of ``train`` into ``ddpo``): a preset, ``--config`` file, keyword argument, environment variable or
command-line flag that uses the old name still works, and a note names the new one."""

from __future__ import annotations

import sys

from trainer.algorithms.ddpo.settings import MOVED as _DDPO_MOVED

# old dotted name -> new one
RENAMED = {f"train.{name}": f"ddpo.{name}" for name in _DDPO_MOVED}


def note(old: str, new: str, where: str = "") -> None:
    print(f"{old} is now {new}{f' ({where})' if where else ''}; the old name goes in the next release", file=sys.stderr)


def moved_settings(settings: dict, where: str) -> dict:
    """``settings`` (nested groups) with each old name moved to its new place (a note for each); an old and a new
    name both given: the new one wins."""
    if not isinstance(settings, dict):
        return settings
    out = None
    for old, new in RENAMED.items():
        old_group, name = old.split(".")
        group = settings.get(old_group)
        if not isinstance(group, dict) or name not in group:
            continue
        out = out or {key: dict(value) if isinstance(value, dict) else value for key, value in settings.items()}
        new_group, new_name = new.split(".")
        value = out[old_group].pop(name)
        target = out.setdefault(new_group, {})
        if isinstance(target, dict):
            target.setdefault(new_name, value)
        note(old, new, where)
    return settings if out is None else out


def moved_flags(args: list[str]) -> list[str]:
    """The command line with each old flag (``--train.clip_range``, ``--no-train.cfg``) spelled anew, noted."""
    renamed = {f"--{prefix}{old}": f"--{prefix}{new}" for old, new in RENAMED.items() for prefix in ("", "no-")}
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in renamed:
            note(flag, renamed[flag])
            arg = renamed[flag] + eq + value
        out.append(arg)
    return out
