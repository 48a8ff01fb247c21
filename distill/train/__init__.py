"""Student training from a teacher cache: ``train_student(cfg) -> TrainResult``.

``data`` streams shards and replays cached views with sparse targets; ``loop`` is the training loop
(AdamW, cosine schedule, checkpoints, validation, DDP); ``checkpoint`` owns the run directory.
Nothing here imports ``distill.teachers``: the student never runs the teacher.
"""
from .loop import TrainResult, lr_at, train_student
from .prepare import prepare_data

__all__ = ["TrainResult", "lr_at", "prepare_data", "train_student"]
