"""Helm's values semantics: deep merge of values files and `--set` expressions.

- `-f a.yaml -f b.yaml`: maps merge deeply, the later file wins, lists are replaced whole.
- Coalescing with chart defaults: a `null` from the user deletes the default key.
- `--set a.b=1,c={x,y},d[0].e=f` as Helm parses it (values typed like YAML scalars).
"""
from __future__ import annotations

import copy
import re
from typing import Any

from trajflow.errors import ConfigError


def merge_maps(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base` (later wins, lists replace, nulls kept)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_maps(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def coalesce(defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """Apply user values over chart defaults the way an install does: a user `null` deletes."""
    out = copy.deepcopy(defaults)
    for key, value in user.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = coalesce(out[key], value)
        else:
            out[key] = _drop_nulls(copy.deepcopy(value))
    return out


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    return value


# ---- --set parsing -------------------------------------------------------------------

_INT = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")


def _typed(raw: str) -> Any:
    """Type a --set scalar as Helm does: ints, true/false, null; everything else a string.

    Helm keeps floats such as `1.5` and exponents as strings in --set; we do the same so
    `--set image.tag=1.10` stays the tag the user wrote.
    """
    if raw in ("true", "false"):
        return raw == "true"
    if raw == "null":
        return None
    if _INT.match(raw) and not (len(raw.lstrip("+-")) > 1 and raw.lstrip("+-").startswith("0")):
        try:
            value = int(raw)
        except ValueError:
            return raw
        if -(2**63) <= value < 2**63:
            return value
    return raw


def _split_unescaped(text: str, sep: str) -> list[str]:
    parts, buf, depth, i = [], [], 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            buf.append(text[i : i + 2])
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(depth - 1, 0)
        if ch == sep and depth == 0:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _parse_value(raw: str) -> Any:
    if raw.startswith("{") and raw.endswith("}"):
        inner = raw[1:-1]
        return [] if inner == "" else [_typed(_unescape(p)) for p in _split_unescaped(inner, ",")]
    return _typed(_unescape(raw))


_KEY_PART = re.compile(r"^(?P<name>(?:[^\[\\]|\\.)*)(?P<idx>(?:\[\d+\])*)$")


def _key_path(key: str, expression: str) -> list[str | int]:
    path: list[str | int] = []
    for part in _split_unescaped(key, "."):
        m = _KEY_PART.match(part)
        if not m or (not m.group("name") and not m.group("idx")):
            raise ConfigError(f"--set {expression!r}: malformed key {key!r}")
        if m.group("name"):
            path.append(_unescape(m.group("name")))
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group("idx")))
    return path


def _assign(target: dict[str, Any], path: list[str | int], value: Any, expression: str) -> None:
    node: Any = target
    for here, nxt in zip(path, path[1:]):
        empty: Any = [] if isinstance(nxt, int) else {}
        if isinstance(here, int):
            if not isinstance(node, list):
                raise ConfigError(f"--set {expression!r}: index [{here}] on a non-list")
            while len(node) <= here:
                node.append(None)
            if not isinstance(node[here], (dict, list)):
                node[here] = empty
            node = node[here]
        else:
            if not isinstance(node, dict):
                raise ConfigError(f"--set {expression!r}: key {here!r} on a non-map")
            if not isinstance(node.get(here), (dict, list)):
                node[here] = empty
            node = node[here]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list):
            raise ConfigError(f"--set {expression!r}: index [{last}] on a non-list")
        while len(node) <= last:
            node.append(None)
        node[last] = value
    else:
        if not isinstance(node, dict):
            raise ConfigError(f"--set {expression!r}: key {last!r} on a non-map")
        node[last] = value


def parse_set(expression: str, into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse one `--set` expression (comma-separated `key=value` pairs) into nested values."""
    out: dict[str, Any] = {} if into is None else into
    for pair in _split_unescaped(expression, ","):
        if pair == "":
            continue
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {expression!r}: expected key=value, got {pair!r}")
        _assign(out, _key_path(key, expression), _parse_value(raw), expression)
    return out
