"""``python -m trainer.before_after``: the command line in trainer/tools/before_after.py."""

from trainer.tools.before_after import main

if __name__ == "__main__":
    main()
