"""Regenerate the small figures of the docs (``docs/img/``) from a demo's output folder.

    python jobs/demo.py --out demo-out              # the default demo, seed 0
    python scripts/docs_figures.py demo-out         # writes docs/img/*.png

The demo draws its figures under ``<out>/reports/demo/``; this script only copies, joins and
downscales them (PIL), so that each committed PNG stays under ``MAX_BYTES``. Nothing is recomputed.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"
MAX_BYTES = 150_000

# docs/img name -> (demo figure, width in pixels of the committed copy)
COPIES = {
    "nn_similarity_hist.png": ("nn_similarity_hist.png", 640),
    "pareto.png": ("pareto.png", 900),
    "roc_reconstruction.png": ("roc_reconstruction.png", 420),
    "roc_nn_distance.png": ("roc_nn_distance.png", 420),
    "samples_ddim.png": ("samples_ddim.png", 640),
    "samples_cpsample.png": ("samples_cpsample.png", 640),
    "comparison.png": ("comparison.png", 760),
}
SIDE_BY_SIDE = "ddim_vs_cpsample.png"  # pairs_ddim.png beside pairs_cpsample.png


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise SystemExit(f"{path}: no such figure; run `python jobs/demo.py --out DIR` first")
    return Image.open(path).convert("RGB")


def _resize(image: Image.Image, width: int) -> Image.Image:
    if image.width <= width:
        return image
    return image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)


def _save(image: Image.Image, path: Path) -> int:
    """Save as a palette PNG, shrinking until it is under MAX_BYTES; return its size."""
    while True:
        buffer = io.BytesIO()
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(
            buffer, "PNG", optimize=True
        )
        if buffer.tell() <= MAX_BYTES or image.width < 200:
            path.write_bytes(buffer.getvalue())
            return buffer.tell()
        image = _resize(image, int(image.width * 0.85))


def side_by_side(ddim: Image.Image, cpsample: Image.Image, width: int = 760) -> Image.Image:
    """The two pair grids next to each other (each figure carries its own title)."""
    gap = 16
    canvas = Image.new("RGB", (ddim.width + gap + cpsample.width, max(ddim.height, cpsample.height)),
                       "white")  # fmt: skip
    canvas.paste(ddim, (0, 0))
    canvas.paste(cpsample, (ddim.width + gap, 0))
    return _resize(canvas, width)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a demo's --out folder (local)")
    parser.add_argument("--run", default="demo", help="the report folder under <out>/reports/")
    args = parser.parse_args(argv)
    figures = args.out / "reports" / args.run
    OUT.mkdir(parents=True, exist_ok=True)
    pairs = side_by_side(_open(figures / "pairs_ddim.png"), _open(figures / "pairs_cpsample.png"))
    print(f"{SIDE_BY_SIDE}: {_save(pairs, OUT / SIDE_BY_SIDE):,} bytes")
    for name, (source, width) in COPIES.items():
        size = _save(_resize(_open(figures / source), width), OUT / name)
        print(f"{name}: {size:,} bytes")


if __name__ == "__main__":
    main()
