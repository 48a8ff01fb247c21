"""timm for tests on CPU-only machines (README, Development: timm in the tests): ``import_timm()`` returns timm or skips.

PyPI's torchvision wheels are CUDA builds that do not load with the CPU torch, and timm imports a
few torchvision names at module level. When the real torchvision is missing or broken, the stub
package under ``stub_torchvision/`` goes first on ``sys.path`` (for the rest of the test session);
a working torchvision is left alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

STUB = str(Path(__file__).resolve().parent / "stub_torchvision")


def _torchvision_works() -> bool:
    try:
        import torchvision.ops.misc  # noqa: F401
        import torchvision.transforms  # noqa: F401
        return True
    except Exception:        # missing, or a CUDA wheel failing to load its ops with the CPU torch
        return False


def import_timm():
    if not _torchvision_works():
        for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[name]            # a half-imported real torchvision, or timm that failed on it
        if STUB not in sys.path:
            sys.path.insert(0, STUB)
    return pytest.importorskip("timm")
