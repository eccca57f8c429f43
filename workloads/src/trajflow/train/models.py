"""Sequence models over an observation window: LSTM, GRU or a small Transformer encoder.

`TrajectoryModel` takes raw (unnormalised) windows `[B, window, D_in]` and returns the
prediction for the window's last step in normalised target units; the normalisation
statistics are buffers of the model, so they travel with its weights into checkpoints
and the inference artifact. `predict` gives the prediction in raw units.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from trajflow.config.train import ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network (the inference artifact stores it)."""

    type: str
    input_dim: int
    output_dim: int
    window: int
    hidden_size: int
    num_layers: int
    num_heads: int
    feedforward_size: int
    dropout: float

    @staticmethod
    def from_config(config: ModelConfig, input_dim: int, output_dim: int, window: int) -> "ModelSpec":
        return ModelSpec(
            type=config.type,
            input_dim=int(input_dim),
            output_dim=int(output_dim),
            window=int(window),
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            feedforward_size=config.feedforward_size or 4 * config.hidden_size,
            dropout=config.dropout,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(doc: dict[str, Any]) -> "ModelSpec":
        return ModelSpec(**{k: doc[k] for k in ModelSpec.__dataclass_fields__})


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], spec: ModelSpec):
        super().__init__()
        self.rnn = cell(
            spec.hidden_size,
            spec.hidden_size,
            num_layers=spec.num_layers,
            batch_first=True,
            dropout=spec.dropout if spec.num_layers > 1 else 0.0,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(h)
        return out[:, -1]


class _Encoder(nn.Module):
    """Pre-norm Transformer encoder with learned positions; reads out the last step, which
    attends to the whole window."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, spec.window, spec.hidden_size))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            spec.hidden_size,
            spec.num_heads,
            dim_feedforward=spec.feedforward_size,
            dropout=spec.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, spec.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.hidden_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        steps = h.shape[1]
        if steps > self.position.shape[1]:
            raise ValueError(f"window of {steps} steps is longer than the model's {self.position.shape[1]}")
        out = self.encoder(h + self.position[:, -steps:])
        return self.norm(out[:, -1])


class TrajectoryModel(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Linear(spec.input_dim, spec.hidden_size)
        if spec.type == "lstm":
            self.core: nn.Module = _Recurrent(nn.LSTM, spec)
        elif spec.type == "gru":
            self.core = _Recurrent(nn.GRU, spec)
        elif spec.type == "transformer":
            self.core = _Encoder(spec)
        else:
            raise ValueError(f"unknown model type {spec.type!r}; known: lstm, gru, transformer")
        self.head = nn.Linear(spec.hidden_size, spec.output_dim)
        self.register_buffer("input_mean", torch.zeros(spec.input_dim))
        self.register_buffer("input_std", torch.ones(spec.input_dim))
        self.register_buffer("target_mean", torch.zeros(spec.output_dim))
        self.register_buffer("target_std", torch.ones(spec.output_dim))

    def set_normalization(self, input_mean: np.ndarray, input_std: np.ndarray, target_mean: np.ndarray,
                          target_std: np.ndarray) -> None:
        with torch.no_grad():
            for name, value in (("input_mean", input_mean), ("input_std", input_std),
                                ("target_mean", target_mean), ("target_std", target_std)):
                buf = getattr(self, name)
                buf.copy_(torch.as_tensor(np.asarray(value), dtype=buf.dtype))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        """Raw `[B, T, D_in]` -> normalised prediction `[B, D_out]`."""
        x = (window - self.input_mean) / self.input_std
        return self.head(self.core(self.embed(x)))

    def normalize_target(self, target: torch.Tensor) -> torch.Tensor:
        return (target - self.target_mean) / self.target_std

    @torch.no_grad()
    def predict(self, window: torch.Tensor) -> torch.Tensor:
        """Raw window -> prediction in raw target units."""
        return self.forward(window).float() * self.target_std + self.target_mean


def build_model(spec: ModelSpec) -> TrajectoryModel:
    return TrajectoryModel(spec)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
