"""The base of every settings group: unknown keys are errors, not silently ignored; and a rejected value is
not echoed in the error (pydantic's input_value), since it may hold a secret (a password in a reward URL):
each validator's own message says what is wrong, with secrets masked."""

from pydantic import BaseModel, ConfigDict

class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
