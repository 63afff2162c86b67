"""Training: ``train(cfg) -> RunResult``, evaluation, checkpoints, optimizer and schedule."""

from momkit.train.loop import NonFiniteError, RunResult, TrainingInterrupted, evaluate, load_run, train
from momkit.train.optim import make_optimizer, param_groups

__all__ = ["NonFiniteError", "RunResult", "TrainingInterrupted", "evaluate", "load_run", "make_optimizer",
           "param_groups", "train"]
