"""Values merging agrees with Helm's own implementation (helm-python-sdk, Helm's Go code).

- `parse_set` vs `helm_python.parse_set_string` (fuzzed and on named cases);
- `coalesce_chart` vs `helm_python.Chart.merge_values` on charts with a subchart and
  globals, with nulls deleting keys and lists replaced (fuzzed and named cases);
- YAML scalars read as Helm reads them (`helm_python.values_from_yaml`);
- `-f` files: Helm merges them before coalescing (later wins, nulls kept until then).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's Go engine) is not installed")

from trajflow.config.loader import dump_yaml, load_chart, load_values, parse_yaml  # noqa: E402
from trajflow.config.merge import ChartValues, SetString, coalesce, coalesce_chart, merge_maps, parse_set  # noqa: E402
from trajflow.errors import ConfigError  # noqa: E402

if hasattr(helm, "disable_logging"):
    helm.disable_logging()  # Helm's own warnings about tables vs scalars


def _helm_set(expression: str, strings: bool = False) -> tuple[str, Any]:
    """Helm's own answer to `--set expression` (`--set-string` with ``strings``)."""
    try:
        return "ok", (helm.parse_set_string_values if strings else helm.parse_set_string)(expression)
    except helm.HelmError:
        return "error", None


def _our_set(expression: str, strings: bool = False) -> tuple[str, Any]:
    option = "--set-string" if strings else "--set"
    try:
        return "ok", parse_set(SetString(expression) if strings else expression)
    except ConfigError as exc:
        assert str(exc).startswith(f"{option} {expression!r}: ") and "\n" not in str(exc)
        return "error", None


# ---- --set ----------------------------------------------------------------------------

NAMED_SET_CASES = [
    "a=1,b.c=two",
    "image.tag=1.10",  # floats stay strings
    "x=010", "x=0", "x=00", "x=-0", "x=+5", "x=-01", "x=9223372036854775807", "x=9223372036854775808",
    "x=true", "x=True", "x=FALSE", "x=null", "x=NuLL", "x=", "x=a=b",
    "x={}", "x={a,b}", "x={1,true,null}", "name={a=b,c}", "x={a,b}c=1",
    "x[1]=2", "x[0]=1,x[2]=3", "x[0].y=1", "a.b[2].c=3", "a[0][1]=2", "a[+1]=3", "a[01]=3",
    "a\\.b=1", "x=a\\,b", "a=b\\", "x.y=1,x=2",
    "a=1,", "=1", "a.", "a[0", "a[0]", "a[0].", "a[0].b=",
    # errors
    "x", "a..b=1", "x={a,{b}}", "x=1,x.y=2", "a[x]=1", "a[-1]=1", "a=1,,b=2", ",a=1", "x={a", "a\\",
    "x[0]=1,x.y=2", "x.y=1,x[0]=2", "a[70000]=1",
]


@pytest.mark.parametrize("expression", NAMED_SET_CASES)
def test_set_parser_agrees_with_helm(expression):
    assert _our_set(expression) == _helm_set(expression)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="ab.=,[]{}\\01-xT", max_size=16))
def test_set_parser_agrees_with_helm_on_arbitrary_input(expression):
    assert _our_set(expression) == _helm_set(expression)


_names = st.sampled_from(["a", "b", "image", "tag", "x.y", "k,v", "n=1"])
_scalars = st.sampled_from(["1", "-3", "0", "07", "1.5", "true", "False", "null", "", "s p", "a,b", "{x}", "\\", "v=w"])


@st.composite
def _set_expressions(draw: Any) -> str:
    """Well-formed-looking expressions with escapes, indices and lists."""
    pairs = []
    for _ in range(draw(st.integers(1, 4))):
        parts = []
        for _ in range(draw(st.integers(1, 3))):
            name = draw(_names).replace("\\", "\\\\").replace(".", "\\.").replace(",", "\\,").replace("=", "\\=")
            if draw(st.booleans()):
                name += f"[{draw(st.integers(0, 3))}]"
            parts.append(name)
        if draw(st.booleans()):
            value = draw(_scalars).replace("\\", "\\\\").replace(",", "\\,")
        else:
            items = draw(st.lists(st.sampled_from(["1", "x", "true", "", "0.5"]), max_size=3))
            value = "{" + ",".join(items) + "}"
        pairs.append(".".join(parts) + "=" + value)
    return ",".join(pairs)


@settings(max_examples=300, deadline=None)
@given(_set_expressions())
def test_set_parser_agrees_with_helm_on_structured_input(expression):
    assert _our_set(expression) == _helm_set(expression)


@pytest.mark.parametrize("expression", NAMED_SET_CASES)
def test_set_string_parser_agrees_with_helm(expression):
    assert _our_set(expression, strings=True) == _helm_set(expression, strings=True)


@settings(max_examples=200, deadline=None)
@given(_set_expressions())
def test_set_string_parser_agrees_with_helm_on_structured_input(expression):
    assert _our_set(expression, strings=True) == _helm_set(expression, strings=True)


def test_set_string_applies_after_every_set_as_in_helm():
    values = load_values([], [SetString("a.tag=2024,a.n={1,true}"), "a.tag=7,a.m=8"], use_chart_defaults=False)
    assert values.merged["a"] == {"tag": "2024", "n": ["1", "true"], "m": 8}
    assert values.origin(["a", "tag"]) == "--set-string a.tag=2024,a.n={1,true}"


def test_set_parses_into_existing_values_like_helm_parse_into():
    # Helm applies each --set onto the merged -f files: an index edits the file's list
    values = {"ports": [80, 443, 8080], "image": {"tag": "old", "repo": "r"}}
    parse_set("ports[1]=8443,image.tag=new", into=values)
    assert values == {"ports": [80, 8443, 8080], "image": {"tag": "new", "repo": "r"}}


# ---- coalescing with chart defaults ---------------------------------------------------


def _write_chart(root: Path, defaults: dict[str, Any], sub_defaults: dict[str, Any]) -> Path:
    chart = root / "parent"
    (chart / "charts" / "sub").mkdir(parents=True, exist_ok=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: parent\nversion: 0.1.0\n"
                                      "dependencies:\n  - name: sub\n    version: 0.1.0\n")
    (chart / "values.yaml").write_text(json.dumps(defaults))  # JSON is YAML, keys stay strings
    (chart / "charts" / "sub" / "Chart.yaml").write_text("apiVersion: v2\nname: sub\nversion: 0.1.0\n")
    (chart / "charts" / "sub" / "values.yaml").write_text(json.dumps(sub_defaults))
    return chart


def _helm_merge(chart_dir: Path, user: dict[str, Any]) -> dict[str, Any]:
    chart = helm.Chart.load(chart_dir)
    try:
        return chart.merge_values(user)
    finally:
        chart.close()


DEFAULTS = {
    "a": {"b": 1, "c": {"d": 2, "e": [1, 2]}, "l": ["x", "z"], "n": None},
    "top": 5,
    "s": "str",
    "m": {},
    "z": None,
    "sub": {"x": 10, "w": {"p": 1}},
    "global": {"g": 1, "t": {"u": 1}},
}
SUB_DEFAULTS = {"x": 1, "y": 2, "w": {"p": 0, "q": 0}, "k": {"deep": {"v": 1}}, "global": {"g": 0, "h": 2}}
NAMED_COALESCE_CASES = {
    "nothing": {},
    "null deletes a default": {"a": {"b": None}},
    "null deletes a default map": {"a": {"c": None}},
    "null deletes a nested default": {"a": {"c": {"d": None}}},
    "null for an unknown key stays": {"new": None, "a": {"q": None}},
    "nulls inside a new map stay": {"new": {"x": None, "y": 1}},
    "lists replace": {"a": {"l": ["only"], "c": {"e": []}}},
    "nulls inside lists stay": {"a": {"l": [1, None, {"q": None}]}},
    "scalar over a default map": {"a": "scalar"},
    "map over a default scalar": {"top": {"x": 1}},
    "list over a default map": {"a": {"c": [1]}},
    "null over a default null": {"z": None, "a": {"n": None}},
    "value over a default null": {"z": {"k": 1}, "a": {"n": 3}},
    "null for a new key in an empty default map": {"m": {"k": None}},
    "subchart key deleted": {"sub": {"y": None, "w": {"q": None}}},
    "subchart map deleted": {"sub": {"w": None, "k": {"deep": None}}},
    "parent default for subchart deleted": {"sub": {"x": None}},
    "whole subchart values nulled": {"sub": None},
    "global override reaches the subchart": {"global": {"g": 7, "h": 8, "t": {"v": 2}}},
    "global key deleted": {"global": {"t": None}},
}


@pytest.mark.parametrize("user", list(NAMED_COALESCE_CASES.values()), ids=list(NAMED_COALESCE_CASES))
def test_coalesce_agrees_with_helm(tmp_path, user):
    chart_dir = _write_chart(tmp_path, DEFAULTS, SUB_DEFAULTS)
    assert coalesce_chart(load_chart(chart_dir), user) == _helm_merge(chart_dir, user)


def test_coalesce_examples_spelled_out():
    defaults = {"a": {"b": 1, "c": 2}, "l": [1, 2, 3]}
    assert coalesce(defaults, {"a": {"b": None}}) == {"a": {"c": 2}, "l": [1, 2, 3]}
    assert coalesce(defaults, {"l": [9]}) == {"a": {"b": 1, "c": 2}, "l": [9]}
    assert coalesce(defaults, {"new": None}) == {"a": {"b": 1, "c": 2}, "l": [1, 2, 3], "new": None}
    assert coalesce(defaults, {"a": None}) == {"l": [1, 2, 3]}


_keys = st.sampled_from(["a", "b", "c", "l", "sub", "global", "x", "y"])
_leaf = st.one_of(st.none(), st.integers(-3, 3), st.booleans(), st.sampled_from(["s", "", "t"]))
_values = st.recursive(
    _leaf,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(_keys, children, max_size=4)),
    max_leaves=12,
)
_maps = st.dictionaries(_keys, _values, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(defaults=_maps, sub_defaults=_maps, user=_maps)
def test_coalesce_agrees_with_helm_on_arbitrary_values(tmp_path_factory, defaults, sub_defaults, user):
    chart_dir = _write_chart(tmp_path_factory.mktemp("chart"), defaults, sub_defaults)
    try:
        ours: Any = coalesce_chart(load_chart(chart_dir), user)
    except ConfigError:
        ours = "error"  # a subchart's values that are no map: Helm refuses them too
    try:
        theirs: Any = _helm_merge(chart_dir, user)
    except helm.HelmError:
        theirs = "error"
    assert ours == theirs


def test_non_map_values_for_a_subchart_are_an_error(tmp_path):
    chart_dir = _write_chart(tmp_path, DEFAULTS, SUB_DEFAULTS)
    with pytest.raises(ConfigError, match="values for the 'sub' subchart must be a map"):
        coalesce_chart(load_chart(chart_dir), {"sub": [1]})
    with pytest.raises(helm.HelmError):
        _helm_merge(chart_dir, {"sub": [1]})


def test_real_umbrella_chart_agrees_with_helm(repo_root):
    chart_dir = repo_root / "charts" / "trajflow"
    if not (chart_dir / "Chart.yaml").is_file():
        pytest.skip("charts/trajflow is not in this checkout")
    user = {
        "global": {"runId": "r1", "storage": {"s3": None}},
        "downloader": {"config": {"concurrency": None}, "resources": None},
        "training": {"enabled": False},
    }
    ours = coalesce_chart(load_chart(chart_dir), user)
    theirs = _helm_merge(chart_dir, user)
    assert ours == theirs  # 10.0 == 10: Helm's JSON loses only the float type


# ---- -f files and --set together -----------------------------------------------------


def test_files_merge_in_order_before_coalescing(tmp_path):
    chart_dir = _write_chart(tmp_path, DEFAULTS, SUB_DEFAULTS)
    first = tmp_path / "first.yaml"
    second = tmp_path / "second.yaml"
    first.write_text("a:\n  b: null\n  l: [p, q]\n  c: {d: 5}\nsub:\n  x: 20\n  on: 1\ntop: 1\n")
    second.write_text("a:\n  b: 3\n  c: {e: [9]}\nsub:\n  x: null\ntop: null\n")
    values = load_values([first, second], ["a.l[1]=r,sub.w.p=4"], chart_dir=chart_dir)
    # Helm: files merged (later wins, lists whole, nulls kept), --set parsed into that,
    # then coalesced with the chart
    user = merge_maps(parse_yaml(first.read_text()), parse_yaml(second.read_text()))
    # `on:` is the key "true" for Helm's YAML reader, and for ours
    assert user == {"a": {"b": 3, "l": ["p", "q"], "c": {"d": 5, "e": [9]}}, "sub": {"x": None, "true": 1}, "top": None}
    parse_set("a.l[1]=r,sub.w.p=4", into=user)
    assert values.merged == _helm_merge(chart_dir, user)
    assert values.merged["a"] == {"b": 3, "c": {"d": 5, "e": [9]}, "l": ["p", "r"]}
    assert "top" not in values.merged and "x" not in values.merged["sub"] and values.merged["sub"]["true"] == 1
    assert values.merged["sub"]["w"] == {"p": 4, "q": 0}


def test_merge_maps_is_helms_file_merge():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1, "e": {"f": 1}}
    over = {"a": {"c": [3], "g": None}, "d": {"x": 1}, "e": 5}
    assert merge_maps(base, over) == {"a": {"b": 1, "c": [3], "g": None}, "d": {"x": 1}, "e": 5}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1, "e": {"f": 1}}  # inputs untouched


# ---- YAML scalars ---------------------------------------------------------------------

YAML_SCALARS = [
    "y", "Y", "n", "N", "yes", "No", "on", "OFF", "true", "False", "tRue", "~", "null", "NULL", "",
    "1e3", "1.5e-3", "1E+3", "0.5", ".5", "+.5", "1_000", "1_000.5", "010", "0o17", "0x1F", "0x_1F", "0b1_01",
    "-0", "+1", "2024-01-01", "2024-01-01T00:00:00Z", "12:30", "1:30:00", "'quoted'", "\"on\"", "!!str 1",
    "=", "abc", "1.2.3", "[1, y, n]", "{y: n, 1: x}", "3.0", "1.6e1", "-2.0", "1e15", "0.0",
    # prefixes without digits, upper-case prefixes, numbers beyond float64 or int64, merge outside a key
    "0x_", "0b_", "0o_", "-0x_", "0X1F", "0O17", "0B11", "1e400", "-1e400", "<<", "[<<, 1]",
    "9223372036854775807", "18446744073709551615", "18446744073709551616", "-9223372036854775809",
]


def _same_number_or_value(ours: Any, theirs: Any) -> bool:
    # a whole float is an integer for both (3.0 reaches a pod as 3, and passes `integer`)
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return ours.keys() == theirs.keys() and all(_same_number_or_value(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, list) and isinstance(theirs, list):
        return len(ours) == len(theirs) and all(_same_number_or_value(a, b) for a, b in zip(ours, theirs))
    return type(ours) is type(theirs) and ours == theirs


@pytest.mark.parametrize("scalar", YAML_SCALARS)
def test_yaml_scalars_read_as_helm_reads_them(scalar):
    doc = f"k: {scalar}\n"
    assert _same_number_or_value(parse_yaml(doc)["k"], helm.values_from_yaml(doc)["k"])


@pytest.mark.parametrize("scalar", [s for s in YAML_SCALARS if not s.startswith(("[", "{", "'", '"', "!"))])
def test_strings_written_for_the_stages_read_back_as_strings(scalar):
    # `trajflow run` hands each stage its settings in a file the stage reads as Helm would:
    # a source named "y" or a robot "0o17" must not come back as a boolean or a number
    doc = {"robot": scalar, "nested": [{"name": scalar}], scalar or "empty": 1}
    assert parse_yaml(dump_yaml(doc)) == doc


def test_yaml_keys_become_strings_as_in_helm():
    doc = "y: 1\n1: 2\n2.5: 3\nbase: &b {p: 1}\nderived:\n  <<: *b\n  q: 2\n"
    assert parse_yaml(doc) == helm.values_from_yaml(doc)
    assert set(parse_yaml(doc)) == {"true", "1", "2.5", "base", "derived"}


def test_unusable_chart_values_are_named(tmp_path):
    chart_dir = _write_chart(tmp_path, {}, {})
    (chart_dir / "charts" / "sub" / "values.yaml").write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match=r"sub/values.yaml: not valid YAML \(line 2"):
        load_chart(chart_dir)


def test_packaged_subchart_is_read(tmp_path):
    import tarfile

    chart_dir = _write_chart(tmp_path, {"sub": {"x": 5}}, {})
    packaged = tmp_path / "pkg"
    (packaged / "extra").mkdir(parents=True)
    (packaged / "extra" / "Chart.yaml").write_text("apiVersion: v2\nname: extra\nversion: 0.1.0\n")
    (packaged / "extra" / "values.yaml").write_text("level: 3\nnested: {keep: true}\n")
    with tarfile.open(chart_dir / "charts" / "extra-0.1.0.tgz", "w:gz") as tar:
        tar.add(packaged / "extra", arcname="extra")
    tree = load_chart(chart_dir)
    assert sorted(d.name for d in tree.dependencies) == ["extra", "sub"]
    merged = coalesce_chart(tree, {"extra": {"nested": {"more": 1}}})
    assert merged == _helm_merge(chart_dir, {"extra": {"nested": {"more": 1}}})
    assert merged["extra"]["level"] == 3 and merged["extra"]["nested"] == {"keep": True, "more": 1}


def test_chart_values_dataclass_defaults():
    assert ChartValues("c", {}).dependencies == []
