"""The command line of ``python -m trainer`` / ``accelerate launch -m trainer`` (trainer/__main__.py): DDPO
finetuning (``--algorithm dpo``: Diffusion-DPO, also ``python -m trainer.dpo`` with that project's flags, in
trainer/dpo/__main__.py; ``--algorithm refl``: ReFL, DRaFT, AlignProp; ``--algorithm nft`` / ``awm`` /
``dgpo``: DiffusionNFT, AWM, DGPO); ``--help`` lists every option.

A mistake of the user's (an option, a value, a file, an unreachable or refusing scorer) is one short message
naming the setting and the fix, exit status 2 and no traceback; ``--debug`` (or ``DIFFUSION_RL_DEBUG=1``)
shows the traceback too. ``--print-config`` prints the resolved configuration and exits.

Without ``--preset`` the command line runs ``shapes-sd3-nft`` (DiffusionNFT on the flow-matching shapes world: of
the recipes measured, the largest gain in 10 minutes on 2 cores, docs/learning.md); ``Config()`` in Python starts
from ``tiny``, the fast random-init run the tests use.
"""

from __future__ import annotations

import difflib
import json
import os
import sys

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import CliApp

from protocol.errors import RewardServerError, cli_message
from trainer.config import Config
from trainer.config.renamed import moved_flags
from trainer.plan import BatchPlanError

PROG = "python -m trainer"
USAGE_ERROR = 2  # as argparse's


class CommandLine(Config):  # the same config, starting from the shapes-sd3-nft preset (see the module docstring)
    preset: str = Field("shapes-sd3-nft", description=Config.model_fields["preset"].description)


def flags(model: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    """Every command-line flag of the config, bool negations included."""
    found = set()
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found |= flags(annotation, f"{dotted}.")
            continue
        found.add(f"--{dotted}")
        if annotation is bool:
            found.add(f"--no-{dotted}")
    return found


def unknown_flags(args: list[str]) -> list[str]:
    """One line per flag that is not an option, with the closest one that is."""
    known, problems = flags() | {"--help", "-h"}, []
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.6)
            problems.append(
                f"{flag}: no such option" + (f"; did you mean {close[0]}?" if close else f" ({PROG} --help lists them)")
            )
    return problems


def fail(message: str, exc: BaseException | None, debug: bool) -> None:
    if debug and exc is not None:
        import traceback

        traceback.print_exception(exc)
    print(f"{PROG}: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def main(argv: list[str] | None = None) -> None:
    # A file or pipe is block-buffered: `python -m trainer > run.log`, nohup and a cluster's job log would
    # show the epoch lines only when the run ends.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("DIFFUSION_RL_DEBUG", "") not in ("", "0")
    print_config = "--print-config" in args
    args = moved_flags([a for a in args if a not in ("--debug", "--print-config")])
    problems = unknown_flags(args)
    if problems:
        fail("\n  ".join(["unknown option(s):", *problems]), None, debug)
    try:
        cfg = CliApp.run(CommandLine, cli_args=args)
    except ValidationError as exc:
        fail(f"invalid configuration\n{cli_message(exc)}", exc, debug)
    if print_config:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return
    from trainer.checkpoint import CheckpointError
    from trainer.preflight import PreflightError
    from trainer.rewards import RewardError
    from trainer.algorithms import run
    from trainer.interrupt import Stopped
    from trainer.pairs import PairsError
    from trainer.run_folder import RunFolderError

    try:
        run(cfg)  # the one dispatch (trainer/algorithms/__init__.py)
    except (
        PreflightError,
        BatchPlanError,
        CheckpointError,
        RewardError,
        RewardServerError,
        PairsError,
        RunFolderError,
    ) as exc:  # the user's to fix
        fail(str(exc), exc, debug)
    except Stopped:  # SIGTERM: saved what it could within run.stop_grace_s and printed how to resume
        raise SystemExit(Stopped.exit_status) from None
    except KeyboardInterrupt:  # the trainer has saved what it could and printed how to resume
        raise SystemExit(130) from None
