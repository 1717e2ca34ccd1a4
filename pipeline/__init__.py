"""cpsample-ray: CPSample (Kazdan et al., arXiv 2409.07025) as a Ray pipeline, in layers.

    orchestration   stages, the demo, cluster configs: the only layer that wires the others together
    evaluation      FID / FD, membership inference, the sweep, report.json/md and figures
    train | fanout  Ray Train worker loops | Ray Data sampling and scoring pools, the FAISS index
    data            store URIs and filesystems, shards and manifests, sources, model directories
    core            schedule, DDIM, guidance, sampler, labels, models, configs: Ray-free, I/O-free

A module imports only its own subpackage and the layers below it (``train`` and ``fanout`` are peers
and import neither each other); ``tests/test_layout.py`` enforces it. Nothing here imports ``jobs/``.
"""
