"""finetune.evaluate and finetune.segment: hand-made prediction folders, the files written, the CLI
commands as subprocesses, and every bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from finetune_testdata import write_task

from data_engine.ingest import read_task
from data_engine.io import read_mask
from finetune.config import NetConfig, OptimConfig, PatchConfig, SegmenterConfig
from finetune.evaluate import evaluate_folder, read_prediction
from finetune.segmenter import train_segmenter
from finetune.split import draw_split, write_split

SPLITS = ["train", "train", "test", "test"]  # case_00, case_01 train; case_02, case_03 test
H, W = 40, 48


def label_of(task_csv: Path, name: str) -> np.ndarray:
    return read_mask(task_csv.parent / "masks" / f"{name}_gt.png")


def univg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "univg", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def task_csv(tmp_path: Path) -> Path:
    return write_task(tmp_path / "task", SPLITS, size=(H, W))


def background_pixel(label: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(label == 0)
    return int(ys[0]), int(xs[0])


def test_scores_and_files_for_hand_made_masks(task_csv: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    label_2, label_3 = label_of(task_csv, "case_02"), label_of(task_csv, "case_03")
    # case_02: the label plus one false positive -> Dice 2n / (2n + 1); named by image stem
    with_fp = label_2.copy()
    fp_yx = background_pixel(label_2)
    with_fp[fp_yx] = 255
    cv2.imwrite(str(pred / "case_02.png"), with_fp)
    # case_03: nothing found -> Dice 0, sensitivity 0, specificity 1; named by mask stem, as 0/1 values
    cv2.imwrite(str(pred / "case_03_gt.png"), np.zeros((H, W), np.uint8))
    cv2.imwrite(str(pred / "unrelated.png"), np.zeros((H, W), np.uint8))  # ignored

    summary = evaluate_folder(pred, task_csv, progress=False)
    n = int((label_2 > 0).sum())
    rows = {r["case"]: r for r in summary["per_case"]}
    assert set(rows) == {"case_02", "case_03"} and summary["cases_from"] == "test split"
    assert rows["case_02"]["dice"] == pytest.approx(2 * n / (2 * n + 1))
    assert rows["case_02"]["sensitivity"] == 1.0
    assert rows["case_02"]["specificity"] == pytest.approx(1 - 1 / (H * W - n))
    assert (rows["case_03"]["dice"], rows["case_03"]["sensitivity"], rows["case_03"]["specificity"]) == (
        0,
        0,
        1,
    )
    assert rows["case_03"]["auc"] is None and summary["metrics"]["auc"]["n"] == 0
    mean = (rows["case_02"]["dice"] + 0.0) / 2
    assert summary["mean"]["dice"] == pytest.approx(mean)
    assert summary["std"]["dice"] == pytest.approx(abs(rows["case_02"]["dice"] - mean))

    out = pred / "evaluation"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["per_case"] == summary["per_case"] and on_disk["task"] == "task"
    with open(out / "cases.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == ["case_02", "case_03"]
    assert float(table[0]["dice"]) == pytest.approx(rows["case_02"]["dice"], abs=1e-6)
    assert table[1]["auc"] == ""
    report = (out / "report.md").read_text()
    assert "| dice |" in report and "overlays/case_03.png" in report

    picture = cv2.imread(str(out / "overlays" / "case_02.png"))
    assert picture is not None
    assert picture.shape == (H, 4 * W + 3 * 4, 3)
    errors = picture[:, 3 * (W + 4) :]
    assert tuple(errors[fp_yx]) == (0, 0, 255)  # false positive: red (BGR)
    ys, xs = np.nonzero(label_2)
    assert tuple(errors[ys[0], xs[0]]) == (255, 255, 255)  # true positive: white
    missed_picture = cv2.imread(str(out / "overlays" / "case_03.png"))
    assert missed_picture is not None
    missed = missed_picture[:, 3 * (W + 4) :]
    ys, xs = np.nonzero(label_3)
    assert tuple(missed[ys[0], xs[0]]) == (255, 0, 0)  # false negative: blue (BGR)


def test_probability_maps_threshold_and_auc(task_csv: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    (pred / "probabilities").mkdir(parents=True)
    for name in ("case_02", "case_03"):
        label = label_of(task_csv, name)
        prob = np.where(label > 0, 200, 30).astype(np.uint8)  # 0.78 on vessel, 0.12 elsewhere
        if name == "case_02":
            cv2.imwrite(str(pred / f"{name}.png"), prob)  # a probability map in place of a mask
        else:
            cv2.imwrite(str(pred / f"{name}.png"), label)  # a mask, with its probabilities beside it
            cv2.imwrite(str(pred / "probabilities" / f"{name}.png"), prob)
    summary = evaluate_folder(pred, task_csv, progress=False)
    assert summary["num_cases_with_probabilities"] == 2
    assert summary["metrics"]["auc"]["n"] == 2 and summary["mean"]["auc"] == pytest.approx(1.0)
    assert summary["mean"]["dice"] == pytest.approx(1.0)
    strict = evaluate_folder(pred, task_csv, out_dir=tmp_path / "strict", threshold=0.9, progress=False)
    dice = {r["case"]: r["dice"] for r in strict["per_case"]}
    assert dice == {"case_02": 0.0, "case_03": 1.0}  # 0.78 < 0.9 empties the map; the mask stays a mask


def test_read_prediction_formats(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.array([[0.2, 0.9]], np.float32))
    mask, prob = read_prediction(tmp_path / "f.npy", 0.5)
    assert mask.tolist() == [[False, True]] and prob is not None
    np.save(tmp_path / "b.npy", np.array([[0, 1]], np.uint8))
    mask, prob = read_prediction(tmp_path / "b.npy", 0.5)
    assert mask.tolist() == [[False, True]] and prob is None
    cv2.imwrite(str(tmp_path / "w.png"), np.array([[0, 65535]], np.uint16))
    mask, prob = read_prediction(tmp_path / "w.png", 0.5)
    assert mask.tolist() == [[False, True]] and prob is None
    cv2.imwrite(str(tmp_path / "p16.png"), np.array([[0, 30000, 65535]], np.uint16))
    mask, prob = read_prediction(tmp_path / "p16.png", 0.5)
    assert mask.tolist() == [[False, False, True]] and prob is not None
    np.save(tmp_path / "bad.npy", np.array([[0.2, 1.5]]))
    with pytest.raises(ValueError, match=r"bad\.npy: float predictions must be probabilities"):
        read_prediction(tmp_path / "bad.npy", 0.5)
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (0, 0, 255)
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    with pytest.raises(ValueError, match="single-channel"):
        read_prediction(tmp_path / "c.png", 0.5)
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        read_prediction(tmp_path / "x.png", 0.5)


def test_fov_and_cases_without_a_test_split(tmp_path: Path) -> None:
    csv_path = write_task(tmp_path / "task", ["none"] * 4, size=(H, W), with_fov=True)
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in range(4):
        label = label_of(csv_path, f"case_{i:02d}")
        label[0, 0] = 255  # a corner pixel: outside the elliptic FOV, so it does not count
        cv2.imwrite(str(pred / f"case_{i:02d}.png"), label)
    summary = evaluate_folder(pred, csv_path, progress=False)
    assert summary["num_cases"] == 4 and "no test split" in summary["cases_from"]
    assert summary["mean"]["dice"] == pytest.approx(1.0) and summary["mean"]["specificity"] == 1.0
    split = draw_split(read_task(csv_path), shots=1, seed=0, task_path=csv_path)
    write_split(split, tmp_path / "run")
    split_file = tmp_path / "run" / "split.json"
    scored = evaluate_folder(pred, csv_path, out_dir=tmp_path / "e2", split_path=split_file, progress=False)
    assert [r["case"] for r in scored["per_case"]] == split.eval and len(split.eval) == 3


def test_bad_prediction_folders(task_csv: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    cv2.imwrite(str(pred / "case_02.png"), label_of(task_csv, "case_02"))
    with pytest.raises(ValueError, match=r"no prediction for 1 of 2 case\(s\): case_03"):
        evaluate_folder(pred, task_csv, progress=False)
    cv2.imwrite(str(pred / "case_03.png"), np.zeros((H + 1, W), np.uint8))
    with pytest.raises(ValueError, match="case case_03: prediction is 48x41 px but its label"):
        evaluate_folder(pred, task_csv, out_dir=tmp_path / "o1", progress=False)
    cv2.imwrite(str(pred / "case_03.png"), np.zeros((H, W), np.uint8))
    np.save(pred / "case_03_gt.npy", np.zeros((H, W), np.uint8))
    with pytest.raises(ValueError, match="more than one prediction file for a case: case_03"):
        evaluate_folder(pred, task_csv, out_dir=tmp_path / "o2", progress=False)
    (pred / "case_03_gt.npy").unlink()
    evaluate_folder(pred, task_csv, out_dir=tmp_path / "o3", progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        evaluate_folder(pred, task_csv, out_dir=tmp_path / "o3", progress=False)
    evaluate_folder(pred, task_csv, out_dir=tmp_path / "o3", overwrite=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        evaluate_folder(tmp_path / "nowhere", task_csv, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        evaluate_folder(pred, task_csv, threshold=1.5, progress=False)


def test_evaluate_cli(task_csv: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    cv2.imwrite(str(pred / "case_02.png"), label_of(task_csv, "case_02"))
    missing = univg("evaluate", "--pred", str(pred), "--task", str(task_csv))
    assert missing.returncode == 2 and "no prediction for 1 of 2 case(s): case_03" in missing.stderr
    cv2.imwrite(str(pred / "case_03.png"), label_of(task_csv, "case_03"))
    ok = univg("evaluate", "--pred", str(pred), "--task", str(task_csv), "--out", str(tmp_path / "ev"),
               "--no-progress")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "dice" in ok.stdout and "1.0000" in ok.stdout
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["mean"]["dice"] == 1.0


def test_segment_then_evaluate_cli(task_csv: Path, tmp_path: Path) -> None:
    cfg = SegmenterConfig(
        net=NetConfig(base_channels=8, num_levels=3),
        patch=PatchConfig(patch_size_px=32, batch_size=4),
        optim=OptimConfig(max_steps=3, warmup_steps=1),
    )
    from data_engine.ingest import load_case

    task = read_task(task_csv)
    train_segmenter(cfg, [load_case(c) for c in task.split("train")], model_dir=tmp_path / "run" / "model",
                    progress=False)  # fmt: skip
    images, out = task_csv.parent / "images", tmp_path / "pred"
    result = univg("segment", "--model", str(tmp_path / "run"), "--images", str(images), "--out", str(out),
                   "--probabilities", "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 4 mask(s)" in result.stdout
    for i in range(4):
        mask = cv2.imread(str(out / f"case_{i:02d}.png"), cv2.IMREAD_UNCHANGED)
        prob = cv2.imread(str(out / "probabilities" / f"case_{i:02d}.png"), cv2.IMREAD_UNCHANGED)
        assert mask is not None and prob is not None
        assert mask.shape == prob.shape == (H, W) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
    again = univg("segment", "--model", str(tmp_path / "run"), "--images", str(images), "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    scored = univg("evaluate", "--pred", str(out), "--task", str(task_csv), "--no-progress")
    assert scored.returncode == 0, scored.stderr
    summary = json.loads((out / "evaluation" / "summary.json").read_text())
    assert summary["num_cases"] == 2 and summary["metrics"]["auc"]["n"] == 2


def test_segment_cli_bad_input(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "model").mkdir()
    no_model = univg("segment", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "empty"),
                     "--out", str(tmp_path / "o"))  # fmt: skip
    assert no_model.returncode == 2 and "holds no image files" in no_model.stderr
    cv2.imwrite(str(tmp_path / "empty" / "a.png"), np.zeros((8, 8), np.uint8))
    no_model = univg("segment", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "empty"),
                     "--out", str(tmp_path / "o"))  # fmt: skip
    assert no_model.returncode == 2 and "no config.json there" in no_model.stderr
    cv2.imwrite(str(tmp_path / "empty" / "a.jpg"), np.zeros((8, 8), np.uint8))
    twice = univg("segment", "--model", str(tmp_path / "model"), "--images", str(tmp_path / "empty"),
                  "--out", str(tmp_path / "o"))  # fmt: skip
    assert twice.returncode == 2 and "share the stem 'a'" in twice.stderr
