"""Training: the Ray-free denoiser and classifier loops (``loops``), the streamed input (``ingest``:
the Ray Data read-and-decode dataset, and the per-worker epoch batching of a cached or streamed
share), then the Ray Train edge (``workers``: per-worker functions, checkpoints, data shards).

May import: ``pipeline.core``, ``pipeline.data`` and ``pipeline.train``; not ``pipeline.fanout``.
"""
