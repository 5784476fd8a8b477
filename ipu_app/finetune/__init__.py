"""``python -m ipu_app finetune``: fine-tuning a pre-trained (sparse) BERT on a GLUE-style task.

``source`` finds the model (a run, a checkpoint, an export or any Hugging Face BERT folder),
``tuner`` trains it with checkpoints and bit-exact ``--resume``, ``metrics`` holds the task metrics
and ``outputs`` writes what a finished fine-tune leaves.
"""

from .metrics import classification_metrics, regression_metrics
from .tuner import Finetuner, Request

__all__ = ["Finetuner", "Request", "classification_metrics", "regression_metrics"]
