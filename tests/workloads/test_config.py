"""Configuration: typed models, the values loader, and one clear error line per problem."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pydantic
import pytest

from trajflow import cli
from trajflow.config import (
    DownloadConfig,
    GlobalConfig,
    load_config_file,
    load_values,
    shard_from_env,
    stage_settings,
    validate_global,
    validate_stage,
)
from trajflow.config.cli import schemas
from trajflow.errors import ConfigError, ExitCode
from trajflow.storage.s3 import parse_s3_uri


@pytest.fixture
def chart(tmp_path: Path) -> Path:
    """A minimal umbrella chart: global defaults plus a downloader subchart with `config`."""
    root = tmp_path / "chart"
    (root / "charts" / "downloader").mkdir(parents=True)
    (root / "Chart.yaml").write_text("apiVersion: v2\nname: trajflow\nversion: 0.1.0\n")
    (root / "values.yaml").write_text(
        "global:\n  runId: default\n  storage:\n    type: filesystem\n    filesystem: {path: /data}\n"
        "downloader:\n  enabled: true\n"
    )
    (root / "charts" / "downloader" / "Chart.yaml").write_text("apiVersion: v2\nname: downloader\nversion: 0.1.0\n")
    (root / "charts" / "downloader" / "values.yaml").write_text("shards: 2\nconfig:\n  concurrency: 4\n")
    return root


def _values_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


# ---- models ---------------------------------------------------------------------------


def test_defaults_validate_and_give_a_run_root(tmp_path):
    glob = GlobalConfig()
    assert glob.run_id == "default" and glob.storage.type == "filesystem"
    assert glob.run_root() == "file:///data/default"
    s3 = GlobalConfig.model_validate(
        {"runId": "r7", "storage": {"type": "s3", "s3": {"bucket": "runs", "prefix": "/team #1/runs/"}}}
    )
    assert s3.run_root() == "s3://runs/team #1/runs/r7"
    assert parse_s3_uri(s3.run_root()) == ("runs", "team #1/runs/r7")  # keys are taken literally
    assert GlobalConfig.model_validate({"storage": {"type": "s3", "s3": {"bucket": "runs"}}}).run_root() == "s3://runs/default"


def test_models_are_camel_case_and_frozen():
    glob = GlobalConfig.model_validate({"runId": "abc", "metrics": {"pushgatewayUrl": "http://pg:9091"}})
    assert glob.metrics.pushgateway_url == "http://pg:9091"
    with pytest.raises(pydantic.ValidationError, match=r"(?s)^1 validation error for GlobalConfig\nrun_id\n.*"
                                                       r"Instance is frozen \[type=frozen_instance"):
        glob.run_id = "other"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match=r"(?s)\ntype\n.*\[type=frozen_instance"):  # nested too
        glob.storage.type = "s3"  # type: ignore[misc]
    assert glob.run_id == "abc" and glob.storage.type == "filesystem"


def test_schema_rejects_unknown_keys_everywhere():
    doc = schemas()
    assert set(doc) == {"global", "downloader", "preprocessing", "training"}

    def closed(node, path="$"):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, path
            assert "$ref" not in node, f"{path}: unresolved $ref (the charts embed these blocks)"
            for key, value in node.items():
                closed(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                closed(value, f"{path}[{i}]")

    for block in doc.values():
        closed(block)
    assert "runId" in doc["global"]["properties"]


def test_schema_command_prints_json(capsys):
    assert cli.main(["schema", "--block", "global"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == schemas()["global"]


def test_schema_accepts_what_the_models_accept_and_rejects_the_rest():
    jsonschema = pytest.importorskip("jsonschema")
    schema = schemas()["global"]
    good = {"runId": "r1", "storage": {"type": "s3", "s3": {"bucket": "runs", "addressingStyle": "virtual"}}}
    jsonschema.validate(good, schema)
    GlobalConfig.model_validate(good)
    # (bucket names and prefixes every stage would refuse at start, after `helm install` took them)
    # (each bad document, the key the models' one-line error must name)
    for bad, key in (({"runID": "r1"}, "runID"), ({"storage": {"type": "nfs"}}, "storage.type"),
                     ({"storage": {"s3": {"addressingStyle": "dns"}}}, "storage.s3.addressingStyle"),
                     ({"storage": {"s3": {"bucket": "My_Bucket"}}}, "storage.s3.bucket"),
                     ({"storage": {"s3": {"prefix": "a//b"}}}, "storage.s3.prefix"),
                     ({"storage": {"s3": {"prefix": "team/../other"}}}, "storage.s3.prefix")):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ConfigError, match=rf"^values: global\.{re.escape(key)}: "):
            validate_global(bad)


# ---- bad configuration: one clear line each --------------------------------------------


@pytest.mark.parametrize(
    "raw,expected",
    [
        ({"storage": {"tipe": "s3"}}, "values.yaml: global.storage.tipe: unknown key"),
        ({"storage": {"type": "nfs"}}, "values.yaml: global.storage.type: Input should be 'filesystem' or 's3' (got 'nfs')"),
        ({"runId": "Bad_Run"}, "values.yaml: global.runId: expected a DNS label: lowercase letters, digits and '-', "
                               "starting and ending with a letter or digit, got 'Bad_Run'"),
        ({"storage": {"s3": {"endpoint": "ftp://minio:9000"}}}, "values.yaml: global.storage.s3.endpoint: endpoint must be an http(s) URL with a host, a port of 1-65535 if any, and no user:password@, got 'ftp://minio:9000'"),
        ({"metrics": {"pushgatewayUrl": "pushgateway:9091"}}, "values.yaml: global.metrics.pushgatewayUrl: pushgatewayUrl must be an http(s) URL"),
        # credentials in a URL nothing sends them from are refused, and not repeated
        ({"storage": {"s3": {"endpoint": "http://AKIAX:SECRETEP@minio:9000"}}},
         "values.yaml: global.storage.s3.endpoint: endpoint must be an http(s) URL with a host, a port of 1-65535 if any, and no user:password@, got 'http://…@minio:9000'"),
        ({"metrics": {"pushgatewayUrl": "https://u:PGSECRET@pg.example/?token=T0KEN"}},
         "values.yaml: global.metrics.pushgatewayUrl: pushgatewayUrl must be an http(s) URL with a host, a port of 1-65535 if any, and no user:password@, got 'https://…@pg.example/?…'"),
        ({"storage": {"s3": {"region": "bad region"}}},
         "values.yaml: global.storage.s3.region: expected empty or a region name: letters, digits and '-' (such as "
         "us-east-1), got 'bad region'"),
        ({"storage": {"type": "s3"}}, "values.yaml: global.storage: storage.s3.bucket is required when storage.type is s3"),
        ({"storage": 5}, "values.yaml: global.storage: Input should be a valid dictionary"),
        ({"storage": {"s3": {"prefix": "runs/./x"}}}, "values.yaml: global.storage.s3.prefix: expected a key prefix: "
                                                     "names joined by '/', none of them empty, '.' or '..', and no "
                                                     "backslash, got 'runs/./x'"),
        ({"imagePullSecrets": [{"name": "ok"}, {"name": "Not OK"}]},
         "values.yaml: global.imagePullSecrets[1].name: expected a DNS name: DNS labels (lowercase letters, digits and "
         "'-') joined by '.', got 'Not OK'"),
    ],
)
def test_bad_global_values_give_one_clear_line(raw, expected):
    with pytest.raises(ConfigError) as info:
        validate_global(raw, origin="values.yaml")
    assert _one_line(info).startswith(expected)


def test_each_problem_gets_its_own_line():
    with pytest.raises(ConfigError) as info:
        validate_global({"runId": "UPPER", "storage": {"tipe": 1}}, origin="v.yaml")
    lines = str(info.value).splitlines()
    assert lines == [
        "v.yaml: global.runId: expected a DNS label: lowercase letters, digits and '-', starting and ending with a "
        "letter or digit, got 'UPPER'",
        "v.yaml: global.storage.tipe: unknown key",
    ]


def test_bad_stage_config_names_the_stage_and_key():
    with pytest.raises(ConfigError) as info:
        validate_stage("downloader", {"concurrencyy": 3}, origin="dev.yaml")
    assert _one_line(info) == "dev.yaml: downloader.config.concurrencyy: unknown key"
    with pytest.raises(ConfigError) as info:
        validate_stage("downloader", {"concurrency": "many"}, origin="dev.yaml")
    assert _one_line(info).startswith("dev.yaml: downloader.config.concurrency: Input should be a valid integer")
    with pytest.raises(ConfigError, match="unknown stage 'uploader'"):
        validate_stage("uploader", {})


@pytest.mark.parametrize("stage, key", [("preprocessing", "rateHz"), ("preprocessing", "pushIntervalSeconds"),
                                        ("training", "learningRate"), ("downloader", "pushIntervalSeconds")])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_numbers_are_refused(stage, key, value):
    with pytest.raises(ConfigError) as info:
        validate_stage(stage, {key: value}, origin="dev.yaml")
    assert _one_line(info) == f"dev.yaml: {stage}.config.{key}: Input should be a finite number (got {value})"


@pytest.mark.parametrize("stage, key, value, floor", [
    ("downloader", "pushIntervalSeconds", 0.001, "1"), ("preprocessing", "pushIntervalSeconds", 0.5, "1"),
    ("downloader", "progressIntervalSeconds", 1e-6, "0.1"),
])
def test_intervals_that_would_flood_the_pushgateway_or_the_log_are_refused(stage, key, value, floor):
    """1e-6 s made a pod log 2,000 lines in 2 s from a busy loop; pushes loop the same way."""
    with pytest.raises(ConfigError) as info:
        validate_stage(stage, {key: value}, origin="dev.yaml")
    assert _one_line(info) == (f"dev.yaml: {stage}.config.{key}: Input should be greater than or equal to {floor} "
                               f"(got {value})")


@pytest.mark.parametrize("key, value, expected", [
    ("targetRateHz", True, "Input should be a valid number"),  # YAML `true` is no rate
    ("maxBadFraction", "yes", "Input should be a valid number"),
    ("targetRateHz", "25", "Input should be a valid number"),
    ("batchSize", 8.0, "Input should be a valid integer"),
])
def test_values_of_another_type_are_refused_as_helm_refuses_them(key, value, expected):
    """The models are as strict as the charts' values.schema.json: `trajflow preprocess -f`
    refuses what `helm install` refuses, instead of reading `true` as 1 Hz."""
    with pytest.raises(ConfigError) as info:
        validate_stage("preprocessing", {key: value}, origin="dev.yaml")
    assert _one_line(info).startswith(f"dev.yaml: preprocessing.config.{key}: {expected}")
    assert validate_stage("preprocessing", {"targetRateHz": 25}).target_rate_hz == 25.0  # an integer is a number


def test_errors_name_the_file_the_bad_value_came_from(tmp_path, chart):
    good = _values_file(tmp_path, "base.yaml", "global:\n  runId: run-1\n")
    bad = _values_file(tmp_path, "override.yaml", "downloader:\n  config:\n    concurrency: lots\n")
    with pytest.raises(ConfigError) as info:
        stage_settings("downloader", values_files=[good, bad], env={})
    assert _one_line(info).startswith(f"{bad}: downloader.config.concurrency: Input should be a valid integer")
    with pytest.raises(ConfigError) as info:
        stage_settings("downloader", values_files=[good], sets=["global.storage.type=nfs"], env={})
    assert _one_line(info).startswith("--set global.storage.type=nfs: global.storage.type: Input should be")


def test_unknown_top_level_key_is_named(tmp_path, chart):
    bad = _values_file(tmp_path, "typo.yaml", "downloder:\n  enabled: true\n")
    with pytest.raises(ConfigError) as info:
        load_values([bad], chart_dir=chart)
    assert _one_line(info).startswith(f"{bad}: unknown top-level key 'downloder'")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("global: [unclosed\n", "not valid YAML (line 2, column 1)"),
        ("- a\n- b\n", "top level must be a map of values, got list"),
        ("global:\n  runId: a\n runId: b\n", "not valid YAML"),
        ("global:\n  runId: a\n---\nglobal:\n  runId: b\n", "holds more than one YAML document (after '---'): "
                                                       "Helm reads only the first"),
    ],
)
def test_unreadable_values_files_are_named(tmp_path, text, expected):
    path = _values_file(tmp_path, "broken.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_values([path], use_chart_defaults=False)
    message = _one_line(info)
    assert message.startswith(f"{path}: ") and expected in message


@pytest.mark.parametrize("text", ["---\nglobal:\n  runId: docs\n---\n", "global:\n  runId: docs\n---\n---\n"])
def test_empty_documents_around_the_values_are_allowed(tmp_path, text):
    path = _values_file(tmp_path, "values.yaml", text)
    assert load_values([path], use_chart_defaults=False).merged["global"]["runId"] == "docs"


def test_missing_values_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_values([tmp_path / "nope.yaml"], use_chart_defaults=False)
    assert _one_line(info) == f"{tmp_path / 'nope.yaml'}: no such values file"


def test_a_missing_stage_config_says_how_to_give_one(terminal_output, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRAJFLOW_CONFIG", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config_file(tmp_path / "nope.yaml", "downloader")
    assert _one_line(info) == f"{tmp_path / 'nope.yaml'}: no such stage config"
    assert cli.main(["download"]) == ExitCode.CONFIG  # neither --config nor -f, and no pod mount
    assert capsys.readouterr().err.strip() == (
        "trajflow download: error: no stage config at /etc/trajflow/config.yaml, where pods mount the chart's "
        "ConfigMap: give --config FILE (or $TRAJFLOW_CONFIG), or -f VALUES.yaml to read values files")


def test_bad_set_expression_is_named():
    with pytest.raises(ConfigError) as info:
        load_values(sets=["a.b=1,a=x,a.c=2"], use_chart_defaults=False)
    assert _one_line(info) == "--set 'a.b=1,a=x,a.c=2': 'a' is used as a map but already holds str"


def test_cli_turns_config_errors_into_exit_code_2_and_one_line(terminal_output, tmp_path, capsys, chart, monkeypatch):
    monkeypatch.setenv("TRAJFLOW_CHART", str(chart))
    bad = _values_file(tmp_path, "bad.yaml", "global:\n  storage:\n    type: nfs\n")
    code = cli.main(["wait", "--stage", "download", "--shards", "0", "--timeout", "1s", "-f", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.CONFIG == 2
    assert err == [f"trajflow wait: error: {bad}: global.storage.type: Input should be 'filesystem' or 's3' (got 'nfs')"]


# ---- loading ---------------------------------------------------------------------------


def test_stage_settings_from_values_files_and_sets(tmp_path, chart):
    base = _values_file(tmp_path, "env.yaml", f"global:\n  runId: exp-1\n  storage:\n    filesystem: {{path: {tmp_path}}}\n")
    settings = stage_settings(
        "downloader", values_files=[base], sets=["downloader.config.concurrency=9"],
        env={"JOB_COMPLETION_INDEX": "1", "TRAJFLOW_SHARDS": "2"},
    )
    assert isinstance(settings.config, DownloadConfig) and settings.config.concurrency == 9
    assert (settings.shard, settings.shards) == (1, 2)
    assert settings.root == (tmp_path / "exp-1").as_uri()


def test_values_give_the_shard_count_outside_a_pod(tmp_path, chart):
    base = _values_file(tmp_path, "env.yaml", f"global:\n  storage:\n    filesystem: {{path: {tmp_path}}}\n"
                        "preprocessing:\n  shards: 8\n")
    assert stage_settings("preprocessing", values_files=[base], env={}).shards == 8
    # the pod's environment wins, as in the chart
    assert stage_settings("preprocessing", values_files=[base], env={"TRAJFLOW_SHARDS": "4"}).shards == 4
    with pytest.raises(ConfigError) as info:
        stage_settings("preprocessing", values_files=[base], sets=["preprocessing.shards=0"], env={})
    assert _one_line(info) == "--set preprocessing.shards=0: preprocessing.shards must be a positive integer, got 0"


def test_the_stages_after_the_downloader_know_the_generation_of_its_download(tmp_path, chart, caplog):
    """From the values (`-f`), or in a pod from the downloader's config the chart mounts."""
    from trajflow.config.loader import DATASET_CONFIG_ENV, expected_download_generation

    sources = f"downloader:\n  config:\n    sources: [{{name: lab, type: file, path: {tmp_path}}}]\n"
    base = _values_file(tmp_path, "env.yaml", f"global:\n  storage:\n    filesystem: {{path: {tmp_path}}}\n" + sources)
    generation = validate_stage("downloader", load_values([base]).stage_config("downloader")).generation_id()
    assert stage_settings("preprocessing", values_files=[base], env={}).download_generation == generation
    assert stage_settings("downloader", values_files=[base], env={}).download_generation is None
    assert expected_download_generation(values_files=[base], sets=["downloader.config.planGeneration=v2"]) not in (
        None, generation)
    assert expected_download_generation(values_files=[base], sets=["downloader.enabled=false"]) is None
    assert expected_download_generation(values_files=[base], sets=["preprocessing.enabled=false"]) is None
    assert expected_download_generation(values_files=[_values_file(tmp_path, "none.yaml", "global: {}\n")]) is None
    # in a pod
    dataset = _values_file(tmp_path, "dataset.yaml", sources.replace("downloader:\n  config:", "config:").replace(
        "\n    sources", "\n  sources"))
    config = _values_file(tmp_path, "config.yaml", f"global:\n  storage:\n    filesystem: {{path: {tmp_path}}}\n")
    env = {"TRAJFLOW_CONFIG": str(config), DATASET_CONFIG_ENV: str(dataset)}
    assert stage_settings("training", env=env).download_generation == generation
    assert stage_settings("training", env={"TRAJFLOW_CONFIG": str(config)}).download_generation is None
    with caplog.at_level("INFO", logger="trajflow.config.loader"):
        missing = {**env, DATASET_CONFIG_ENV: str(tmp_path / "absent.yaml")}
        assert stage_settings("training", env=missing).download_generation is None
    assert f"{DATASET_CONFIG_ENV}={tmp_path / 'absent.yaml'} does not exist" in caplog.text


def test_chart_default_is_used_and_null_deletes_it(tmp_path, chart):
    values = load_values([], chart_dir=chart)
    assert values.stage("downloader")["config"] == {"concurrency": 4}
    assert values.origin(["downloader", "config", "concurrency"]).endswith("charts/downloader/values.yaml (the chart's default)")
    nulled = load_values([], ["downloader.config.concurrency=null"], chart_dir=chart)
    assert nulled.stage("downloader")["config"] == {}
    assert validate_stage("downloader", nulled.stage("downloader")["config"]).concurrency == DownloadConfig().concurrency


def test_config_file_as_rendered_by_the_chart(tmp_path):
    path = _values_file(
        tmp_path, "config.yaml",
        "global:\n  runId: r2\n  storage:\n    type: s3\n    s3: {bucket: data, endpoint: 'http://minio:9000'}\n"
        "config:\n  concurrency: 3\n",
    )
    glob, config = load_config_file(path, "downloader")
    assert glob.run_root() == "s3://data/r2" and config.concurrency == 3
    settings = stage_settings("downloader", env={"TRAJFLOW_CONFIG": str(path), "JOB_COMPLETION_INDEX": "0"})
    assert settings.global_.run_id == "r2"

    extra = _values_file(tmp_path, "extra.yaml", "global: {}\nconfig: {}\nstage: x\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(extra, "downloader")
    assert _one_line(info) == f"{extra}: unknown top-level key 'stage' (expected global and config)"
    bad = _values_file(tmp_path, "bad.yaml", "config:\n  concurrency: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(bad, "downloader")
    assert _one_line(info).startswith(f"{bad}: config.concurrency: ")
    # every setting commented out: the defaults; a list is no map of settings
    empty = _values_file(tmp_path, "empty.yaml", "global: {runId: r3}\nconfig:\n")
    assert load_config_file(empty, "downloader")[1].concurrency == DownloadConfig().concurrency
    listed = _values_file(tmp_path, "listed.yaml", "config: [1]\n")
    with pytest.raises(ConfigError, match="config must be a map of settings, got list"):
        load_config_file(listed, "downloader")
    # an empty file is what Helm's toYaml writes for values it cannot write: not the defaults
    blank = _values_file(tmp_path, "blank.yaml", "")
    with pytest.raises(ConfigError) as info:
        load_config_file(blank, "downloader")
    assert _one_line(info).startswith(f"{blank}: the stage config is empty, but the chart always writes global, "
                                      "config: Helm could not write the release's values")
    with pytest.raises(ConfigError, match="the stage config is empty, but the chart always writes global, config, "
                                          "shards"):
        stage_settings("preprocessing", env={"TRAJFLOW_CONFIG": str(empty), "JOB_COMPLETION_INDEX": "0",
                                             "TRAJFLOW_DATASET_CONFIG": str(blank)})


@pytest.mark.parametrize("key, field, before, after, per_source", [
    ("timeUnit", "time_unit", "s", "ns", "ms"),  # every timestamp changes; older shards were made in seconds
    ("filterKey", "filter_key", "", "train", "valid"),  # which demos a shard holds; older shards hold every demo
])
def test_a_setting_added_later_is_an_output_setting_older_manifests_made_with_its_default(key, field, before, after,
                                                                                            per_source):
    """Done shards made with another value are not kept as they are; shards from before the
    setting existed were made as its default makes them."""
    from trajflow.config.preprocess import PreprocessConfig
    from trajflow.preprocess.shards import settings_differences, settings_of

    now = PreprocessConfig().output_settings(["lab"])
    assert now[key] == before
    older = {"settings": {k: v for k, v in now.items() if k != key}}
    assert settings_differences(settings_of(older), now) == []
    changed = PreprocessConfig(**{field: after}).output_settings(["lab"])
    assert settings_differences(settings_of(older), changed) == [f"{key} {before!r} -> {after!r}"]
    overridden = PreprocessConfig(sources={"lab": {field: per_source}}).output_settings(["lab"])
    assert settings_differences(now, overridden) == [f"sources.lab {{}} -> {{{key!r}: {per_source!r}}}"]


def test_time_unit_and_filter_key_values():
    with pytest.raises(ConfigError) as info:
        validate_stage("preprocessing", {"timeUnit": "sec"}, origin="dev.yaml")
    assert _one_line(info).startswith("dev.yaml: preprocessing.config.timeUnit: Input should be 's', 'ms', 'us' or 'ns'")
    values = validate_stage("preprocessing", {"filterKey": "20_percent", "sources": {"lab": {"filterKey": ""}}})
    assert (values.filter_key, values.sources["lab"].filter_key) == ("20_percent", "")


@pytest.mark.parametrize(
    "env,expected",
    [({}, (0, 1)), ({"JOB_COMPLETION_INDEX": "3", "TRAJFLOW_SHARDS": "8"}, (3, 8))],
)
def test_shard_from_env(env, expected):
    assert shard_from_env(env) == expected


@pytest.mark.parametrize(
    "env,match",
    [
        ({"JOB_COMPLETION_INDEX": "x"}, "must be integers"),
        ({"JOB_COMPLETION_INDEX": "8", "TRAJFLOW_SHARDS": "8"}, "outside 0..7"),
        ({"TRAJFLOW_SHARDS": "0"}, "outside"),
    ],
)
def test_bad_shard_env_is_a_config_error(env, match):
    with pytest.raises(ConfigError, match=match):
        shard_from_env(env)


def test_an_empty_s3_region_is_the_default_region():
    """Values files written for MinIO often say `region: ""`: the clients take it as us-east-1."""
    assert validate_global({"storage": {"type": "s3", "s3": {"bucket": "data", "region": ""}}}).storage.s3.region == ""
    source = {"type": "s3", "name": "b", "url": "s3://b/p", "region": ""}
    assert validate_stage("downloader", {"sources": [source]}).sources[0].region == ""


def test_a_refused_catalog_template_does_not_repeat_its_query():
    template = "https://hub.example/{cohort}/x.tsv?token=SECRETX"  # neither {file} nor {category}
    with pytest.raises(ConfigError) as info:
        validate_stage("downloader", {"sources": [{"type": "catalog", "name": "xena", "urlTemplate": template,
                                                   "cohorts": ["A"], "categories": {"m": "HiSeqV2"}}]})
    assert "SECRETX" not in str(info.value) and "'https://hub.example/{cohort}/x.tsv?…' needs {cohort}" in str(info.value)


@pytest.mark.parametrize("env,generation,checkpoint_hash", [
    ("local", "e458874988fa", "253d5909889e4739"),
    ("dev", "f3c9f1c7db3b", "ed632ee41708ea6b"),
    ("kind", "c0e813f7229a", "253d5909889e4739"),
])
def test_a_new_version_keeps_the_download_generation_and_checkpoint_hash_of_a_run(repo_root, env, generation,
                                                                                  checkpoint_hash):
    """Runs in progress upgrade to new images: a new setting that changed either (both hash
    every setting they cover, defaults included) would make every download plan again and
    check every item, and every training refuse its checkpoints. Leave a new setting out
    of them while it has its default (see how `DownloadConfig.generation_id` treats gunzip)."""
    from trajflow.train.loop import config_hash

    values = [repo_root / "values" / f"{env}.yaml"]
    download = stage_settings("downloader", values_files=values, env={})
    training = stage_settings("training", values_files=values, env={})
    assert (download.config.generation_id(), config_hash(training.config)) == (generation, checkpoint_hash)
