"""Test-time views on trained few-shot segmenters: the same saved models, scored without and with one
`infer` switch, the threshold chosen again on each model's own training cases for the way it was not saved
with (never on test labels). `--switch flip_tta` (the default): probabilities averaged over the image and its
three flips; `--switch rot90_tta`: the same views of the image turned by 90 degrees as well.

    python benchmarks/bench_tta.py --runs runs/bench_fewshot --shots 5
    python benchmarks/bench_tta.py --runs runs/bench_fewshot --shots 5 --switch rot90_tta

Reads run folders that benchmarks/bench_fewshot.py wrote (`<runs>/<set>/shots_<k>/draw_<d>/<method>/model`
and `<runs>/<set>/full*/full/model`: every full-supervision seed) and the sets from ../shared/data. Prints a
table of Dice (test split, inside the FOV) per set and method, mean over the draws, without vs with the
switch, and writes it to `<runs>/tta.md` (`<runs>/tta_rot90_tta.md` for the other switch). The column of the
way each model was saved re-scores it as it was, so it must equal the run's own summary (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from data_engine.ingest import Task, load_case, read_task  # noqa: E402
from finetune.metrics import case_metrics  # noqa: E402
from finetune.run import machine_line, machine_record  # noqa: E402
from finetune.segmenter import Segmenter, choose_threshold  # noqa: E402


def score(
    model_dir: Path, task: Task, train: list[str], test: list[str], cache: dict, switch: str = "flip_tta"
) -> dict[str, float]:
    """Dice without and with `infer.<switch>` for one saved model (mean over the test cases). The way the
    model was saved keeps its own threshold, so its score must equal the run's; the other way gets a
    threshold chosen again on the model's training cases."""
    saved = Segmenter.load(model_dir)
    infer = saved.cfg.infer
    was_on = bool(getattr(infer, switch))
    if switch == "flip_tta":
        toggled = replace(infer, flip_tta=not infer.flip_tta)
    else:
        toggled = replace(infer, rot90_tta=not infer.rot90_tta)
    other = Segmenter(
        saved.network,
        replace(saved.cfg, infer=toggled),
        saved.threshold,
        saved.record,
    )

    def case(name: str):
        if name not in cache:
            cache[name] = load_case(task_by_name[name])
        return cache[name]

    task_by_name = {c.name: c for c in task.cases}
    probs, labels, fovs = [], [], []
    for name in train:
        image, label, fov = case(name)
        probs.append(other.predict_proba(image))
        labels.append(label)
        fovs.append(fov)
    other.threshold, _ = choose_threshold(probs, labels, fovs)
    dice: dict[bool, list[float]] = {True: [], False: []}  # by whether the switch was on
    for name in test:
        image, label, fov = case(name)
        for seg in (saved, other):
            prob = seg.predict_proba(image)
            dice[bool(getattr(seg.cfg.infer, switch))].append(
                float(case_metrics(prob > seg.threshold, label, fov, None)["dice"] or 0.0)
            )
    plain_seg, tta_seg = (other, saved) if was_on else (saved, other)
    return {
        "saved": float(np.mean(dice[was_on])),
        "plain": float(np.mean(dice[False])),
        "tta": float(np.mean(dice[True])),
        "threshold_plain": plain_seg.threshold,
        "threshold_tta": tta_seg.threshold,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=Path, default=Path("runs/bench_fewshot"))
    parser.add_argument("--shots", default="5", help="comma-separated shot counts")
    parser.add_argument("--sets", default="CHASE_DB1,CIMAT_XCA80,OCTA500_3M")
    parser.add_argument("--methods", default="univg,baseline")
    parser.add_argument("--switch", default="flip_tta", choices=["flip_tta", "rot90_tta"])
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: no real data in {DATA}")
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results: dict = {}
    for name in args.sets.split(","):
        task = read_task(DATA / name / "pairs.csv")
        cache: dict = {}
        jobs: list[tuple[str, Path]] = []  # (label, method folder)
        # full supervision: seed 0 in full/, further segmenter seeds (--full-seeds) in full_seed<s>/
        for seed_dir in sorted((args.runs / name).glob("full*")):
            full = seed_dir / "full"
            if (full / "eval" / "summary.json").is_file():
                jobs.append(("full", full))
        for k in args.shots.split(","):
            for draw in sorted((args.runs / name / f"shots_{k}").glob("draw_*")):
                for method in args.methods.split(","):
                    if (draw / method / "eval" / "summary.json").is_file():
                        jobs.append((f"{method} {k}-shot", draw / method))
        for label, folder in jobs:
            started = time.perf_counter()
            summary = json.loads((folder / "eval" / "summary.json").read_text())
            test = [c["case"] for c in summary["per_case"]]
            got = score(folder / "model", task, summary["train_cases"], test, cache, args.switch)
            if abs(got["saved"] - summary["mean"]["dice"]) > 1e-6:
                have = summary["mean"]["dice"]
                raise RuntimeError(f"{folder}: re-score as saved {got['saved']} != its summary's {have}")
            results.setdefault(name, {}).setdefault(label, []).append(got)
            seconds = time.perf_counter() - started
            print(
                f"{name} {label} {folder.parent.name}: without {got['plain']:.4f} "
                f"(t={got['threshold_plain']}) with {args.switch} {got['tta']:.4f} "
                f"(t={got['threshold_tta']}) | {seconds:.0f} s",
                flush=True,
            )
    lines = [f"| set | model | n | Dice without {args.switch} | with | change |", "|---|---|---|---|---|---|"]
    for name, by_label in results.items():
        for label, runs in by_label.items():
            plain = float(np.mean([r["plain"] for r in runs]))
            tta = float(np.mean([r["tta"] for r in runs]))
            lines.append(f"| {name} | {label} | {len(runs)} | {plain:.4f} | {tta:.4f} | {tta - plain:+.4f} |")
    rows = "\n".join(lines)
    (args.runs / ("tta.md" if args.switch == "flip_tta" else f"tta_{args.switch}.md")).write_text(rows + "\n")
    print(rows)
    command = " ".join(["python", "benchmarks/bench_tta.py", *sys.argv[1:]])
    print(f"\nmachine: {machine_line(machine_record())} | command: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
