"""trajflow: a GPU data-and-training pipeline for trajectories, on Kubernetes or one machine."""

__version__ = "0.1.0"
