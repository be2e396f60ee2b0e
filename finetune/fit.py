"""`univg fit`: the segmenter to keep, trained on every label a task has (no draws, nothing scored).

    univg fit --task my_task/ --out models/my_task --unlabelled new_scans/
    univg segment --model models/my_task --images new_scans/ --out new_scans_masks/

`univg finetune` measures: it draws shots, holds labelled cases out to score them, and trains the
baselines beside univg. With five labelled images and nothing else, that leaves no case to score and no
segmenter to use. `univg fit` trains univg once, the profile's recipe as `univg finetune` runs it, on every
labelled case of the task outside its test split (or `--cases`): the data engine's synthesis from them, the
profile's pretrained start and rehearsal, and, with `--unlabelled` (a folder of images, or a task whose
labels are not read), self-training on those images and the `area` threshold rule over them; without, the
threshold best on the labelled cases. Writes `<out>/model` (a segmenter folder: `univg segment --model
<out>` reads it), `<out>/synthetic` (the synthetic pairs as shards, with preview.png), `<out>/config.yaml`
and `<out>/finetune.log`. `--resume auto` continues an interrupted fit; a finished one is refused without
`--overwrite`.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from finetune.config import FinetuneConfig, load_finetune_config
from finetune.run import (
    checked_start,
    close_logging,
    load_cases,
    load_unlabelled,
    prepare_run_dir,
    profile_path,
    read_unlabelled,
    setup_logging,
    synthesize,
    train_model,
    with_rehearsal,
)
from finetune.split import Split, spread
from univg.config import add_config_options, cli_overrides, to_dict

log = logging.getLogger("univg.finetune")


def fit(
    task_path: str | Path,
    out: str | Path,
    cfg: FinetuneConfig,
    cases: list[str] | None = None,
    unlabelled_path: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """`univg fit` as a function (module docstring); returns the model folder."""
    from data_engine.ingest import read_task

    out = Path(out)
    started = time.perf_counter()
    # everything read and checked first: a bad input stops the fit before it writes anything
    cfg, init = checked_start(cfg, started_methods=["univg"])
    task = read_task(task_path)
    labelled = [c.name for c in task.cases if c.split != "test"]
    if cases is not None:
        unknown = sorted(set(cases) - {c.name for c in task.cases})
        if unknown:
            raise ValueError(f"{task_path}: no case named {', '.join(unknown)}")
        in_test = sorted(set(cases) - set(labelled))
        if in_test:
            raise ValueError(f"{task_path}: case(s) {', '.join(in_test)} are in the test split: held out")
        named = set(cases)
        labelled = [n for n in labelled if n in named]
    if not labelled:
        raise ValueError(f"{task_path}: no labelled case outside the test split to train on")
    split = Split(
        task=task.name,
        task_path=str(task_path),
        pool_split="all",
        shots=len(labelled),
        seed=None,
        train=labelled,
        eval=[],
        eval_from="nothing scored",
        full_train=labelled,
    )
    infer, pseudo = cfg.segmenter.infer, cfg.segmenter.pseudo
    area_names: list[str] = []
    pseudo_names: list[str] = []
    unlabelled_from = None
    if unlabelled_path is not None:
        unlabelled_from, images = read_unlabelled(unlabelled_path, set())
        trained = set(labelled)
        shots = {c.image_path.resolve() for c in task.cases if c.name in trained}
        names = [name for name, image in images if image not in shots]
        if infer.tune_threshold and infer.threshold_rule == "area":
            area_names = spread(names, infer.area_images)
        if pseudo.enabled and "univg" in pseudo.methods:
            pseudo_names = spread(names, pseudo.max_images)
    loaded = load_cases(task, set(labelled), progress)
    external = (
        load_unlabelled(unlabelled_path, set(area_names + pseudo_names), progress)
        if unlabelled_path is not None
        else {}
    )
    cfg_dict: dict[str, Any] = {
        "fit": str(task_path),
        "cases": cases,
        "unlabelled": None if unlabelled_path is None else str(unlabelled_path),
        **to_dict(cfg),
    }
    prepare_run_dir(out, cfg_dict, resume, overwrite, kind="univg fit", owned=lambda c: "fit" in (c or {}))
    handlers = setup_logging(out)
    try:
        log.info(
            "univg fit: task %s | univg on %d labelled case(s) | %s | model %s",
            task.name,
            len(labelled),
            f"{len(external)} unlabelled image(s) from {unlabelled_from}"
            if external
            else "no unlabelled image (no self-training; threshold from the labelled cases)",
            out / "model",
        )
        synthetic = synthesize(cfg, loaded, split, out / "synthetic", 0, progress)
        segmenter, model_dir = train_model(
            cfg,
            loaded,
            labelled,
            with_rehearsal(cfg, synthetic, 0),
            out,
            "univg",
            progress,
            init,
            [external[n] for n in area_names],
            [external[n] for n in pseudo_names],
        )
        log.info(
            "univg fit: %s (threshold %.3f, %s; %.0f s). Segment with: univg segment --model %s --images DIR "
            "--out DIR",
            model_dir,
            segmenter.threshold,
            segmenter.record.get("threshold_source"),
            time.perf_counter() - started,
            out,
        )
        return model_dir
    finally:
        close_logging(handlers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task manifest CSV or folder with images/ and masks/")
    parser.add_argument("--out", required=True, help="new folder for the segmenter (<out>/model)")
    parser.add_argument(
        "--unlabelled",
        default=None,
        metavar="TASK_OR_FOLDER",
        help="images to self-train on and to set the area threshold over, labels never read (e.g. the "
        "scans to segment)",
    )
    parser.add_argument("--cases", default=None, metavar="A,B,C", help="train on these cases only")
    parser.add_argument(
        "--profile", default="cpu-fast", help="configs/finetune/<profile>.yaml (default cpu-fast)"
    )
    parser.add_argument("--config", default=None, help="a fine-tuning YAML instead of --profile")
    parser.add_argument("--resume", choices=["auto"], default=None, help="continue an interrupted fit")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing fit in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_options(parser, FinetuneConfig, skip=("methods",))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides: segmenter.optim.max_steps=400")


def run(args: argparse.Namespace) -> int:
    """Run `univg fit`."""
    path = Path(args.config) if args.config else profile_path(args.profile)
    cfg = load_finetune_config(path, cli_overrides(args, args.overrides))
    model_dir = fit(
        args.task,
        args.out,
        cfg,
        cases=None if args.cases is None else args.cases.split(","),
        unlabelled_path=args.unlabelled,
        resume=args.resume == "auto",
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"segmenter: {model_dir}")
    print(f"segment new images: univg segment --model {Path(args.out)} --images DIR --out DIR")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="univg fit", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
