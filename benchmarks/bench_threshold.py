"""How each saved few-shot model would score with its threshold chosen another way, without retraining.

    python benchmarks/bench_threshold.py runs/bench_fewshot                 # every finished draw under it
    python benchmarks/bench_threshold.py runs/camp --methods univg --sets CIMAT_XCA80

For every `<out>/<set>/shots_<k>/draw_<d>/<method>/model` of a `bench_fewshot.py` output, predicts the
draw's shots, its unlabelled pool (the task's labelled pool minus the shots, read without their labels)
and its test cases once, then scores the test cases (mean Dice over cases, inside each FOV) at:

- `shots`: the threshold the run chose (maximum Dice on the training shots: what `univg finetune` does);
- `area`: the threshold at which the predicted vessel fraction over the unlabelled pool (inside the FOV)
  equals the labelled fraction over the shots; only the shots' labels are read;
- `midway`: halfway between the two (their errors are not the same: one reads the shots' fit, the other
  the unlabelled images);
- `oracle`: the threshold of the candidate grid that is best on the test labels, an upper bound only
  (reading test labels is what a run must never do).

Prints a table per (set, shots, method) and writes `<out>/threshold.json` and `<out>/threshold.png` (Dice
against shots per rule). `--merge F.json` adds the rows of another run of this script (e.g. the baselines
of another folder) to the table and the picture; `--report-only` re-reads `<out>/threshold.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from bench_fewshot import dice_panels, finish_panel, save_figure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def mean_dice(t: float, cases: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> float:
    """Mean over cases of Dice inside each FOV of (probability > t) against the label."""
    from finetune.metrics import dice

    scores = []
    for prob, mask, fov in cases:
        inside = np.ones(mask.shape, bool) if fov is None else fov > 0
        scores.append(dice((prob > t) & inside, (mask > 0) & inside))
    return float(np.mean(scores))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a bench_fewshot.py output folder")
    parser.add_argument("--methods", default="univg,baseline")
    parser.add_argument("--sets", default="", help="comma-separated set names (default: every one there)")
    parser.add_argument("--pool-max", type=int, default=16, help="unlabelled images read (spread)")
    parser.add_argument("--merge", type=Path, action="append", default=[], help="another threshold.json")
    parser.add_argument("--report-only", action="store_true", help="tabulate <out>/threshold.json only")
    parser.add_argument("--tta", action="store_true", help="keep each model's mirrored averaging (4x slower)")
    args = parser.parse_args()

    from data_engine.ingest import read_task
    from finetune.run import load_cases, machine_line, machine_record
    from finetune.segmenter import THRESHOLDS, Segmenter, area_threshold, choose_threshold
    from finetune.split import read_split, unlabelled_cases

    print(f"# bench_threshold {args.out} | {machine_line(machine_record())}", flush=True)
    rows: list[dict[str, Any]] = []
    wanted = {s for s in args.sets.split(",") if s}
    set_dirs = [] if args.report_only else sorted(p for p in args.out.iterdir() if p.is_dir())
    if args.report_only:
        rows = json.loads((args.out / "threshold.json").read_text())
    for set_dir in set_dirs:
        if wanted and set_dir.name not in wanted:
            continue
        manifest = DATA / set_dir.name / "pairs.csv"
        if not manifest.is_file():
            print(f"skip {set_dir.name}: {manifest} is absent")
            continue
        task = read_task(manifest)
        for shots_dir in sorted(set_dir.glob("shots_*")):
            for draw_dir in sorted(shots_dir.glob("draw_*")):
                split = read_split(draw_dir / "split.json")
                pool = unlabelled_cases(split, args.pool_max)
                loaded = load_cases(task, set(split.train) | set(pool) | set(split.eval), progress=False)
                for method in args.methods.split(","):
                    model_dir = draw_dir / method / "model"
                    if not (model_dir / "config.json").is_file():
                        continue
                    started = time.perf_counter()
                    seg = Segmenter.load(model_dir)
                    if not args.tta:
                        seg.cfg = replace(seg.cfg, infer=replace(seg.cfg.infer, flip_tta=False))
                    probs = {n: seg.predict_proba(loaded[n][0]) for n in loaded}
                    shot_t, _ = choose_threshold(
                        [probs[n] for n in split.train],
                        [loaded[n][1] for n in split.train],
                        [loaded[n][2] for n in split.train],
                    )
                    area_t, fraction = area_threshold(
                        [loaded[n][1] for n in split.train],
                        [loaded[n][2] for n in split.train],
                        [probs[n] for n in pool],
                        [loaded[n][2] for n in pool],
                    )

                    test = [(probs[n], loaded[n][1], loaded[n][2]) for n in split.eval]
                    grid = {t: mean_dice(t, test) for t in THRESHOLDS}
                    oracle_t = max(grid, key=lambda t: grid[t])
                    row = {
                        "set": set_dir.name,
                        "shots": split.shots,
                        "draw": draw_dir.name,
                        "method": method,
                        "saved_threshold": seg.threshold,
                        "shots_threshold": shot_t,
                        "area_threshold": area_t,
                        "shot_label_fraction": fraction,
                        "dice_shots": grid[shot_t],  # shot_t is one of THRESHOLDS
                        "dice_area": mean_dice(area_t, test),
                        "dice_midway": mean_dice(0.5 * (shot_t + area_t), test),
                        "oracle_threshold": oracle_t,
                        "dice_oracle": grid[oracle_t],
                        "pool_cases": len(pool),
                    }
                    rows.append(row)
                    print(
                        f"{set_dir.name} {split.shots} shot(s) {draw_dir.name} {method}: "
                        f"shots t={shot_t:.2f} Dice {row['dice_shots']:.4f} | area t={area_t:.3f} "
                        f"(fraction {fraction:.4f}) Dice {row['dice_area']:.4f} "
                        f"| midway {row['dice_midway']:.4f} | oracle t={oracle_t:.2f} "
                        f"Dice {row['dice_oracle']:.4f} | {time.perf_counter() - started:.0f} s",
                        flush=True,
                    )
    if not args.report_only:
        (args.out / "threshold.json").write_text(json.dumps(rows, indent=2) + "\n")
    for extra in args.merge:
        rows += json.loads(extra.read_text())
    print("\n| set | shots | method | draws | shots threshold | area threshold | midway | oracle (test) |")
    print("|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["set"], r["shots"], r["method"]) for r in rows})
    for key in keys:
        group = [r for r in rows if (r["set"], r["shots"], r["method"]) == key]
        means = [
            float(np.mean([r[f"dice_{k}"] for r in group])) for k in ("shots", "area", "midway", "oracle")
        ]
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | {len(group)} | {means[0]:.4f} | {means[1]:.4f} "
            f"({100 * (means[1] - means[0]):+.2f}) | {means[2]:.4f} ({100 * (means[2] - means[0]):+.2f}) "
            f"| {means[3]:.4f} |"
        )
    plot(rows, args.out / "threshold.png")
    print(f"wrote {args.out / 'threshold.json'}, {args.out / 'threshold.png'}")
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Per set, mean Dice against shots for each method and threshold rule."""
    sets = sorted({r["set"] for r in rows})
    fig, axes = dice_panels(len(sets))
    styles = {"shots": "-", "area": "--", "oracle": ":"}
    colours = {"univg": "tab:red", "baseline": "tab:blue"}
    for ax, name in zip(axes, sets, strict=True):
        for method in sorted({r["method"] for r in rows if r["set"] == name}):
            for rule, style in styles.items():
                group = [r for r in rows if r["set"] == name and r["method"] == method]
                xs = sorted({r["shots"] for r in group})
                ys = [float(np.mean([r[f"dice_{rule}"] for r in group if r["shots"] == k])) for k in xs]
                label = f"{method}, {rule}" + (" (test labels)" if rule == "oracle" else "")
                ax.plot(xs, ys, style, marker="o", ms=3, color=colours.get(method, "grey"), label=label)
        finish_panel(ax, name, "real labelled shots")
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
