"""Object stores (``s3://``, ``gs://``) through fsspec: listing, ranged reads, puts, deletes.

Only this package imports fsspec (and, through it, s3fs or gcsfs, the optional extras
``ckptd[s3]`` and ``ckptd[gcs]``); the rest of ckptd sees :class:`Store`, :class:`ObjectInfo`
and :class:`StoreError` (whose ``kind`` is one of ``KINDS``).
"""

from ckptd.io.objstore.failures import KINDS, TRANSIENT, StoreError
from ckptd.io.objstore.store import (
    METHODS,
    ObjectInfo,
    Retry,
    Store,
    is_object_url,
    open_store,
)

__all__ = [
    "KINDS",
    "METHODS",
    "TRANSIENT",
    "ObjectInfo",
    "Retry",
    "Store",
    "StoreError",
    "is_object_url",
    "open_store",
]
