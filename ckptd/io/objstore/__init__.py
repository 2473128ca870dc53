"""Object stores (``s3://``, ``gs://``) through fsspec: listing, ranged reads, puts, deletes.

Only this package imports fsspec (and, through it, s3fs or gcsfs, the optional extras
``ckptd[s3]`` and ``ckptd[gcs]``); the rest of ckptd sees :class:`Store` and :class:`ObjectInfo`.
"""

from ckptd.io.objstore.store import ObjectInfo, Store, StoreError, is_object_url, open_store

__all__ = ["ObjectInfo", "Store", "StoreError", "is_object_url", "open_store"]
