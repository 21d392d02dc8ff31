"""``python -m trainer`` / ``accelerate launch -m trainer``: DDPO finetuning; ``--help`` lists every option."""

from __future__ import annotations

import sys

from pydantic import ValidationError
from pydantic_settings import CliApp

from protocol.errors import cli_message

from trainer.config import Config


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = CliApp.run(Config, cli_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        raise SystemExit(f"python -m trainer: invalid configuration\n{cli_message(exc)}") from None
    from trainer.config import BatchPlanError
    from trainer.train import train

    try:
        train(cfg)
    except BatchPlanError as exc:  # checked before any model loads
        raise SystemExit(f"python -m trainer: {exc}") from None


if __name__ == "__main__":
    main()
