"""The settings of the step loop (trainer/step_loop.py) that the algorithms counted in optimizer steps (dpo,
refl) share: the base of their settings groups."""

from __future__ import annotations

from pydantic import Field

from trainer.config.group import _Group


class _Steps(_Group):
    """The settings of the step loop (trainer/step_loop.py) that the algorithms counted in optimizer steps share."""

    max_train_steps: int = Field(100, gt=0, description="optimizer steps")
    checkpointing_steps: int = Field(
        500, ge=0, description="checkpoint every this many steps (and at the end); 0: at the end only"
    )
    log_every: int = Field(1, gt=0, description="log metrics every this many steps")
