"""The field of view estimated from the image (finetune/field.py): on the real sets' labels, and on the
saved predictions of runs made before it existed.

    python benchmarks/bench_field.py --labels
    python benchmarks/bench_field.py --runs runs/w36s1 runs/x5more34w [--cleared-out /tmp/cleared]

--labels: for every labelled image of the sets in ../shared/data, whether the estimate finds an outside,
the fraction of its vessel pixels the estimate puts outside (what `infer.field_from_image=auto` checks on
the shots), and, where the set gives FOV masks, the estimate's IoU with them.

--runs: every `<run>/eval/summary.json` under the folders given is re-scored from its saved masks
(`eval/pred`), as they are and cleared outside the estimated field, with the run's own task and cases
(Dice inside the task's FOV, as `univg evaluate` scores). Since a run's probabilities are cleared before the
threshold, clearing the saved mask gives the mask a run with the field would have written, for a model
whose shots pass the check (the run's field_from_image record says whether they do; runs older than it
have none, and the script checks their shots itself). `--cleared-out` writes the cleared masks, one folder
per run, for fig_errors.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_engine.ingest import load_case, read_task  # noqa: E402
from data_engine.io import read_image, read_mask  # noqa: E402
from finetune.evaluate import match_predictions, read_prediction  # noqa: E402
from finetune.field import estimate_field, shots_keep_vessels  # noqa: E402
from finetune.metrics import dice  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def label_report() -> None:
    sets = sorted(p.parent for p in DATA.glob("*/pairs.csv"))
    if not sets:
        print(f"no real data set under {DATA}: nothing to check")
        return
    print("| set | images | with an outside | vessel px outside, mean | worst | FOV IoU, min / mean |")
    print("|---|---|---|---|---|---|")
    for root in sets:
        with open(root / "pairs.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        losses, ious, with_outside = [], [], 0
        for row in rows:
            field = estimate_field(read_image(root / row["image"]))
            with_outside += int(not field.all())
            vessel = read_mask(root / row["mask"]) > 0
            losses.append(float((vessel & ~field).sum() / max(int(vessel.sum()), 1)))
            if row.get("fov"):
                given = read_mask(root / row["fov"]) > 0
                ious.append(float((given & field).sum() / (given | field).sum()))
        iou = f"{min(ious):.4f} / {np.mean(ious):.4f}" if ious else "-"
        print(
            f"| {root.name} | {len(rows)} | {with_outside} | {100 * np.mean(losses):.3f} % | "
            f"{100 * max(losses):.3f} % | {iou} |"
        )


def rescore(run: Path, cleared_out: Path | None) -> tuple[float, float, bool, str]:
    """(Dice as saved, Dice cleared, whether the run's shots pass the check, where the decision came from)."""
    summary = json.loads((run / "eval" / "summary.json").read_text())
    task = read_task(summary["task_path"])
    by_name = {c.name: c for c in task.cases}
    cases = [by_name[row["case"]] for row in summary["per_case"]]
    files = match_predictions(run / "eval" / "pred", cases)
    decision = summary.get("field_from_image")
    if isinstance(decision, dict):
        keeps, source = bool(decision["used"]), "recorded"
    else:
        train_task = read_task(summary.get("trained_on_task_path", summary["task_path"]))
        train_by_name = {c.name: c for c in train_task.cases}
        shots = [load_case(train_by_name[n])[:2] for n in summary["train_cases"] if n in train_by_name]
        keeps, source = (shots_keep_vessels(shots)[0], "checked") if shots else (True, "no shots found")
    before, after = [], []
    for case in cases:
        image, label, fov = load_case(case)
        pred, _prob = read_prediction(files[case.name][0], 0.5)
        cleared = pred & estimate_field(image) if keeps else pred
        inside = np.ones(label.shape, bool) if fov is None else fov > 0
        before.append(dice(pred[inside], label[inside] > 0))
        after.append(dice(cleared[inside], label[inside] > 0))
        if cleared_out is not None:
            folder = cleared_out / run.as_posix().replace("/", "__")
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{case.name}.png"), np.where(cleared, np.uint8(255), np.uint8(0)))
    return float(np.mean(before)), float(np.mean(after)), keeps, source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", action="store_true", help="the estimate on the real sets' labels")
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="folders with */eval/summary.json")
    parser.add_argument("--cleared-out", type=Path, default=None, help="write the cleared masks here")
    args = parser.parse_args()
    if args.labels:
        label_report()
    runs = sorted({p.parent.parent for root in args.runs for p in root.glob("**/eval/summary.json")})
    if args.runs and not runs:
        raise SystemExit(f"no */eval/summary.json under {', '.join(map(str, args.runs))}")
    if runs:
        print("| run | Dice as saved | cleared outside the field | change (points) | shots pass |")
        print("|---|---|---|---|---|")
    for run in runs:
        before, after, keeps, source = rescore(run, args.cleared_out)
        print(
            f"| {run} | {before:.4f} | {after:.4f} | {100 * (after - before):+.2f} | "
            f"{'yes' if keeps else 'no'} ({source}) |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
