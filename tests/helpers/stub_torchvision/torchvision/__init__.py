"""Stub torchvision for tests (see ../README.md): only what timm imports at module level."""
__version__ = "0.0.0+stub"
STUB = True

from . import datasets, io, models, ops, transforms, utils  # noqa: E402,F401
