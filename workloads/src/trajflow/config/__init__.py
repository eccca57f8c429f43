"""Typed configuration: one model per values block, loaded with Helm's merge rules."""
from trajflow.config.download import DownloadConfig
from trajflow.config.global_ import GlobalConfig
from trajflow.config.loader import (
    STAGE_MODELS,
    StageSettings,
    Values,
    add_config_arguments,
    global_settings,
    load_config_file,
    load_values,
    shard_from_env,
    stage_settings,
    validate_global,
    validate_stage,
)
from trajflow.config.preprocess import PreprocessConfig
from trajflow.config.train import TrainConfig

__all__ = [
    "STAGE_MODELS",
    "DownloadConfig",
    "GlobalConfig",
    "PreprocessConfig",
    "StageSettings",
    "TrainConfig",
    "Values",
    "add_config_arguments",
    "global_settings",
    "load_config_file",
    "load_values",
    "shard_from_env",
    "stage_settings",
    "validate_global",
    "validate_stage",
]
