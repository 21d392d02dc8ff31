"""DDPO's preflight check (trainer/preflight.py runs it before any model loads): the model's own schedule."""

from __future__ import annotations


def problems(cfg, model_found: bool) -> list[str]:
    """DDPO trains only steps with noise: a DDIM schedule that ends on alpha 1 makes its last step's std 0,
    read from the model's scheduler config before any weights load (what holds for every model, eta 0 and
    CPS's last step, the configuration itself refuses)."""
    if not model_found:
        return []
    import json

    from trainer.algorithms.ddpo.trained_steps import last_step_fix, trainable_steps
    from trainer.preflight import local_file

    index, config = local_file(cfg, "model_index.json"), local_file(cfg, "scheduler/scheduler_config.json")
    if (
        index is None
        or config is None
        or json.loads(index.read_text()).get("_class_name") == "StableDiffusion3Pipeline"
    ):
        return []  # the tiny models' schedules are ours; a flow schedule's steps all have noise at eta > 0
    from diffusers import DDIMScheduler

    from trainer.families.ddim import zero_std_steps

    scheduler = DDIMScheduler.from_config(json.loads(config.read_text()))
    steps = zero_std_steps(scheduler, cfg.sample.num_steps, cfg.sample.eta, trainable_steps(cfg))
    return [
        f"--pretrained.model {cfg.pretrained.model}: its DDIM schedule gives step {step} of "
        f'{cfg.sample.num_steps} a std of 0 at any sample.eta ("set_alpha_to_one": true in {config}), and '
        f'training can pick it: set "set_alpha_to_one": false there, or {last_step_fix(cfg)}'
        for step in steps
    ]
