"""``adapt_teacher(cfg)``: fit a pretrained ViT teacher to the shards' classes (see ``stage.py``)."""
from .stage import AdaptResult, adapt_teacher

__all__ = ["AdaptResult", "adapt_teacher"]
