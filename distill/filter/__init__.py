"""filter-labels: ``rules`` (label-noise rules on top-K scores, pure numpy), ``stage``
(``filter_labels(cfg)``), ``report`` (report.md and its figures). Names are handed on lazily."""
from .. import lazy_names

__all__ = ["FilterResult", "filter_labels"]
__getattr__ = lazy_names(__name__, {"FilterResult": "stage", "filter_labels": "stage"})
