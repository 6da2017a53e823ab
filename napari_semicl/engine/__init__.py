"""The engine: config, the training loop, inference, checkpoints, metrics, device choice.

No Qt and no napari are imported anywhere in this package.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DataConfig, MeanTeacherConfig, ModelConfig, OptimConfig, TrainConfig, recommended_config
from .device import describe_device, pick_device
from .events import (
    Analysed,
    Checkpointed,
    DataUpdated,
    Evaluated,
    Finished,
    Notice,
    Preview,
    Reviewed,
    ReviewSlice,
    Started,
    StepDone,
    Stop,
    UpdateData,
)
from .inference import Prediction, predict_volume
from .metrics import evaluate_segmentation
from .trainer import Trainer, load_predictor, run_sync

__all__ = [
    "Analysed", "Checkpointed", "DataConfig", "DataUpdated", "Evaluated", "Finished", "MeanTeacherConfig",
    "ModelConfig", "Notice", "OptimConfig", "Prediction", "Preview", "ReviewSlice", "Reviewed", "Started", "StepDone",
    "Stop", "TrainConfig", "Trainer", "UpdateData", "describe_device", "evaluate_segmentation", "recommended_config",
    "load_checkpoint", "load_predictor", "pick_device", "predict_volume", "run_sync",
    "save_checkpoint",
]
