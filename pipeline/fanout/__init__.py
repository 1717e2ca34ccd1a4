"""Fan-out: connecting to Ray (``ray_init``), the FAISS replica index (``index``, Ray-free), the
stored replica index built once by Ray tasks (``replica_index``) and loaded by every actor
(``replica_store``), and the Ray Data actor pools that sample (``sampling``) and score samples
against it (``scoring``).

May import: ``pipeline.core``, ``pipeline.data`` and ``pipeline.fanout``; not ``pipeline.train``.
"""
