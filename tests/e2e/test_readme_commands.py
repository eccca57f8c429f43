"""The README's commands are the ones the tests and CI run, and every command it shows
still parses: `make` targets exist, `trajflow` command lines are accepted by the CLI,
files and links point at something, values files and `--set` keys are real."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from trajflow.cli import build_parser
from trajflow.config import load_values
from trajflow.local.pipeline import build_plan

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def code_blocks(text: str, languages: tuple[str, ...] = ("bash", "console", "sh")) -> list[str]:
    """Fenced blocks of the given languages, in order."""
    blocks, current, language = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language in languages:
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    assert current is None, "unclosed code fence"
    return blocks


def command_lines(text: str) -> list[list[str]]:
    """Shell command lines of the README's code blocks: continuations joined, comments and
    trailing `&` dropped, split like a shell would."""
    out = []
    for block in code_blocks(text):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            argv = shlex.split(line, comments=True)
            if argv and argv[-1] == "&":
                argv = argv[:-1]
            if argv:
                out.append(argv)
    return out


def makefile_recipe(target: str) -> list[str]:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{target}\s*:", line))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_quick_start_is_make_demo_and_make_test_and_ci_runs_the_same() -> None:
    quick = README.split("## Quick start", 1)[1]
    first_block = code_blocks(quick)[0]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make demo", "make test"]
    for target in ("demo", "test"):
        assert makefile_recipe(target), f"Makefile has no {target} target"
    assert "make test" in (REPO / ".ci" / "run").read_text().splitlines()[-1]
    workflow = (REPO / ".github" / "workflows" / "test.yaml").read_text()
    assert re.search(r"run:\s*(make test|\.ci/run)\b", workflow)


def test_the_readme_shows_what_make_demo_runs() -> None:
    """The two commands the README lists under `make demo` are the Makefile's recipe, which
    tests/e2e/test_pipeline.py runs (on a tiny dataset)."""
    recipe = [line.replace("$(VENV)", ".venv") for line in makefile_recipe("demo")]
    quick = README.split("## Quick start", 1)[1]
    shown = [line.strip() for line in code_blocks(quick)[1].strip().splitlines()]
    assert shown == recipe


def test_every_trajflow_command_line_parses() -> None:
    parser = build_parser()
    lines = [argv for argv in command_lines(README) if re.fullmatch(r"(\.venv/bin/)?trajflow", argv[0])]
    assert len(lines) >= 5
    for argv in lines:
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"README command does not parse: {shlex.join(argv)}")
        for path in getattr(args, "values", []) or []:
            assert (REPO / path).is_file(), f"{shlex.join(argv)}: no {path}"
        if args.command == "run":  # the values it names are valid together
            build_plan([REPO / f for f in args.values], args.set)


def test_helm_commands_name_real_charts_values_and_keys() -> None:
    lines = [argv for argv in command_lines(README) if argv[0] == "helm"]
    assert {argv[1] for argv in lines} >= {"install", "upgrade"}
    for argv in lines:
        assert argv[3] == "charts/trajflow" and (REPO / argv[3] / "Chart.yaml").is_file()
        files = [argv[i + 1] for i, a in enumerate(argv) if a == "-f"]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        assert files, shlex.join(argv)
        # unknown top-level keys are rejected by load_values; the stage keys must exist in the chart
        values = load_values([REPO / f for f in files], sets)
        for expression in sets:
            key = expression.split("=", 1)[0]
            node = values.merged
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{shlex.join(argv)}: no value {key}"
                node = node[part]


def test_links_and_paths_exist() -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (REPO / target).exists(), f"README links to a missing {target}"
    for path in re.findall(r"`((?:values|argocd|images|charts)/[^`\s]*?\.(?:yaml|hcl|json))`", README):
        if "<" not in path:
            assert (REPO / path).is_file(), f"README names a missing {path}"
