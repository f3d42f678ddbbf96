"""Typed configs (pydantic) whose validation errors are one line naming the flag and the fix."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    name = ".".join(str(p) for p in err["loc"]) if err["loc"] else "config"
    if err["type"] == "extra_forbidden":
        return f"unknown setting '{name}'"
    msg = err["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    return f"{flag(name)} {msg}, got {err.get('input')!r}"


class Config(BaseModel):
    """Base of every command's config: unknown keys are errors, and so is any bad value, in one line."""

    model_config = ConfigDict(extra="forbid")

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise UserError(one_line(e)) from None

    def as_dict(self) -> dict:
        return self.model_dump()
