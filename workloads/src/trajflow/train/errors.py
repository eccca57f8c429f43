"""Training failures with their exit codes (the chart's podFailurePolicy contract)."""
from __future__ import annotations

from trajflow.errors import ExitCode, TrajflowError


class TrainingDiverged(TrajflowError):
    """The loss or the gradient norm became NaN/Inf: retrying the same run cannot help."""

    exit_code = ExitCode.DIVERGED
