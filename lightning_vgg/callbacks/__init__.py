"""Lightning callbacks: thin "when and where"; the computing lives in explain/ and report/.

Configs name them as ``lightning_vgg.callbacks.<Class>``.
"""

from lightning_vgg.callbacks.figures import (
    FeatureMapCallback,
    GradCAMCallback,
    MisclassificationGallery,
)
from lightning_vgg.callbacks.guard import FiniteLossGuard
from lightning_vgg.callbacks.predictions import PredictionCSV
from lightning_vgg.callbacks.ranks import device_name, gather_to_all, local_log_dir, run_dir_of
from lightning_vgg.callbacks.run import (
    EpochProgress,
    RunArtifacts,
    StopWhenDataRunsOut,
)

__all__ = [
    "EpochProgress",
    "FeatureMapCallback",
    "FiniteLossGuard",
    "GradCAMCallback",
    "MisclassificationGallery",
    "PredictionCSV",
    "RunArtifacts",
    "StopWhenDataRunsOut",
    "device_name",
    "gather_to_all",
    "local_log_dir",
    "run_dir_of",
]
