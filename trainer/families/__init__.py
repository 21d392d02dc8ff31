"""The model families: one file per diffusers pipeline the trainer trains (``sd1.py`` SD1.x/SD2.x, ``sdxl.py``,
``sd3.py``, ``flux.py``), the step math they share (``ddim.py`` DDIM, ``flow.py`` Flow-GRPO's flow-matching
SDE and CPS steps, ``zero_t5.py`` SD3 without T5), loading a family and making its denoiser trainable
(``models.py``: ``load_family``, ``FAMILIES``, ``TINY``, ``SHIPPED``), the tiny test pipelines
(``tiny_pipeline.py``) and the pretraining of the shipped tiny-shapes models (``shapes_model.py``).

This file imports no family: ``trainer.loss`` imports ``trainer.families.ddim``, and ``sd1.py`` imports
``trainer.loss``, so a package that loaded its families on import would be an import cycle. Import them from
their modules (``from trainer.families.models import load_family``).
"""
