"""Lint as CI does: helm lint (strict) on the umbrella and on each subchart directly,
yamllint and yamale with the chart-testing configs."""
from __future__ import annotations

from pathlib import Path

import pytest
from helmrender import (
    CHART,
    ENVIRONMENTS,
    NEWEST_KUBE,
    OLDEST_KUBE,
    ROOT,
    STAGE_CHARTS,
    SUBCHARTS,
    env_file,
    helm,
    read_values,
    with_a_source,
)

LINTCONF = ROOT / "ci" / "lintconf.yaml"
CHART_SCHEMA = ROOT / "ci" / "chart_schema.yaml"
WARNING = 2


def problems(report):
    found = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= WARNING]
    return found + list(report["errors"])


@pytest.mark.parametrize("kube", [OLDEST_KUBE, NEWEST_KUBE])
def test_umbrella_lints_clean_in_strict_mode(kube):
    report = helm.lint(CHART, with_a_source({}, ("downloader",)), strict=True, namespace="trajflow",
                       with_subcharts=True, kube_version=f"v{kube}")
    assert report["total_charts_linted"] == 1
    assert not problems(report)


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_umbrella_lints_clean_with_each_environment(env):
    report = helm.lint(CHART, read_values(env_file(env)), strict=True, namespace="trajflow",
                       kube_version=f"v{NEWEST_KUBE}")
    assert not problems(report), env


@pytest.mark.parametrize("chart", [*STAGE_CHARTS, "common"])
def test_each_subchart_lints_on_its_own(chart):
    """A stage disabled in the umbrella is still linted: directly, with its own defaults (and
    a source for the downloader, whose default has none)."""
    values = with_a_source({}, ()) if chart == "downloader" else {}
    report = helm.lint(SUBCHARTS / chart, values, strict=True, namespace="trajflow", kube_version=f"v{OLDEST_KUBE}")
    assert not problems(report), chart


def test_lint_reports_a_broken_template(tmp_path):
    """The lint gate can fail: a template error in a copy of a stage chart is reported."""
    import shutil

    copy = tmp_path / "downloader"
    shutil.copytree(SUBCHARTS / "downloader", copy, symlinks=False)
    (copy / "templates" / "broken.yaml").write_text("{{ include \"trajflow.no-such-helper\" . }}\n")
    assert problems(helm.lint(copy, strict=True))


def yaml_files():
    files = [
        *sorted((ROOT / "charts").rglob("Chart.yaml")),
        CHART / "values.yaml",
        *(SUBCHARTS / s / "values.yaml" for s in STAGE_CHARTS),
        *sorted((ROOT / "values").glob("*.yaml")),
        *sorted((ROOT / "argocd").glob("*.yaml")),
        *sorted((ROOT / "ci").glob("*.yaml")),
    ]
    return [f for f in files if "node_modules" not in f.parts and ".tools" not in f.parts]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yamllint_with_the_ct_config(path):
    yamllint_config = pytest.importorskip("yamllint.config")
    linter = pytest.importorskip("yamllint.linter")
    config = yamllint_config.YamlLintConfig(file=str(LINTCONF))
    found = [f"{p.line}:{p.column} {p.rule}: {p.desc}" for p in linter.run(path.read_text(), config, str(path))
             if p.level == "error" or p.level == "warning"]
    assert not found, f"{path.relative_to(ROOT)}:\n" + "\n".join(found)


@pytest.mark.parametrize("path", sorted((ROOT / "charts").rglob("Chart.yaml")), ids=lambda p: str(p.parent.name))
def test_chart_yaml_matches_the_ct_schema(path):
    yamale = pytest.importorskip("yamale")
    schema = yamale.make_schema(str(CHART_SCHEMA))
    yamale.validate(schema, yamale.make_data(str(path)), strict=True)


def test_chart_schema_rejects_a_bad_chart_yaml(tmp_path):
    yamale = pytest.importorskip("yamale")
    bad = tmp_path / "Chart.yaml"
    bad.write_text("apiVersion: v1\nname: Trajflow\nversion: one\ntype: service\nappVersion: '1'\ndescription: x\n")
    with pytest.raises(yamale.YamaleError) as info:
        yamale.validate(yamale.make_schema(str(CHART_SCHEMA)), yamale.make_data(str(bad)), strict=True)
    message = str(info.value)
    assert "apiVersion" in message and "name" in message and "version" in message and "type" in message


def test_ct_config_points_at_the_files():
    import yaml

    ct = yaml.safe_load((ROOT / "ci" / "ct.yaml").read_text())
    assert (ROOT / ct["lint-conf"]) == LINTCONF and (ROOT / ct["chart-yaml-schema"]) == CHART_SCHEMA
    for chart in ct["charts"]:
        assert (ROOT / chart / "Chart.yaml").is_file()
    # ct install reads <chart>/ci/*-values.yaml: the kind values
    ci_values = sorted((CHART / "ci").glob("*-values.yaml"))
    assert [p.name for p in ci_values] == ["kind-values.yaml"]
    assert Path(ci_values[0]).resolve() == env_file("kind").resolve()
