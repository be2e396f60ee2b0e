"""Error maps of several prediction folders side by side, for the same test cases: a picture to look at.

    python benchmarks/fig_errors.py --task ../shared/data/CIMAT_XCA80/pairs.csv --out docs/errors.jpg \
        "without rehearsal=runs/fewshot_segpre/CIMAT_XCA80/shots_1/draw_2/univg/eval/pred" \
        "with rehearsal=runs/fewshot_rehearsal/CIMAT_XCA80/shots_1/draw_2/univg/eval/pred"

One row per case (the first `--num-cases` of the split, in the task's order, unless `--cases` names
them): image | label | each folder's errors (vessel found white, false red, missed blue, outside the FOV
dark grey), each titled with its label and the case's Dice inside the FOV; `--field` outlines the field of
view estimated from the image (finetune/field.py) on the image panel. Prediction files are
matched to cases as `univg evaluate` matches them (named after the case, its image or its mask).

`--synthetic RUN/draw_0/synthetic` adds a row of close-ups where the vessels are small in the frame: the
first composite pairs of a run's synthesised shards, each cropped around its largest labelled vessel,
and last the real shot that pair's background came from, cropped the same way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_engine.ingest import Case, load_case, read_task  # noqa: E402
from finetune.evaluate import error_map, match_predictions, read_prediction  # noqa: E402
from finetune.field import estimate_field  # noqa: E402
from finetune.synthesis import fit_tile  # noqa: E402
from shards.schema import decode_sample, iter_samples  # noqa: E402


def _titled(tile: np.ndarray, text: str) -> np.ndarray:
    cv2.putText(tile, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1, cv2.LINE_AA)
    return tile


def _close_up(image: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """A size x size tile of the square around the largest labelled component, twice its extent."""
    n, _, stats, centres = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8))
    if n < 2:
        return fit_tile(image, size)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    half = max(int(stats[k, cv2.CC_STAT_WIDTH]), int(stats[k, cv2.CC_STAT_HEIGHT]), 16)
    cx, cy = (int(round(v)) for v in centres[k])
    h, w = mask.shape
    y0, x0 = min(max(cy - half, 0), max(h - 2 * half, 0)), min(max(cx - half, 0), max(w - 2 * half, 0))
    crop = image[y0 : y0 + 2 * half, x0 : x0 + 2 * half]
    bgr = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR) if crop.ndim == 2 else crop
    return cv2.resize(bgr, (size, size), interpolation=cv2.INTER_LINEAR)


def _synthetic_row(folder: Path, cases_by_name: dict[str, Case], count: int, size: int) -> list[np.ndarray]:
    """Close-ups of the first `count` composite pairs in folder's shards, then the first one's host shot."""
    tiles: list[np.ndarray] = []
    host = None
    for shard in sorted(folder.glob("*.tar")):
        with shard.open("rb") as f:
            for key, members in iter_samples(f, str(shard)):
                sample = decode_sample(key, members)
                if sample.meta.get("route") != "composite":
                    continue
                tiles.append(_titled(_close_up(sample.image, sample.mask, size), "synthetic"))
                host = host or sample.meta.get("host")
                if len(tiles) == count:
                    break
        if len(tiles) == count:
            break
    if not tiles:
        raise SystemExit(f"no composite pairs in the shards of {folder}")
    if host in cases_by_name:
        image, label, _fov = load_case(cases_by_name[host])
        tiles.append(_titled(_close_up(image, label, size), f"real shot {host}"))
    return tiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--task", required=True, help="task manifest CSV or folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: the first ones)")
    parser.add_argument("--num-cases", type=int, default=3)
    parser.add_argument("--tile-px", type=int, default=256, help="side of each panel")
    parser.add_argument("--out", type=Path, required=True, help="picture to write (.png or .jpg)")
    parser.add_argument("--synthetic", type=Path, help="a run's synthetic shard folder: a row of close-ups")
    parser.add_argument("--num-synthetic", type=int, default=4, help="composite pairs in that row")
    parser.add_argument(
        "--field", action="store_true", help="outline the field of view estimated from the image (green)"
    )
    parser.add_argument("preds", nargs="+", help="LABEL=FOLDER of predicted masks, in panel order")
    args = parser.parse_args()
    task_path = Path(args.task)
    if not task_path.exists():
        print(f"skipped: no task at {task_path}")
        return 0
    folders = []
    for item in args.preds:
        label, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            parser.error(f"{item!r}: expected LABEL=FOLDER with an existing folder")
        folders.append((label, Path(folder)))
    cases = read_task(task_path).split(args.split)
    if args.cases:
        wanted = args.cases.split(",")
        by_name = {c.name: c for c in cases}
        missing = [n for n in wanted if n not in by_name]
        if missing:
            parser.error(f"no {args.split} case named {missing}")
        cases = [by_name[n] for n in wanted]
    else:
        cases = cases[: args.num_cases]
    matched = [match_predictions(folder, cases) for _name, folder in folders]  # ValueError names the missing
    t = args.tile_px
    rows = []
    for case in cases:
        image, label, fov = load_case(case)
        truth = label > 0
        inside = np.ones(truth.shape, bool) if fov is None else fov > 0
        shown = fit_tile(image, t)
        if args.field:  # the estimate's edge, drawn at the tile's scale
            outside = fit_tile(np.where(estimate_field(image), np.uint8(0), np.uint8(255)), t)[:, :, 0] > 127
            edge = outside & ~cv2.erode(outside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            shown[edge] = (0, 220, 0)
        tiles = [_titled(shown, case.name), _titled(fit_tile(label, t), "label")]
        for (name, _folder), files in zip(folders, matched, strict=True):
            found, _prob = read_prediction(files[case.name][0], 0.5)
            both = int((found & truth & inside).sum())
            total = int((found & inside).sum()) + int((truth & inside).sum())
            dice = 2 * both / total if total else 1.0
            tiles.append(_titled(fit_tile(error_map(found, truth, fov), t), f"{name}: Dice {dice:.3f}"))
        gap = np.full((t, 4, 3), 96, np.uint8)
        rows.append(np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=1))
    if args.synthetic is not None:
        task_cases = {c.name: c for c in read_task(task_path).cases}
        close = _synthetic_row(args.synthetic, task_cases, args.num_synthetic, t)
        gap = np.full((t, 4, 3), 96, np.uint8)
        row = np.concatenate([x for tile in close for x in (tile, gap)][:-1], axis=1)
        width = rows[0].shape[1]
        if row.shape[1] != width:  # same width as the rows above: shrink or pad on the right
            if row.shape[1] > width:
                row = cv2.resize(
                    row, (width, round(row.shape[0] * width / row.shape[1])), interpolation=cv2.INTER_AREA
                )
            else:
                row = np.concatenate([row, np.zeros((row.shape[0], width - row.shape[1], 3), np.uint8)], 1)
        rows.append(row)
    band = np.full((4, rows[0].shape[1], 3), 96, np.uint8)
    picture = np.concatenate([x for row in rows for x in (row, band)][:-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 88] if args.out.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(args.out), picture, params):
        raise SystemExit(f"could not write {args.out}")
    print(f"wrote {args.out} ({len(cases)} cases x {len(folders)} prediction folders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
