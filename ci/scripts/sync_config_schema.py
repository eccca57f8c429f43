#!/usr/bin/env python3
"""Write the charts' values.schema.json files and the `config:` blocks of the stage
values.yaml files from the workload models (`trajflow schema`, `trajflow.config`).

    python ci/scripts/sync_config_schema.py           # rewrite what drifted
    python ci/scripts/sync_config_schema.py --check   # exit 1 and name what drifted

Run it after changing a model in trajflow.config (`make schema`). The chart-owned part
of each schema (image, resources, shards, ...) is defined in chart_schema_parts.py. When
readme-generator-for-helm is installed (ci/scripts/install-test-tools.sh), the charts'
README parameter tables are regenerated too.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chart_schema_parts as parts

ROOT = Path(__file__).resolve().parents[2]
UMBRELLA = ROOT / "charts" / "trajflow"
STAGES = ("downloader", "preprocessing", "training")
CONFIG_BEGIN = "# BEGIN config (generated from trajflow.config by ci/scripts/sync_config_schema.py; edit the model)"
CONFIG_END = "# END config"


def stage_dir(stage: str) -> Path:
    return UMBRELLA / "charts" / stage


def trajflow_command() -> list[str]:
    """`trajflow` next to this interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).with_name("trajflow")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("trajflow")
    if found:
        return [found]
    return [sys.executable, "-m", "trajflow.cli"]


def workload_schemas() -> dict[str, Any]:
    """What `trajflow schema` prints: {"global": ..., "<stage>": ...}."""
    proc = subprocess.run([*trajflow_command(), "schema"], check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"`trajflow schema` failed ({proc.returncode}):\n{proc.stderr.strip()}")
    doc = json.loads(proc.stdout)
    missing = [key for key in ("global", *STAGES) if key not in doc]
    if missing:
        raise SystemExit(f"`trajflow schema` printed no schema for: {', '.join(missing)}")
    return doc


def _without_annotations(node: Any) -> Any:
    """Drop pydantic's `title`s and OpenAPI `discriminator`s: noise to a values validator."""
    if isinstance(node, dict):
        return {k: _without_annotations(v) for k, v in node.items()
                if k != "discriminator" and not (k == "title" and isinstance(v, str))}
    if isinstance(node, list):
        return [_without_annotations(v) for v in node]
    return node


def global_schema(workload: dict[str, Any]) -> dict[str, Any]:
    schema = _without_annotations(workload["global"])
    schema["description"] = "Shared by every stage: trajflow.config.GlobalConfig (rendered into each stage's config file)"
    schema["allOf"] = parts.global_constraints()
    return schema


def config_schema(workload: dict[str, Any], stage: str) -> dict[str, Any]:
    schema = _without_annotations(workload[stage])
    schema["description"] = f"Workload settings of the {stage} stage, rendered into /etc/trajflow/config.yaml"
    return schema


def stage_schema(workload: dict[str, Any], stage: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        # The umbrella's schema checks `global` once; a stage chart only takes it as it comes.
        "global": parts.any_object("Shared settings from the umbrella chart (validated by its schema)"),
        "common": parts.any_object("Values of the common library chart (it has none)"),
        **parts.pod_vocabulary(),
    }
    required = list(parts.POD_REQUIRED)
    if stage in ("downloader", "preprocessing"):
        properties.update(parts.batch_stage_vocabulary())
        required += ["shards", "parallelism"]
    if stage == "preprocessing":
        properties.update(parts.wait_vocabulary("How long shard i waits for download shard i"))
        required += ["waitResources", "waitTimeout"]
    if stage == "training":
        properties.update(parts.wait_vocabulary("How long the pods wait for every preprocessed shard"))
        properties.update(parts.training_vocabulary())
        required += ["waitResources", "waitTimeout", "nodes", "maxRestarts", "terminationGracePeriodSeconds", "launcher",
                     "rendezvous",
                     "clusterDomain", "inputShards"]
    properties["config"] = config_schema(workload, stage)
    return {
        "$schema": parts.DRAFT,
        "title": f"trajflow {stage} values",
        **parts.closed(properties, required=sorted(set(required))),
    }


def umbrella_schema(workload: dict[str, Any]) -> dict[str, Any]:
    def stage_switch(name: str) -> dict[str, Any]:
        return {
            "type": "object",
            "description": f"Values of the {name} subchart (validated by its own values.schema.json)",
            "properties": {"enabled": parts.boolean(f"Render the {name} subchart")},
            "required": ["enabled"],
        }

    properties = {
        "global": global_schema(workload),
        "common": parts.any_object("Values of the common library chart (it has none)"),
        **{stage: stage_switch(stage) for stage in (*STAGES, "monitoring")},
        "networkPolicy": parts.network_policy(),
    }
    return {
        "$schema": parts.DRAFT,
        "title": "trajflow values",
        **parts.closed(properties, required=["global", *STAGES, "monitoring", "networkPolicy"]),
    }


def library_schema() -> dict[str, Any]:
    """The common library takes no values; Helm still hands it `global`."""
    return {
        "$schema": parts.DRAFT,
        "title": "trajflow common library values (none)",
        **parts.closed({"global": parts.any_object("Shared settings from the umbrella chart")}),
    }


def dump_json(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


# ---- the `config:` block of each stage's values.yaml ----------------------------------


def _describe(schema: dict[str, Any], path: list[str]) -> str:
    node: Any = schema
    for key in path:
        node = (node.get("properties") or {}).get(key, {})
    text = " ".join(str(node.get("description") or "").split())
    if text:
        return text
    # No description in the model: the key itself, spelled out (`numLayers` -> `Num layers`).
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", path[-1]).lower()
    return words[:1].upper() + words[1:]


def _leaves(value: Any, path: list[str]) -> list[list[str]]:
    if isinstance(value, dict) and value:
        out: list[list[str]] = []
        for key, child in value.items():
            out += _leaves(child, [*path, key])
        return out
    return [path]


def config_defaults(stage: str) -> dict[str, Any]:
    from trajflow.config.loader import STAGE_MODELS

    return STAGE_MODELS[stage]().model_dump(by_alias=True, mode="json")


def config_block(workload: dict[str, Any], stage: str) -> str:
    defaults = config_defaults(stage)
    schema = workload[stage]
    lines = [
        CONFIG_BEGIN,
        "",
        f"## @section Workload settings (`config`, the {stage} model in trajflow.config)",
        "",
    ]
    for path in _leaves(defaults, []):
        description = _describe(schema, path).replace("|", "/")
        lines.append(f"## @param config.{'.'.join(path)} {description}")
    body = yaml.safe_dump({"config": defaults}, sort_keys=False, default_flow_style=False, width=120)
    lines += body.rstrip("\n").splitlines()
    lines.append(CONFIG_END)
    return "\n".join(lines) + "\n"


def values_with_config(values_text: str, block: str, path: Path) -> str:
    pattern = re.compile(re.escape(CONFIG_BEGIN) + r".*?" + re.escape(CONFIG_END) + r"\n?", re.DOTALL)
    if not pattern.search(values_text):
        raise SystemExit(f"{path}: no generated config block (between '{CONFIG_BEGIN}' and '{CONFIG_END}')")
    return pattern.sub(lambda _: block, values_text, count=1)


def expected_files(workload: dict[str, Any]) -> dict[Path, str]:
    files: dict[Path, str] = {
        UMBRELLA / "values.schema.json": dump_json(umbrella_schema(workload)),
        UMBRELLA / "charts" / "common" / "values.schema.json": dump_json(library_schema()),
    }
    for stage in STAGES:
        files[stage_dir(stage) / "values.schema.json"] = dump_json(stage_schema(workload, stage))
        values_path = stage_dir(stage) / "values.yaml"
        files[values_path] = values_with_config(values_path.read_text(), config_block(workload, stage), values_path)
    return files


README_GENERATOR = ROOT / "ci" / ".tools" / "node_modules" / ".bin" / "readme-generator"


def update_readmes() -> list[Path]:
    """Regenerate the parameter tables; returns the READMEs that changed."""
    changed = []
    for chart in (UMBRELLA, *(stage_dir(s) for s in STAGES), UMBRELLA / "charts" / "monitoring"):
        readme = chart / "README.md"
        before = readme.read_text()
        proc = subprocess.run([str(README_GENERATOR), "--values", str(chart / "values.yaml"), "--readme", str(readme)],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"readme-generator failed on {chart.relative_to(ROOT)}/values.yaml:\n"
                             f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        if readme.read_text() != before:
            changed.append(readme.relative_to(ROOT))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs; write nothing")
    args = parser.parse_args(argv)
    drifted = []
    for path, text in expected_files(workload_schemas()).items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        drifted.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(text)
    if args.check:
        if drifted:
            print("out of date with trajflow.config (run `make schema`):", *drifted, sep="\n  ")
            return 1
        print("chart schemas and config blocks match trajflow.config")
        return 0
    if README_GENERATOR.exists() and shutil.which("node"):
        drifted += update_readmes()
    else:
        print(f"note: {README_GENERATOR.relative_to(ROOT)} is missing; README tables not regenerated")
    if drifted:
        print("updated:", *drifted, sep="\n  ")
    else:
        print("already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
