"""``python -m trainer.dpo`` / ``accelerate launch -m trainer.dpo``: the trainer's command line (trainer/cli.py)
with ``--algorithm dpo``, taking Diffusion-DPO's own flags (trainer/algorithms/dpo/seed_flags.py). Here and not in the
algorithm's module, so that the command line depends on the algorithms and not the reverse."""

from __future__ import annotations

import sys

from trainer.cli import main as trainer_main
from trainer.algorithms.dpo.seed_flags import translate


def main(argv: list[str] | None = None) -> None:
    trainer_main(["--algorithm", "dpo", *translate(list(sys.argv[1:] if argv is None else argv))])


if __name__ == "__main__":
    main()
