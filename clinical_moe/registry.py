"""Tiny name -> builder registries for fusion heads and modality encoders (timm style).

Registering is the only step needed for a new head to be built by name, listed by
:func:`clinical_moe.list_models`, and covered by the registry-wide contract tests.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def closest(name: str, options) -> str:
    """A hint naming the closest valid option, for error messages."""
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.0)
    return f" (did you mean {match[0]!r}?)" if match else ""


class Registry(Generic[T]):
    """A mapping from names to builders (classes or factory functions)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@HEADS.register("fusemoe")`` on a class or factory."""

        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}{closest(name, self._items)}; "
                f"registered: {sorted(self._items)}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


#: Fusion heads: ``cls(modalities=..., d_model=..., num_classes=..., num_tokens=..., **kw)``.
HEADS: Registry = Registry("model")
#: Modality encoders: ``cls(d_model=..., num_tokens=..., **kw)``.
ENCODERS: Registry = Registry("encoder")
