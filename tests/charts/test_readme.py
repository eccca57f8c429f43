"""Each chart README's parameter tables are what readme-generator-for-helm makes of the
`## @param` comments in its values.yaml."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from helmrender import CHART, ROOT, STAGE_CHARTS, SUBCHARTS

GENERATOR = ROOT / "ci" / ".tools" / "node_modules" / ".bin" / "readme-generator"
CHARTS = [CHART, *(SUBCHARTS / s for s in (*STAGE_CHARTS, "monitoring"))]

pytestmark = pytest.mark.skipif(
    not GENERATOR.exists() or shutil.which("node") is None,
    reason="@bitnami/readme-generator-for-helm is not installed (bash ci/scripts/install-test-tools.sh)",
)


@pytest.mark.parametrize("chart", CHARTS, ids=lambda p: p.name)
def test_readme_parameters_are_up_to_date(chart, tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(chart / "README.md", readme)
    proc = subprocess.run([str(GENERATOR), "--values", str(chart / "values.yaml"), "--readme", str(readme)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{chart.name}/values.yaml metadata: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    assert readme.read_text() == (chart / "README.md").read_text(), (
        f"{chart.relative_to(ROOT)}/README.md is stale: run "
        f"ci/.tools/node_modules/.bin/readme-generator --values {chart.relative_to(ROOT)}/values.yaml "
        f"--readme {chart.relative_to(ROOT)}/README.md")
