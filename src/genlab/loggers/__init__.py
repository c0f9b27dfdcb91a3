"""Experiment loggers and logger-agnostic media logging."""

from genlab.loggers.clearml import ClearMLLogger
from genlab.loggers.media import log_image, log_mesh

__all__ = ["ClearMLLogger", "log_image", "log_mesh"]
