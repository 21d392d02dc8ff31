"""``python -m trainer`` / ``accelerate launch -m trainer``: the command line, trainer/cli.py (``--help`` lists
every option)."""

from trainer.cli import main

if __name__ == "__main__":
    main()
