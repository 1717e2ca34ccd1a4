"""Training: the Ray-free denoiser and classifier loops (``loops``), then the Ray Train edge
(``workers``: per-worker functions, checkpoints, data shards).

May import: ``pipeline.core``, ``pipeline.data`` and ``pipeline.train``; not ``pipeline.fanout``.
"""
