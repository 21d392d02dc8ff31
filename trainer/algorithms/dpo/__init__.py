"""Diffusion-DPO (``--algorithm dpo``): ``loop.py`` its optimizer steps on the shared step loop
(trainer/step_loop.py), ``loss.py`` its loss, ``settings.py`` the ``dpo`` group, ``checks.py`` its
configuration checks, ``preflight.py`` its check of the pairs, ``seed_flags.py`` Diffusion-DPO's own flags
(``python -m trainer.dpo``)."""
