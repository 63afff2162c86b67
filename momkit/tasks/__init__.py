"""Tasks: MQAR and other synthetic recall tasks, plain-text byte-level LM, and metrics on supervised positions.

    from momkit.tasks import MQARConfig, MQARSegment, task_from_dict
    data = MQARConfig(vocab_size=256, train=[MQARSegment(2000, 64, 4)], valid=[MQARSegment(200, 64, 4)]).build()
    for inputs, labels, segment in data.batches("train", 64, shuffle=True, seed=0, epoch=0):
        loss = masked_cross_entropy(model(inputs), labels)

Every task's data is ``(inputs, labels)`` int64 ``[N, T]``, ``labels = -100`` where unsupervised and otherwise
the token to emit at that position. See docs/tasks.md.
"""

from __future__ import annotations

from momkit.tasks.base import IGNORE_INDEX, Batch, Segment, TaskData, sample_distinct, split_seeds
from momkit.tasks.metrics import SupervisedMetrics, masked_accuracy, masked_cross_entropy, perplexity
from momkit.tasks.mqar import MQARConfig, MQARSegment, make_mqar
from momkit.tasks.needle import NeedleConfig, make_needle
from momkit.tasks.registry import TASKS, TaskConfig, build_task, task_from_dict, task_names, task_to_dict
from momkit.tasks.selective_copying import SelectiveCopyingConfig, make_selective_copying
from momkit.tasks.text import ByteTokenizer, TextLMConfig, find_files, lm_blocks

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "Batch",
    "ByteTokenizer",
    "MQARConfig",
    "MQARSegment",
    "NeedleConfig",
    "Segment",
    "SelectiveCopyingConfig",
    "SupervisedMetrics",
    "TaskConfig",
    "TaskData",
    "TextLMConfig",
    "build_task",
    "find_files",
    "lm_blocks",
    "make_mqar",
    "make_needle",
    "make_selective_copying",
    "masked_accuracy",
    "masked_cross_entropy",
    "perplexity",
    "sample_distinct",
    "split_seeds",
    "task_from_dict",
    "task_names",
    "task_to_dict",
]
