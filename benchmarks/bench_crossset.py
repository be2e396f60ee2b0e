"""Shots from one set, scored on another: univg against the augmentation-only baseline for every ordered pair
of sets (`univg finetune --task A --eval-task B` underneath), as a Dice matrix.

    python benchmarks/bench_crossset.py --out runs/crossset --jobs 2   # univg from the shipped start
    python benchmarks/bench_crossset.py --sets DRIVE,CHASE_DB1 --data /path/to/sets --out runs/fundus_x
    python benchmarks/bench_crossset.py --out runs/crossset --report-only       # tables of finished runs

Reads `<data>/<set>/pairs.csv` (default data: ../shared/data; absent sets are skipped). Each ordered pair is
one run folder `<out>/<A>_on_<B>` (methods univg + baseline, `--draws` draws of `--shots`, trained on A's
train split and scored on B's test split, or on all of B when it has none; `--target-unlabelled` self-trains
on B's train images, labels unread, instead of A's). Runs resume. `--diagonal` adds A on A (the in-set
reference). Writes `<out>/crossset.json`, `<out>/crossset.md` (one matrix per method,
rows: the set the shots come from; columns: the set scored) and `<out>/crossset.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_fewshot import refuse_conflicts, run_jobs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = ("CHASE_DB1", "CIMAT_XCA80", "OCTA500_3M")
METHODS = ("univg", "baseline")

Job = tuple[str, str, str, int, int, str, str, list[str], int, bool]


def job_config(job: Job) -> tuple[Path, Any]:
    """(run folder, finetune config) of one job: the shots of `source`, scored on `target`."""
    _data, source, target, shots, draws, profile, out, overrides, _threads, _target_unlabelled = job
    if str(ROOT) not in sys.path:  # called once per job, in the campaign and in each worker
        sys.path.insert(0, str(ROOT))
    from finetune.config import load_finetune_config
    from finetune.run import profile_path

    more = [f"methods=[{','.join(METHODS)}]", f"split.num_draws={draws}", f"split.shots={shots}"]
    return Path(out) / f"{source}_on_{target}", load_finetune_config(
        profile_path(profile), [*overrides, *more]
    )


def run_job(job: Job) -> str:
    """One run folder (see job_config), resumed when it exists."""
    data, source, target, _shots, _draws, _profile, _out, _overrides, threads, target_unlabelled = job
    import torch

    torch.set_num_threads(threads)
    from finetune.run import run_finetune

    run_dir, cfg = job_config(job)
    started = time.perf_counter()
    task, scored = (Path(data) / name / "pairs.csv" for name in (source, target))
    run_finetune(
        task,
        run_dir,
        cfg,
        resume=run_dir.exists(),
        progress=False,
        eval_task_path=None if source == target else scored,
        # self-training on the scored set's train split (its labels never read), not the shots' set
        unlabelled_path=scored if target_unlabelled and source != target else None,
    )
    return f"{run_dir}: {time.perf_counter() - started:.0f} s"


def collect(out: Path) -> dict[str, Any]:
    """{source: {target: {method: {"mean", "std", "per_draw"}}}} from the finished runs' summary.json."""
    results: dict[str, Any] = {}
    for summary_path in sorted(out.glob("*_on_*/summary.json")):
        source, target = summary_path.parent.name.split("_on_", 1)
        summary = json.loads(summary_path.read_text())
        results.setdefault(source, {})[target] = {
            m: {k: summary["methods"][m]["dice"][k] for k in ("mean", "std", "per_draw")}
            for m in METHODS
            if m in summary["methods"]
        } | {"shots": summary["shots"], "num_eval_cases": summary["num_eval_cases"]}
    return results


def _names(results: dict[str, Any]) -> list[str]:
    return sorted(set(results) | {t for row in results.values() for t in row})


def tables(results: dict[str, Any]) -> str:
    names = _names(results)
    lines: list[str] = []
    for method in (*METHODS, "univg - baseline"):
        lines += [
            f"**{method}** (Dice; rows: shots from, columns: scored on)",
            "",
            "| shots from \\ scored on | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for source in names:
            cells = []
            for target in names:
                entry = results.get(source, {}).get(target)
                if not entry or any(m not in entry for m in METHODS):
                    cells.append("-")
                elif method == "univg - baseline":
                    cells.append(f"{entry['univg']['mean'] - entry['baseline']['mean']:+.4f}")
                else:
                    m = entry[method]
                    n = len(m["per_draw"])
                    cells.append(f"{m['mean']:.4f}" + (f" +- {m['std']:.4f}" if n > 1 else "") + f" (n={n})")
            lines.append(f"| {source} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _names(results)
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4.4 * len(METHODS), 4.0), squeeze=False)
    for ax, method in zip(axes[0], METHODS, strict=True):
        grid = np.full((len(names), len(names)), np.nan)
        for i, source in enumerate(names):
            for j, target in enumerate(names):
                entry = results.get(source, {}).get(target, {})
                if method in entry:
                    grid[i, j] = entry[method]["mean"]
        ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
        for i in range(len(names)):
            for j in range(len(names)):
                if not np.isnan(grid[i, j]):
                    colour = "black" if grid[i, j] > 0.6 else "white"
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color=colour, fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("scored on")
        ax.set_ylabel("shots from")
        ax.set_title(f"{method}: Dice")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DATA, help="folder of <set>/pairs.csv")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated set folders in --data")
    parser.add_argument("--shots", type=int, default=5, help="labelled shots per draw")
    parser.add_argument("--draws", type=int, default=1, help="draws of the shots per pair")
    parser.add_argument("--diagonal", action="store_true", help="also each set on itself")
    parser.add_argument("--profile", default="cpu-fast", help="configs/finetune/<profile>.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_crossset"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each on cores / jobs threads")
    parser.add_argument(
        "--target-unlabelled",
        action="store_true",
        help="self-train on the scored set's train images (univg finetune --unlabelled B) instead of A's",
    )
    parser.add_argument("--report-only", action="store_true", help="only tabulate finished runs")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"skipped: no real data in {args.data}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        sets = [n for n in args.sets.split(",") if (args.data / n / "pairs.csv").is_file()]
        for n in sorted(set(args.sets.split(",")) - set(sets)):
            print(f"skipped {n}: no {args.data / n / 'pairs.csv'}")
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        common = (args.shots, args.draws, args.profile, str(args.out), args.overrides, threads)
        jobs: list[Job] = [
            (str(args.data), a, b, *common, args.target_unlabelled)
            for a in sets
            for b in sets
            if a != b or args.diagonal
        ]
        if refuse_conflicts(args.out, [job_config(job) for job in jobs]):
            return 2
        run_jobs(run_job, jobs, args.jobs)
    results = collect(args.out)
    (args.out / "crossset.json").write_text(json.dumps(results, indent=2) + "\n")
    text = tables(results)
    (args.out / "crossset.md").write_text(text + "\n")
    plot(results, args.out / "crossset.png")
    print(text)
    sys.path.insert(0, str(ROOT))
    from finetune.run import machine_line, machine_record

    print(f"machine: {machine_line(machine_record())} | python {sys.version.split()[0]}")
    print(f"command: python benchmarks/bench_crossset.py {' '.join(sys.argv[1:])}")
    print(f"wrote {args.out / 'crossset.md'}, {args.out / 'crossset.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
