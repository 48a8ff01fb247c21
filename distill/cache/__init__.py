"""The teacher cache: ``writer`` (the Ray worker that turns a shard into its Arrow file), ``stage``
(``cache_teacher(cfg)``, the driver), ``reader`` (``open_cache``), ``verify`` (``verify_cache``), ``convert`` (``convert_cache``: an older format version -> the current).

Names are handed on lazily, so ``import distill.cache.reader`` loads neither torch nor Ray."""
from .. import lazy_names

__all__ = ["Cache", "CacheResult", "VerifyResult", "cache_teacher", "convert_cache", "open_cache", "verify_cache"]
__getattr__ = lazy_names(__name__, {"Cache": "reader", "open_cache": "reader", "CacheResult": "stage",
                                    "cache_teacher": "stage", "VerifyResult": "verify", "verify_cache": "verify",
                                    "convert_cache": "convert"})
