"""Full supervision and the shots-only baseline started from a pretrained segmenter: the references that
`pretrained_segmenter` runs of univg should also be held against (the `full` and `baseline` methods of
`univg finetune` always start from scratch).

    python benchmarks/bench_full_pretrained.py --model weights/segmenter-univg58k-cpu-fast \
        --out runs/full_pretrained
    python benchmarks/bench_full_pretrained.py --model weights/segmenter-univg58k-cpu-fast \
        --out runs/base_pretrained --baseline-shots 1,5 --draws 3

Per set of ../shared/data (absent ones skipped), the profile's segmenter and budget, the weights of --model
as the start, scored on the test split like `univg finetune` scores. Without --baseline-shots: every train
label (run folder `<out>/<set>/full_pretrained`). With it: the real shots alone, with the standard
augmentation and no synthetic pairs, on the same draws as `univg finetune --shots K` (`<out>/<set>/
baseline_pretrained_shots_<K>/draw_<d>`): what pretraining gives without the engine's synthesis from the
shots. With `rehearsal.corpus=<corpus>` among the overrides (not the profile's), the baselines rehearse it
(`<out>/<set>/baseline_pretrained_rehearsal_shots_<K>/draw_<d>`): corpus pairs make up the same share of each
batch as in univg with rehearsal (patch.synthetic_fraction x rehearsal.share), the rest are the shots, so
the difference to univg is the synthesis from the shots alone. Prints the Dice per run and, for baselines,
the mean and std over the draws. Runs resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from data_engine.ingest import read_task  # noqa: E402
from finetune.config import load_finetune_config  # noqa: E402
from finetune.run import (  # noqa: E402
    load_cases,
    plan_splits,
    profile_path,
    rehearsal_pairs,
    train_and_evaluate,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", required=True, help="the pretrained segmenter folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sets", default="CHASE_DB1,CIMAT_XCA80,OCTA500_3M")
    parser.add_argument("--profile", default="cpu-fast")
    parser.add_argument("--baseline-shots", default="", help="e.g. 1,5: shots-only baselines instead of full")
    parser.add_argument("--draws", type=int, default=3, help="draws per shot count (with --baseline-shots)")
    parser.add_argument(
        "--compare",
        type=Path,
        help="bench_fewshot.py --out folder of univg from the same start: writes <out>/ablation.md, .png",
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # rehearsal only when asked for here (the cpu-fast profile turns it on for univg)
    cfg = load_finetune_config(
        profile_path(args.profile), ["rehearsal.corpus=", *args.overrides, "split.num_draws=1"]
    )
    init = Path(args.model).resolve()
    shot_counts = [int(k) for k in args.baseline_shots.split(",") if k]
    if args.compare is not None and not (args.compare / "fewshot.json").is_file():
        parser.error(f"--compare {args.compare}: no fewshot.json there (run bench_fewshot.py first)")
    baselines: dict[str, dict[int, list[float]]] = {}
    for name in args.sets.split(","):
        path = DATA / name / "pairs.csv"
        if not path.is_file():
            print(f"skipped {name}: no {path}")
            continue
        task = read_task(path)
        if not shot_counts:
            split = plan_splits(task, path, cfg, None)[0]
            loaded = load_cases(task, set(split.full_train) | set(split.eval), progress=False)
            started = time.perf_counter()
            folder = args.out / name / "full_pretrained"
            info: dict[str, Any] = {"method": "full_pretrained", "task_path": str(path)}
            info["cases_from"] = split.eval_from
            summary = train_and_evaluate(
                cfg, task, loaded, split.full_train, split.eval, None, folder, info, False, init
            )
            print(
                f"{name}: full supervision from {init.name}: Dice {summary['mean']['dice']:.4f} on "
                f"{summary['num_cases']} test cases, {len(split.full_train)} train labels "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
            continue
        for shots in shot_counts:
            draws_cfg = replace(cfg, split=replace(cfg.split, shots=shots, num_draws=args.draws))
            rehearse = bool(cfg.rehearsal.corpus)
            if rehearse:  # the corpus takes univg's corpus share of the batch; the shots take the rest
                fraction = cfg.segmenter.patch.synthetic_fraction * cfg.rehearsal.share
                patch = replace(cfg.segmenter.patch, synthetic_fraction=fraction)
                draws_cfg = replace(draws_cfg, segmenter=replace(cfg.segmenter, patch=patch))
            splits = plan_splits(task, path, draws_cfg, None)
            loaded = load_cases(task, {n for s in splits for n in s.train + s.eval}, progress=False)
            dice = baselines.setdefault(name, {}).setdefault(shots, [])
            kind = "baseline_pretrained_rehearsal" if rehearse else "baseline_pretrained"
            for d, split in enumerate(splits):
                started = time.perf_counter()
                folder = args.out / name / f"{kind}_shots_{shots}" / f"draw_{d}"
                info = {
                    "method": kind,
                    "task_path": str(path),
                    "cases_from": split.eval_from,
                    "draw": d,
                    "shots": split.train,
                }
                corpus = rehearsal_pairs(cfg, d) if rehearse else None  # what univg's draw d rehearses
                summary = train_and_evaluate(
                    draws_cfg, task, loaded, split.train, split.eval, corpus, folder, info, False, init
                )
                dice.append(summary["mean"]["dice"])
                print(
                    f"{name} {shots} shot(s) draw {d} ({', '.join(split.train)}): baseline from "
                    f"{init.name}: Dice {dice[-1]:.4f} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            print(
                f"{name} {shots} shot(s): baseline from {init.name}: Dice {np.mean(dice):.4f} +- "
                f"{np.std(dice):.4f} over {len(dice)} draws",
                flush=True,
            )
    if args.compare is not None and baselines:
        compare(json.loads((args.compare / "fewshot.json").read_text()), baselines, args.out)
    return 0


def compare(fewshot: dict[str, Any], baselines: dict[str, dict[int, list[float]]], out: Path) -> None:
    """Table and plot: univg and the shots-only baseline from the same pretrained start (paired draws),
    and the baseline from scratch, per set and shot count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "| set | shots | univg (pretrained start) | baseline (pretrained start) | univg - that baseline, "
        "per draw | baseline (scratch) |",
        "|---|---|---|---|---|---|",
    ]
    fig, axes = plt.subplots(1, len(baselines), figsize=(4.6 * len(baselines), 3.6), squeeze=False)
    for ax, (name, by_shots) in zip(axes[0], baselines.items(), strict=True):
        curves: dict[str, list[tuple[int, float, float]]] = {}
        for shots, pre in sorted(by_shots.items()):
            runs = fewshot.get(name, {}).get("shots", {}).get(str(shots), {})
            univg = runs.get("univg", {}).get("dice", {}).get("per_draw", [])
            scratch = runs.get("baseline", {}).get("dice", {}).get("per_draw", [])
            diffs = ", ".join(f"{u - b:+.4f}" for u, b in zip(univg, pre, strict=False)) or "-"
            univg_s, pre_s, scratch_s = (
                f"{np.mean(v):.4f} +- {np.std(v):.4f}" if v else "-" for v in (univg, pre, scratch)
            )
            lines.append(f"| {name} | {shots} | {univg_s} | {pre_s} | {diffs} | {scratch_s} |")
            for label, values in (
                ("univg (pretrained start)", univg),
                ("baseline (pretrained start)", pre),
                ("baseline (scratch)", scratch),
            ):
                if values:
                    curves.setdefault(label, []).append(
                        (shots, float(np.mean(values)), float(np.std(values)))
                    )
        for label, points in curves.items():
            xs, ys, es = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("real labelled shots")
        ax.set_ylabel("Dice (test split)")
        ax.set_xticks(sorted(by_shots))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "ablation.png", dpi=110)
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'ablation.md'}, {out / 'ablation.png'}")


if __name__ == "__main__":
    sys.exit(main())
