"""The base of every models.yaml and site.yaml section: unknown fields are errors, values frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A section of a config file: a typo'd field is an error, and the value never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
