from ._modes import InterpolationMode  # noqa: F401
from .._placeholder import placeholder


def __getattr__(name):
    return placeholder(__name__, name)
