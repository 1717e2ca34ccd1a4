"""Data: store URIs and filesystems (local, S3), the storage layout, WebDataset shards and manifests,
image sources, the in-memory image set, and model directories in a store.

May import: ``pipeline.core`` and ``pipeline.data``. Ray-free.
"""
