"""The near-duplicate clusters as a picture: one row per cluster (:mod:`pipeline.fanout.clusters`)."""

from __future__ import annotations

from pipeline.data.storage import Store
from pipeline.evaluation.figures import _png_bytes, _show
from pipeline.fanout.clusters import Clusters, member_images


def cluster_grid_figure(
    store: Store, dataset: str, clusters: Clusters, n: int = 10, per_row: int = 12
) -> bytes:
    """PNG: one row per cluster (the ``n`` largest), its first ``per_row`` members (by key), each
    row titled with the cluster's id and size. Reads the training shards one at a time, and stops
    once every member shown is found."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_cluster: dict[str, list[str]] = {}
    for key, cid in sorted(clusters.label_of.items()):
        by_cluster.setdefault(cid, []).append(key)
    top = clusters.largest(n)
    shown = {cid: by_cluster[cid][:per_row] for cid, _ in top}
    images = member_images(store, dataset, {k for keys in shown.values() for k in keys})
    fig, axes = plt.subplots(
        max(1, len(top)), per_row, figsize=(per_row * 0.7, max(1, len(top)) * 0.95), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, (cid, size) in enumerate(top):
        for c, key in enumerate(shown[cid]):
            _show(axes[r, c], images[key])
            axes[r, c].axis("on")
        axes[r, 0].set_title(f"{size} images: {cid}", fontsize=7, loc="left")
    what = f"{len(top)} largest" if top else "no"
    fig.suptitle(
        f"{dataset}: {what} near-duplicate clusters (cosine >= {clusters.threshold:g}, "
        f"{clusters.embedding})",
        fontsize=9,
    )
    data = _png_bytes(fig)
    plt.close(fig)
    return data
