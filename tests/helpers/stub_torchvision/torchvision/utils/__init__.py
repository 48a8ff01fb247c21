"""Placeholder module: its names exist and refuse to be used."""
from .._placeholder import placeholder


def __getattr__(name):
    return placeholder(__name__, name)
