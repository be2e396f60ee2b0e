"""Vessel polarity: which way round the shipped start reads each draw's shots, and a bright-vessel task
derived from a dark-vessel set to run univg on.

    python benchmarks/bench_polarity.py make --out runs/polarity        # writes runs/polarity/chase_fa
    python benchmarks/bench_polarity.py decide --sets CIMAT_XCA80,OCTA500_3M,runs/polarity/chase_fa
    univg finetune --task runs/polarity/chase_fa/pairs.csv --shots 1 --out runs/fa   # or bench_fewshot --data
    python benchmarks/bench_polarity.py figure --case runs/polarity/chase_fa/pairs.csv:Image_01L \
        --case runs/outside/xca_inv/pairs.csv:train_1 --out docs/polarity_start.jpg

`make` reads ../shared/data/CHASE_DB1 (skips with a message where it is absent) and writes `chase_fa`, never
into the project (the set's terms allow research use only): each image's green channel inverted inside its
FOV and black outside, so vessels are bright on a grey fundus in a black round field, as a fluorescein
angiogram shows them; masks, FOVs and splits as given.

`decide` prints, for each set (a folder name in ../shared/data or a path to a task's folder or CSV), shot
count and draw (the shots `univg finetune --shots K --seed 0` draws), the start's Dice on the shots as they
are and inverted, and what `segmenter.input.polarity=auto` decides (finetune/polarity.py): the decision every
univg training with that start and those shots makes, without training anything.

`figure` draws, per named case (TASK_CSV:CASE), image | label | the start's probability as the image is |
inverted, with the Dice at the best threshold under each map.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
SHIPPED = ROOT / "weights" / "segmenter-univg58k-cpu-fast"


def make(out: Path) -> int:
    source = DATA / "CHASE_DB1"
    if not (source / "pairs.csv").is_file():
        print(f"skipped: no {source / 'pairs.csv'}")
        return 0
    with open(source / "pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    task = out / "chase_fa"
    written = []
    for row in rows:
        image = cv2.imread(str(source / row["image"]), cv2.IMREAD_COLOR)
        fov = cv2.imread(str(source / row["fov"]), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(source / row["mask"]), cv2.IMREAD_GRAYSCALE)
        if image is None or fov is None or mask is None:
            raise SystemExit(f"unreadable: one of {row['image']}, {row['fov']}, {row['mask']} in {source}")
        angiogram = np.where(fov > fov.max() / 2, 255 - image[:, :, 1], 0).astype(np.uint8)
        names = {k: f"{k}s/{Path(row[k]).stem}.png" for k in ("image", "mask", "fov")}
        for key, array in (("image", angiogram), ("mask", mask), ("fov", fov)):
            (task / names[key]).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(task / names[key]), array)
        written.append({**names, "split": row["split"]})
    with open(task / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "mask", "fov", "split"])
        writer.writeheader()
        writer.writerows(written)
    print(f"wrote {task}: {len(written)} cases")
    return 0


def task_csv(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".csv":
        return path
    if path.is_dir():
        return path / "pairs.csv"
    return DATA / name / "pairs.csv"


def decide_all(sets: list[str], shots: list[int], draws: int, model: Path) -> int:
    import torch

    from data_engine.ingest import load_case, read_task
    from finetune.config import load_finetune_config
    from finetune.field import decide as decide_field
    from finetune.polarity import decide
    from finetune.segmenter import _start_reader
    from finetune.split import draw_split

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_finetune_config(ROOT / "configs" / "finetune" / "cpu-fast.yaml").segmenter
    print(f"start {model} | input.polarity=auto")
    print("| set | shots | draw | start's Dice as they are | inverted | decision |")
    print("|---|---|---|---|---|---|")
    for name in sets:
        path = task_csv(name)
        if not path.is_file():
            print(f"skipped {name}: no {path}")
            continue
        task = read_task(path)
        cases = {c.name: c for c in task.cases}
        for k in shots:
            for d in range(draws):
                drawn = [load_case(cases[n]) for n in draw_split(task, shots=k, seed=d).train]
                field = decide_field(cfg.infer.field_from_image, [(i, m) for i, m, _f in drawn])
                reader = _start_reader(model, cfg, field, "no", torch.device("cpu"))
                r = decide("auto", drawn, reader)
                way = "inverted" if r["inverted"] else "as they are"
                print(f"| {name} | {k} | {d} | {r['dice_as_is']:.4f} | {r['dice_inverted']:.4f} | {way} |")
    return 0


def figure(specs: list[str], out: Path, model: Path, tile_px: int = 256) -> int:
    import torch

    from data_engine.ingest import load_case, read_task
    from finetune.segmenter import Segmenter, choose_threshold

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = Segmenter.load(model)
    rows = []
    for spec in specs:
        path, _, name = spec.rpartition(":")
        if not Path(path).is_file():
            print(f"skipped {spec}: no {path}")
            continue
        case = next((c for c in read_task(path).cases if c.name == name), None)
        if case is None:
            raise SystemExit(f"{path} has no case {name!r}")
        image, label, fov = load_case(case)
        tiles = [image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)]
        tiles.append(cv2.cvtColor(np.where(label > 0, np.uint8(255), np.uint8(0)), cv2.COLOR_GRAY2BGR))
        for inverted in (False, True):
            start.record["input_polarity"] = {"inverted": inverted}
            prob = start.predict_proba(image)
            dice = choose_threshold([prob], [label], [fov])[1]
            tile = cv2.cvtColor(np.clip(prob * 255, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
            tile = cv2.resize(tile, (tile_px, tile_px), interpolation=cv2.INTER_AREA)
            way = "inverted" if inverted else "as it is"
            cv2.putText(
                tile, f"{way}: Dice {dice:.2f}", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 255), 1
            )
            tiles.append(tile)
        tiles[:2] = [cv2.resize(t, (tile_px, tile_px), interpolation=cv2.INTER_AREA) for t in tiles[:2]]
        rows.append(np.hstack(tiles))
        print(f"{spec}: drawn")
    if not rows:
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.vstack(rows), [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(f"wrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    make_p = sub.add_parser("make", help="write the chase_fa task")
    make_p.add_argument("--out", type=Path, required=True)
    decide_p = sub.add_parser("decide", help="the start's polarity decision per set, shot count and draw")
    decide_p.add_argument("--sets", default="CHASE_DB1,CIMAT_XCA80,OCTA500_3M")
    decide_p.add_argument("--shots", default="1,3,5")
    decide_p.add_argument("--draws", type=int, default=3)
    decide_p.add_argument("--model", type=Path, default=SHIPPED)
    figure_p = sub.add_parser("figure", help="image | label | the start's reading as it is | inverted")
    figure_p.add_argument("--case", action="append", required=True, help="TASK_CSV:CASE (repeatable)")
    figure_p.add_argument("--out", type=Path, required=True)
    figure_p.add_argument("--model", type=Path, default=SHIPPED)
    args = parser.parse_args()
    if args.command == "make":
        return make(args.out)
    if args.command == "figure":
        return figure(args.case, args.out, args.model)
    shots = [int(s) for s in args.shots.split(",") if s]
    return decide_all([s for s in args.sets.split(",") if s], shots, args.draws, args.model)


if __name__ == "__main__":
    sys.exit(main())
