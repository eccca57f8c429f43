"""Load values files the way Helm does and validate the parts the workloads use.

Two entry points:
- `load_values(files, sets)`: chart defaults + `-f` files + `--set`, merged with Helm's rules
  (used by `trajflow run` and by each stage when given `-f`).
- `load_config_file(path, stage)`: the ConfigMap the chart renders into every pod:
  `{global: <.Values.global>, config: <.Values.<stage>.config>}`.
Errors name the file and the key path, one line each.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from trajflow.config.download import DownloadConfig
from trajflow.config.global_ import GlobalConfig
from trajflow.config.merge import coalesce, merge_maps, parse_set
from trajflow.config.preprocess import PreprocessConfig
from trajflow.config.train import TrainConfig
from trajflow.errors import ConfigError

# chart stage name -> workload config model
STAGE_MODELS: dict[str, type[BaseModel]] = {
    "downloader": DownloadConfig,
    "preprocessing": PreprocessConfig,
    "training": TrainConfig,
}
CONFIG_PATH_ENV = "TRAJFLOW_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/trajflow/config.yaml"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such values file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a map of values, got {type(doc).__name__}")
    return doc


def find_chart_dir() -> Path | None:
    """The umbrella chart: $TRAJFLOW_CHART, else charts/trajflow above the cwd or this checkout."""
    env = os.environ.get("TRAJFLOW_CHART")
    if env:
        return Path(env)
    starts = [Path.cwd(), Path(__file__).resolve()]
    for start in starts:
        for parent in [start, *start.parents]:
            candidate = parent / "charts" / "trajflow"
            if (candidate / "Chart.yaml").is_file():
                return candidate
    return None


def chart_defaults(chart_dir: Path) -> dict[str, Any]:
    """Umbrella values.yaml over each subchart's values.yaml, as Helm composes them."""
    values = read_yaml(chart_dir / "values.yaml") if (chart_dir / "values.yaml").is_file() else {}
    subcharts = chart_dir / "charts"
    if subcharts.is_dir():
        for sub in sorted(subcharts.iterdir()):
            sub_values = sub / "values.yaml"
            if sub.is_dir() and sub_values.is_file() and sub.name != "common":
                defaults = read_yaml(sub_values)
                defaults.pop("global", None)
                values[sub.name] = coalesce(defaults, values.get(sub.name) or {})
    return values


@dataclass(frozen=True)
class Values:
    """Merged values plus where each layer came from, to name files in errors."""

    merged: dict[str, Any]
    layers: tuple[tuple[str, dict[str, Any]], ...]  # (origin, values) lowest priority first

    def origin(self, path: Iterable[str | int]) -> str:
        keys = list(path)
        for name, layer in reversed(self.layers):
            node: Any = layer
            for key in keys:
                if isinstance(node, dict) and key in node:
                    node = node[key]
                elif isinstance(node, list) and isinstance(key, int) and key < len(node):
                    node = node[key]
                else:
                    break
            else:
                return name
        return self.layers[-1][0] if self.layers else "values"

    def stage(self, stage: str) -> dict[str, Any]:
        return self.merged.get(stage) or {}

    def enabled(self, stage: str) -> bool:
        return bool(self.stage(stage).get("enabled", False))


def load_values(
    files: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    chart_dir: Path | None = None,
    use_chart_defaults: bool = True,
) -> Values:
    """Chart defaults, then each `-f` file (later wins), then `--set`; nulls delete defaults."""
    layers: list[tuple[str, dict[str, Any]]] = []
    defaults: dict[str, Any] = {}
    if use_chart_defaults:
        chart_dir = chart_dir or find_chart_dir()
        if chart_dir is not None:
            defaults = chart_defaults(chart_dir)
            layers.append((str(chart_dir / "values.yaml"), defaults))
    user: dict[str, Any] = {}
    for f in files:
        doc = read_yaml(f)
        layers.append((str(f), doc))
        user = merge_maps(user, doc)
    for expression in sets:
        layer = parse_set(expression)
        layers.append((f"--set {expression}", layer))
        parse_set(expression, into=user)
    merged = coalesce(defaults, user)
    if defaults:
        unknown = sorted(set(merged) - set(defaults))
        if unknown:
            key = unknown[0]
            raise ConfigError(
                f"{Values(merged, tuple(layers)).origin([key])}: unknown top-level key {key!r} "
                f"(known: {', '.join(sorted(defaults))})"
            )
    return Values(merged, tuple(layers))


def _format_errors(exc: ValidationError, origin: str | None, prefix: list[str | int], values: Values | None) -> str:
    lines = []
    for err in exc.errors():
        loc = [*prefix, *[p for p in err["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)]]
        dotted = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        where = values.origin(loc) if values is not None else origin
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"{where}: {dotted}: {msg}")
    return "\n".join(lines)


# pydantic puts the chosen union member's tag or class in error locations; users never wrote it
_UNION_TAGS = {"s3", "https", "catalog", "file", "str", "UrlItem"}


def validate_global(raw: dict[str, Any], origin: str = "values", values: Values | None = None) -> GlobalConfig:
    try:
        return GlobalConfig.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin, ["global"], values)) from None


def validate_stage(stage: str, raw: dict[str, Any], origin: str = "values", values: Values | None = None) -> BaseModel:
    if stage not in STAGE_MODELS:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGE_MODELS)}")
    try:
        return STAGE_MODELS[stage].model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin, [stage, "config"], values)) from None


@dataclass(frozen=True)
class StageSettings:
    """Everything a stage needs to run one shard."""

    global_: GlobalConfig
    config: Any
    shard: int
    shards: int

    @property
    def root(self) -> str:
        return self.global_.run_root()


def shard_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(index, count) from JOB_COMPLETION_INDEX and TRAJFLOW_SHARDS (defaults: 0 of 1)."""
    env = os.environ if env is None else env
    try:
        index = int(env.get("JOB_COMPLETION_INDEX", "0"))
        count = int(env.get("TRAJFLOW_SHARDS", "1"))
    except ValueError:
        raise ConfigError(
            f"JOB_COMPLETION_INDEX={env.get('JOB_COMPLETION_INDEX')!r} and TRAJFLOW_SHARDS="
            f"{env.get('TRAJFLOW_SHARDS')!r} must be integers"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard index {index} is outside 0..{count - 1} (TRAJFLOW_SHARDS={count})")
    return index, count


def load_config_file(path: str | Path, stage: str) -> tuple[GlobalConfig, Any]:
    """Read the rendered ConfigMap: `{global: ..., config: ...}`."""
    doc = read_yaml(path)
    unknown = sorted(set(doc) - {"global", "config"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {unknown[0]!r} (expected global and config)")
    glob = validate_global(doc.get("global") or {}, origin=str(path))
    try:
        config = STAGE_MODELS[stage].model_validate(doc.get("config") or {})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, str(path), ["config"], None)) from None
    return glob, config


def global_settings(
    config_file: str | Path | None = None,
    values_files: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
) -> GlobalConfig:
    """Only `global` (storage, run id), from `--config FILE` or `-f/--set`; any stage's file will do."""
    values_files, sets = list(values_files), list(sets)
    if values_files or sets:
        values = load_values(values_files, sets)
        return validate_global(values.merged.get("global") or {}, values=values)
    path = config_file or os.environ.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH
    return validate_global(read_yaml(path).get("global") or {}, origin=str(path))


def stage_settings(
    stage: str,
    config_file: str | Path | None = None,
    values_files: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    env: dict[str, str] | None = None,
) -> StageSettings:
    """Resolve a stage's settings from `--config FILE` (pods) or `-f/--set` (local use)."""
    values_files, sets = list(values_files), list(sets)
    if values_files or sets:
        values = load_values(values_files, sets)
        glob = validate_global(values.merged.get("global") or {}, values=values)
        config = validate_stage(stage, values.stage(stage).get("config") or {}, values=values)
    else:
        env_map = os.environ if env is None else env
        path = config_file or env_map.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH
        glob, config = load_config_file(path, stage)
    index, count = shard_from_env(env)
    return StageSettings(glob, config, index, count)


def add_config_arguments(parser: Any) -> None:
    """The `--config`, `-f` and `--set` options every stage command takes."""
    parser.add_argument(
        "--config",
        default=None,
        help=f"rendered stage config ({{global, config}}); default ${CONFIG_PATH_ENV} or {DEFAULT_CONFIG_PATH}",
    )
    parser.add_argument("-f", "--values", action="append", default=[], metavar="FILE", help="values file (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override values (repeatable)")
