"""raykd: semi-supervised knowledge distillation with Ray Train (DDP) and Ray Tune + Optuna."""

__version__ = "0.1.0"
