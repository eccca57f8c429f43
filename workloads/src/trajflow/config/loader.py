"""Load values files the way Helm does and validate the parts the workloads use.

Two entry points:
- `load_values(files, sets)`: chart defaults + `-f` files + `--set`, merged with Helm's rules
  (used by `trajflow run` and by each stage when given `-f`).
- `load_config_file(path, stage)`: the ConfigMap the chart renders into every pod:
  `{global: <.Values.global>, config: <.Values.<stage>.config>}`.
Errors name the file and the key path, one line each.
"""
from __future__ import annotations

import copy
import decimal
import difflib
import functools
import json
import logging
import math
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml
from pydantic import BaseModel, ValidationError

from trajflow.config import formats
from trajflow.config.download import DownloadConfig
from trajflow.config.global_ import GlobalConfig
from trajflow.config.merge import (
    GLOBAL_KEY,
    ChartValues,
    SetString,
    apply_order,
    coalesce_chart,
    merge_maps,
    parse_set,
    set_option,
)
from trajflow.config.preprocess import PreprocessConfig
from trajflow.config.train import TrainConfig
from trajflow.errors import ConfigError

log = logging.getLogger(__name__)

# chart stage name -> workload config model
STAGE_MODELS: dict[str, type[BaseModel]] = {
    "downloader": DownloadConfig,
    "preprocessing": PreprocessConfig,
    "training": TrainConfig,
}
CONFIG_PATH_ENV = "TRAJFLOW_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/trajflow/config.yaml"
# the downloader's rendered config, given to the stages downstream of it (the umbrella
# chart's `<release>-dataset` ConfigMap; `trajflow run`: the downloader's own file)
DATASET_CONFIG_ENV = "TRAJFLOW_DATASET_CONFIG"
# the dataset ConfigMap's keys: the downloader's config and shard count, and the `rerun` of
# the downloader and preprocessing (`trajflow run` gives the downloader's stage config)
DATASET_CONFIG_KEYS = ("global", "config", "shards", "reruns")


class HelmYamlLoader(yaml.SafeLoader):
    """PyYAML read the way Helm reads values (Go yaml.v2 through sigs.k8s.io/yaml), so a
    file means the same here as in `helm install`: y/n/on/off are booleans, `1e-3` and
    `0o17` are numbers, dates and `12:30` stay strings, mapping keys become strings."""


HelmYamlLoader.yaml_implicit_resolvers = {}
_RESOLVERS = [
    ("tag:yaml.org,2002:bool",
     r"^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$", "yYnNtTfFoO"),
    # Go reads a prefix in either case, and a prefix without digits as a string
    ("tag:yaml.org,2002:int",
     r"^(?:[-+]?0[bB]_*[01][01_]*|[-+]?0[oO]_*[0-7][0-7_]*|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)"
     r"|[-+]?0[xX]_*[0-9a-fA-F][0-9a-fA-F_]*)$", "-+0123456789"),
    ("tag:yaml.org,2002:float",
     r"^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
     r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789."),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", "<"),
]
for _tag, _pattern, _first in _RESOLVERS:
    HelmYamlLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    return str(loader.construct_scalar(node)).lower() in ("y", "yes", "true", "on")


def _as_helm_number(value: float) -> float | int:
    # Helm holds every number as a float64 and writes a whole one below 1e21 back as an
    # integer in the float's shortest digits (3.0 reaches the pod as 3, and the schema's
    # `integer` takes it; 2**63 - 1 reaches it as 9223372036854776000): so does this
    return int(decimal.Decimal(repr(value))) if value.is_integer() and abs(value) < 1e21 else value


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | int | str:
    text = str(loader.construct_scalar(node))
    plain = text.replace("_", "")
    sign = -1 if plain.startswith("-") else 1
    digits = plain.lstrip("+-")
    if digits[:2].lower() in ("0b", "0x", "0o"):
        value = sign * int(digits, 0)
    elif len(digits) > 1 and digits.startswith("0"):
        value = sign * int(digits, 8)
    else:
        value = sign * int(digits)
    try:
        return _as_helm_number(float(value))
    except OverflowError:  # beyond float64: Go keeps the text
        return text


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | int | str:
    value = loader.construct_yaml_float(node)
    text = str(loader.construct_scalar(node))
    if math.isinf(value) and ".inf" not in text.lower():  # 1e400: beyond float64, Go keeps the text
        return text
    return _as_helm_number(value)


def _construct_merge_value(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    # `<<` merges only as a key (flatten_mapping handles those); as a value it is a string
    return str(loader.construct_scalar(node))


HelmYamlLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
HelmYamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
HelmYamlLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
HelmYamlLoader.add_constructor("tag:yaml.org,2002:merge", _construct_merge_value)


def _construct_mapping(loader: HelmYamlLoader, node: yaml.MappingNode, deep: bool = False) -> dict[str, Any]:
    # Keys become strings as Helm's YAML-to-JSON step makes them (and `y: 1` next to
    # `1: 2` stays two keys: as Python objects True and 1 would collide).
    loader.flatten_mapping(node)
    mapping: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, bool):
            text = "true" if key else "false"
        elif isinstance(key, (str, int, float)):
            text = str(key)
        else:
            raise yaml.constructor.ConstructorError(
                None, None, f"a map key must be a string or number, got {key!r}", key_node.start_mark
            )
        mapping[text] = loader.construct_object(value_node, deep=deep)
    return mapping


HelmYamlLoader.construct_mapping = _construct_mapping  # type: ignore[method-assign,assignment]


class HelmYamlDumper(yaml.SafeDumper):
    """Writes YAML that `HelmYamlLoader` reads back as written: a string it would read as
    something else (``y``, ``n``, ``0o17``, ``1e5``) is quoted."""


HelmYamlDumper.yaml_implicit_resolvers = HelmYamlLoader.yaml_implicit_resolvers


def dump_yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=HelmYamlDumper, sort_keys=True)


def parse_yaml(text: str, origin: str = "<values>") -> Any:
    """One YAML document read as Helm reads values files; errors name `origin` and the line.
    Empty documents after it (a trailing `---`) are allowed; Helm would silently drop a
    second document with values in it, so that is refused."""
    try:
        docs = list(yaml.load_all(text, Loader=HelmYamlLoader))  # noqa: S506 - a SafeLoader subclass
        if any(doc is not None for doc in docs[1:]):
            raise ConfigError(f"{origin}: holds more than one YAML document (after '---'): Helm reads only the "
                              "first; give each set of values its own file")
        return docs[0] if docs else None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{origin}: not valid YAML{where}: {problem}") from None


def read_yaml(path: str | Path, kind: str = "values file") -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {kind}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {kind}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    doc = parse_yaml(text, str(path))
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


def _chart_name(meta: dict[str, Any], fallback: str) -> str:
    name = meta.get("name")
    return name if isinstance(name, str) and name else fallback


def _load_archived_chart(archive: Path) -> ChartValues | None:
    """A packaged subchart (`charts/<name>-<version>.tgz`, from `helm dependency build`)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            top = sorted({name.split("/", 1)[0] for name in members})
            if len(top) != 1 or f"{top[0]}/Chart.yaml" not in members:
                return None
            def member_yaml(name: str) -> dict[str, Any]:
                member = members.get(f"{top[0]}/{name}")
                if member is None:
                    return {}
                fh = tar.extractfile(member)
                doc = parse_yaml(fh.read().decode() if fh else "", f"{archive}:{name}")
                return doc if isinstance(doc, dict) else {}

            meta = member_yaml("Chart.yaml")
            # a packaged chart's own subcharts are further archives inside it; the
            # workloads never need their values, so they are not unpacked here
            return ChartValues(_chart_name(meta, top[0]), member_yaml("values.yaml"), [], f"{archive}:values.yaml")
    except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{archive}: unreadable chart archive: {exc}") from None


def load_chart(chart_dir: Path) -> ChartValues:
    """A chart's defaults and, recursively, its subcharts' (charts/<dir> or charts/*.tgz)."""
    chart_dir = Path(chart_dir)
    meta_path = chart_dir / "Chart.yaml"
    meta = read_yaml(meta_path) if meta_path.is_file() else {}
    values_path = chart_dir / "values.yaml"
    values = read_yaml(values_path) if values_path.is_file() else {}
    dependencies: list[ChartValues] = []
    sub_root = chart_dir / "charts"
    if sub_root.is_dir():
        archives = []
        for entry in sorted(sub_root.iterdir()):
            if entry.is_dir() and (entry / "Chart.yaml").is_file():
                dependencies.append(load_chart(entry))
            elif entry.is_file() and entry.name.endswith(".tgz"):
                archives.append(entry)
        loaded = {d.name for d in dependencies}
        for archive in archives:  # an unpacked copy of the same chart takes precedence
            chart = _load_archived_chart(archive)
            if chart is not None and chart.name not in loaded:
                dependencies.append(chart)
                loaded.add(chart.name)
    return ChartValues(_chart_name(meta, chart_dir.name), values, dependencies, str(values_path))


def _default_layers(chart: ChartValues, path: tuple[str, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """(file, values nested at the chart's place) for every chart, subcharts first (they
    have the lowest priority), for naming the file a value came from."""
    layers: list[tuple[str, dict[str, Any]]] = []
    for sub in chart.dependencies:
        layers.extend(_default_layers(sub, (*path, sub.name)))
    nested: dict[str, Any] = chart.values
    for key in reversed(path):
        nested = {key: nested}
    # a value no file of the user's gave: the message must not send them to edit the chart
    layers.append((f"{chart.source or chart.name} (the chart's default)", nested))
    return layers


@dataclass(frozen=True)
class Values:
    """Merged values plus where each layer came from, to name files in errors."""

    merged: dict[str, Any]
    layers: tuple[tuple[str, dict[str, Any]], ...]  # (origin, values) lowest priority first

    def origin(self, path: Iterable[str | int]) -> str:
        """The file (or --set) that gave the value at ``path``, or would have to give it."""
        keys = list(path)
        for name, layer in reversed(self.layers):
            node: Any = layer
            for key in keys:
                if not isinstance(node, dict):
                    return name  # a list or a scalar replaces the lower layers' value whole
                if key not in node:
                    break
                node = node[key]
            else:
                return name
        return self.layers[-1][0] if self.layers else "values"

    def stage(self, stage: str) -> dict[str, Any]:
        block = self.merged.get(stage) or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{self.origin([stage])}: {stage}: must be a map of settings, got {type(block).__name__}")
        return block

    def stage_config(self, stage: str) -> dict[str, Any]:
        """A stage's `config` map; {} where no layer has one. Anything else is refused, as
        the chart's schema refuses it: a null removes the chart's defaults (Helm then finds
        no `config`), and a list or a scalar is no map of settings."""
        block = self.stage(stage)
        if "config" not in block:
            if any(isinstance(layer.get(stage), dict) and "config" in layer[stage] for _, layer in self.layers):
                raise ConfigError(f"{self.origin([stage, 'config'])}: {stage}.config is null, which removes every "
                                  "setting of it; give a map of settings, or leave the key out")
            return {}
        config = block["config"]
        if not isinstance(config, dict):
            raise ConfigError(f"{self.origin([stage, 'config'])}: {stage}.config must be a map of settings, got "
                              f"{type(config).__name__}")
        return config


def load_values(
    files: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    chart_dir: Path | None = None,
    use_chart_defaults: bool = True,
) -> Values:
    """`helm install -f ... --set ...` without Helm: each `-f` file merged over the previous
    ones, each `--set` parsed into the result, then coalesced with the chart's defaults
    (a user null deletes a default, subcharts get their defaults and the globals)."""
    layers: list[tuple[str, dict[str, Any]]] = []
    chart: ChartValues | None = None
    if use_chart_defaults:
        chart_dir = chart_dir or find_chart_dir()
        if chart_dir is not None and (chart_dir / "Chart.yaml").is_file():
            chart = load_chart(chart_dir)
            layers.extend(_default_layers(chart))
    user: dict[str, Any] = {}
    for f in files:
        doc = read_yaml(f)
        layers.append((str(f), doc))
        user = merge_maps(user, doc)
    for expression in apply_order(sets):
        layers.append((" ".join(set_option(expression)), parse_set(expression)))
        parse_set(expression, into=user)
    if chart is None:
        return Values(coalesce_chart(ChartValues("values", {}), user), tuple(layers))
    merged = coalesce_chart(chart, user)
    known = set(chart.values) | {d.name for d in chart.dependencies} | {GLOBAL_KEY}
    unknown = sorted(set(merged) - known)
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{Values(merged, tuple(layers)).origin([key])}: unknown top-level key {key!r} "
            f"(known: {', '.join(sorted(known))})"
        )
    return Values(merged, tuple(layers))


def _user_loc(raw: Any, loc: tuple[Any, ...]) -> list[str | int]:
    """The part of a pydantic error location that names keys the user wrote: pydantic adds
    union members and validator names (`str`, `function-after[...]`, a tag) that are no
    keys, so keep a step only where the input has that key or index, or where it is the
    last step naming a required key that is absent."""
    out: list[str | int] = []
    node = raw
    for i, step in enumerate(loc):
        if isinstance(node, dict) and isinstance(step, str) and step in node:
            node = node[step]
            out.append(step)
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
            out.append(step)
        elif (
            i == len(loc) - 1
            and isinstance(node, dict)
            and isinstance(step, str)
            and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", step)
            and step not in _PYDANTIC_STEPS
        ):
            out.append(step)
    return out


# location steps pydantic invents for union members
_PYDANTIC_STEPS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _dotted(loc: list[str | int]) -> str:
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")


def _format_errors(exc: ValidationError, raw: Any, origin: str | None, prefix: list[str | int], values: Values | None) -> str:
    lines: list[str] = []
    unknown: dict[tuple[str | int, ...], set[str]] = {}  # parent -> its unknown keys, which are no hint for each other
    for err in exc.errors():
        if err["type"] == "extra_forbidden":
            loc = [*prefix, *_user_loc(raw, tuple(err["loc"]))]
            unknown.setdefault(tuple(loc[:-1]), set()).add(str(loc[-1]))
    for err in exc.errors():
        loc = [*prefix, *_user_loc(raw, tuple(err["loc"]))]
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
            loc.append(err["ctx"]["discriminator"].strip("'"))  # the key that says which kind (a source's type)
        where = values.origin(loc) if values is not None else origin
        msg = err["msg"]
        if err["type"] == "union_tag_not_found":
            msg = "required key is missing"
        elif err["type"] == "union_tag_invalid":
            msg = f"expected one of {err['ctx']['expected_tags']}, got {err['ctx']['tag']!r}"
        elif err["type"] == "extra_forbidden":
            known = _sibling_keys(values, loc) - unknown.get(tuple(loc[:-1]), set())
            msg = "unknown key" + _unknown_key_hint(str(loc[-1]), known, set(), loc[:-1])
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] == "string_type" and not isinstance(err["input"], (dict, list)):
            msg = f"expected a string, got {_shown(err['input'])}" + _set_string_hint(where, err["input"])
        elif err["type"] == "string_pattern_mismatch":
            shown = formats.without_secrets(err["input"])
            msg = f"expected {formats.in_words(str(err['ctx']['pattern']))}, got {shown!r}"
        elif err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", msg))  # our validators name the value
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {err['input']!r})"
            if err["type"] == "float_type":
                msg += _set_number_hint(where, err["input"])
        line = f"{where}: {_dotted(loc)}: {msg}"
        if line not in lines:  # union members can repeat one problem
            lines.append(line)
    return "\n".join(lines)


def validate_global(raw: dict[str, Any], origin: str = "values", values: Values | None = None) -> GlobalConfig:
    try:
        return GlobalConfig.model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, raw or {}, origin, ["global"], values)) from None


def validate_stage(stage: str, raw: dict[str, Any], origin: str = "values", values: Values | None = None) -> BaseModel:
    if stage not in STAGE_MODELS:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGE_MODELS)}")
    try:
        return STAGE_MODELS[stage].model_validate(raw or {})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, raw or {}, origin, [stage, "config"], values)) from None


@dataclass(frozen=True)
class StageSettings:
    """Everything a stage needs to run one shard."""

    global_: GlobalConfig
    config: Any
    shard: int
    shards: int
    # the generation of the download this stage's input must come from (None: any)
    download_generation: str | None = None

    @property
    def root(self) -> str:
        return self.global_.run_root()


def shard_from_env(env: dict[str, str] | None = None, default_count: int = 1) -> tuple[int, int]:
    """(index, count) from JOB_COMPLETION_INDEX and TRAJFLOW_SHARDS (defaults: 0 of
    ``default_count``)."""
    env = os.environ if env is None else env
    try:
        index = int(env.get("JOB_COMPLETION_INDEX", "0"))
        count = int(env.get("TRAJFLOW_SHARDS", str(default_count)))
    except ValueError:
        raise ConfigError(
            f"JOB_COMPLETION_INDEX={env.get('JOB_COMPLETION_INDEX')!r} and TRAJFLOW_SHARDS="
            f"{env.get('TRAJFLOW_SHARDS')!r} must be integers"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard index {index} is outside 0..{count - 1} (TRAJFLOW_SHARDS={count})")
    return index, count


def _read_config_doc(path: str | Path, keys: tuple[str, ...] = ("global", "config")) -> dict[str, Any]:
    if str(path) == DEFAULT_CONFIG_PATH and not Path(path).exists():
        raise ConfigError(f"no stage config at {DEFAULT_CONFIG_PATH}, where pods mount the chart's ConfigMap: "
                          f"give --config FILE (or ${CONFIG_PATH_ENV}), or -f VALUES.yaml to read values files")
    doc = read_yaml(path, "stage config")
    if not doc:
        # the chart always writes `global` and `config`: an empty file is a render that went
        # wrong, and its defaults are not the settings the release was given
        raise ConfigError(f"{path}: the stage config is empty, but the chart always writes {', '.join(keys)}: "
                          "Helm could not write the release's values (a string holding a control character, which "
                          "this chart refuses at install); fix the values and upgrade")
    unknown = sorted(set(doc) - set(keys))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {unknown[0]!r} (expected {' and '.join(keys)})")
    return doc


def load_config_file(path: str | Path, stage: str) -> tuple[GlobalConfig, Any]:
    """Read the rendered ConfigMap: `{global: ..., config: ...}`."""
    if stage not in STAGE_MODELS:
        raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGE_MODELS)}")
    doc = _read_config_doc(path)
    glob = validate_global(doc.get("global") or {}, origin=str(path))
    raw = doc.get("config")
    raw = {} if raw is None else raw  # a file whose settings are all commented out: the defaults
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a map of settings, got {type(raw).__name__}")
    try:
        config = STAGE_MODELS[stage].model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, raw, str(path), ["config"], None)) from None
    return glob, config


def _templates(node: Any, path: list[str]) -> Iterable[tuple[list[str], str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _templates(value, [*path, str(key)])
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _templates(value, [*path, str(i)])
    elif isinstance(node, str) and "{{" in node:
        yield path, node


def untemplated(values: Values) -> Values:
    """Values given with `-f/--set` outside the chart: what the chart renders with `tpl` has
    no meaning here. The one such value the charts document, `global.metrics.pushgatewayUrl`
    naming the release's own Pushgateway, becomes empty (no pushing); any other template is
    an error naming its key."""
    merged = copy.deepcopy(values.merged)
    glob = merged.get("global") or {}
    for path, text in list(_templates(glob, ["global"])):
        key = ".".join(path)
        if path == ["global", "metrics", "pushgatewayUrl"]:
            log.info(
                "%s is a Helm template (%s) naming the cluster's Pushgateway; nothing is pushed from here "
                "(--set global.metrics.pushgatewayUrl=http://127.0.0.1:9091 pushes to a local one)", key, text,
            )
            glob["metrics"]["pushgatewayUrl"] = ""
        else:
            raise ConfigError(
                f"{values.origin(path)}: {key} is a Helm template ({text}), which only the chart renders: "
                f"override it with --set {key}=..."
            )
    return Values(merged, values.layers)


def global_settings(
    config_file: str | Path | None = None,
    values_files: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
) -> GlobalConfig:
    """Only `global` (storage, run id), from `--config FILE` or `-f/--set`; any stage's file will do."""
    values_files, sets = list(values_files), list(sets)
    _one_source(config_file, values_files, sets)
    if values_files or sets:
        values = untemplated(load_values(values_files, sets))
        return validate_global(values.merged.get("global") or {}, values=values)
    path = config_file or os.environ.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH
    return validate_global(_read_config_doc(path).get("global") or {}, origin=str(path))


def stage_settings(
    stage: str,
    config_file: str | Path | None = None,
    values_files: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    env: dict[str, str] | None = None,
) -> StageSettings:
    """Resolve a stage's settings from `--config FILE` (pods) or `-f/--set` (local use)."""
    values_files, sets = list(values_files), list(sets)
    _one_source(config_file, values_files, sets)
    default_count = 1
    if values_files or sets:
        values = untemplated(load_values(values_files, sets))
        glob = validate_global(values.merged.get("global") or {}, values=values)
        config = validate_stage(stage, values.stage_config(stage), values=values)
        generation = _generation_in_values(values) if stage != "downloader" else None
        # outside a pod the values say how many shards the stage has, as they tell the chart
        shards = values.stage(stage).get("shards")
        if shards is not None:
            if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
                raise ConfigError(f"{values.origin([stage, 'shards'])}: {stage}.shards must be a positive integer, "
                                  f"got {shards!r}")
            default_count = shards
    else:
        env_map = os.environ if env is None else env
        path = config_file or env_map.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_PATH
        glob, config = load_config_file(path, stage)
        generation = _generation_in_env(env_map) if stage != "downloader" else None
    index, count = shard_from_env(env, default_count)
    return StageSettings(glob, config, index, count, generation)


def expected_download_generation(
    config_file: str | Path | None = None,
    values_files: Iterable[str | Path] = (),
    sets: Iterable[str] = (),
    env: dict[str, str] | None = None,
) -> str | None:
    """The generation (`DownloadConfig.generation_id`) of the download this release's
    downloader config names: from the values' `downloader.config` (`-f/--set`), in a pod
    from the file ${DATASET_CONFIG_ENV} names. The stages downstream wait for download and
    preprocess manifests of that generation, so that an install with another dataset over
    a run root that holds an earlier one never takes the earlier files for this run's. None
    when the downloader or preprocessing is disabled (as the chart then has no dataset
    ConfigMap): the stage takes any generation."""
    values_files, sets = list(values_files), list(sets)
    _one_source(config_file, values_files, sets)
    if values_files or sets:
        return _generation_in_values(load_values(values_files, sets))
    return _generation_in_env(os.environ if env is None else env)


def _generation_in_values(values: Values) -> str | None:
    raw = values.stage_config("downloader")
    enabled = all(values.stage(stage).get("enabled", True) for stage in ("downloader", "preprocessing"))
    if not enabled or not raw.get("sources"):
        return None
    config = validate_stage("downloader", raw, values=values)
    assert isinstance(config, DownloadConfig)
    return config.generation_id()


def _generation_in_env(env: dict[str, str]) -> str | None:
    path = env.get(DATASET_CONFIG_ENV)
    if not path:
        return None
    if not Path(path).is_file():  # the chart renders none without the downloader or preprocessing: no check
        log.info("%s=%s does not exist: any download generation will do", DATASET_CONFIG_ENV, path)
        return None
    config, _ = _read_dataset_config(path)
    return config.generation_id() if config.sources else None


def _read_dataset_config(path: str | Path) -> tuple[DownloadConfig, Any]:
    """The dataset ConfigMap's file: the downloader's `config` and `shards` (`trajflow run`
    gives the downloader's own stage config, with `global` and no `shards`)."""
    doc = _read_config_doc(path, DATASET_CONFIG_KEYS)
    raw = doc.get("config") or {}
    try:
        return DownloadConfig.model_validate(raw), doc.get("shards")
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, raw, str(path), ["config"], None)) from None


def wanted_download(env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """The shard count and generation of the download the release names now, from the file
    ${DATASET_CONFIG_ENV} names (the dataset ConfigMap, which the kubelet updates in running
    pods after an upgrade). None where there is none (outside the chart; the chart renders it
    only with the downloader and preprocessing enabled) or it cannot be read. Read again only
    when the file changed (a catalog of 10^5 URLs takes a while to validate)."""
    found = _dataset_config_version(env)
    return None if found is None else _read_wanted_download(*found)


def _dataset_config_version(env: Mapping[str, str] | None) -> tuple[str, tuple[int, int, int]] | None:
    """The dataset ConfigMap's path and version (inode, mtime, size: the kubelet swaps the
    file in), or None where there is none."""
    path = (os.environ if env is None else env).get(DATASET_CONFIG_ENV)
    try:
        stat = os.stat(path) if path else None
    except OSError:
        return None
    return None if stat is None or not path else (path, (stat.st_ino, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=1)
def _read_wanted_download(path: str, version: tuple[int, int, int]) -> tuple[int, str] | None:
    """`wanted_download` of the file at `path` as it is at `version` (inode, mtime, size)."""
    try:
        config, shards = _read_dataset_config(path)
    except ConfigError as exc:
        log.warning("the release's download is not known: %s", exc)
        return None
    if not isinstance(shards, int) or isinstance(shards, bool) or not config.sources:
        return None
    return shards, config.generation_id()


def wanted_reruns(env: Mapping[str, str] | None = None) -> dict[str, int] | None:
    """The `rerun` of the downloader and preprocessing the release names now (its dataset
    ConfigMap, which the kubelet updates in running pods after an upgrade), by chart name;
    None where there is none or it cannot be read. Read again only when the file changed."""
    found = _dataset_config_version(env)
    return None if found is None else _read_wanted_reruns(*found)


@functools.lru_cache(maxsize=1)
def _read_wanted_reruns(path: str, version: tuple[int, int, int]) -> dict[str, int] | None:
    try:
        reruns = _read_config_doc(path, DATASET_CONFIG_KEYS).get("reruns")
    except ConfigError:
        return None
    if not isinstance(reruns, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in reruns.values()):
        return None
    return dict(reruns)


def _one_source(config_file: str | Path | None, values_files: list[Any], sets: list[str]) -> None:
    """`--config` (a rendered stage config) and `-f/--set` (values) do not combine: one of
    them would be ignored without a word."""
    if config_file and (values_files or sets):
        raise ConfigError(f"--config {config_file} and -f/--set: give either the rendered stage config (--config) or "
                          "values files and --set (as for helm), not both")


def add_config_arguments(parser: Any) -> None:
    """The `--config`, `-f` and `--set` options every stage command takes."""
    parser.add_argument(
        "--config",
        default=None,
        help=f"rendered stage config ({{global, config}}); default ${CONFIG_PATH_ENV} or {DEFAULT_CONFIG_PATH}",
    )
    parser.add_argument("-f", "--values", action="append", default=[], metavar="FILE", help="values file (repeatable)")
    add_set_arguments(parser)


def add_set_arguments(parser: Any) -> None:
    """`--set` and `--set-string`, as Helm takes them (both into `args.set`)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override values (repeatable)")
    parser.add_argument("--set-string", action="append", dest="set", type=SetString, metavar="KEY=VALUE",
                        help="override values, every value a string (repeatable; applied after --set, as by Helm)")


_SCHEMA_TYPE_WORDS = {"integer": "an integer", "number": "a number", "boolean": "a boolean (true or false)",
                      "string": "a string", "object": "a map", "array": "a list", "null": "null"}
_JSON_TYPE_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
                    "dict": "a map", "list": "a list", "NoneType": "null"}


def _schema_expectation(schema: dict[str, Any]) -> str:
    """`an integer >= 1 and <= 64 or null` from a schema's type and bounds."""
    types = schema.get("type")
    types = types if isinstance(types, list) else [types] if types else []
    words = []
    for t in types:
        word = _SCHEMA_TYPE_WORDS.get(t, str(t))
        if t in ("integer", "number"):
            bounds = [f"{op} {schema[k]}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                          ("maximum", "<=")) if k in schema]
            word = " ".join([word, " and ".join(bounds)]) if bounds else word
        words.append(word)
    return " or ".join(words) or "another value"


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _shown(value: Any) -> str:
    """A scalar as the user wrote it in YAML (true, null), others as Python shows them."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def _set_string_hint(origin: str | None, value: Any) -> str:
    """For a number or boolean given where a string belongs: the way to give it as a string
    (a null is no such value: --set pads a list with nulls up to the index it sets)."""
    return "; --set-string keeps it a string" if (origin or "").startswith("--set ") and value is not None else ""


def _set_number_hint(origin: str | None, value: Any) -> str:
    """For a fraction given by --set where a number belongs: Helm's --set types only whole
    numbers, so 0.5 arrives as the string "0.5" (in `helm install` as here)."""
    if not (origin or "").startswith("--set ") or not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return "; --set passes a fraction as a string, as Helm does: give it in a values file (-f)"


def _sibling_keys(values: Values | None, loc: list[str | int]) -> set[str]:
    """The keys beside ``loc``'s in the merged values: the chart's defaults name every key a
    config block has (an unknown key among them too, which is left out)."""
    node: Any = values.merged if values is not None else {}
    for key in loc[:-1]:
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            return set()
    return {str(k) for k in node if k != loc[-1]} if isinstance(node, dict) else set()


def _unknown_key_hint(key: str, known: set[str], config_keys: set[str], path: list[str | int]) -> str:
    """Where an unknown key may have been meant: a stage's `config` key put beside it, or a
    near spelling of a known one."""
    if key in config_keys:
        return f"; it is a key of {_dotted([*path, 'config'])}: {_dotted([*path, 'config', key])}"
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
    return f"; did you mean {close[0]!r}?" if close else ""


def _schema_error_lines(error: Any, prefix: list[str | int], origin: str) -> list[tuple[list[str | int], str]]:
    """(key path, message) for one jsonschema error; an unknown key is named itself."""
    path: list[str | int] = [*prefix, *error.absolute_path]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        schema = error.schema if isinstance(error.schema, dict) else {}
        known = set(schema.get("properties") or {})
        patterns = list((schema.get("patternProperties") or {}).keys())
        extra = [k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns)]
        if extra:
            config_keys = set(((schema.get("properties") or {}).get("config") or {}).get("properties") or {})
            return [([*path, key], "unknown key" + _unknown_key_hint(key, known, config_keys, path)) for key in sorted(extra)]
    if error.validator == "required":
        missing = re.match(r"'([^']*)' is a required property", error.message)
        if missing:
            return [([*path, missing.group(1)], "required key is missing")]
    if error.validator == "pattern":
        expected = f"expected {formats.in_words(error.validator_value)}"
        if "propertyNames" in error.schema_path:
            return [(path, f"key {error.instance!r}: {expected}")]
        return [(path, f"{expected}, got {error.instance!r}")]
    if error.validator == "not" and "enum" in error.validator_value:
        taken = ", ".join(map(str, error.validator_value["enum"]))
        return [(path, f"{error.instance!r} is one the chart's pods use themselves ({taken}): choose another")]
    if error.validator == "not" and "pattern" in error.validator_value:
        refused = formats.in_words(error.validator_value["pattern"])
        if "propertyNames" in error.schema_path:
            return [(path, f"key {error.instance!r}: {refused}")]
        return [(path, f"{error.instance!r} is {refused}")]
    alternatives = error.validator_value if error.validator in ("anyOf", "oneOf") else None
    if alternatives and all(isinstance(a, dict) and "type" in a and not {"properties", "items"} & set(a)
                            for a in alternatives):
        words = [formats.in_words(a["pattern"]) if "pattern" in a else _schema_expectation(a) for a in alternatives]
        return [(path, f"expected {' or '.join(words)}, got {error.instance!r}")]
    if error.validator in ("type", "minimum", "exclusiveMinimum", "maximum") and isinstance(error.schema, dict):
        got = _shown(error.instance)
        if error.validator == "type":
            name = type(error.instance).__name__
            got += f" ({_JSON_TYPE_NAMES.get(name, name)})"
        hint = _set_string_hint(origin, error.instance) if error.validator == "type" and "string" in error.validator_value else ""
        if error.validator == "type" and "number" in _as_list(error.validator_value):
            hint += _set_number_hint(origin, error.instance)
        return [(path, f"expected {_schema_expectation(error.schema)}, got {got}{hint}")]
    if "then" in error.schema_path and isinstance(error.schema, dict) and error.schema.get("description"):
        # a rule between keys (`if` one is set, `then` another must be): its own words, never
        # the value (the rule that keeps secrets out of plain values is one of them)
        return [(path, error.schema["description"])]
    message = error.message
    if len(message) > 200:
        message = message[:200] + "..."
    return [(path, message)]


def schema_errors(values: Values, chart_dir: Path | None, skip: Iterable[tuple[str, ...]] = ()) -> list[str]:
    """What `helm install` would reject through the charts' values.schema.json files: the
    umbrella's schema over all the values and each subchart's schema over its block (every
    subchart, enabled or not: stricter than Helm, which skips a disabled subchart's schema,
    because a typo in a disabled block is still a typo). One line per problem,
    `<file or --set>: <key path>: <what is wrong>`. Key paths starting with an
    entry of `skip` are left out (the stage models validate those with their own words).
    Empty when the chart is not available."""
    if chart_dir is None:
        return []
    from jsonschema import Draft7Validator, ValidationError, validators  # here: the stage workloads never need it

    def go_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
        if validator.is_type(instance, "string") and not formats.go_regex(pattern).search(instance):
            yield ValidationError(f"{instance!r} does not match {pattern!r}")

    # patterns as Helm's Go regexp reads them (see formats.go_regex)
    GoPatternValidator = validators.extend(Draft7Validator, {"pattern": go_pattern})
    checks: list[tuple[Path, Any, list[str | int]]] = [(Path(chart_dir) / "values.schema.json", values.merged, [])]
    sub_root = Path(chart_dir) / "charts"
    if sub_root.is_dir():
        for entry in sorted(sub_root.iterdir()):
            block = values.merged.get(entry.name)
            if (entry / "values.schema.json").is_file() and isinstance(block, dict):
                checks.append((entry / "values.schema.json", block, [entry.name]))
    skipped = [tuple(s) for s in skip]
    lines: list[str] = []
    for schema_path, instance, prefix in checks:
        if not schema_path.is_file():
            continue
        try:
            schema = json.loads(schema_path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{schema_path}: unreadable values schema: {exc}") from None
        validator = GoPatternValidator(schema)
        for error in sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path]):
            for path, message in _schema_error_lines(error, prefix, values.origin([*prefix, *error.absolute_path])):
                if any(tuple(path[: len(s)]) == s for s in skipped):
                    continue
                if prefix and path[1:2] == ["global"]:
                    continue  # the umbrella's schema checks the globals
                line = f"{values.origin(path)}: {_dotted(path)}: {message}"
                if line not in lines:
                    lines.append(line)
    return lines


def validate_schema(values: Values, chart_dir: Path | None, skip: Iterable[tuple[str, ...]] = ()) -> None:
    """Raise ConfigError listing every problem `schema_errors` finds."""
    lines = schema_errors(values, chart_dir, skip)
    if lines:
        raise ConfigError("\n".join(lines))
