"""Dice against the segmenter's step budget, one panel per set: a picture of how each method's score moves
when every method gets more steps.

    python benchmarks/fig_budget.py --out docs/fewshot_budget.png --shots 5 \
        "800:univg=runs/fewshot_rehearsal" "800:full=runs/full_seeds" \
        "1600:univg=runs/budget1600" "1600:full=runs/budget1600"

Each point is STEPS:METHOD=FOLDER, a `bench_fewshot.py` output folder read with its own `collect` (so the
mean and std are over draws for the few-shot methods and over training seeds for `full`). Methods: univg,
univg_gen, baseline (at --shots) and full. A method missing from a folder is an error naming both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fewshot import collect  # noqa: E402

COLOURS = {"univg": "tab:red", "univg_gen": "tab:purple", "baseline": "tab:blue", "full": "black"}


def parse_point(text: str) -> tuple[int, str, Path]:
    """'STEPS:METHOD=FOLDER' -> (steps, method, folder)."""
    head, sep, folder = text.partition("=")
    steps, colon, method = head.partition(":")
    if not (sep and colon and steps.isdigit() and method in COLOURS and folder):
        raise SystemExit(f"bad point {text!r}: want STEPS:METHOD=FOLDER, METHOD one of {sorted(COLOURS)}")
    return int(steps), method, Path(folder)


def stats_of(results: dict[str, Any], name: str, method: str, shots: int) -> dict[str, Any] | None:
    entry = results.get(name)
    if entry is None:
        return None
    if method == "full":
        return entry.get("full")
    return entry["shots"].get(shots, {}).get(method)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("points", nargs="+", help="STEPS:METHOD=FOLDER (bench_fewshot.py output folders)")
    parser.add_argument("--shots", type=int, default=5, help="shot count of the few-shot methods")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    points = [parse_point(p) for p in args.points]
    results = {folder: collect(folder) for folder in {f for _s, _m, f in points}}
    names = sorted({n for r in results.values() for n in r})
    series: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for steps, method, folder in points:
        for name in names:
            stats = stats_of(results[folder], name, method, args.shots)
            if stats is None:
                raise SystemExit(f"{folder}: no {method} result for {name} (at {args.shots} shots)")
            dice = stats["dice"]
            series.setdefault((name, method), []).append((steps, dice["mean"], dice["std"]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.0 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for (set_name, method), values in series.items():
            if set_name != name:
                continue
            values.sort()
            label = "full supervision" if method == "full" else f"{method} {args.shots} shots"
            ax.errorbar(
                [v[0] for v in values],
                [v[1] for v in values],
                yerr=[v[2] for v in values],
                marker="o",
                capsize=3,
                color=COLOURS[method],
                ls="--" if method == "full" else "-",
                label=label,
            )
        ax.set_title(name)
        ax.set_xlabel("segmenter steps (every method)")
        ax.set_ylabel("Dice (test split)")
        ax.set_xticks(sorted({s for s, _m, _f in points}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
