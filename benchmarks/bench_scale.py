"""Test images at another scale than the shots: saved few-shot segmenters scored on the test split resized.

    python benchmarks/bench_scale.py --runs runs/bench_fewshot --scales 0.5,0.7,1,1.4,2 \
        --start weights/segmenter-univg58k-cpu-fast [--given]

A new set of the same modality often differs from the shots' set first in pixel size (a camera of another
resolution, another field of view on the same sensor), so its vessels are wider or thinner in pixels than the
shots'. This scores the models bench_fewshot.py saved (`<runs>/<set>/shots_<k>/draw_<d>/<method>/model`, and
full supervision's `<runs>/<set>/full*/full/model`), each at its own saved threshold, on every test image of
the set resized by each factor: the image with area (down) or cubic (up) interpolation, label and FOV by area
and then cut at half, as `univg finetune` reads masks at another size. Scored at the resized size, inside the
FOV. `--start` adds a pretrained segmenter alone (its own threshold, no shot). `--given` also scores every
model with the factor given back to it, as `univg segment --scale 1/F` would (the image resized by 1/F for the
network, the probability returned at the resized size): how much of the loss knowing the factor recovers.
The segmenter's input cap
(`segmenter.input.max_side_px`) applies as in any run, so a factor that takes an image past the cap is
undone for the network (and then reads like a smaller factor).

Prints one line per model and scale and a table (mean Dice over the draws per set, method and scale), and
writes `<runs>/scale.md`, `<runs>/scale.json` and `<runs>/scale.png` (Dice against the scale factor); a set
scored by an earlier run into the same folder at the same factors stays in them unless `--sets` names it.
Labels are read for scoring only; nothing is chosen on them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
from bench_fewshot import dice_panels, finish_panel, save_figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from data_engine.ingest import load_case, read_task  # noqa: E402
from finetune.metrics import case_metrics  # noqa: E402
from finetune.run import machine_line, machine_record  # noqa: E402
from finetune.sampler import prepare_mask, resize_by  # noqa: E402
from finetune.segmenter import Segmenter  # noqa: E402


def resized(
    image: np.ndarray, label: np.ndarray, fov: np.ndarray | None, factor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The case as a camera with `factor` times the pixels per millimetre would have taken it."""
    if factor == 1.0:
        return image, label, fov
    out = resize_by(image, factor)
    h, w = out.shape[:2]
    return out, prepare_mask(label, h, w) * 255, None if fov is None else prepare_mask(fov, h, w) * 255


def models(runs: Path, name: str, shots: list[str], methods: list[str]) -> list[tuple[str, Path]]:
    """(label, model folder) of every saved model of one set, full supervision first."""
    found = [("full", d / "full" / "model") for d in sorted((runs / name).glob("full*"))]
    for k in shots:
        for draw in sorted((runs / name / f"shots_{k}").glob("draw_*")):
            found += [(f"{m} {k}-shot", draw / m / "model") for m in methods]
    return [(label, folder) for label, folder in found if (folder / "config.json").is_file()]


_CASES: dict[str, list] = {}  # set -> its loaded test cases, per process


def score_model(job: tuple[str, str, Path, list[float], bool]) -> tuple[list[float], list[float]]:
    """Mean test Dice of one saved segmenter at each scale factor, and (with `given`) with the factor given to
    it as `predict_proba(image, 1 / factor)`; [] when not asked."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    name, label, folder, scales, given = job
    if name not in _CASES:
        task = read_task(DATA / name / "pairs.csv")
        _CASES[name] = [load_case(c) for c in task.cases if c.split == "test"]
    started = time.perf_counter()
    seg = Segmenter.load(folder)
    dice: list[float] = []
    dice_given: list[float] = []
    for factor in scales:
        per_case: list[float] = []
        per_case_given: list[float] = []
        for image, truth, fov in _CASES[name]:
            image_s, truth_s, fov_s = resized(image, truth, fov, factor)
            pred = seg.predict_proba(image_s) > seg.threshold
            per_case.append(float(case_metrics(pred, truth_s, fov_s, None)["dice"] or 0.0))
            if given and factor == 1.0:  # giving x1 back changes nothing: the same prediction
                per_case_given.append(per_case[-1])
            elif given:
                pred = seg.predict_proba(image_s, 1.0 / factor) > seg.threshold
                per_case_given.append(float(case_metrics(pred, truth_s, fov_s, None)["dice"] or 0.0))
        dice.append(float(np.mean(per_case)))
        if given:
            dice_given.append(float(np.mean(per_case_given)))
    cells = " ".join(f"x{f:g} {d:.4f}" for f, d in zip(scales, dice, strict=True))
    if given:
        cells += " | given " + " ".join(f"x{f:g} {d:.4f}" for f, d in zip(scales, dice_given, strict=True))
    print(
        f"{name} {label} ({folder.parent.parent.name}): {cells} | {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return dice, dice_given


def plot(results: dict, scales: list[float], path: Path) -> None:
    fig, axes = dice_panels(len(results))
    for ax, (name, by_label) in zip(axes, results.items(), strict=True):
        for label, runs in by_label.items():
            mean = np.mean([r["dice"] for r in runs], axis=0)
            (line,) = ax.plot(scales, mean, marker="o", label=f"{label} (n={len(runs)})")
            if runs[0].get("dice_given"):
                given = np.mean([r["dice_given"] for r in runs], axis=0)
                ax.plot(scales, given, "x--", color=line.get_color(), label=f"{label}, factor given")
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(scales, [f"{s:g}" for s in scales])
        ax.minorticks_off()
        finish_panel(ax, name, "test images resized by (shots at 1)")
    save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_fewshot"))
    parser.add_argument("--sets", default="CHASE_DB1,CIMAT_XCA80,OCTA500_3M")
    parser.add_argument("--shots", default="5", help="comma-separated shot counts")
    parser.add_argument("--methods", default="univg,baseline")
    parser.add_argument("--scales", default="0.5,0.7,1,1.4,2", help="comma-separated resize factors")
    parser.add_argument("--jobs", type=int, default=1, help="models scored at once (processes)")
    parser.add_argument(
        "--start", type=Path, default=None, help="a pretrained segmenter folder, scored alone"
    )
    parser.add_argument(
        "--given",
        action="store_true",
        help="also score each model with the factor given to it (univg segment --scale 1/F)",
    )
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: no real data in {DATA}")
        return 0
    scales = [float(s) for s in args.scales.split(",")]
    shot_counts, methods = args.shots.split(","), args.methods.split(",")
    if any(s <= 0 for s in scales):
        parser.error(f"--scales {args.scales}: every factor must be > 0")
    jobs: list[tuple[str, str, Path, list[float], bool]] = []  # (set, label, model folder, scales, given)
    for name in args.sets.split(","):
        if not (DATA / name / "pairs.csv").is_file():
            print(f"{name}: not in {DATA}, skipped")
            continue
        if args.start is not None:
            jobs.append((name, "start alone", args.start, scales, args.given))
        jobs += [
            (name, label, folder, scales, args.given)
            for label, folder in models(args.runs, name, shot_counts, methods)
        ]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        done = pool.map(score_model, jobs, chunksize=1)
    results: dict = {}
    for (name, label, folder, _s, _g), (dice, dice_given) in zip(jobs, done, strict=True):
        results.setdefault(name, {}).setdefault(label, []).append(
            {"model": str(folder), "dice": dice, "dice_given": dice_given}
        )
    saved = args.runs / "scale.json"
    if saved.is_file():  # sets an earlier run scored at the same factors stay (re-scored ones replaced)
        earlier = json.loads(saved.read_text())
        if earlier.get("scales") == scales and earlier.get("given", False) == args.given:
            results = {**{k: v for k, v in earlier["results"].items() if k not in results}, **results}
    given_at = [i for i, f in enumerate(scales) if args.given and f != 1.0]  # at x1 giving changes nothing
    columns = [f"x{s:g}" for s in scales] + [f"x{scales[i]:g} given" for i in given_at]
    lines = ["| set | model | n | " + " | ".join(columns) + " |", "|" + "---|" * (3 + len(columns))]
    for name, by_label in results.items():
        for label, runs in by_label.items():
            mean = list(np.mean([r["dice"] for r in runs], axis=0))
            if given_at:
                given = np.mean([r["dice_given"] for r in runs], axis=0)
                mean += [given[i] for i in given_at]
            lines.append(f"| {name} | {label} | {len(runs)} | " + " | ".join(f"{d:.4f}" for d in mean) + " |")
    table = "\n".join(lines)
    command = " ".join(["python", "benchmarks/bench_scale.py", *sys.argv[1:]])
    footer = f"machine: {machine_line(machine_record())} | command: {command}"
    (args.runs / "scale.md").write_text(f"{table}\n\n{footer}\n")
    saved.write_text(json.dumps({"scales": scales, "given": args.given, "results": results}, indent=1))
    if results:
        plot(results, scales, args.runs / "scale.png")
    print(f"{table}\n\n{footer}\nwrote {args.runs / 'scale.md'}, scale.json, scale.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
