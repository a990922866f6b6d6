"""Which public methods of the device classes a test session called.

The kernel tests' conftest wraps, for the whole VM session, every public
method and property that VhostVdpa and VhostNet define or inherit from
vdpad.device; the kernel test that runs last asserts that each was called on
an instance of each class. The list is taken from the classes at run time,
so a method added, moved or removed is checked without editing anything here.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable
from typing import Any

from vdpad.device import VhostNet, VhostVdpa

DEVICE_CLASSES: tuple[type, ...] = (VhostVdpa, VhostNet)
DEVICE_PACKAGE = "vdpad.device"


def _definitions(classes: Iterable[type]) -> dict[str, tuple[type, str]]:
    """"Class.name" -> (the class in vdpad.device that defines it, name), for each public method and property."""
    found = {}
    for cls in classes:
        for name in dir(cls):
            if name.startswith("_"):
                continue
            owner = next(base for base in cls.__mro__ if name in vars(base))
            if not owner.__module__.startswith(DEVICE_PACKAGE + "."):
                continue
            raw = vars(owner)[name]
            if isinstance(raw, type) or not (callable(raw) or isinstance(raw, (property, classmethod))):
                continue  # nested classes and constants are not calls
            if not isinstance(raw, (types.FunctionType, property, classmethod)):
                raise TypeError(f"{owner.__name__}.{name} is a {type(raw).__name__}: the recorder cannot tell "
                                "which class it is called on")
            found[f"{cls.__name__}.{name}"] = (owner, name)
    return found


def public_api(classes: Iterable[type] = DEVICE_CLASSES) -> set[str]:
    """Every public method and property of `classes` that vdpad.device defines, as "Class.name"."""
    return set(_definitions(classes))


class CallRecorder:
    """Wraps the device classes' public API in place (install) and notes each "Class.name" called."""

    def __init__(self, classes: Iterable[type] = DEVICE_CLASSES):
        self.classes = tuple(classes)
        self.api = public_api(self.classes)
        self.called: set[str] = set()
        self._originals: list[tuple[type, str, Any]] = []

    def missing(self) -> list[str]:
        return sorted(self.api - self.called)

    def install(self) -> None:
        if self._originals:
            raise RuntimeError("the recorder is installed already")
        for owner, name in sorted(set(_definitions(self.classes).values()), key=lambda d: (d[0].__qualname__, d[1])):
            raw = vars(owner)[name]
            self._originals.append((owner, name, raw))
            setattr(owner, name, self._wrap(raw, name))

    def uninstall(self) -> None:
        while self._originals:
            owner, name, raw = self._originals.pop()
            setattr(owner, name, raw)

    def _note(self, kind: type, name: str) -> None:
        for cls in self.classes:
            if issubclass(kind, cls):
                self.called.add(f"{cls.__name__}.{name}")

    def _wrap(self, raw: Any, name: str) -> Any:
        if isinstance(raw, property):
            return property(*(self._method(f, name) if f else None for f in (raw.fget, raw.fset, raw.fdel)),
                            doc=raw.__doc__)
        if isinstance(raw, classmethod):
            return classmethod(self._method(raw.__func__, name, on_class=True))
        return self._method(raw, name)

    def _method(self, function: Callable[..., Any], name: str, on_class: bool = False) -> Callable[..., Any]:
        @functools.wraps(function)
        def recorded(first: Any, *args: Any, **kwargs: Any) -> Any:
            self._note(first if on_class else type(first), name)
            return function(first, *args, **kwargs)
        return recorded
