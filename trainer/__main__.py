"""``python -m trainer`` / ``accelerate launch -m trainer``: DDPO finetuning; ``--help`` lists every option."""

from __future__ import annotations

import sys

from pydantic_settings import CliApp

from trainer.config import Config


def main(argv: list[str] | None = None) -> None:
    cfg = CliApp.run(Config, cli_args=sys.argv[1:] if argv is None else argv)
    from trainer.train import train

    train(cfg)


if __name__ == "__main__":
    main()
