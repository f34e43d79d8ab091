"""Resource requests: cpus, memory, gpus and custom resources."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

__all__ = ["Resources", "format_memory", "parse_memory"]

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: int | float | str) -> int:
    """Bytes from `512Mi`, `2G`, `1.5Gi` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("memory must be a size such as '512Mi' or a number of bytes, not a bool")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"memory must be a finite size, got {value}")
        if value < 0:
            raise ValueError("memory must not be negative")
        return int(value)
    match = _MEMORY.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"memory {value!r} is not a size; write e.g. '512Mi', '2Gi' or '1G'")
    return int(float(match.group(1)) * _UNITS[unit])


def format_memory(n: int) -> str:
    """`536870912` -> `512Mi` (the largest binary unit that divides evenly, else bytes)."""
    for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)


class Resources(BaseModel):
    """What one step asks for while it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(default=1.0, ge=0)
    """Logical CPUs (fractions allowed)."""
    memory: int = Field(default=0, ge=0)
    """Bytes; accepts '512Mi', '2Gi'. 0 means no request."""
    gpus: int = Field(default=0, ge=0)
    """Whole GPUs."""
    custom: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    """Named resources such as `license: 1` (never negative: a negative request would add to what is free)."""

    @field_validator("memory", mode="before")
    @classmethod
    def _parse_memory(cls, value: Any) -> int:
        return parse_memory(value)

    @field_serializer("memory")
    def _dump_memory(self, value: int) -> int | str:
        text = format_memory(value)
        return value if text == str(value) else text

    def fits(self, free: Resources) -> bool:
        """Whether this request fits in `free`."""
        if self.cpus > free.cpus + 1e-9 or self.memory > free.memory or self.gpus > free.gpus:
            return False
        return all(amount <= free.custom.get(name, 0.0) + 1e-9 for name, amount in self.custom.items())

    def fits_beside(self, claimed: Resources, capacity: Resources) -> bool:
        """Whether this request fits in `capacity` beside `claimed`, in every resource it asks for (what others
        claim beyond the capacity of a resource it does not need is no reason to wait, as it is for `fits`)."""
        amounts = [(self.cpus, claimed.cpus, capacity.cpus), (self.memory, claimed.memory, capacity.memory),
                   (self.gpus, claimed.gpus, capacity.gpus),
                   *((amount, claimed.custom.get(name, 0.0), capacity.custom.get(name, 0.0))
                     for name, amount in self.custom.items())]
        return all(asked <= 0 or asked + held <= total + 1e-9 for asked, held, total in amounts)

    def __add__(self, other: Resources) -> Resources:
        custom = dict(self.custom)
        for name, amount in other.custom.items():
            custom[name] = custom.get(name, 0.0) + amount
        return Resources(cpus=self.cpus + other.cpus, memory=self.memory + other.memory,
                         gpus=self.gpus + other.gpus, custom=custom)

    def __sub__(self, other: Resources) -> Resources:
        custom = dict(self.custom)
        for name, amount in other.custom.items():
            custom[name] = custom.get(name, 0.0) - amount
        return Resources.model_construct(cpus=self.cpus - other.cpus, memory=self.memory - other.memory,
                                         gpus=self.gpus - other.gpus, custom=custom)
