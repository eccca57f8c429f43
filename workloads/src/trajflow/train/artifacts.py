"""What a training run leaves for people and for inference, under `<root>/train/artifacts/`:

    metrics.json      per-epoch history, initial/best/final losses, throughput, world size
    loss_curve.png    training and validation loss per epoch
    config.yaml       the resolved {global, config} the run used (a valid `--config` file)
    model.safetensors the best model's weights, normalisation statistics included, with the
                      model's description in the safetensors metadata
    model.json        the same description, for people and tools that do not read safetensors

`load_model` rebuilds a `TrajectoryModel` from the last two, ready for `predict`.
Everything goes through the run root's atomic writer; only rank 0 calls this module.
"""
from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from trajflow.storage import Storage, open_storage
from trajflow.storage.manifest import TRAIN_ARTIFACT_DIR, TRAIN_METRICS_KEY, TRAIN_MODEL_KEY
from trajflow.train.curves import plot_losses
from trajflow.train.models import ModelSpec, TrajectoryModel

log = logging.getLogger(__name__)

ARTIFACT_DIR = TRAIN_ARTIFACT_DIR
METRICS_KEY = TRAIN_METRICS_KEY
CURVE_KEY = f"{ARTIFACT_DIR}/loss_curve.png"
CONFIG_KEY = f"{ARTIFACT_DIR}/config.yaml"
MODEL_KEY = TRAIN_MODEL_KEY
MODEL_INFO_KEY = f"{ARTIFACT_DIR}/model.json"
MODEL_METADATA = "trajflow.model"
MODEL_FORMAT = "trajflow.model"


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Inf; they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def write_metrics(storage: Storage, metrics: dict[str, Any]) -> None:
    storage.write_bytes(METRICS_KEY, (json.dumps(_finite_or_none(metrics), indent=1, sort_keys=True) + "\n").encode())


def write_config(storage: Storage, resolved: dict[str, Any]) -> None:
    storage.write_bytes(CONFIG_KEY, yaml.safe_dump(resolved, sort_keys=False).encode())


def render_loss_curve(history: list[dict[str, Any]], initial_val_loss: float | None, title: str) -> bytes:
    """PNG of training and validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    plot_losses(ax, history, initial_val_loss)
    ax.set_title(title)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.9, bottom=0.13)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_loss_curve(storage: Storage, history: list[dict[str, Any]], initial_val_loss: float | None, title: str) -> None:
    storage.write_bytes(CURVE_KEY, render_loss_curve(history, initial_val_loss, title))


def model_description(spec: ModelSpec, **extra: Any) -> dict[str, Any]:
    return {"format": MODEL_FORMAT, "version": 1, "spec": spec.to_json(), **extra}


def write_model(storage: Storage, model_state: dict[str, torch.Tensor], description: dict[str, Any]) -> None:
    """Weights (normalisation buffers included) as safetensors, description in its metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    text = json.dumps(_finite_or_none(description), sort_keys=True)
    storage.write_bytes(MODEL_KEY, save(tensors, metadata={MODEL_METADATA: text}))
    storage.write_bytes(MODEL_INFO_KEY, (json.dumps(_finite_or_none(description), indent=1, sort_keys=True) + "\n").encode())


def load_model(source: str | Path | Storage, device: str | torch.device = "cpu") -> tuple[TrajectoryModel, dict[str, Any]]:
    """The trained model of a run root (a `Storage`, URI or path), in eval mode, and its description."""
    from safetensors.torch import load

    storage = source if isinstance(source, Storage) else open_storage(str(source))
    try:
        data = storage.read_bytes(MODEL_KEY)
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.uri}/{MODEL_KEY}: no trained model in this run root") from None
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    description = json.loads(header.get("__metadata__", {}).get(MODEL_METADATA, "{}"))
    if description.get("format") != MODEL_FORMAT:
        raise ValueError(f"{storage.uri}/{MODEL_KEY}: not a trajflow model (no {MODEL_METADATA!r} metadata)")
    model = TrajectoryModel(ModelSpec.from_json(description["spec"]))
    model.load_state_dict(load(data))
    return model.to(device).eval(), description
