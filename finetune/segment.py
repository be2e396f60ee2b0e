"""`univg segment`: apply a trained segmenter to every image in a folder.

    univg segment --model runs/my_task --images new_scans/ --out runs/my_task/pred [--probabilities]

Writes `<out>/<image stem>.png`, a lossless uint8 mask (vessel 255, background 0) at the model's threshold
(the one tuned on its training shots, unless --threshold is given), and with --probabilities also
`<out>/probabilities/<image stem>.png`, the vessel probability times 255. `univg evaluate --pred <out>`
reads both. `--scale F` resizes each image by F for the network (masks come back at its own size): for images
of another resolution than the shots', F = the shots' pixel size over theirs. Images: every file in --images
with an image suffix (not recursive), or one image file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from data_engine.io import IMAGE_SUFFIXES, read_image
from finetune.sampler import check_scale

PROBABILITY_DIR = "probabilities"  # same name finetune.evaluate looks for


def list_images(images: str | Path) -> list[Path]:
    """Image files of a folder (sorted, hidden files skipped), or [the file]; a repeated stem is an error."""
    images = Path(images)
    if not images.exists():
        raise FileNotFoundError(f"--images {images}: no such folder or file")
    if images.is_file():
        return [images]
    found = [
        p
        for p in sorted(images.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not found:
        raise ValueError(f"--images {images}: holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for p in found:
        if p.stem in stems:
            raise ValueError(
                f"--images {images}: {stems[p.stem].name} and {p.name} share the stem {p.stem!r}, so their "
                "outputs would share a name"
            )
        stems[p.stem] = p
    return found


def segment_folder(
    model: str | Path,
    images: str | Path,
    out_dir: str | Path,
    probabilities: bool = False,
    threshold: float | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    scale: float = 1.0,
) -> list[Path]:
    """Segment every image; returns the mask files written. `scale` resizes each image for the network
    (Segmenter.predict_proba); masks come back at the image's own size."""
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold {threshold} must be in (0, 1)")
    check_scale(scale, "--scale")
    paths = list_images(images)
    out_dir = Path(out_dir)
    targets = [out_dir / f"{p.stem}.png" for p in paths]
    if probabilities:
        targets += [out_dir / PROBABILITY_DIR / f"{p.stem}.png" for p in paths]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"--out {out_dir}: {len(existing)} output file(s) exist already (e.g. {existing[0].name}); "
            "pass --overwrite to replace them"
        )
    model = Path(model)
    if not (model / "config.json").is_file() and not (model / "model" / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model}: no config.json there or in {model / 'model'}; pass a run folder holding "
            "model/ or the model folder itself"
        )
    # imported here, once the input is checked: torch + MONAI take seconds to import
    from finetune.segmenter import Segmenter

    segmenter = Segmenter.load(model, device=device)
    cut = segmenter.threshold if threshold is None else threshold
    out_dir.mkdir(parents=True, exist_ok=True)
    if probabilities:
        (out_dir / PROBABILITY_DIR).mkdir(exist_ok=True)
    written = []
    for path in tqdm(paths, desc="segment", unit="image", disable=not progress, dynamic_ncols=True):
        image = read_image(path)
        prob_HW = segmenter.predict_output(image, scale)
        mask_HW = np.where(prob_HW > cut, np.uint8(255), np.uint8(0))
        target = out_dir / f"{path.stem}.png"
        if not cv2.imwrite(str(target), mask_HW):
            raise ValueError(f"could not write {target}")
        written.append(target)
        if probabilities:
            prob_u8 = np.rint(prob_HW * 255.0).astype(np.uint8)
            cv2.imwrite(str(out_dir / PROBABILITY_DIR / f"{path.stem}.png"), prob_u8)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `univg segment`."""
    parser.description = "Write vessel masks (and probability maps) for every image in a folder."
    parser.add_argument(
        "--model", required=True, help="run folder holding model/, or the model folder itself"
    )
    parser.add_argument("--images", required=True, help="folder of images (or one image file)")
    parser.add_argument("--out", required=True, help="output folder for <stem>.png masks")
    parser.add_argument("--probabilities", action="store_true", help="also write probabilities/<stem>.png")
    parser.add_argument("--threshold", type=float, default=None, help="override the model's tuned threshold")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="resize each image by this factor for the network, masks at the image's own size: the shots' "
        "pixel size over these images' (0.5 for images of twice the shots' resolution)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run `univg segment`."""
    written = segment_folder(
        args.model,
        args.images,
        args.out,
        probabilities=args.probabilities,
        threshold=args.threshold,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        scale=args.scale,
    )
    extra = f" and {PROBABILITY_DIR}/" if args.probabilities else ""
    print(f"wrote {len(written)} mask(s){extra} to {args.out}")
    return 0
