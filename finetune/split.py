"""The few-shot split: which real labelled cases a run trains on and which it is scored on.

    task = read_task("my_task/pairs.csv")
    split = draw_split(task, shots=5, seed=0)                 # or draw_split(task, cases=["a", "b"])
    split = write_split(split, run_dir)                      # <run>/split.json, written once
    split = read_split(run_dir / "split.json")

Rules:
- The labelled pool is the task's `train` split; a task without one (a folder task, or a manifest of
  `none` rows) uses its `none` cases.
- `shots` cases are drawn from the pool without replacement by `numpy.random.default_rng(seed)` and kept
  in task order; `cases` names them instead (any case outside the test split).
- Scoring uses the `test` split; a task without one is scored on every case not drawn.
- Full supervision (the upper bound) trains on the whole pool.
- `score_on(split, other, source)` keeps the shots and the pool and scores on another task instead (shots from
  one set tested on another): its test split, or every case when it has none. No scored image may be one of
  the training pool's images.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from data_engine.ingest import Task
from finetune.config import SplitConfig

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Split:
    """A drawn few-shot split, by case name (names as `data_engine.ingest.read_task` gives them)."""

    task: str  # the task's name
    task_path: str  # the manifest or folder it was read from (as given)
    pool_split: str  # the split the shots come from: "train", or "none" for a task without train cases
    shots: int  # number of training cases (count)
    seed: int | None  # seed of the draw; None when the cases were named
    train: list[str]  # the few-shot training cases, in task order
    eval: list[str]  # the cases scored
    eval_from: str  # "test" (the test split) or "not drawn" (every case outside `train`)
    full_train: list[str]  # every pool case: what full supervision trains on
    eval_task: str | None = None  # the task `eval` names cases of, when not this one (score_on)
    eval_task_path: str | None = None  # its manifest or folder (as given)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _pool(task: Task) -> tuple[str, list[str]]:
    train = [c.name for c in task.cases if c.split == "train"]
    if train:
        return "train", train
    return "none", [c.name for c in task.cases if c.split == "none"]


def draw_split(
    task: Task,
    shots: int | None = None,
    seed: int = 0,
    cases: list[str] | None = None,
    task_path: str | Path | None = None,
) -> Split:
    """Draw `shots` training cases with `seed`, or take the named `cases` (exactly one of the two)."""
    where = str(task_path) if task_path is not None else str(task.root)
    pool_split, pool = _pool(task)
    test = [c.name for c in task.cases if c.split == "test"]
    if (shots is None) == (cases is None):
        raise ValueError(
            f"{where}: give either a number of shots or a list of case names, not both or neither"
        )
    if cases is not None:
        names = [n.strip() for n in cases if n.strip()]
        if not names:
            raise ValueError(f"{where}: --cases names no case")
        known = {c.name: c for c in task.cases}
        unknown = [n for n in names if n not in known]
        if unknown:
            sample = ", ".join(sorted(known)[:8])
            raise ValueError(
                f"{where}: unknown case name(s) {', '.join(unknown)}; the task's {len(known)} cases are "
                f"named like {sample}{', ...' if len(known) > 8 else ''}"
            )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{where}: case(s) named more than once: {', '.join(repeated)}")
        in_test = [n for n in names if known[n].split == "test"]
        if in_test:
            raise ValueError(
                f"{where}: case(s) {', '.join(in_test)} are in the test split; training on them would score "
                "the model on its own training images"
            )
        chosen = set(names)
        train = [c.name for c in task.cases if c.name in chosen]  # task order
        drawn_seed: int | None = None
    else:
        assert shots is not None
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise ValueError(f"{where}: shots={shots!r} must be a whole number >= 1")
        if shots > len(pool):
            raise ValueError(
                f"{where}: {shots} shots asked for, but the task has only {len(pool)} labelled case(s) "
                f"in its {pool_split!r} split to draw from; use --shots {len(pool)} or fewer"
            )
        rng = np.random.default_rng(seed)
        picked = sorted(int(i) for i in rng.choice(len(pool), size=shots, replace=False))
        train = [pool[i] for i in picked]
        drawn_seed = int(seed)
    if test:
        evaluation, eval_from = test, "test"
    else:
        drawn = set(train)
        evaluation, eval_from = [c.name for c in task.cases if c.name not in drawn], "not drawn"
    if not evaluation:
        raise ValueError(
            f"{where}: no case is left to score: the task has no test split and all its {len(task.cases)} "
            "case(s) were drawn for training"
        )
    return Split(
        task=task.name,
        task_path=where,
        pool_split=pool_split,
        shots=len(train),
        seed=drawn_seed,
        train=train,
        eval=evaluation,
        eval_from=eval_from,
        full_train=pool,
    )


def score_on(split: Split, task: Task, source: Task, task_path: str | Path) -> Split:
    """`split` (drawn from `source`) scored on `task` instead: its test split, or every case when it has none.

    ValueError when one of the scored images is one of the training pool's images (the score would include
    training images)."""
    where = str(task_path)
    test = task.split("test")
    scored, eval_from = (
        (test, f"test split of {task.name}")
        if test
        else (
            list(task.cases),
            f"every case of {task.name} (it has no test split)",
        )
    )
    pool = {c.name: c for c in source.cases}
    pool_images = {pool[n].image_path.resolve() for n in split.full_train}
    shared = [c.name for c in scored if c.image_path.resolve() in pool_images]
    if shared:
        raise ValueError(
            f"{where}: scored case(s) {', '.join(shared[:5])}{' ...' if len(shared) > 5 else ''} use images "
            f"of {source.name}'s training pool; the score would include training images"
        )
    return replace(
        split,
        eval=[c.name for c in scored],
        eval_from=eval_from,
        eval_task=task.name,
        eval_task_path=where,
    )


def unlabelled_cases(split: Split, max_cases: int) -> list[str]:
    """The labelled pool minus the shots, for a rule that reads their images and never their labels; at most
    `max_cases`, spread evenly over the pool in task order. (For a task without a test split these are the
    cases scored.)"""
    drawn = set(split.train)
    return spread([n for n in split.full_train if n not in drawn], max_cases)


def spread(names: list[str], max_names: int) -> list[str]:
    """At most `max_names` of `names`, spread evenly over them, in their order (all when there are fewer)."""
    if len(names) <= max_names:
        return list(names)
    return [names[int(i)] for i in np.linspace(0, len(names) - 1, max_names).round()]


def write_split(split: Split, run_dir: str | Path) -> Split:
    """Write `<run_dir>/split.json` once. If the file exists it must hold this very split (a rerun or a
    resume); a different one is an error, never silently replaced. Returns the split."""
    path = Path(run_dir) / SPLIT_FILE
    if path.exists():
        existing = read_split(path)
        if existing != split:
            raise FileExistsError(
                f"{path} already holds a different split (train {existing.train}, seed {existing.seed}); "
                f"this run asks for train {split.train}, seed {split.seed}. Use a new run folder"
            )
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(split.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return split


def read_split(path: str | Path) -> Split:
    """Read a split.json written by `write_split`."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLIT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such split file")
    try:
        data = json.loads(path.read_text())
        return Split(**data)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path}: not a split file written by univg ({e})") from e


def check_split_matches(split: Split, task: Task, source: str | Path) -> None:
    """Raise ValueError naming `source` when the split names cases the task does not have."""
    names = {c.name for c in task.cases}
    # a split scored on another task (score_on) names that task's cases in `eval` only
    missing = [n for n in (split.eval if split.eval_task else split.train + split.eval) if n not in names]
    if missing:
        raise ValueError(
            f"{source}: split names case(s) not in task {task.name}: {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}"
        )


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """--shots, --seed and --cases, for commands that draw a split (they override the config's split)."""
    parser.add_argument(
        "--shots", type=int, default=None, help="labelled real cases to train on (default: config)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the few-shot draw (default: config)")
    parser.add_argument(
        "--cases", default=None, metavar="A,B,C", help="name the training cases instead of drawing them"
    )


def split_from_args(args: argparse.Namespace, task: Task, task_path: str | Path, cfg: SplitConfig) -> Split:
    """The split that --shots/--seed/--cases (falling back to `cfg`) ask for."""
    if args.cases is not None:
        if args.shots is not None:
            raise ValueError("give --shots or --cases, not both")
        return draw_split(task, cases=args.cases.split(","), task_path=task_path)
    shots = cfg.shots if args.shots is None else args.shots
    seed = cfg.seed if args.seed is None else args.seed
    return draw_split(task, shots=shots, seed=seed, task_path=task_path)
