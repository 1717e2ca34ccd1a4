"""Data: store URIs and filesystems (local, S3), the storage layout, WebDataset shards and manifests,
a dataset opened once (``handle``), image sources (streamed, listed in pages with completion records:
``chunks``; and in memory), bounded subsets of a split, the in-memory image set, and model directories
in a store.

May import: ``pipeline.core`` and ``pipeline.data``. Ray-free at import time; only the streamed
sources' parallel writer (:func:`pipeline.data.sources.write_sharded`, through
:func:`pipeline.data.chunks.run_tasks`) starts Ray tasks, sized by :mod:`pipeline.data.parallel`.
"""
