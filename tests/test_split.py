"""finetune.split: seeded few-shot draws, named cases, tasks without splits, and the errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from finetune_testdata import DATA, write_task

from data_engine.ingest import read_task
from finetune.config import SplitConfig
from finetune.split import (
    SPLIT_FILE,
    add_split_arguments,
    draw_split,
    read_split,
    split_from_args,
    unlabelled_cases,
    write_split,
)

SPLITS_10_4 = ["train"] * 10 + ["test"] * 4


def test_seeded_draw_is_reproducible_and_follows_the_rules(tmp_path: Path) -> None:
    csv = write_task(tmp_path, SPLITS_10_4)
    task = read_task(csv)
    a = draw_split(task, shots=3, seed=7, task_path=csv)
    b = draw_split(read_task(csv), shots=3, seed=7, task_path=csv)
    assert a == b
    pool = [f"case_{i:02d}" for i in range(10)]
    assert len(a.train) == 3 and set(a.train) <= set(pool)
    assert a.train == sorted(a.train)  # task order
    assert a.eval == [f"case_{i:02d}" for i in range(10, 14)] and a.eval_from == "test"
    assert a.full_train == pool and a.pool_split == "train"
    assert (a.shots, a.seed, a.task) == (3, 7, tmp_path.name)
    draws = {tuple(draw_split(task, shots=3, seed=s).train) for s in range(6)}
    assert len(draws) > 1  # the seed matters


def test_unlabelled_cases_are_the_pool_minus_the_shots(tmp_path: Path) -> None:
    task = read_task(write_task(tmp_path, SPLITS_10_4))
    split = draw_split(task, cases=["case_01", "case_04"])
    rest = [f"case_{i:02d}" for i in (0, 2, 3, 5, 6, 7, 8, 9)]
    assert unlabelled_cases(split, 8) == rest and unlabelled_cases(split, 100) == rest
    # capped: spread evenly over the rest in task order (positions 0, 2.33, 4.67, 7 rounded: 0, 2, 5, 7)
    assert unlabelled_cases(split, 4) == ["case_00", "case_03", "case_07", "case_09"]
    assert unlabelled_cases(split, 1) == ["case_00"]
    assert not set(unlabelled_cases(split, 8)) & (set(split.train) | set(split.eval))


def test_named_cases(tmp_path: Path) -> None:
    csv = write_task(tmp_path, SPLITS_10_4)
    task = read_task(csv)
    split = draw_split(task, cases=["case_05", "case_01"], task_path=csv)
    assert split.train == ["case_01", "case_05"] and split.seed is None and split.shots == 2
    with pytest.raises(ValueError, match=r"pairs\.csv.*unknown case name\(s\) case_99"):
        draw_split(task, cases=["case_01", "case_99"], task_path=csv)
    with pytest.raises(ValueError, match="case_12 are in the test split"):
        draw_split(task, cases=["case_12"], task_path=csv)
    with pytest.raises(ValueError, match="more than once"):
        draw_split(task, cases=["case_01", "case_01"], task_path=csv)


def test_too_many_shots_names_the_file_and_the_numbers(tmp_path: Path) -> None:
    csv = write_task(tmp_path, ["train"] * 3 + ["test"] * 2)
    with pytest.raises(ValueError, match=r"pairs\.csv: 5 shots asked for.* only 3 labelled case"):
        draw_split(read_task(csv), shots=5, seed=0, task_path=csv)
    with pytest.raises(ValueError, match="shots=0"):
        draw_split(read_task(csv), shots=0, seed=0, task_path=csv)
    with pytest.raises(ValueError, match="either"):
        draw_split(read_task(csv), task_path=csv)


def test_task_without_splits_scores_every_case_not_drawn(tmp_path: Path) -> None:
    # a folder task: images/ and masks/ paired by stem, every case split 'none'
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for i in range(6):
        mask = np.zeros((16, 16), np.uint8)
        mask[int(rng.integers(16)), :] = 255
        cv2.imwrite(str(tmp_path / "images" / f"s{i}.png"), mask // 2)
        cv2.imwrite(str(tmp_path / "masks" / f"s{i}.png"), mask)
    task = read_task(tmp_path)
    split = draw_split(task, shots=2, seed=1)
    assert split.pool_split == "none" and split.eval_from == "not drawn"
    assert sorted(split.train + split.eval) == [f"s{i}" for i in range(6)]
    assert not set(split.train) & set(split.eval)
    with pytest.raises(ValueError, match="no case is left to score"):
        draw_split(task, shots=6, seed=0)


def test_split_file_is_written_once(tmp_path: Path) -> None:
    csv = write_task(tmp_path / "task", SPLITS_10_4)
    task = read_task(csv)
    run = tmp_path / "run"
    split = draw_split(task, shots=4, seed=0, task_path=csv)
    write_split(split, run)
    data = json.loads((run / SPLIT_FILE).read_text())
    assert data["train"] == split.train and data["seed"] == 0
    assert read_split(run / SPLIT_FILE) == split
    assert write_split(split, run) == split  # a rerun with the same split is fine
    other = draw_split(task, shots=4, seed=1, task_path=csv)
    assert other.train != split.train
    with pytest.raises(FileExistsError, match="different split"):
        write_split(other, run)
    (tmp_path / "bad.json").write_text('{"task": 1}')
    with pytest.raises(ValueError, match="not a split file"):
        read_split(tmp_path / "bad.json")


def test_cli_arguments_override_the_config(tmp_path: Path) -> None:
    csv = write_task(tmp_path, SPLITS_10_4)
    task = read_task(csv)
    parser = argparse.ArgumentParser()
    add_split_arguments(parser)
    from_config = split_from_args(parser.parse_args([]), task, csv, SplitConfig(shots=2, seed=3))
    assert from_config == draw_split(task, shots=2, seed=3, task_path=csv)
    from_flags = split_from_args(parser.parse_args(["--shots", "4", "--seed", "9"]), task, csv, SplitConfig())
    assert from_flags.shots == 4 and from_flags.seed == 9
    named = split_from_args(parser.parse_args(["--cases", "case_02,case_03"]), task, csv, SplitConfig())
    assert named.train == ["case_02", "case_03"]
    with pytest.raises(ValueError, match="not both"):
        split_from_args(parser.parse_args(["--cases", "case_02", "--shots", "2"]), task, csv, SplitConfig())


def test_real_task_draw() -> None:
    csv = DATA / "CHASE_DB1" / "pairs.csv"
    if not csv.is_file():
        pytest.skip(f"real data set CHASE_DB1 not found at {csv} (only present beside the dev checkout)")
    task = read_task(csv)
    split = draw_split(task, shots=5, seed=0, task_path=csv)
    assert len(split.train) == 5 and len(split.full_train) == 20 and len(split.eval) == 8
    assert all(name.startswith("Image_") and int(name[6:8]) <= 10 for name in split.train)
    assert split == draw_split(task, shots=5, seed=0, task_path=csv)
