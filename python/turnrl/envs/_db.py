"""Copy-on-write view of a parsed JSON database, and tau-bench's state equality.

A domain parses its JSON tables once. Each episode gets a :class:`Store`: reads
go to the shared base tables, and the first write to a record copies just that
record into the episode's overlay. A reset is therefore an empty dict, and
comparing two episodes' final states only has to look at the records either
of them touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Json = Any


def copy_json(value: Json) -> Json:
    """Structural copy of JSON-like data (dicts, lists, scalars); faster than deepcopy."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    if isinstance(value, tuple):
        return tuple(copy_json(v) for v in value)
    if isinstance(value, set):
        return {copy_json(v) for v in value}
    return value


def canonical(value: Json) -> Any:
    """The canonical form tau-bench hashes (``to_hashable``): sorted dict items, tuples.

    Two states are equal for tau-bench when ``str`` of their canonical forms
    are equal; that makes ``1`` and ``1.0`` (or ``True``) different, and a dict
    equal to the list of its sorted ``[key, value]`` pairs, exactly as upstream.
    """
    if isinstance(value, dict):
        return tuple((k, canonical(v)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(canonical(v) for v in value)
    if isinstance(value, set):
        return tuple(sorted(canonical(v) for v in value))
    return value


def same_state(a: Json, b: Json) -> bool:
    """Whether two JSON values hash alike under tau-bench's ``consistent_hash``."""
    if a is b:
        return True
    return repr(canonical(a)) == repr(canonical(b))


_MISSING = object()


class Store:
    """One episode's database: shared read-only base tables plus a private overlay.

    ``get`` returns a record that must be treated as read-only; ``mut`` returns
    the episode's own copy, made on first write. New records go through ``put``.
    Iteration keeps the base's key order with new keys after it, as a plain
    dict that had the records inserted would.
    """

    __slots__ = ("base", "overlay")

    def __init__(self, base: dict[str, dict[str, Json]]) -> None:
        self.base = base
        self.overlay: dict[str, dict[str, Json]] = {}

    def has(self, table: str, key: Any) -> bool:
        """Whether ``table`` holds ``key``."""
        ov = self.overlay.get(table)
        if ov is not None and key in ov:
            return True
        return key in self.base[table]

    def get(self, table: str, key: Any) -> Json:
        """The record (read-only) or raise ``KeyError(key)`` as a dict would."""
        ov = self.overlay.get(table)
        if ov is not None and key in ov:
            return ov[key]
        return self.base[table][key]

    def mut(self, table: str, key: Any) -> Json:
        """The episode's own writable copy of a record (``KeyError(key)`` if absent)."""
        ov = self.overlay.setdefault(table, {})
        rec = ov.get(key, _MISSING)
        if rec is _MISSING:
            rec = copy_json(self.base[table][key])
            ov[key] = rec
        return rec

    def put(self, table: str, key: Any, record: Json) -> None:
        """Insert or replace a whole record."""
        self.overlay.setdefault(table, {})[key] = record

    def items(self, table: str) -> Iterator[tuple[Any, Json]]:
        """All (key, record) pairs of a table in dict order."""
        base = self.base[table]
        ov = self.overlay.get(table)
        if not ov:
            yield from base.items()
            return
        for k, v in base.items():
            yield k, ov.get(k, v)
        for k, v in ov.items():
            if k not in base:
                yield k, v

    def values(self, table: str) -> Iterator[Json]:
        """All records of a table in dict order."""
        for _, v in self.items(table):
            yield v

    def materialize(self) -> dict[str, dict[str, Json]]:
        """The full state as plain dicts (a copy; for inspection and tests)."""
        return {t: {k: copy_json(v) for k, v in self.items(t)} for t in self.base}

    def same_as(self, other: Store) -> bool:
        """Whether this state equals ``other``'s under tau-bench's hash equality.

        Both must share the same base; records neither touched are identical.
        """
        if self.base is not other.base:
            return same_state(self.materialize(), other.materialize())
        for table in set(self.overlay) | set(other.overlay):
            mine = self.overlay.get(table, {})
            theirs = other.overlay.get(table, {})
            base = self.base[table]
            for key in set(mine) | set(theirs):
                a = mine.get(key, base.get(key, _MISSING))
                b = theirs.get(key, base.get(key, _MISSING))
                if a is _MISSING or b is _MISSING:
                    if a is not b:
                        return False
                    continue
                if not same_state(a, b):
                    return False
        return True
