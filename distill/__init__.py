"""distill: offline knowledge distillation (TinyViT fast pretraining distillation as a product).

Notebook entry points (each reads one output directory; nothing runs a teacher)::

    import distill
    cache = distill.open_cache("out/demo/cache")      # teacher cache: tables, records, replayed views
    flt = distill.open_filter("out/demo/filter")      # filter-labels scores and flags
    run = distill.open_run("out/demo/student")        # train-student metrics and summary

``import distill`` is light: the readers (pyarrow) load on first use, torch only when a view is
replayed, matplotlib (``pip install 'distill[viz]'``) only when a figure is drawn.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["open_cache", "open_filter", "open_run", "Cache", "FilterOutput", "Run", "UserError", "__version__"]

# name -> module that defines it; imported on first access (PEP 562) so `import distill` stays cheap
_LAZY = {"open_cache": "reader", "Cache": "reader", "open_filter": "notebook", "FilterOutput": "notebook",
         "open_run": "notebook", "Run": "notebook", "UserError": "format"}


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'distill' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
