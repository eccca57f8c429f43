"""`trajflow schema`: the JSON Schema of `global` and each stage's `config` block."""
from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import BaseModel

from trajflow.config.global_ import GlobalConfig
from trajflow.config.loader import STAGE_MODELS


def _close(node: Any) -> Any:
    """Pydantic already forbids extras; make sure every object schema says so too."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _close(value)
    elif isinstance(node, list):
        for value in node:
            _close(value)
    return node


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace `$ref`s with their definitions: the blocks are embedded deep inside the
    charts' values.schema.json, where a `#/$defs/...` pointer would not resolve."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            return _inline(merged, defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    return _close(_inline(raw, raw.get("$defs", {})))


def schemas() -> dict[str, Any]:
    out = {"global": model_schema(GlobalConfig)}
    for stage, model in STAGE_MODELS.items():
        out[stage] = model_schema(model)
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--block", choices=["global", *STAGE_MODELS], help="print only this block's schema")


def run(args: argparse.Namespace) -> int:
    doc = schemas()
    print(json.dumps(doc[args.block] if args.block else doc, indent=2, sort_keys=True))
    return 0
