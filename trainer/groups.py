"""The bases of the settings groups: every number finite and bounded (``Bounded``, also the other commands'
settings), unknown keys refused and rejected values not echoed (``_Group``), and the step loop's settings
(trainer/step_loop.py) that the algorithms counted in optimizer steps (dpo, refl) share (``_Steps``). Apart
from trainer/config so that each algorithm's settings group (trainer/algorithms/<name>/settings.py), which
trainer.config.Config imports, imports nothing of trainer.config."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# Whatever a setting counts (steps, seconds, images, a seed), past this it is a typo or an attack: torch,
# numpy and the OS refuse larger seeds, timeouts and sizes later, with a traceback after the model has loaded.
MAGNITUDE = 2**31 - 1


class Bounded(BaseModel):
    """Every number finite and within +-MAGNITUDE: one check for every numeric setting of every settings class
    (each group of the trainer's config, and the other commands'), a field's own bounds coming on top."""

    # allow_inf_nan: NaN passes every gt/ge/lt bound (all comparisons are false), and inf most of them
    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> Any:
        if type(value) in (int, float) and abs(value) > MAGNITUDE:
            raise ValueError(f"must lie between -{MAGNITUDE} and {MAGNITUDE}")
        return value


class _Group(Bounded):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # with Bounded's


class _Steps(_Group):
    """The settings of the step loop (trainer/step_loop.py) that the algorithms counted in optimizer steps share."""

    max_train_steps: int = Field(100, gt=0, description="optimizer steps")
    checkpointing_steps: int = Field(
        500, ge=0, description="checkpoint every this many steps (and at the end); 0: at the end only"
    )
    log_every: int = Field(1, gt=0, description="log metrics every this many steps")
