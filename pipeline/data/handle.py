"""A dataset opened once: its store, its folder and its manifest, passed down to every reader.

A job that reads ``data/<dataset>`` opens it with :func:`open_dataset` (one read of
``manifest.json``) and hands the :class:`DatasetHandle` to the stages and readers below it, which
take the split folders, the shard entries, the counts and the digest from it instead of fetching the
manifest again (DESIGN.md section 8: "a job opens its dataset once"). A handle pickles to Ray tasks
whole; its manifest is one entry per shard (about 150 bytes each), not one per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.data.imageset import DataError
from pipeline.data.layout import data_folder
from pipeline.data.shards import MANIFEST, read_manifest
from pipeline.data.storage import Store


@dataclass(frozen=True, eq=False)
class DatasetHandle:
    """``data/<dataset>`` of ``store`` (``folder``) and its manifest as read when it was opened
    (None: shards put there by hand, read unchecked)."""

    store: Store
    dataset: str
    folder: str
    manifest: dict[str, Any] | None

    def split(self, name: str) -> str:
        """The folder of split ``name``: ``data/<dataset>/<name>``."""
        return data_folder(self.dataset, name)

    def shards(self, split: str) -> dict[str, dict[str, Any]] | None:
        """The manifest's shard entries ``{name: {name, count, bytes, sha256}}`` of ``split``; None
        without a manifest. A split the manifest lacks is a :class:`DataError` naming the ones it has."""
        if self.manifest is None:
            return None
        entry = self.manifest["splits"].get(split)
        if entry is None:
            raise DataError(
                f"{self.store.uri_of(self.split(split))}: the dataset's manifest has no split "
                f"{split!r} (it lists {sorted(self.manifest['splits'])})"
            )
        return {sh["name"]: sh for sh in entry["shards"]}

    def count(self, split: str) -> int | None:
        """The number of rows of ``split`` the manifest records; None without a manifest."""
        entries = self.shards(split)
        return None if entries is None else sum(int(sh["count"]) for sh in entries.values())

    @property
    def digest(self) -> str | None:
        """The manifest's digest (:func:`pipeline.data.provenance.manifest_digest`): every shard's
        sha256; None without a manifest."""
        from pipeline.data.provenance import manifest_digest

        return manifest_digest(self.manifest)

    @property
    def latent(self) -> dict[str, Any] | None:
        """The manifest's ``latent`` section (a dataset of VAE latents), else None."""
        latent = (self.manifest or {}).get("latent")
        return latent if isinstance(latent, dict) else None


def open_dataset(store: Store, dataset: str, required: bool = False) -> DatasetHandle:
    """Open ``data/<dataset>``: one read of its ``manifest.json``. A corrupt manifest raises
    :class:`DataError` naming it; a missing one gives a handle without a manifest (its shards are read
    unchecked, as for shards put there by hand), or with ``required`` a :class:`DataError` that says
    how to make one."""
    if not dataset or "/" in dataset:
        raise DataError(f"a dataset name is one path segment, got {dataset!r}")
    folder = data_folder(dataset)
    manifest = read_manifest(store, folder)
    if manifest is None and required:
        raise DataError(
            f"no manifest at {store.uri_of(folder, MANIFEST)}: write the dataset with "
            f"jobs/make_shards.py --dataset {dataset}"
        )
    return DatasetHandle(store, dataset, folder, manifest)


def as_handle(store: Store, dataset: str | DatasetHandle) -> DatasetHandle:
    """``dataset`` when it is a handle already (of this store), else :func:`open_dataset`: the stages
    take either, so a caller that opened the dataset passes it down and nothing reads it again."""
    if isinstance(dataset, DatasetHandle):
        if dataset.store.uri != store.uri:
            raise DataError(
                f"dataset {dataset.dataset!r} was opened in {dataset.store.uri}, not {store.uri}"
            )
        return dataset
    return open_dataset(store, dataset)
