"""`univg evaluate`: score predictions, made by anything, against a task's labels.

    univg evaluate --pred runs/my_task/pred --task my_task/pairs.csv [--out DIR] [--split RUN/split.json]

Which cases: the task's test split; with `--split`, the `eval` cases of that split.json; a task without a
test split (and no --split) is scored on every case.

Predictions: one file per case directly in `--pred`, named by the case's name, its image's file stem or
its mask's file stem (`Image_11L.png`, `test_1.png`, `1.png`): PNG/TIFF/... images or `.npy` arrays.
A file holding two values (0 and one other) is a mask; anything else is a probability map (uint8 / 255,
uint16 / 65535, float as is, in [0, 1]), made a mask at `--threshold`. Probability maps in
`--pred/probabilities/` with the same names (what `univg segment --probabilities` writes) give AUC next
to masks. A case without a prediction is an error that lists them all.

Writes into --out (default `<pred>/evaluation`): `summary.json` (mean, std, min, max, n per metric, and
every case's scores), `cases.csv`, `overlays/<case>.png` (image | label | prediction | errors: true
positive white, false positive red, false negative blue, outside the FOV dark grey) and `report.md`.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from data_engine.ingest import Case, Task, load_case, read_task
from data_engine.io import IMAGE_SUFFIXES
from finetune.metrics import METRICS, case_metrics, summarise

PREDICTION_SUFFIXES: tuple[str, ...] = (*IMAGE_SUFFIXES, ".npy")
PROBABILITY_DIR = "probabilities"
_OVERLAY_MAX_SIDE_PX = 1024  # overlay panels larger than this are shrunk to it (px), to keep PNGs small

# (mask bool HxW, probability float HxW in [0, 1] or None) for one case, given the case and its image
Predictor = Callable[[Case, np.ndarray], tuple[np.ndarray, np.ndarray | None]]


# --- reading predictions ---


def _read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable .npy array ({e})") from e
    else:
        data = path.read_bytes()
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
        if decoded is None:
            raise ValueError(f"{path}: not a readable image")
        array = decoded
        if array.ndim == 3:
            channels = array[:, :, : min(3, array.shape[2])]
            if not all(
                np.array_equal(channels[:, :, 0], channels[:, :, c]) for c in range(channels.shape[2])
            ):
                raise ValueError(
                    f"{path}: a prediction must be single-channel (grey), got colour {array.shape}"
                )
            array = channels[:, :, 0]
    if array.ndim != 2:
        raise ValueError(f"{path}: a prediction must be an HxW array, got shape {array.shape}")
    return array


def read_prediction(path: str | Path, threshold: float) -> tuple[np.ndarray, np.ndarray | None]:
    """(mask bool HxW, probability float32 HxW or None) from a prediction file (module docstring)."""
    path = Path(path)
    array = _read_array(path)
    if array.dtype == np.bool_:
        return array, None
    values = np.unique(array)
    if (
        array.dtype.kind in "iu"
        and values.size <= 2
        and values[0] >= 0
        and (values.size == 1 or values[0] == 0)
    ):
        return array > 0, None
    if array.dtype.kind == "f":
        prob = np.nan_to_num(array.astype(np.float32), nan=0.0)
        if prob.min() < 0 or prob.max() > 1:
            raise ValueError(
                f"{path}: float predictions must be probabilities in [0, 1], "
                f"got {prob.min():.3g}..{prob.max():.3g}"
            )
    elif array.dtype == np.uint8:
        prob = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        prob = array.astype(np.float32) / 65535.0
    else:
        raise ValueError(
            f"{path}: unsupported prediction dtype {array.dtype} (use uint8, uint16, bool or float)"
        )
    return prob > threshold, prob


def _case_keys(cases: Sequence[Case]) -> dict[str, str]:
    """File stem -> case name: each case answers to its name and its image's and mask's stems, unless
    another case answers to the same stem (then only the case whose name it is keeps it)."""
    owners: dict[str, set[str]] = {}
    for case in cases:
        for key in {case.name, case.image_path.stem, case.mask_path.stem}:
            owners.setdefault(key, set()).add(case.name)
    keys = {}
    for key, names in owners.items():
        if len(names) == 1:
            keys[key] = next(iter(names))
        elif key in names:
            keys[key] = key
    return keys


def match_predictions(pred_dir: str | Path, cases: Sequence[Case]) -> dict[str, tuple[Path, Path | None]]:
    """Case name -> (prediction file, probability file or None) for every case; ValueError listing the
    cases without a prediction, or cases with two."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"--pred {pred_dir}: no such folder")
    keys = _case_keys(cases)

    def files_by_case(folder: Path) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {}
        if not folder.is_dir():
            return found
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in PREDICTION_SUFFIXES:
                name = keys.get(p.stem)
                if name is not None:
                    found.setdefault(name, []).append(p)
        return found

    masks = files_by_case(pred_dir)
    probs = files_by_case(pred_dir / PROBABILITY_DIR)
    doubles = [
        f"{name}: {', '.join(p.name for p in paths)}"
        for name, paths in {**masks, **probs}.items()
        if len(paths) > 1
    ]
    if doubles:
        raise ValueError(f"--pred {pred_dir}: more than one prediction file for a case: {'; '.join(doubles)}")
    missing = [c.name for c in cases if c.name not in masks]
    if missing:
        listed = ", ".join(missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise ValueError(
            f"--pred {pred_dir}: no prediction for {len(missing)} of {len(cases)} case(s): {listed}. "
            f"Name each file after the case, its image or its mask (e.g. {cases[0].name}.png or "
            f"{cases[0].image_path.stem}.png); formats: {', '.join(PREDICTION_SUFFIXES)}"
        )
    return {c.name: (masks[c.name][0], probs[c.name][0] if c.name in probs else None) for c in cases}


# --- overlays and reports ---


def _panel(array: np.ndarray) -> np.ndarray:
    """Any uint8 HxW / HxWx3 -> HxWx3 BGR."""
    return cv2.cvtColor(array, cv2.COLOR_GRAY2BGR) if array.ndim == 2 else array


def error_map(pred_HW: np.ndarray, label_HW: np.ndarray, fov: np.ndarray | None) -> np.ndarray:
    """BGR picture of a prediction's errors (bool masks in): TP white, FP red, FN blue, TN black, outside
    the FOV dark grey."""
    errors = np.zeros((*label_HW.shape, 3), np.uint8)
    if fov is not None:
        errors[fov == 0] = (40, 40, 40)
    errors[pred_HW & label_HW] = (255, 255, 255)
    errors[pred_HW & ~label_HW] = (0, 0, 255)  # BGR red
    errors[~pred_HW & label_HW] = (255, 0, 0)  # BGR blue
    return errors


def overlay(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    fov: np.ndarray | None,
    prob: np.ndarray | None = None,
) -> np.ndarray:
    """One BGR picture: image | label | prediction (probability map when given) | errors (TP white,
    FP red, FN blue, TN black, outside the FOV dark grey)."""
    label_b, pred_b = label > 0, pred > 0
    errors = error_map(pred_b, label_b, fov)
    shown_pred = np.rint(prob * 255).astype(np.uint8) if prob is not None else pred_b.astype(np.uint8) * 255
    panels = [_panel(image), _panel(label_b.astype(np.uint8) * 255), _panel(shown_pred), errors]
    h, w = label_b.shape
    scale = min(1.0, _OVERLAY_MAX_SIDE_PX / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        panels = [cv2.resize(p, size, interpolation=cv2.INTER_AREA) for p in panels]
    gap = np.full((panels[0].shape[0], 4, 3), 128, np.uint8)
    row: list[np.ndarray] = []
    for p in panels:
        row += [p, gap]
    return np.concatenate(row[:-1], axis=1)


def _fmt(value: float | int | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _write_report(summary: dict[str, Any], out_dir: Path) -> None:
    lines = [
        f"# Evaluation: {summary['task']}",
        "",
        f"- predictions: `{summary['predictions']}`",
        f"- cases: {summary['num_cases']} ({summary['cases_from']})",
        f"- probability threshold (for probability maps): {summary['threshold']}",
        f"- AUC: {summary['num_cases_with_probabilities']} case(s) came with probabilities",
        "",
        "| metric | mean | std | min | max | n |",
        "|---|---|---|---|---|---|",
    ]
    for name in METRICS:
        m = summary["metrics"][name]
        cells = [_fmt(m["mean"]), _fmt(m["std"]), _fmt(m["min"]), _fmt(m["max"]), str(m["n"])]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        "## Cases, worst Dice first",
        "",
        "| case | dice | cldice | nsd | overlay |",
        "|---|---|---|---|---|",
    ]
    for row in sorted(summary["per_case"], key=lambda r: r["dice"]):
        link = f"[png](overlays/{row['case']}.png)" if summary["overlays"] else "-"
        lines.append(
            f"| {row['case']} | {_fmt(row['dice'])} | {_fmt(row['cldice'])} | {_fmt(row['nsd'])} | {link} |"
        )
    lines += [
        "",
        "Overlays: image | label | prediction | errors (white TP, red FP, blue FN, dark grey outside FOV).",
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(lines))


def prepare_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create out_dir; an existing evaluation there is an error unless overwrite."""
    out_dir = Path(out_dir)
    if (out_dir / "summary.json").exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds an evaluation (summary.json); pass --overwrite to replace it"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def evaluate_cases(
    task: Task,
    cases: Sequence[Case],
    predict: Predictor,
    out_dir: str | Path,
    info: dict[str, Any],
    overlays: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Score `predict` on `cases` and write summary.json, cases.csv, overlays/ and report.md into out_dir.

    `info` joins the summary (where the predictions came from, threshold, which cases); returns the summary.
    Used by `univg evaluate` (predictions read from files) and by runs that predict in memory.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if overlays:
        (out_dir / "overlays").mkdir(exist_ok=True)
    per_case: list[dict[str, Any]] = []
    num_with_prob = 0
    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress, dynamic_ncols=True):
        image, label, fov = load_case(case)
        pred, prob = predict(case, image)
        if pred.shape != label.shape or (prob is not None and prob.shape != label.shape):
            got = pred.shape if pred.shape != label.shape else prob.shape  # type: ignore[union-attr]
            raise ValueError(
                f"case {case.name}: prediction is {got[1]}x{got[0]} px but its label {case.mask_path} is "
                f"{label.shape[1]}x{label.shape[0]} px (width x height)"
            )
        scores = case_metrics(pred, label, fov, prob)
        num_with_prob += prob is not None
        per_case.append({"case": case.name, **scores})
        if overlays:
            picture = overlay(image, label, pred, fov, prob)
            cv2.imwrite(str(out_dir / "overlays" / f"{case.name}.png"), picture)
    metrics = summarise(per_case)
    summary: dict[str, Any] = {
        "task": task.name,
        "task_root": str(task.root),
        **info,
        "num_cases": len(per_case),
        "num_cases_with_probabilities": num_with_prob,
        "overlays": overlays,
        "metrics": metrics,
        "mean": {name: metrics[name]["mean"] for name in METRICS},
        "std": {name: metrics[name]["std"] for name in METRICS},
        "per_case": per_case,
    }
    with open(out_dir / "cases.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", *METRICS])
        for row in per_case:
            writer.writerow([row["case"], *("" if row[m] is None else f"{row[m]:.6f}" for m in METRICS)])
    _write_report(summary, out_dir)
    # summary.json last and atomically: its presence means the evaluation is complete (runs resume on it)
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out_dir / "summary.json")
    return summary


def eval_cases(task: Task, task_path: str | Path, split_path: str | Path | None) -> tuple[list[Case], str]:
    """The cases to score and a note saying where they come from (module docstring)."""
    if split_path is not None:
        from finetune.split import check_split_matches, read_split

        split = read_split(split_path)
        check_split_matches(split, task, split_path)
        by_name = {c.name: c for c in task.cases}
        return [by_name[n] for n in split.eval], f"eval cases of {split_path} ({split.eval_from})"
    test = task.split("test")
    if test:
        return test, "test split"
    return list(task.cases), f"every case: {task_path} has no test split"


def evaluate_folder(
    pred_dir: str | Path,
    task_path: str | Path,
    out_dir: str | Path | None = None,
    split_path: str | Path | None = None,
    threshold: float = 0.5,
    overwrite: bool = False,
    overlays: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """`univg evaluate` as a function: score the prediction files in pred_dir; returns the summary."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"--threshold {threshold} must be in (0, 1)")
    task = read_task(task_path)
    cases, cases_from = eval_cases(task, task_path, split_path)
    files = match_predictions(pred_dir, cases)
    out = prepare_out_dir(Path(pred_dir) / "evaluation" if out_dir is None else out_dir, overwrite)

    def predict(case: Case, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        mask_path, prob_path = files[case.name]
        mask, prob = read_prediction(mask_path, threshold)
        if prob is None and prob_path is not None:
            _, prob = read_prediction(prob_path, threshold)
        return mask, prob

    info = {
        "task_path": str(task_path),
        "predictions": str(pred_dir),
        "cases_from": cases_from,
        "threshold": threshold,
        "files": {name: [str(p) for p in pair if p is not None] for name, pair in files.items()},
    }
    return evaluate_cases(task, cases, predict, out, info, overlays=overlays, progress=progress)


# --- CLI ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `univg evaluate`."""
    parser.description = (
        "Score predictions (mask or probability files, one per case) against a task's labels."
    )
    parser.add_argument("--pred", required=True, help="folder of predictions named by case / image stem")
    parser.add_argument(
        "--task", required=True, help="task manifest CSV, or a folder with images/ and masks/"
    )
    parser.add_argument("--out", default=None, help="output folder (default: <pred>/evaluation)")
    parser.add_argument("--split", default=None, help="a run's split.json: score its eval cases")
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="threshold for probability maps (default 0.5)"
    )
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay pictures")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing evaluation in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run `univg evaluate`; prints one line per metric."""
    summary = evaluate_folder(
        args.pred,
        args.task,
        out_dir=args.out,
        split_path=args.split,
        threshold=args.threshold,
        overwrite=args.overwrite,
        overlays=not args.no_overlays,
        progress=not args.no_progress,
    )
    out = Path(args.pred) / "evaluation" if args.out is None else Path(args.out)
    print(f"{summary['task']}: {summary['num_cases']} case(s) ({summary['cases_from']})")
    for name in METRICS:
        m = summary["metrics"][name]
        print(f"  {name:<12} {_fmt(m['mean'])} +- {_fmt(m['std'])}  (n={m['n']})")
    print(
        f"wrote {out / 'summary.json'}, cases.csv, report.md" + (", overlays/" if summary["overlays"] else "")
    )
    return 0
