"""DGPO (``--algorithm dgpo``: Luo et al., "Reinforcing Diffusion Models by Direct Group Preference
Optimization", arXiv 2510.08425): ``loop.py`` the run, ``loss.py`` its group-weighted denoising loss,
``settings.py`` the ``dgpo`` group, ``checks.py`` its configuration check."""
