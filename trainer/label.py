"""``python -m trainer.label``: the command line in trainer/tools/label.py."""

from trainer.tools.label import main

if __name__ == "__main__":
    main()
