"""ReFL, DRaFT and AlignProp (``--algorithm refl``): ``loop.py`` its optimizer steps on the shared step loop
(trainer/step_loop.py), ``settings.py`` the ``refl`` group, ``checks.py`` its configuration check,
``preflight.py`` its check of the pre-training images."""
