"""`training.config` — task, model, optimisation, checkpoints."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from trajflow.config.base import Model


class ModelConfig(Model):
    type: Literal["lstm", "gru", "transformer"] = "gru"
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1, description="Transformer only.")
    dropout: float = Field(0.0, ge=0, lt=1)


class EarlyStopping(Model):
    enabled: bool = True
    patience: int = Field(5, ge=1, description="Epochs without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0)


class Checkpoints(Model):
    every_steps: int = Field(0, ge=0, description="Also checkpoint every N steps (0: once per epoch).")
    keep_last: int = Field(3, ge=1)


class TrainConfig(Model):
    task: Literal["forecast", "behavior_cloning"] = "behavior_cloning"
    observation: str = Field("observation.state", description="Input stream.")
    action: str = Field("action", description="Target stream for behaviour cloning.")
    window: int = Field(32, ge=2, description="Time steps of history per sample.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1, description="Per process.")
    learning_rate: float = Field(1e-3, gt=0)
    scale_lr_with_world_size: bool = False
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 disables clipping.")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = 0
    bf16: bool = Field(True, description="bf16 autocast on GPU.")
    num_workers: int = Field(0, ge=0)
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    checkpoints: Checkpoints = Field(default_factory=Checkpoints)
    metrics_port: int = Field(9400, ge=0, le=65535, description="/metrics port on each rank (0: off).")
