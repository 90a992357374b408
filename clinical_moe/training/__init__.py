"""Training: the loop (engine), losses, checkpoints, resumable sampling, DDP helpers, routing stats.

``pipelines/train.py`` composes these with the MLflow logger; nothing in this package imports MLflow.
"""

from clinical_moe.training.losses import infer_task, task_loss
from clinical_moe.training.sampling import modality_dropout

__all__ = ["infer_task", "modality_dropout", "task_loss"]
