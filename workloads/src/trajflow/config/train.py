"""`training.config` — task, model, optimisation, checkpoints."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trajflow.config.base import Model


class ModelConfig(Model):
    type: Literal["lstm", "gru", "transformer"] = Field("gru", description="Sequence model over the observation window.")
    hidden_size: int = Field(128, ge=1, description="Width of the recurrent state / transformer embedding.")
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1, description="Transformer only; must divide hiddenSize.")
    feedforward_size: int = Field(0, ge=0, description="Transformer only: feed-forward width (0: 4 x hiddenSize).")
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.type == "transformer" and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hiddenSize ({self.hidden_size}) must be a multiple of model.numHeads ({self.num_heads}) "
                "for the transformer"
            )
        return self


class EarlyStopping(Model):
    enabled: bool = True
    patience: int = Field(5, ge=1, description="Epochs without a validation-loss improvement before stopping.")
    min_delta: float = Field(0.0, ge=0, description="Smallest decrease of the validation loss that counts as one.")


class Checkpoints(Model):
    every_steps: int = Field(0, ge=0, description="Also checkpoint every N optimiser steps (0: once per epoch).")
    keep_last: int = Field(3, ge=1, description="Newest checkpoints kept; the best one is always kept as well.")


class TrainConfig(Model):
    task: Literal["forecast", "behavior_cloning"] = Field(
        "behavior_cloning",
        description="forecast: predict the next observation; behavior_cloning: predict the action at the last step.",
    )
    observation: str = Field("observation.state", min_length=1, description="Input stream.")
    action: str = Field("action", min_length=1, description="Target stream for behaviour cloning.")
    window: int = Field(32, ge=2, description="Time steps of history per sample.")
    stride: int = Field(1, ge=1, description="Steps between the starts of consecutive windows of an episode.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    epochs: int = Field(20, ge=1)
    max_steps_per_epoch: int = Field(0, ge=0, description="Cap optimiser steps per epoch (0: the whole training split).")
    batch_size: int = Field(64, ge=1, description="Per process.")
    learning_rate: float = Field(1e-3, gt=0)
    scale_lr_with_world_size: bool = Field(False, description="Multiply learningRate by the number of processes.")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="Decay after warm-up, over all epochs.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up from 0.")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 disables clipping.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of episodes held out for validation.")
    max_val_windows: int = Field(
        0, ge=0, description="Validate on a seeded sample of at most this many windows, the same at every pass, "
                             "instead of every validation window each epoch (0: all)."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="Seed of the validation split, the initial weights and the shuffling.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: the GPU of LOCAL_RANK when CUDA is available.")
    bf16: bool = Field(True, description="bf16 autocast on GPUs that compute in bf16 (Ampere and later); float32 on "
                                         "others, which only emulate it.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank.")
    log_every_steps: int = Field(50, ge=1, description="Progress log and samples/s update interval.")
    cache_dir: str = Field(
        "", description="Local directory for shards fetched from S3 (memory-mapped from there); empty: $TMPDIR."
    )
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    checkpoints: Checkpoints = Field(default_factory=Checkpoints)
    metrics_port: int = Field(
        9400, ge=0, le=65535, description="/metrics port of local rank 0; local rank i serves port + i (0: off)."
    )

    @model_validator(mode="after")
    def _streams_differ(self) -> "TrainConfig":
        if self.task == "behavior_cloning" and self.observation == self.action:
            raise ValueError(f"observation and action are both {self.action!r}; behaviour cloning needs two streams")
        return self
