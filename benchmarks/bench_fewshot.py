"""Dice against shots on the real sets: univg (shots + engine synthesis) vs the augmentation-only baseline
vs full supervision, each with the same segmenter and step budget (`univg finetune` underneath).

    python benchmarks/bench_fewshot.py --out runs/bench_fewshot --jobs 2              # all three sets
    python benchmarks/bench_fewshot.py --sets OCTA500_3M --shots 1,5 --draws 1 --out runs/quick
    python benchmarks/bench_fewshot.py --data /path/to/sets --sets MYSET --out runs/myset --jobs 2
    python benchmarks/bench_fewshot.py --out runs/bench_fewshot --report-only   # tables of finished runs
    python benchmarks/bench_fewshot.py --out runs/variant --methods univg --skip-full \
        --baseline-from runs/bench_fewshot segmenter.patch.synthetic_fraction_end=0    # a univg variant only

Reads the sets from ../shared/data, or from `--data DIR` (any folder of set folders, each with a task
manifest `pairs.csv`: your own collections; skips those absent). Each (set, shots) is one run folder
`<out>/<set>/shots_<k>` (methods univg + baseline, --draws draws); full supervision is one run per set,
`<out>/<set>/full` (with `--full-seeds N`, also `<out>/<set>/full_seed<s>` for segmenter seeds 1..N-1, so
full supervision gets a mean and std over training seeds too; `--shots ""` runs full supervision only).
Runs resume, so a killed benchmark continues where it stopped. Writes
`<out>/fewshot.json`, `<out>/fewshot.md` (the table) and `<out>/fewshot_dice.png` (Dice against shots).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("CHASE_DB1", "CIMAT_XCA80", "OCTA500_3M")


def machine_line() -> str:
    """CPU, the vector level torch uses and the core count (CPU scores can differ across vector levels)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from finetune.run import machine_line as describe
    from finetune.run import machine_record

    return describe(machine_record())


Job = tuple[str, int | None, int, str, str, list[str], int, str, int, str]


def job_config(job: Job) -> tuple[Path, Path, Any]:
    """(task CSV, run folder, finetune config) of one job: full supervision of a set at segmenter seed
    `full_seed` (shots None) or the few-shot methods at `shots`."""
    name, shots, draws, profile, out, overrides, _threads, methods, full_seed, data = job
    from finetune.config import load_finetune_config
    from finetune.run import profile_path

    if shots is None:
        run_dir = Path(out) / name / full_dir_name(full_seed)
        more = ["methods=[full]", "split.num_draws=1", "split.shots=1"]
        if full_seed:
            more.append(f"segmenter.seed={full_seed}")
    else:
        run_dir = Path(out) / name / f"shots_{shots}"
        more = [f"methods=[{methods}]", f"split.num_draws={draws}", f"split.shots={shots}"]
    return (
        Path(data) / name / "pairs.csv",
        run_dir,
        load_finetune_config(profile_path(profile), [*overrides, *more]),
    )


def run_job(job: Job) -> str:
    """One run folder (see job_config), resumed when it exists."""
    import torch

    torch.set_num_threads(job[6])  # the job's threads
    from finetune.run import run_finetune

    task, run_dir, cfg = job_config(job)
    started = time.perf_counter()
    run_finetune(task, run_dir, cfg, resume=run_dir.exists(), progress=False)
    return f"{run_dir}: {time.perf_counter() - started:.0f} s"


def conflicting_runs(runs: Sequence[tuple[Path, Any]]) -> list[str]:
    """Each (run folder, config) whose folder already holds a run of other settings, with what differs.

    Checked before a campaign starts: `univg finetune` refuses such a folder too, but only when its turn
    comes, which can be hours into the campaign."""
    import yaml

    from finetune.run import CONFIG_FILE, config_differences, with_checkout_paths
    from univg.config import to_dict

    found = []
    for run_dir, cfg in runs:
        path = run_dir / CONFIG_FILE
        if not path.is_file():
            continue
        saved = yaml.safe_load(path.read_text()) or {}
        wanted = to_dict(with_checkout_paths(cfg))  # the paths as the run records them
        diffs = config_differences({key: saved.get(key) for key in wanted}, wanted)
        if diffs:
            found.append(f"{run_dir}: {'; '.join(diffs[:3])}")
    return found


def refuse_conflicts(out: Path, runs: Sequence[tuple[Path, Any]]) -> bool:
    """Print the conflicting_runs of a campaign to stderr; True when there is one (the campaign stops)."""
    conflicts = conflicting_runs(runs)
    if conflicts:
        print(
            f"{out} holds runs made with other settings (another --out, or the same settings):\n  "
            + "\n  ".join(conflicts),
            file=sys.stderr,
        )
    return bool(conflicts)


def usable_cores() -> int:
    """The cores this process may run on (a `taskset` binding counts), else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def run_jobs(run: Callable[[Any], str], jobs: Sequence[Any], num_jobs: int) -> None:
    """Run every job, `num_jobs` at once (each in a fresh spawned process, so threads and state stay its
    own), printing the line each returns as it finishes."""
    if num_jobs == 1:
        for job in jobs:
            print(run(job), flush=True)
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(num_jobs, maxtasksperchild=1) as pool:
        for line in pool.imap_unordered(run, jobs):
            print(line, flush=True)


def full_dir_name(seed: int) -> str:
    """Run folder of full supervision at segmenter seed `seed` (seed 0 keeps the original name)."""
    return "full" if seed == 0 else f"full_seed{seed}"


def _full_summaries(set_dir: Path) -> list[Path]:
    """Finished full-supervision evaluations of a set folder, seed 0 first, then seeds 1, 2, ..."""
    runs = [set_dir / "full"] + sorted(
        set_dir.glob("full_seed*"), key=lambda p: int(p.name.removeprefix("full_seed") or 0)
    )
    return [f for f in (r / "full" / "eval" / "summary.json" for r in runs) if f.is_file()]


def _stats(dice_per_draw: list[float], cldice_per_draw: list[float]) -> dict[str, Any]:
    def one(values: list[float]) -> dict[str, Any]:
        return {
            "mean": float(np.mean(values)),
            "std": float(np.std(values)) if len(values) > 1 else 0.0,
            "per_draw": values,
        }

    return {"num_draws": len(dice_per_draw), "dice": one(dice_per_draw), "cldice": one(cldice_per_draw)}


def _same_split(a: Path, b: Path) -> bool:
    """Whether two draw folders hold the same split.json (same task, shots and cases)."""
    keys = ("task", "shots", "train", "eval")
    sa, sb = (json.loads((d / "split.json").read_text()) for d in (a, b))
    return all(sa.get(k) == sb.get(k) for k in keys)


def collect(out: Path, baseline_from: Path | None = None) -> dict[str, Any]:
    """Every finished evaluation under out, as {set: {"full": stats, "shots": {k: {method: stats}}}}.

    Read from each draw's own eval/summary.json, so a run stopped part-way still counts the draws that
    every method of it finished (n= in the table says how many). With `baseline_from` (an earlier
    benchmark folder), the baseline and full supervision missing here are taken from there, draw by
    draw, only where that draw's split.json names the same cases."""
    results: dict[str, Any] = {}
    for set_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        entry: dict[str, Any] = {"shots": {}}
        full = _full_summaries(set_dir)
        if not full and baseline_from is not None and (baseline_from / set_dir.name).is_dir():
            full = _full_summaries(baseline_from / set_dir.name)
        if full:  # over training seeds: full supervision has no draw of shots
            means = [json.loads(f.read_text())["mean"] for f in full]
            entry["full"] = _stats([m["dice"] for m in means], [m["cldice"] for m in means])
        for run in sorted(set_dir.glob("shots_*")):
            methods: dict[str, Any] = {}
            where = {m: run for m in ("univg", "univg_gen", "baseline")}
            done = {m: {f.parts[-4] for f in run.glob(f"draw_*/{m}/eval/summary.json")} for m in where}
            if not done["baseline"] and baseline_from is not None:
                other = baseline_from / set_dir.name / run.name
                where["baseline"] = other
                done["baseline"] = {
                    f.parts[-4]
                    for f in other.glob("draw_*/baseline/eval/summary.json")
                    if (run / f.parts[-4]).is_dir() and _same_split(run / f.parts[-4], other / f.parts[-4])
                }
            present = [m for m in done if done[m]]
            # methods are compared on the same draws only: those every present method finished
            draws = sorted(set.intersection(*(done[m] for m in present))) if present else []
            for method in present:
                evals = [
                    json.loads((where[method] / d / method / "eval" / "summary.json").read_text())["mean"]
                    for d in draws
                ]
                if evals:
                    methods[method] = _stats([e["dice"] for e in evals], [e["cldice"] for e in evals])
            if methods:
                entry["shots"][int(run.name.split("_")[1])] = methods
        if entry["shots"] or "full" in entry:
            results[set_dir.name] = entry
    return results


def _cell(stats: dict[str, Any] | None, metric: str = "dice") -> str:
    if not stats or stats[metric]["mean"] is None:
        return "-"
    m = stats[metric]
    return f"{m['mean']:.4f} +- {m['std']:.4f} (n={stats['num_draws']})"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| set | shots | univg Dice | baseline Dice | univg - baseline | full supervision Dice | univg clDice"
        " | baseline clDice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        full = entry.get("full")
        if not entry["shots"]:  # full supervision only (--shots "")
            lines.append(f"| {name} | - | - | - | - | {_cell(full)} | - | - |")
        for k in sorted(entry["shots"]):
            methods = entry["shots"][k]
            u, b = methods.get("univg"), methods.get("baseline")
            gap = "-"
            if u and b:
                gap = f"{u['dice']['mean'] - b['dice']['mean']:+.4f}"
            lines.append(
                f"| {name} | {k} | {_cell(u)} | {_cell(b)} | {gap} | {_cell(full)} | {_cell(u, 'cldice')} | "
                f"{_cell(b, 'cldice')} |"
            )
    return "\n".join(lines)


def dice_panels(count: int) -> tuple[Any, list[Any]]:
    """A figure of `count` Dice panels side by side (Agg backend, nothing shown): (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=(4.2 * count, 3.6), squeeze=False)
    return fig, list(axes[0])


def finish_panel(ax: Any, title: str, xlabel: str, legend_size: int = 7) -> None:
    """Title, axis labels (y: test-split Dice), a light grid and the legend of one Dice panel."""
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Dice (test split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: dict[str, Any], path: Path) -> None:
    fig, axes = dice_panels(len(results))
    for ax, (name, entry) in zip(axes, results.items(), strict=True):
        shots = sorted(entry["shots"])
        for method, colour in (("univg", "tab:red"), ("baseline", "tab:blue")):
            xs = [k for k in shots if method in entry["shots"][k]]
            mean = [entry["shots"][k][method]["dice"]["mean"] for k in xs]
            std = [entry["shots"][k][method]["dice"]["std"] for k in xs]
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, color=colour, label=method)
        if "full" in entry:
            full = entry["full"]["dice"]
            ax.axhline(full["mean"], color="black", ls="--", label="full supervision")
            if full["std"] > 0:  # spread over training seeds
                ax.axhspan(full["mean"] - full["std"], full["mean"] + full["std"], color="black", alpha=0.08)
        ax.set_xticks(shots or [1])
        finish_panel(ax, name, "real labelled shots", legend_size=8)
    save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated set folders in --data")
    parser.add_argument(
        "--shots", default="1,3,5", help='comma-separated shot counts ("" for full supervision only)'
    )
    parser.add_argument("--draws", type=int, default=3, help="draws per shot count")
    parser.add_argument("--profile", default="cpu-fast", help="configs/finetune/<profile>.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fewshot"))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each on cores / jobs threads")
    parser.add_argument("--report-only", action="store_true", help="only tabulate finished runs")
    parser.add_argument(
        "--methods", default="univg,baseline", help="few-shot methods to run (comma-separated)"
    )
    parser.add_argument("--skip-full", action="store_true", help="do not run full supervision")
    parser.add_argument(
        "--full-seeds",
        type=int,
        default=1,
        help="full supervision at segmenter seeds 0..N-1 (mean and std over them; default 1)",
    )
    parser.add_argument(
        "--baseline-from",
        type=Path,
        help="an earlier benchmark folder: its baseline and full runs stand in for the ones not run "
        "here, on the draws whose split matches (to try a univg variant without rerunning them)",
    )
    parser.add_argument(
        "--data", type=Path, default=DATA, help="folder of <set>/pairs.csv (default: ../shared/data)"
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args()
    data = args.data.resolve()
    if not data.is_dir():
        if args.data != DATA:  # a folder the user named: a mistake, not a machine without the data
            print(f"--data {args.data}: no such folder", file=sys.stderr)
            return 2
        print(f"skipped: no real data in {data}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        sets = [n for n in args.sets.split(",") if (data / n / "pairs.csv").is_file()]
        for n in sorted(set(args.sets.split(",")) - set(sets)):
            print(f"skipped {n}: no {data / n / 'pairs.csv'}")
        threads = max(1, usable_cores() // args.jobs)
        shot_counts = [int(k) for k in args.shots.split(",") if k.strip()]
        common = (args.draws, args.profile, str(args.out), args.overrides, threads, args.methods)
        # full supervision first, then the shot counts in the order given (most wanted first)
        jobs: list[Job] = []
        if not args.skip_full:
            jobs += [(n, None, *common, s, str(data)) for s in range(args.full_seeds) for n in sets]
        jobs += [(n, k, *common, 0, str(data)) for k in shot_counts for n in sets]
        if refuse_conflicts(args.out, [job_config(job)[1:] for job in jobs]):
            return 2
        run_jobs(run_job, jobs, args.jobs)
    results = collect(args.out, args.baseline_from)
    (args.out / "fewshot.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (args.out / "fewshot.md").write_text(text + "\n")
    plot(results, args.out / "fewshot_dice.png")
    print(text)
    print(f"\nmachine: {machine_line()} | python {sys.version.split()[0]}")
    print(f"command: python benchmarks/bench_fewshot.py {' '.join(sys.argv[1:])}")
    print(f"wrote {args.out / 'fewshot.md'}, {args.out / 'fewshot_dice.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
