"""Fan-out: connecting to Ray (``ray_init``), the FAISS replica index (``index``, Ray-free), the
stored replica index built in parts by Ray tasks (``replica_index``, ``index_build``; a part's FAISS
maths in ``index_parts``, its files read by byte ranges in ``index_files``) and opened by every actor
(``replica_store``), and the Ray Data actor pools that sample (``sampling``), score samples against it
shard by shard (``scoring_stream``, folded by ``replica_summary``) and embed images for the Fréchet
distance (``features``).

May import: ``pipeline.core``, ``pipeline.data`` and ``pipeline.fanout``; not ``pipeline.train``.
"""
