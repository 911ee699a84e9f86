"""One registry per axis of choice: model families, mask rules, edge modes, samplers, readouts.

    RULES = Registry("mask rule")
    @RULES.register("otsu")
    def otsu(values): ...

    RULES["otsu"]            # the implementation; an unknown name: UnknownChoiceError naming the choices
    RULES.check("gmm")       # validation alone (a `DistillConfig`), with the same message
    rule: RULES.literal() = "gmm"   # a pydantic field whose choices are the registry's

A value is registered once, where it is implemented; the job config's `Literal`s, the checks of
`DistillConfig` and the lookups of the code that uses it all derive from the registry, so adding a value is
one registration and its tests (docs/development.md). This module imports nothing heavy: a registry's
names are known without torch, so loading a job YAML stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, Literal, TypeVar

from factory.errors import UserError

T = TypeVar("T")


class UnknownChoiceError(UserError, ValueError):
    """A name that its registry does not hold; the message lists the ones it does."""


class Registry(Generic[T]):
    """Names -> implementations of one axis (an ordered mapping, read-only but for `register`)."""

    def __init__(self, axis: str):
        self.axis = axis
        self._entries: dict[str, T] = {}

    def register(self, name: str, value: T | None = None) -> Any:
        """Register `value` under `name`, or, without a value, decorate the implementation to register."""
        if value is None:

            def decorate(v: T) -> T:
                self.register(name, v)
                return v

            return decorate
        if name in self._entries:
            raise ValueError(f"{self.axis} {name!r} is registered twice")
        self._entries[name] = value
        return value

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def check(self, name: str) -> str:
        """`name` itself if registered, else UnknownChoiceError naming the choices."""
        if name not in self._entries:
            raise UnknownChoiceError(
                f"unknown {self.axis} {name!r}; choose one of {', '.join(self._entries)}"
            )
        return name

    def literal(self) -> Any:
        """`Literal[...]` of the names, for a pydantic field (the config validates against the registry)."""
        return Literal[self.names()]

    def items(self):
        return self._entries.items()

    def values(self):
        return self._entries.values()

    def __getitem__(self, name: str) -> T:
        return self._entries[self.check(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.axis!r}: {', '.join(self._entries)})"


def first_match(registry: Registry[T], test: Callable[[T], bool]) -> str | None:
    """The name of the first entry that passes `test` (a family that recognises a pipeline), or None."""
    return next((name for name, value in registry.items() if test(value)), None)
