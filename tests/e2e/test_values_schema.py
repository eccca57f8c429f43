"""`trajflow run` rejects what `helm install` rejects through the charts' values.schema.json:
unknown keys and wrong types in a stage's block, naming the file or --set and the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
VALUES = sorted((ROOT / "values").glob("*.yaml"))


def trajflow_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("trajflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "trajflow.cli"]


def dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*trajflow_cmd(), "run", *args, "--dry-run", "--work-dir", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )


@pytest.mark.parametrize(
    "expression, key",
    [
        ("downloader.paralelism=3", "downloader.paralelism: unknown key; did you mean 'parallelism'?"),
        ("training.nprocPerNod=4", "training.nprocPerNod: unknown key; did you mean 'nprocPerNode'?"),
        # a stage's config key given beside its config, and a near spelling inside it
        ("preprocessing.format=npz", "preprocessing.format: unknown key; it is a key of preprocessing.config: "
         "preprocessing.config.format"),
        ("preprocessing.config.targetRateH=30", "preprocessing.config.targetRateH: unknown key; did you mean "
         "'targetRateHz'?"),
        ("downloader.enable=false", "downloader.enable: unknown key"),
        ("monitoring.enabld=true", "monitoring.enabld: unknown key"),
        ("downloader.parallelism=four", "downloader.parallelism: expected an integer"),
        ("training.nprocPerNode=100", "training.nprocPerNode: expected an integer >= 1 and <= 64 or null"),
        # a format is told in words, never as the regular expression behind it
        ("downloader.resources.limits.memory=4gb", "downloader.resources.limits.memory: expected a Kubernetes "
         "quantity (such as 500m, 2, 512Mi, 1.5Gi) or a number >= 0, got '4gb'"),
        ("preprocessing.waitTimeout=0s", "preprocessing.waitTimeout '0s' is zero: the wait would give up at once"),
        ("downloader.config.sources[0].type=ftp",
         "downloader.config.sources[0].type: expected one of 's3', 'https', 'catalog', 'file', got 'ftp'"),
        ("global.imageRegistry=https://ghcr.io", "global.imageRegistry: expected empty or a registry host"),
        ("training.image.repository=Trajflow/GPU", "training.image.repository: expected an image repository"),
        ("preprocessing.waitTimeout=1h30", "preprocessing.waitTimeout: expected a duration (such as 90s, 30m, 6h, "
         "1h30m; a bare number is seconds) or an integer >= 1, got '1h30'"),
        # Kubernetes refuses a volume of size 0
        ("global.storage.pvc.size=0Gi", "global.storage.pvc.size: expected a Kubernetes quantity above zero "
         "(such as 100Gi, 1.5Ti), got '0Gi'"),
        ("monitoring.pushgateway.persistence.size=0", "monitoring.pushgateway.persistence.size: expected a "
         "Kubernetes quantity above zero (such as 100Gi, 1.5Ti) or a number > 0, got 0"),
        ("downloader.resources.limits.Bad/gpu=1", "downloader.resources.limits: key 'Bad/gpu': expected a Kubernetes name"),
        ("training.extraVolumes[0].name=data", "training.extraVolumes[0].name: 'data' is one the chart's pods use "
         "themselves (config, tmp, shm, data, trajflow-dataset): choose another"),
        ("training.extraVolumeMounts[0].mountPath=/etc/trajflow-dataset/x", "training.extraVolumeMounts[0].mountPath: "
         "'/etc/trajflow-dataset/x' is a path the chart's pods mount themselves (/tmp, /dev/shm, or /etc/trajflow or "
         "/etc/trajflow-dataset and below): choose another"),
        ("training.podLabels.app\\.kubernetes\\.io/component=x", "training.podLabels: key "
         "'app.kubernetes.io/component': a label the chart sets itself (Services and NetworkPolicies select on it)"),
        # typos the chart's rules and the stage's config refuse
        ("preprocessing.config.sources.sims.rateHz=20", "preprocessing.config.sources.sims names no source of "
         "downloader.config.sources (demo): its settings would apply to nothing"),
        # accepted by the chart, but a local run would never start the stage
        ("downloader.parallelism=0", "downloader.parallelism is 0: on a cluster the Job runs no pod"),
        ("monitoring.prometheusRule.alerts.jobFailed.for=5 minutes", "monitoring.prometheusRule.alerts.jobFailed.for: "
         "expected a Prometheus duration (such as 30s, 5m, 1h, 1h30m), got '5 minutes'"),
    ],
)
def test_set_typos_and_bad_types_are_rejected(tmp_path: Path, expression: str, key: str) -> None:
    result = dry_run(tmp_path, "-f", "values/local.yaml", "--set", expression)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--set {expression}: {key}" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_format_in_the_schemas_is_told_in_words() -> None:
    import json

    from trajflow.config.formats import IN_WORDS

    def patterns(node: object) -> list[str]:
        if isinstance(node, dict):
            own = [node["pattern"]] if isinstance(node.get("pattern"), str) and "if" not in node else []
            # the secret-name pattern only selects, in an `if`: it never refuses a value
            return own + [p for key, value in node.items() if key != "if" for p in patterns(value)]
        if isinstance(node, list):
            return [p for value in node for p in patterns(value)]
        return []

    schemas = sorted((ROOT / "charts").glob("**/values.schema.json"))
    found = {p for schema in schemas for p in patterns(json.loads(schema.read_text()))}
    assert found and not found - set(IN_WORDS), sorted(found - set(IN_WORDS))


def test_set_string_keeps_a_number_a_string(tmp_path: Path) -> None:
    refused = dry_run(tmp_path, "-f", "values/local.yaml", "--set", "global.runId=2024")
    assert refused.returncode == 2
    assert "global.runId: expected a string, got 2024; --set-string keeps it a string" in refused.stderr
    result = dry_run(tmp_path, "-f", "values/local.yaml", "--set-string", "global.runId=2024")
    assert result.returncode == 0, result.stderr
    rendered = (tmp_path / "w" / "config" / "downloader.yaml").read_text()
    assert "runId: '2024'" in rendered


@pytest.mark.parametrize("text, message", [
    ('training:\n  enabled: "false"\n', "training.enabled: expected boolean"),  # a quoted boolean is not one
    ("downloader:\n  image:\n    tagg: x\n", "downloader.image.tagg: unknown key"),
    # every key under config commented out: not the defaults, as the chart's schema says
    ("training:\n  config:\n", "training.config is null, which removes every setting of it"),
    ("preprocessing:\n  config: []\n", "preprocessing.config must be a map of settings, got list"),
])
def test_a_bad_values_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = dry_run(tmp_path, "-f", "values/local.yaml", "-f", str(bad))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{bad}: {message}" in result.stderr


def test_a_rename_another_values_file_made_is_dropped_with_null(tmp_path: Path) -> None:
    """values/dev.yaml renames three robomimic streams; an environment that reads two of them
    drops the third rename with null (Helm's delete), as helm does, instead of failing at start."""
    fewer = tmp_path / "fewer.yaml"
    fewer.write_text("preprocessing:\n  config:\n    streams: [obs/robot0_eef_pos, actions]\n"
                     "    renames:\n      obs/robot0_gripper_qpos: null\n")
    left = dry_run(tmp_path, "-f", "values/dev.yaml", "--set", "preprocessing.config.streams={obs/robot0_eef_pos,actions}")
    assert left.returncode == 2
    assert "renames: 'obs/robot0_gripper_qpos' is not one of the streams read" in left.stderr
    assert "set it to null" in left.stderr
    result = dry_run(tmp_path, "-f", "values/dev.yaml", "-f", str(fewer))
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load((tmp_path / "w" / "config" / "preprocessing.yaml").read_text())
    from trajflow.config.preprocess import PreprocessConfig

    assert PreprocessConfig.model_validate(rendered["config"]).renames == {"obs/robot0_eef_pos": "eef_pos",
                                                                           "actions": "action"}


@pytest.mark.parametrize("values", VALUES, ids=[v.name for v in VALUES])
def test_shipped_values_pass(tmp_path: Path, values: Path) -> None:
    result = dry_run(tmp_path, "-f", str(values.relative_to(ROOT)))
    assert result.returncode == 0, result.stderr


def test_the_enabled_check_needs_no_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the chart (an installed wheel) `enabled` must still be a real boolean."""
    from trajflow.errors import ConfigError
    from trajflow.local import pipeline

    monkeypatch.setattr(pipeline, "find_chart_dir", lambda: None)
    values = tmp_path / "v.yaml"
    values.write_text('global:\n  storage:\n    type: filesystem\n    filesystem:\n      path: /tmp\n'
                      'training:\n  enabled: "false"\n')
    with pytest.raises(ConfigError, match=r"v\.yaml: training\.enabled: expected boolean"):
        pipeline.build_plan([values])


def test_a_fraction_given_by_set_says_why_it_is_a_string(tmp_path: Path) -> None:
    # Helm's --set types only whole numbers: 0.5 arrives as "0.5" (helm install refuses it too)
    refused = dry_run(tmp_path, "-f", "values/local.yaml", "--set", "preprocessing.config.maxBadFraction=0.5")
    assert refused.returncode == 2
    assert ("preprocessing.config.maxBadFraction: Input should be a valid number (got '0.5'); --set passes a "
            "fraction as a string, as Helm does: give it in a values file (-f)") in refused.stderr


def test_a_work_dir_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    # as a read-only volume would (root writes through file modes): the OS refuses the mkdir
    work_dir = tmp_path / ("x" * 300) / "w"
    result = subprocess.run([*trajflow_cmd(), "run", "-f", "values/local.yaml", "--dry-run", "--work-dir",
                             str(work_dir)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"work dir {work_dir}: cannot write" in result.stderr and "File name too long" in result.stderr
    assert "Traceback" not in result.stderr


def test_whole_numbers_written_as_floats_pass_as_helm_passes_them(tmp_path: Path) -> None:
    values = tmp_path / "floats.yaml"
    values.write_text("training:\n  config:\n    epochs: 3.0\n    window: 1.6e1\n")
    result = dry_run(tmp_path, "-f", "values/local.yaml", "-f", str(values))
    assert result.returncode == 0, result.stderr
    rendered = (tmp_path / "w" / "config" / "training.yaml").read_text()
    assert "epochs: 3\n" in rendered and "window: 16\n" in rendered


def test_a_list_padded_by_set_is_not_told_to_use_set_string(tmp_path: Path) -> None:
    result = dry_run(tmp_path, "-f", "values/local.yaml", "--set", "preprocessing.config.streams[3]=x")
    assert result.returncode == 2
    assert "preprocessing.config.streams[2]: expected a string, got null\n" in result.stderr  # no --set-string hint


def test_a_rule_between_keys_is_told_in_its_own_words(tmp_path: Path) -> None:
    result = dry_run(tmp_path, "-f", "values/dev.yaml", "--set", "global.storage.pvc.create=false")
    assert result.returncode == 2
    assert "global.storage.pvc.existingClaim: required when pvc.create is false\n" in result.stderr
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text("training:\n  extraEnv: [{name: WANDB_API_KEY, value: sk-secret-123}]\n")
    secret = dry_run(tmp_path, "-f", "values/local.yaml", "-f", str(leaky))
    assert secret.returncode == 2 and "training.extraEnv[0].value: plain-text secret" in secret.stderr
    assert "sk-secret-123" not in secret.stderr  # an error naming the key must not print the secret


def test_a_file_source_this_machine_lacks_stops_a_run_before_anything_runs(tmp_path: Path) -> None:
    """Each download process would fail on it (exit 2) only once the run started, leaving
    files in the run root. A dry run warns: a cluster's values name the pod's paths."""
    missing = tmp_path / "nonexist"
    values = tmp_path / "missing.yaml"
    values.write_text(yaml.safe_dump({"downloader": {"config": {"sources": [
        {"type": "file", "name": "demo", "path": str(missing)}]}}}))
    message = f"{values}: downloader.config.sources[0].path: '{missing}' does not exist on this machine"
    warned = dry_run(tmp_path, "-f", "values/local.yaml", "-f", str(values))
    assert warned.returncode == 0, warned.stdout + warned.stderr
    assert f"{message}; a run here would stop at once" in warned.stderr and "relative path" not in warned.stderr
    root = tmp_path / "data"
    run = subprocess.run([*trajflow_cmd(), "run", "-f", "values/local.yaml", "-f", str(values), "--set",
                          f"global.storage.filesystem.path={root}", "--work-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and f"{message}\n" in run.stderr, run.stdout + run.stderr
    assert not root.exists() and not (tmp_path / "run").exists()


def test_a_relative_file_source_is_resolved_against_the_working_directory(tmp_path: Path) -> None:
    values = tmp_path / "relative.yaml"
    values.write_text(yaml.safe_dump({"downloader": {"config": {"sources": [
        {"type": "file", "name": "demo", "path": "rel/source"}]}}}))
    argv = [*trajflow_cmd(), "run", "-f", str(ROOT / "values" / "local.yaml"), "-f", str(values), "--dry-run",
            "--work-dir", str(tmp_path / "w")]
    warned = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert warned.returncode == 0, warned.stdout + warned.stderr
    assert (f"{values}: downloader.config.sources[0].path: 'rel/source' does not exist on this machine (a relative "
            f"path is resolved against the current working directory, {tmp_path}: {tmp_path / 'rel' / 'source'})"
            ) in warned.stderr
    (tmp_path / "rel" / "source").mkdir(parents=True)
    result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "does not exist" not in result.stderr, result.stderr


def test_unknown_keys_are_no_hint_for_each_other(tmp_path: Path) -> None:
    typos = tmp_path / "typos.yaml"
    typos.write_text(yaml.safe_dump({"training": {"config": {"epochz": 3, "epochx": 4}}}))
    result = dry_run(tmp_path, "-f", "values/local.yaml", "-f", str(typos))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{typos}: training.config.epochx: unknown key; did you mean 'epochs'?" in result.stderr
    assert f"{typos}: training.config.epochz: unknown key; did you mean 'epochs'?" in result.stderr


def test_an_earlier_runs_download_manifests_do_not_stand_for_a_missing_source(tmp_path: Path) -> None:
    # manifests of another shard count (or generation) are no download this run would skip
    from trajflow.storage import LocalStorage, write_manifest

    root = tmp_path / "data"
    for shard in range(4):  # values/local.yaml's runId and shard count, another generation
        write_manifest(LocalStorage(root / "demo"), "download", shard, 4, [], generation="earlier")
    values = tmp_path / "missing.yaml"
    values.write_text(yaml.safe_dump({"downloader": {"config": {"sources": [
        {"type": "file", "name": "demo", "path": str(tmp_path / "nonexist")}]}}}))
    run = subprocess.run([*trajflow_cmd(), "run", "-f", "values/local.yaml", "-f", str(values), "--set",
                          f"global.storage.filesystem.path={root}", "--work-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "does not exist on this machine" in run.stderr, run.stdout + run.stderr
    assert "the run goes on without it" not in run.stderr
