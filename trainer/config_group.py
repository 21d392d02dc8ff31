"""The base of every settings group: unknown keys are errors, not silently ignored."""

from pydantic import BaseModel, ConfigDict


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")
