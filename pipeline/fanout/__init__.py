"""Fan-out: connecting to Ray (``ray_init``), the FAISS replica index (``index``, Ray-free), and the
Ray Data actor pools that sample (``sampling``) and score samples against the index (``scoring``).

May import: ``pipeline.core``, ``pipeline.data`` and ``pipeline.fanout``; not ``pipeline.train``.
"""
