"""Tools: the command lines a person runs by hand, apart from training. Nothing that trains imports them.

- ``evaluate.py``: ``python -m trainer.evaluate``, saved weights evaluated on fixed prompts and seeds (the
  evaluation itself, which the trainer also runs every ``run.eval_every``, is trainer/evaluate.py);
- ``before_after.py``: ``python -m trainer.before_after``, a base model and base + LoRA side by side, scored;
- ``label.py``: ``python -m trainer.label``, AI-feedback preference pairs for ``--algorithm dpo``;
- ``shapes_model.py``: ``python -m trainer.tools.shapes_model``, the pretraining of the shipped tiny-shapes
  models (trainer/weights/), on the untrained pipelines of ``shapes_pipelines.py``.

``python -m trainer.evaluate``, ``trainer.before_after`` and ``trainer.label`` stay the commands: those modules
start the tools here.
"""
