"""Helm's values semantics, reimplemented so the workloads need no Helm at run time.

- `merge_maps`: how `-f a.yaml -f b.yaml` combine: maps merge deeply, the later file wins,
  lists and scalars are replaced whole, a `null` is kept as a value (it deletes later).
- `parse_set`: how Helm parses `--set a.b=1,c={x,y},d[0].e=f` (values typed: ints,
  true/false, null; everything else, floats included, stays a string).
- `coalesce_chart`: how an install combines the user's values with a chart's defaults and
  its subcharts' defaults: a user `null` deletes the default key, chart-default nulls are
  dropped, globals flow down into every subchart.

The test suite holds each of these to Helm's own implementation (helm-python-sdk).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from trajflow.errors import ConfigError

GLOBAL_KEY = "global"


def merge_maps(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base` (later wins, lists replace, nulls kept)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_maps(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ---- coalescing with chart defaults ---------------------------------------------------


@dataclass
class ChartValues:
    """A chart's default values and its subcharts', as Helm loads them."""

    name: str
    values: dict[str, Any]
    dependencies: list["ChartValues"] = field(default_factory=list)
    source: str = ""  # the values file, for error messages


def _drop_nulls(table: dict[str, Any]) -> None:
    """Remove null entries, recursively through maps (not lists), in place."""
    for key in [k for k, v in table.items() if v is None]:
        del table[key]
    for value in table.values():
        if isinstance(value, dict):
            _drop_nulls(value)


def _coalesce_tables(dst: dict[str, Any], src: dict[str, Any], merge: bool) -> dict[str, Any]:
    """Fill `dst` (authoritative) from `src`. Coalescing (merge False) lets a null in
    `dst` delete the key; merging keeps the null for a later coalesce to act on."""
    for key, default in src.items():
        if key in dst:
            value = dst[key]
            if value is None and not merge:
                del dst[key]
            elif isinstance(default, dict) and isinstance(value, dict):
                _coalesce_tables(value, default, merge)
            # otherwise the user's value stands, whatever its type
        else:
            dst[key] = default
    return dst


def _coalesce_values(chart: ChartValues, values: dict[str, Any], merge: bool) -> None:
    dependency_names = {d.name for d in chart.dependencies}
    for key, default in copy.deepcopy(chart.values).items():
        if key in values:
            value = values[key]
            if value is None and not merge:
                del values[key]
            elif isinstance(value, dict) and isinstance(default, dict):
                # values meant for a subchart keep their nulls until that subchart's own
                # defaults are coalesced, where the nulls delete keys
                sub_merge = merge or key in dependency_names
                if not sub_merge:
                    _drop_nulls(default)
                _coalesce_tables(value, default, sub_merge)
        else:
            if not merge:
                if default is None:
                    continue
                if isinstance(default, dict):
                    _drop_nulls(default)
            values[key] = default


def _coalesce_globals(sub_values: dict[str, Any], parent_values: dict[str, Any]) -> None:
    """Copy the parent's `global` into a subchart's values; the parent wins.

    Maps are copied one level deep only, as Helm does: deeper maps stay shared with the
    parent, so a subchart's global defaults can show up in the parent's globals too. That
    is Helm's behaviour, and the point here is to agree with it."""
    dest_global = sub_values.get(GLOBAL_KEY, {})
    src_global = parent_values.get(GLOBAL_KEY, {})
    if not isinstance(dest_global, dict) or not isinstance(src_global, dict):
        return  # Helm warns and skips globals that are not maps
    for key, value in src_global.items():
        if isinstance(value, dict):
            parent_table = dict(value)
            existing = dest_global.get(key)
            if key not in dest_global:
                dest_global[key] = parent_table
            elif isinstance(existing, dict):
                dest_global[key] = _coalesce_tables(parent_table, existing, merge=True)
        elif isinstance(dest_global.get(key), dict):
            continue
        else:
            dest_global[key] = value
    sub_values[GLOBAL_KEY] = dest_global


def _coalesce(chart: ChartValues, values: dict[str, Any], merge: bool, path: str) -> dict[str, Any]:
    _coalesce_values(chart, values, merge)
    for sub in chart.dependencies:
        if sub.name not in values:
            values[sub.name] = {}
        elif not isinstance(values[sub.name], dict):
            raise ConfigError(
                f"{path}{sub.name}: values for the {sub.name!r} subchart must be a map, "
                f"got {type(values[sub.name]).__name__}"
            )
        sub_values = values[sub.name]
        _coalesce_globals(sub_values, values)
        values[sub.name] = _coalesce(sub, sub_values, merge, f"{path}{sub.name}.")
    return values


def coalesce_chart(chart: ChartValues, user: dict[str, Any]) -> dict[str, Any]:
    """The values a release of `chart` renders with, given the user's merged values."""
    return _coalesce(chart, copy.deepcopy(user or {}), merge=False, path="")


def coalesce(defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """User values over one chart's defaults (no subcharts)."""
    return coalesce_chart(ChartValues("chart", defaults), user)


# ---- --set parsing --------------------------------------------------------------------

MAX_INDEX = 65536  # as Helm: a larger list index is refused
MAX_NESTING = 30  # as Helm: deeper dotted names are refused
_INT64 = re.compile(r"^[+-]?[0-9]+$")


def typed_set_value(text: str) -> Any:
    """Type a --set scalar as Helm does: true/false/null in any case, base-10 int64 not
    starting with 0; everything else (floats, 0-prefixed numbers) stays a string."""
    folded = text.casefold()
    if folded == "true":
        return True
    if folded == "false":
        return False
    if folded == "null":
        return None
    if text == "0":
        return 0
    if text and text[0] != "0" and _INT64.match(text):
        value = int(text)
        if -(2**63) <= value < 2**63:
            return value
    return text


class _End(Exception):
    """The expression is used up: parsing stops without error (as Helm's io.EOF)."""


class SetString(str):
    """A `--set-string` expression: parsed as `--set` is, but every value stays a string
    (`--set-string downloader.image.tag=2024` keeps the tag from becoming a number)."""


def set_option(expression: str) -> list[str]:
    """The command-line arguments that give `expression`, for messages and child commands."""
    return ["--set-string" if isinstance(expression, SetString) else "--set", str(expression)]


def apply_order(sets: Iterable[str]) -> list[str]:
    """The expressions in the order Helm applies them: every --set, then every --set-string."""
    return sorted(sets, key=lambda e: isinstance(e, SetString))


class _SetParser:
    """A port of Helm's strvals state machine: same results, same accepted inputs."""

    def __init__(self, expression: str, data: dict[str, Any]):
        self.text, self.pos, self.data = str(expression), 0, data
        self.option = set_option(expression)[0]

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.option} {self.text!r}: {message}")

    def _typed(self, raw: str) -> Any:
        return raw if self.option == "--set-string" else typed_set_value(raw)

    def _read(self) -> str | None:
        if self.pos >= len(self.text):
            return None
        ch = self.text[self.pos]
        self.pos += 1
        return ch

    def _until(self, stop: str) -> tuple[str, str | None]:
        """Characters up to one in `stop` (consumed); backslash escapes the next one.
        The returned stop character is None at the end of the expression."""
        out: list[str] = []
        while True:
            ch = self._read()
            if ch is None:
                return "".join(out), None
            if ch in stop:
                return "".join(out), ch
            if ch == "\\":
                escaped = self._read()
                if escaped is None:
                    return "".join(out), None
                out.append(escaped)
            else:
                out.append(ch)

    def parse(self) -> dict[str, Any]:
        try:
            while True:
                self._key(self.data, 0)
        except _End:
            return self.data

    @staticmethod
    def _set(data: dict[str, Any], key: str, value: Any) -> None:
        if key:  # Helm ignores an empty name
            data[key] = value

    def _key(self, data: dict[str, Any], nesting: int) -> None:
        name, stop = self._until("=[,.")
        if stop is None:
            if not name:
                raise _End
            raise self.fail(f"key {name!r} has no value")
        if stop == "[":
            index = self._index()
            items = data[name] if name in data else []
            if not isinstance(items, list):
                raise self.fail(f"{name!r} is indexed like a list but already holds {type(items).__name__}")
            try:
                items = self._list_item(items, index, nesting)
            except _End:
                self._set(data, name, items)
                raise
            self._set(data, name, items)
        elif stop == "=":
            try:
                value = self._value_list()
            except _End:
                self._set(data, name, "")
                raise
            if value is _NOT_LIST:
                raw, _ = self._until(",")
                value = self._typed(raw)
            self._set(data, name, value)
        elif stop == ",":
            raise self.fail(f"key {name!r} has no value (an expression cannot end with ',')")
        else:  # "."
            nesting += 1
            if nesting > MAX_NESTING:
                raise self.fail(f"names nest deeper than {MAX_NESTING} levels")
            inner = data.get(name, {})
            if name in data and not isinstance(inner, dict):
                raise self.fail(f"{name!r} is used as a map but already holds {type(inner).__name__}")
            try:
                self._key(inner, nesting)
            except _End:
                if inner:
                    self._set(data, name, inner)
                raise
            if not inner:
                raise self.fail(f"key map {name!r} has no value")
            self._set(data, name, inner)

    def _index(self) -> int:
        raw, stop = self._until("]")
        if stop is None:
            raise _End  # Helm stops quietly at an unterminated index
        if not _INT64.match(raw):
            raise self.fail(f"list index {raw!r} is not an integer")
        index = int(raw)
        if index < 0:
            raise self.fail(f"negative list index {index}")
        return index

    def _list_item(self, items: list[Any], index: int, nesting: int) -> list[Any]:
        rest, stop = self._until("[.=")
        if rest:
            raise self.fail(f"unexpected {rest!r} after list index [{index}]")
        if stop is None:
            raise _End
        if stop == "=":
            try:
                value = self._value_list()
            except _End:
                return self._set_index(items, index, "")
            if value is _NOT_LIST:
                raw, _ = self._until(",")
                value = self._typed(raw)
            return self._set_index(items, index, value)
        if stop == "[":
            inner_index = self._index()
            current: Any = items[index] if index < len(items) else None
            if current is not None and not isinstance(current, list):
                raise self.fail(f"item [{index}] is indexed like a list but holds {type(current).__name__}")
            nested = self._list_item(current if current is not None else [], inner_index, nesting)
            return self._set_index(items, index, nested)
        # "."
        inner: Any = {}
        if index < len(items):
            if not isinstance(items[index], dict):
                items[index] = {}
            inner = items[index]
        self._key(inner, nesting)
        return self._set_index(items, index, inner)

    def _set_index(self, items: list[Any], index: int, value: Any) -> list[Any]:
        if index > MAX_INDEX:
            raise self.fail(f"list index {index} is above the maximum {MAX_INDEX}")
        if len(items) <= index:
            items.extend([None] * (index + 1 - len(items)))
        items[index] = value
        return items

    def _value_list(self) -> Any:
        first = self._read()
        if first is None:
            raise _End
        if first != "{":
            self.pos -= 1
            return _NOT_LIST
        values: list[Any] = []
        while True:
            raw, stop = self._until(",}")
            if stop is None:
                raise self.fail("a list must end with '}'")
            values.append(self._typed(raw))
            if stop == "}":
                if self.pos < len(self.text) and self.text[self.pos] == ",":
                    self.pos += 1
                return values


_NOT_LIST = object()


def parse_set(expression: str, into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse one `--set` expression (comma-separated `key=value` pairs) into nested values,
    into `into` when given (as Helm applies each --set onto the merged -f files)."""
    target: dict[str, Any] = {} if into is None else into
    return _SetParser(expression, target).parse()
