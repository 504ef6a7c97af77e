"""A name -> dataclass registry with helpful errors, shared by attention methods and tasks."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Generic, Sequence, TypeVar

C = TypeVar("C")


class Registry(Generic[C]):
    """Classes registered under their ``name`` attribute, built from keyword arguments.

    Args:
      kind: what the registry holds, for error messages (``"attention method"``).
      builtin_modules: modules whose import registers the built-in classes; imported on
        first lookup (so registering modules may import the registry without a cycle).
      suggestion_cutoff: how similar (0..1, ``difflib``) a name must be to be suggested.
    """

    def __init__(self, kind: str, builtin_modules: Sequence[str] = (), suggestion_cutoff: float = 0.6):
        self.kind = kind
        self._cutoff = suggestion_cutoff
        self._builtin_modules = tuple(builtin_modules)
        self._classes: dict[str, type[C]] = {}

    def register(self, cls: type[C]) -> type[C]:
        """Class decorator: make ``cls`` available under ``cls.name``."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load_builtins()
        return sorted(self._classes)

    def lookup(self, name: str) -> type[C]:
        """The class registered as ``name``.

        Raises:
          ValueError: unknown name (the closest names are suggested).
        """
        self._load_builtins()
        if name not in self._classes:
            close = difflib.get_close_matches(name, self._classes, n=3, cutoff=self._cutoff)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(sorted(self._classes))}.")
        return self._classes[name]

    def build(self, name: str, **kwargs: Any) -> C:
        """An instance of the class registered as ``name``.

        Raises:
          ValueError: unknown name (the closest names are suggested) or unknown argument
            (the valid arguments are listed).
        """
        cls = self.lookup(name)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} has no argument(s) {', '.join(unknown)}; "
                f"valid arguments: {', '.join(sorted(fields)) or '(none)'}."
            )
        return cls(**kwargs)

    def _load_builtins(self) -> None:
        for module in self._builtin_modules:
            importlib.import_module(module)
