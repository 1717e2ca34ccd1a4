"""The WebDataset tar format (pipeline/data/tars.py): reading one shard's members, and the clear
DataError of every way a shard can be malformed."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.tars import build_tar, encode_png, read_records, read_tar


def random_set(n=20, size=8, channels=1, seed=0, labels=True) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(
        keys=[f"img-{i:03d}" for i in range(n)],
        images=rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
        labels=[int(v) for v in rng.integers(0, 10, n)] if labels else None,
    )


def records(images: ImageSet):
    return [
        (k, encode_png(im), {"label": lab})
        for k, im, lab in zip(images.keys, images.images, images.labels)
    ]


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_read_tar_truncated_mid_member():
    data = build_tar(records(random_set(4)))
    with pytest.raises(DataError, match=r"corrupt or truncated tar shard-x\.tar"):
        read_tar(data[:1536], "shard-x.tar")  # inside the first image's data
    with pytest.raises(DataError, match=r"corrupt or truncated tar shard-x\.tar"):
        read_tar(data[:100], "shard-x.tar")  # inside the first header


def test_read_tar_truncated_at_member_boundary():
    data = build_tar(records(random_set(4)))
    with pytest.raises(DataError, match="truncated"):
        read_tar(data[:4096], "shard-x.tar")  # two complete samples, then nothing


def test_read_tar_member_not_an_image():
    png = encode_png(np.zeros((4, 4, 1), np.uint8))
    data = tar_of({"a.png": png, "b.png": b"this is not a png", "b.json": b"{}"})
    with pytest.raises(DataError, match=r"bad.tar: member b\.png is not a readable image"):
        read_tar(data, "bad.tar")


def test_read_tar_sample_without_image():
    data = tar_of(
        {"a.png": encode_png(np.zeros((4, 4, 1), np.uint8)), "b.json": b"{}", "b.txt": b"x"}
    )
    with pytest.raises(
        DataError, match=r"sample 'b' has no image member \(found \['json', 'txt'\]\)"
    ):
        read_tar(data, "t.tar")


def test_read_records_reads_keys_and_records_without_decoding_and_refuses_damage():
    """The records a resumed sampling run checks: as read_tar's, but no image is decoded (a member
    that is not an image is not noticed); damage raises as in read_tar."""
    data = build_tar(records(random_set(4)))
    keys, metas = read_records(data, "s.tar")
    assert keys == read_tar(data, "s.tar").keys and metas == read_tar(data, "s.tar").meta
    undecodable = tar_of({"a.png": b"not a png", "a.json": b'{"x": 1}'})
    assert read_records(undecodable, "u.tar") == (["a"], [{"x": 1}])
    for cut in (100, 1536, 4096):
        with pytest.raises(DataError, match="truncated"):
            read_records(data[:cut], "s.tar")
    with pytest.raises(DataError, match=r"sample 'b' has no image member \(found \['json'\]\)"):
        read_records(tar_of({"a.png": b"x", "b.json": b"{}"}), "t.tar")


def test_read_tar_mixed_sizes():
    data = tar_of(
        {
            "a.png": encode_png(np.zeros((4, 4, 1), np.uint8)),
            "b.png": encode_png(np.zeros((8, 8, 1), np.uint8)),
        }
    )
    with pytest.raises(DataError, match="mixed image sizes"):
        read_tar(data, "m.tar")


def test_read_tar_subfolders_and_jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(buf, format="JPEG")
    data = tar_of({"dir/a.jpg": buf.getvalue(), "dir/a.json": json.dumps({"label": 3}).encode()})
    out = read_tar(data, "j.tar")
    assert out.keys == ["a"]
    assert out.images.shape == (1, 4, 4, 3)
    assert out.labels == [3]


def test_read_tar_gzip_cls_labels_and_errors():

    from pipeline.data.tars import concat

    data = tar_of({"a.png": encode_png(np.zeros((4, 4, 1), np.uint8)), "a.cls": b"7\n"})
    out = read_tar(gzip.compress(data), "g.tar.gz")
    assert out.keys == ["a"] and out.labels == [7]
    with pytest.raises(DataError, match=r"corrupt or truncated tar g\.tar\.gz: bad gzip"):
        read_tar(gzip.compress(data)[:-20], "g.tar.gz")
    bad_cls = tar_of({"a.png": encode_png(np.zeros((4, 4, 1), np.uint8)), "a.cls": b"seven"})
    with pytest.raises(DataError, match=r"b\.tar: sample 'a' has unreadable \.json/\.cls"):
        read_tar(bad_cls, "b.tar")
    # a .txt member is the caption, unless the JSON has one
    captioned = tar_of({
        "a.png": encode_png(np.zeros((4, 4, 1), np.uint8)), "a.txt": b"a red chair\n",
        "b.png": encode_png(np.zeros((4, 4, 1), np.uint8)), "b.txt": b"ignored",
        "b.json": b'{"caption": "kept"}',
    })  # fmt: skip
    assert [m["caption"] for m in read_tar(captioned, "c.tar").meta] == ["a red chair", "kept"]
    bad_txt = tar_of({"a.png": encode_png(np.zeros((4, 4, 1), np.uint8)), "a.txt": b"\xff\xfe"})
    with pytest.raises(DataError, match=r"unreadable \.json/\.cls/\.txt"):
        read_tar(bad_txt, "t.tar")
    # resizing makes mixed sizes acceptable; grayscale + colour becomes RGB
    mixed = tar_of({
        "a.png": encode_png(np.zeros((4, 6, 1), np.uint8)),
        "b.png": encode_png(np.zeros((8, 8, 3), np.uint8)),
    })  # fmt: skip
    resized = read_tar(mixed, "m.tar", image_size=4)
    assert resized.images.shape == (2, 4, 4, 3)
    with pytest.raises(DataError, match=r"x: duplicate sample keys across shards \['a', 'b'\]"):
        concat([resized, resized], "x")
