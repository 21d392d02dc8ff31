"""``python -m trainer.dpo``: Diffusion-DPO with that project's own flags (trainer/dpo/__main__.py). The
algorithm itself is trainer/algorithms/dpo/."""
