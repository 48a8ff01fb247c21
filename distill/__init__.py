"""distill: offline knowledge distillation (TinyViT fast pretraining distillation as a product).

Notebook entry points (each reads one output directory; nothing runs a teacher)::

    import distill
    cache = distill.open_cache("out/demo/cache")      # teacher cache: tables, records, replayed views
    flt = distill.open_filter("out/demo/filter")      # filter-labels scores and flags
    run = distill.open_run("out/demo/student")        # train-student metrics and summary
    distill.student_models()                          # the registered students: params, GFLOPs, source

Your own training loop (see ``examples/own_loop.py``)::

    ds = distill.DistillDataset("shards/demo/train", "out/demo/cache", image_size=32, batch_size=64)
    loader = distill.DistillLoader(ds, num_workers=2)      # state_dict()/load_state_dict(): resume anywhere
    loss_fn = distill.SoftTargetLoss(ds.num_classes, temperature=ds.temperature)
    for batch in loader:                                   # ds.set_epoch(e) before each epoch
        loss = loss_fn(model(batch["image"]), batch)

``import distill`` is light: the readers (pyarrow) load on first use, torch only when a view is
replayed, matplotlib (``pip install 'distill[viz]'``) only when a figure is drawn.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["open_cache", "open_filter", "open_run", "student_models", "Cache", "FilterOutput", "Run", "UserError",
           "DistillDataset", "DistillLoader", "SoftTargetLoss", "dense_targets", "finish", "__version__"]

# name -> module that defines it; imported on first access (PEP 562) so `import distill` stays cheap
_LAZY = {"open_cache": "cache.reader", "Cache": "cache.reader", "open_filter": "notebook", "FilterOutput": "notebook",
         "open_run": "notebook", "Run": "notebook", "student_models": "notebook", "UserError": "files",
         "DistillDataset": "train.data", "DistillLoader": "train.data", "finish": "train.data",
         "SoftTargetLoss": "train.losses", "dense_targets": "train.losses"}


def lazy_names(package: str, where: dict[str, str]):
    """A module ``__getattr__`` that imports ``package.<where[name]>`` on first access of ``name``
    (the sub-packages hand on their names this way, so importing one part never loads the rest)."""
    def __getattr__(name: str):
        mod = where.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        import importlib
        return getattr(importlib.import_module(f"{package}.{mod}"), name)
    return __getattr__


__getattr__ = lazy_names(__name__, _LAZY)


def __dir__():
    return sorted(set(globals()) | set(__all__))
