"""What `trajflow run` will run, resolved from the same values files the chart uses.

For each enabled stage this renders exactly what the chart puts in the stage's ConfigMap,
`{global: <.Values.global>, config: <.Values.<stage>.config>}`, validated by the stage's
model, and reads the Kubernetes knobs that have a local meaning: `shards` (the Job's
completions), `parallelism`, `backoffLimitPerIndex`, and for training `nprocPerNode`,
`maxRestarts` and `inputShards`.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from trajflow.config import GlobalConfig, Values, load_values, validate_global, validate_stage
from trajflow.config.loader import dump_yaml, find_chart_dir, untemplated, validate_schema
from trajflow.errors import ConfigError
from trajflow.storage.wait import parse_duration

log = logging.getLogger(__name__)

# chart stage -> (CLI command, module that implements it)
STAGES: dict[str, tuple[str, str]] = {
    "downloader": ("download", "trajflow.download.cli"),
    "preprocessing": ("preprocess", "trajflow.preprocess.cli"),
    "training": ("train", "trajflow.train.cli"),
}

# Used only when the chart's own defaults cannot be found (an installed wheel, no checkout).
_FALLBACK_KNOBS: dict[str, Any] = {
    "enabled": True,
    "shards": 1,
    "parallelism": 1,
    "backoffLimitPerIndex": 0,
    "nodes": 1,
    "nprocPerNode": None,
    "maxRestarts": 0,
    "inputShards": 1,
}


@dataclass(frozen=True)
class StagePlan:
    stage: str  # chart name: downloader, preprocessing, training
    command: str  # CLI name: download, preprocess, train
    module: str
    shards: int  # processes (training: 1, the one local node)
    parallelism: int
    retries: int  # extra attempts of a shard after a retryable failure
    rendered: dict[str, Any]  # the ConfigMap document
    config: Any  # the validated stage model
    nproc_per_node: int = 1  # training
    max_restarts: int = 0  # training
    input_shards: int = 0  # training: preprocessed shards it waits for
    wait_timeout: str = ""  # preprocessing: how long a shard waits for metadata in another download shard

    @property
    def rendered_yaml(self) -> bytes:
        # read back by the stage's own loader, which reads YAML as Helm does
        return dump_yaml(self.rendered).encode()

    @property
    def fingerprint(self) -> str:
        """Changes whenever the stage would be asked to do something different. `global`
        only says where the run root is (the resume state is kept per root) and where
        metrics go, so it is left out: pointing metrics elsewhere redoes nothing."""
        digest = hashlib.sha256(yaml.safe_dump(self.rendered["config"], sort_keys=True).encode())
        digest.update(f"shards={self.shards};nproc={self.nproc_per_node}".encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class RunPlan:
    values: Values
    global_: GlobalConfig
    stages: tuple[StagePlan, ...]  # enabled stages, in pipeline order
    disabled: tuple[str, ...]

    @property
    def root(self) -> str:
        return self.global_.run_root()

    def stage(self, name: str) -> StagePlan | None:
        return next((s for s in self.stages if s.stage == name), None)


def _int_knob(values: Values, stage: str, key: str, minimum: int, block: dict[str, Any], use_fallback: bool) -> int:
    raw = block.get(key, _FALLBACK_KNOBS[key] if use_fallback else None)
    if raw is None:
        raise ConfigError(f"values: {stage}.{key} is not set")
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise ConfigError(f"{values.origin([stage, key])}: {stage}.{key}: expected an integer >= {minimum}, got {raw!r}")
    return raw


def _wait_timeout(values: Values, stage: str, block: dict[str, Any]) -> str:
    """The stage's waitTimeout as `trajflow wait --timeout` takes it; a zero one is refused as
    the chart refuses it (the wait would give up at once)."""
    raw = block.get("waitTimeout")
    if raw is None:
        return ""
    text = str(int(raw)) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else str(raw)
    if parse_duration(text) == 0:
        raise ConfigError(f"{values.origin([stage, 'waitTimeout'])}: {stage}.waitTimeout {raw!r} is zero: the wait "
                          "would give up at once, before any shard is done; give a duration such as 6h")
    return text


def build_plan(values_files: Iterable[str | Path], sets: Iterable[str] = ()) -> RunPlan:
    """Merge values like `helm install -f ... --set ...` and validate every enabled stage."""
    chart_dir = find_chart_dir()
    chart_found = chart_dir is not None and (chart_dir / "values.yaml").is_file()
    values = untemplated(load_values(list(values_files), list(sets), chart_dir=chart_dir))
    if not chart_found:
        log.warning("chart defaults not found (set TRAJFLOW_CHART to charts/trajflow); using the values files alone")
    glob = validate_global(values.merged.get("global") or {}, values=values)
    enabled_stages: dict[str, bool] = {}
    for stage in STAGES:
        enabled = values.stage(stage).get("enabled", _FALLBACK_KNOBS["enabled"] if not chart_found else False)
        if not isinstance(enabled, bool):
            raise ConfigError(
                f"{values.origin([stage, 'enabled'])}: {stage}.enabled: expected boolean (true or false), "
                f"got {enabled!r} ({type(enabled).__name__})"
            )
        enabled_stages[stage] = enabled
    # Everything else `helm install` would reject through the charts' values.schema.json
    # (unknown keys, wrong types); the enabled stages' `config` is validated below by the
    # stage models, whose messages name the setting the same way.
    validate_schema(values, chart_dir if chart_found else None,
                    skip=[(stage, "config") for stage, on in enabled_stages.items() if on])
    plans: list[StagePlan] = []
    disabled: list[str] = []
    for stage, (command, module) in STAGES.items():
        block = values.stage(stage)
        if not enabled_stages[stage]:
            disabled.append(stage)
            continue
        raw_config = values.stage_config(stage)
        config = validate_stage(stage, raw_config, values=values)
        if stage == "downloader":
            try:
                config.require_sources()
            except ConfigError as e:
                raise ConfigError(f"{values.origin([stage, 'config', 'sources'])}: {e}") from None
            _check_no_plain_tokens(values, block, config)
        rendered = {"global": _config_file_global(values.merged.get("global") or {}), "config": raw_config}
        knob = lambda key, minimum=1: _int_knob(values, stage, key, minimum, block, not chart_found)  # noqa: E731
        retries = knob("backoffLimitPerIndex", 0)
        if stage == "training":
            nodes = knob("nodes")
            nproc = block.get("nprocPerNode")
            if nproc is None:
                nproc = 1  # locally: one process unless asked (the chart counts GPUs in its pod limits)
            elif isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
                raise ConfigError(
                    f"{values.origin([stage, 'nprocPerNode'])}: training.nprocPerNode: expected an integer >= 1 "
                    f"or null, got {nproc!r}"
                )
            if nodes > 1:
                log.info("training.nodes is %d; locally all %d process(es) run on this machine as one node", nodes, nproc)
            if block.get("launcher", "job") == "job":  # a PyTorchJob has no maxFailedIndexes
                _check_max_failed_indexes(values, stage, block, nodes)
            _check_gpu_counts(values, stage, block, config)
            _check_requests_within_limits(values, stage, block)
            port = getattr(config, "metrics_port", 0)
            if port and port + nproc - 1 > 65535:
                raise ConfigError(
                    f"{values.origin([stage, 'config', 'metricsPort'])}: training.config.metricsPort {port}: local rank "
                    f"i serves port + i, and the last local rank's port {port + nproc - 1} is over 65535"
                )
            plans.append(
                StagePlan(
                    stage, command, module, shards=1, parallelism=1, retries=retries, rendered=rendered, config=config,
                    nproc_per_node=nproc, max_restarts=knob("maxRestarts", 0), input_shards=knob("inputShards"),
                )
            )
        else:
            shards = knob("shards")
            parallelism = knob("parallelism", 0)
            if parallelism == 0:
                raise ConfigError(f"{values.origin([stage, 'parallelism'])}: {stage}.parallelism is 0: on a cluster "
                                  "the Job runs no pod until it is raised; a local run needs at least 1")
            parallelism = min(parallelism, shards)
            _check_max_failed_indexes(values, stage, block, shards)
            _check_gpu_counts(values, stage, block, config)
            _check_requests_within_limits(values, stage, block)
            plans.append(StagePlan(stage, command, module, shards, parallelism, retries, rendered, config,
                                   wait_timeout=_wait_timeout(values, stage, block)))
    if not plans:
        raise ConfigError(
            "values: every stage is disabled (downloader.enabled, preprocessing.enabled, training.enabled); nothing to run"
        )
    _check_across_stages(values, plans)
    return RunPlan(values, glob, tuple(plans), tuple(disabled))


def _config_file_global(glob: dict[str, Any]) -> dict[str, Any]:
    """`global` as the chart's ConfigMaps hold it (trajflow.configFile): without the PVC
    and ArgoCD settings, which only shape Kubernetes objects."""
    out = copy.deepcopy(glob)
    out.pop("argocd", None)
    if isinstance(out.get("storage"), dict):
        out["storage"].pop("pvc", None)
    return out


def _check_max_failed_indexes(values: Values, stage: str, block: dict[str, Any], completions: int) -> None:
    """As the chart refuses it: a Job cannot tolerate more failed indexes than it has."""
    limit = block.get("maxFailedIndexes")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > completions:
        raise ConfigError(f"{values.origin([stage, 'maxFailedIndexes'])}: {stage}.maxFailedIndexes ({limit}) cannot "
                          f"exceed the Job's {completions} completions")


def _check_requests_within_limits(values: Values, stage: str, block: dict[str, Any]) -> None:
    """As the chart refuses them: requests above their limits, which the API server refuses
    for every pod of the Job, and a /dev/shm larger than the memory limit."""
    from trajflow.resources import parse_quantity

    for key in ("resources", "waitResources"):
        resources = block.get(key) or {}
        limits = resources.get("limits") or {}
        for name, request in sorted((resources.get("requests") or {}).items()):
            if is_gpu_resource(name):
                continue  # their own rule: _check_gpu_counts
            limit = limits.get(name)
            try:
                above = request is not None and limit is not None and parse_quantity(request) > parse_quantity(limit)
            except ValueError:
                continue  # not a quantity: the schema names it
            if above:
                raise ConfigError(
                    f"{values.origin([stage, key, 'requests', name])}: {stage}.{key}.requests.{name} "
                    f"({_as_helm_prints(request)}) is more than {key}.limits.{name} ({_as_helm_prints(limit)}): "
                    "Kubernetes refuses such pods, and the Job would start none; raise the limit or lower the request")
    shm = block.get("shm") or {}
    memory = ((block.get("resources") or {}).get("limits") or {}).get("memory")
    if shm.get("enabled") and shm.get("sizeLimit") and memory:
        try:
            above = parse_quantity(shm["sizeLimit"]) > parse_quantity(memory)
        except ValueError:
            return
        if above:
            raise ConfigError(
                f"{values.origin([stage, 'shm', 'sizeLimit'])}: {stage}.shm.sizeLimit ({_as_helm_prints(shm['sizeLimit'])}) "
                f"is more than {stage}.resources.limits.memory ({_as_helm_prints(memory)}): /dev/shm counts against "
                "that limit, so the container is OOM-killed before its shm fills; lower shm.sizeLimit or raise the limit")


def is_gpu_resource(name: str) -> bool:
    """An NVIDIA GPU or a share of one (time-sliced `nvidia.com/gpu.shared`, MIG slices), as the
    chart's `trajflow.isGpuResource` reads them."""
    return name == "nvidia.com/gpu" or name.startswith(("nvidia.com/gpu.", "nvidia.com/mig-"))


def _as_helm_prints(value: Any) -> str:
    """A number as the chart's templates print it: 1.0 as "1" (YAML numbers reach them as floats)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _check_gpu_counts(values: Values, stage: str, block: dict[str, Any], config: Any) -> None:
    """As the chart refuses them, though a local run ignores pod resources: GPU requests the API
    server would refuse, GPUs a pod would leave idle, or ranks it would leave without one (a
    local run is how a values file is tried). A local run's device is the machine's, whatever
    the pods' limits: `device: cuda` without a GPU limit is refused by the chart only."""
    resources = block.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    for name in sorted({*limits, *requests}):
        if not is_gpu_resource(name):
            continue
        limit = "unset" if limits.get(name) is None else _as_helm_prints(limits[name])
        request = None if requests.get(name) is None else _as_helm_prints(requests[name])
        if request is not None and request != limit:
            raise ConfigError(f"{values.origin([stage, 'resources', 'requests', name])}: {stage}.resources.requests."
                              f"{name} is {request}, but resources.limits.{name} is {limit}: Kubernetes refuses "
                              f"GPU requests that differ from the limit. Set {name} in resources.limits only")
        if limit != "unset" and not re.fullmatch(r"[0-9]+", limit):
            raise ConfigError(f"{values.origin([stage, 'resources', 'limits', name])}: {stage}.resources.limits.{name} "
                              f"is {limit}: GPUs are whole devices; set a whole number")
    slices = sum(int(_as_helm_prints(v)) for k, v in limits.items() if k.startswith("nvidia.com/mig-") and v is not None)
    if slices > 1:
        raise ConfigError(f"{values.origin([stage, 'resources', 'limits'])}: {stage}.resources.limits asks for {slices} "
                          f"MIG slices, but a CUDA process sees one: {slices - 1} would sit idle. Give each pod one "
                          "slice and run more pods")
    gpus = int(limits.get("nvidia.com/gpu") or 0)
    where = values.origin([stage, "resources", "limits", "nvidia.com/gpu"])
    if stage == "preprocessing" and gpus > 1:
        raise ConfigError(f"{where}: preprocessing.resources.limits.nvidia.com/gpu is {gpus}, but a preprocessing pod "
                          f"uses one GPU: {gpus - 1} would sit idle. Set it to 1 and run more pods at once with "
                          "preprocessing.parallelism")
    nproc = block.get("nprocPerNode")
    if stage != "training" or not gpus or nproc is None or nproc == gpus or getattr(config, "device", "") == "cpu":
        return
    if nproc > gpus:
        raise ConfigError(f"{where}: training.nprocPerNode is {nproc}, but each training pod has {gpus} GPU(s) "
                          f"(resources.limits.nvidia.com/gpu): {nproc - gpus} local rank(s) would have no GPU. Set "
                          f"nprocPerNode to {gpus} or null (which follows the limit), or raise the limit")
    raise ConfigError(f"{where}: training.nprocPerNode is {nproc}, but each training pod has {gpus} GPUs "
                      f"(resources.limits.nvidia.com/gpu): {gpus - nproc} would sit idle. Set nprocPerNode to {gpus} "
                      "or null (which follows the limit), or lower the limit")


def _check_no_plain_tokens(values: Values, block: dict[str, Any], config: Any) -> None:
    """A source's authTokenEnv given as a plain extraEnv value, which every reader of the
    release sees (the chart refuses it: the schema knows only names that look secret)."""
    token_vars = {source.auth_token_env for source in config.sources if getattr(source, "auth_token_env", "")}
    for i, entry in enumerate(block.get("extraEnv") or []):
        if isinstance(entry, dict) and entry.get("name") in token_vars and "value" in entry:
            raise ConfigError(
                f"{values.origin(['downloader', 'extraEnv', i])}: downloader.extraEnv: {entry['name']} holds a source's "
                "secret: give it with valueFrom.secretKeyRef (or extraEnvFrom), not a plain value that every reader "
                "of the release sees"
            )


def _check_across_stages(values: Values, plans: list[StagePlan]) -> None:
    """Preprocessing shard i consumes download shard i; training waits for every preprocessed
    shard (as many as download shards, also when preprocessing is off: the chart's rules).
    Per-source preprocessing settings name downloader sources."""
    by_name = {p.stage: p for p in plans}
    down, pre, train = by_name.get("downloader"), by_name.get("preprocessing"), by_name.get("training")
    if down and pre and down.shards != pre.shards:
        raise ConfigError(
            f"{values.origin(['preprocessing', 'shards'])}: preprocessing.shards ({pre.shards}) must equal "
            f"downloader.shards ({down.shards}): preprocessing shard i consumes download shard i; set "
            "downloader.shards, preprocessing.shards and training.inputShards together"
        )
    if down and pre:
        names = [source.name for source in down.config.sources]
        unknown = sorted(set(pre.config.sources) - set(names))
        if unknown:
            raise ConfigError(
                f"{values.origin(['preprocessing', 'config', 'sources', unknown[0]])}: preprocessing.config.sources."
                f"{unknown[0]} names no source of downloader.config.sources ({', '.join(names)}): its settings would "
                "apply to nothing"
            )
    upstream = ("preprocessing", pre) if pre else ("downloader", down)
    if upstream[1] and train and train.input_shards != upstream[1].shards:
        raise ConfigError(
            f"{values.origin(['training', 'inputShards'])}: training.inputShards ({train.input_shards}) must equal "
            f"{upstream[0]}.shards ({upstream[1].shards}): training waits for every preprocessed shard"
        )
    if pre and train:
        # training would find its stream missing only once every shard is preprocessed; the
        # per-source settings give the same streams as the top level (PreprocessConfig checks it)
        written = sorted(pre.config.renames.get(s, s) for s in pre.config.streams)
        keys = ["observation"] + (["action"] if train.config.task == "behavior_cloning" else [])
        for key in keys:
            stream = getattr(train.config, key)
            if stream not in written:
                raise ConfigError(
                    f"{values.origin(['training', 'config', key])}: training.config.{key} '{stream}' is not a stream "
                    f"preprocessing writes ({', '.join(written)}): the shards hold preprocessing.config.streams, "
                    "renamed by preprocessing.config.renames"
                )


def missing_stage_modules(plan: RunPlan) -> list[str]:
    """Enabled stages this install cannot run, each with the reason."""
    problems = []
    for stage in plan.stages:
        try:
            found = importlib.util.find_spec(stage.module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            problems.append(
                f"{stage.stage} is enabled but this install has no `trajflow {stage.command}` ({stage.module} is missing); "
                f"disable it with --set {stage.stage}.enabled=false or install the full package"
            )
        if stage.stage == "training" and importlib.util.find_spec("torch") is None:
            problems.append("training is enabled but torch is not installed (pip install 'trajflow[ml]' torch==2.13.0)")
    return problems


def missing_file_sources(plan: RunPlan) -> list[str]:
    """File sources whose path is not on this machine: each download process would fail on it
    (exit 2) only after the run started. Not a rule of the values (`build_plan`): on a cluster
    the path is inside the pod, and a cluster's values are planned (and dry-run) here too."""
    down = plan.stage("downloader")
    if down is None:
        return []
    try:
        from trajflow.download.sources import FileSourceRuntime
    except ImportError:
        return []  # the missing module is named by missing_stage_modules
    problems = []
    for i, source in enumerate(down.config.sources):
        if source.type != "file":
            continue
        key = ["downloader", "config", "sources", i, "path"]
        where = f"{plan.values.origin(key)}: downloader.config.sources[{i}].path"
        try:
            root = FileSourceRuntime(source).root  # resolved as the download processes resolve it
        except ConfigError as e:
            problems.append(f"{where}: {e}")
            continue
        if root.is_dir() or root.is_file():
            continue
        state = "is neither a directory nor a file" if root.exists() else "does not exist on this machine"
        problem = f"{where}: {source.path!r} {state}"
        if not source.path.startswith("file://") and not Path(source.path).expanduser().is_absolute():
            # the download processes start in this process's directory
            problem += f" (a relative path is resolved against the current working directory, {Path.cwd()}: {root})"
        problems.append(problem)
    return problems
