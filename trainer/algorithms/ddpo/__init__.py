"""DDPO / Flow-GRPO (``--algorithm ddpo``): ``loop.py`` the epoch loop, ``loss.py`` PPO-clip, ``settings.py`` the
``ddpo`` group, ``checks.py`` its configuration checks, ``preflight.py`` its check of the model's schedule,
``trained_steps.py`` which sampler steps it may train."""
