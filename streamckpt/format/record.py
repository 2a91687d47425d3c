"""Small immutable value types, without ``@dataclass``'s cost at import.

``@dataclass(frozen=True, slots=True)`` writes each class's methods as source text and runs
``exec`` on it while the module is imported: about 1.5 ms a class. The dozen classes a local
read needs cost more than half of what a fresh process spent importing streamckpt beyond
numpy (issue 15.1). A subclass of :class:`Record` lists its fields in ``__slots__`` (and
annotates them: the annotations' order is the fields' order), writes its own ``__init__``
with ``object.__setattr__``, and inherits what a frozen dataclass has: equality and hashing
by field values, a repr that names them, refusal of assignment, pickling, and
:meth:`replace`. Its ``__init__`` takes the fields positionally in that order (pickling relies
on it).
"""

from __future__ import annotations

from typing import Any, Self


class Record:
    __slots__ = ()
    #: every field, of this class and its bases, in order (set per subclass)
    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        below = [k for k in reversed(cls.__mro__) if k is not Record and issubclass(k, Record)]
        # not inspect.get_annotations: importing inspect costs more than all the records
        own = [k.__dict__.get("__annotations__", {}) for k in below]  # noqa: RUF063
        fields = tuple(name for annotations in own for name in annotations)
        slots = {name for k in below for name in k.__dict__.get("__slots__", ())}
        if set(fields) != slots or len(fields) != len(slots):
            raise TypeError(f"{cls.__name__}: annotate each slot once, and only slots")
        cls._fields = fields

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, name) for name in self._fields])

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (as ``dataclasses.replace``); unknown names are refused."""
        unknown = changes.keys() - set(self._fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        values = dict(zip(self._fields, self._values(), strict=True))
        values.update(changes)
        return type(self)(**values)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({shown})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a {type(self).__name__}")

    def __reduce__(self) -> tuple[type[Self], tuple[Any, ...]]:
        return type(self), self._values()
