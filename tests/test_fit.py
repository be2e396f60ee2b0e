"""`univg fit`: one univg segmenter on every label of a task (none held out), read back by `univg segment`;
real code at tiny size (the tiny profile, tasks written by finetune_testdata)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from finetune_testdata import write_task

from finetune.config import load_finetune_config
from finetune.fit import fit
from finetune.segmenter import Segmenter
from univg.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "finetune" / "tiny.yaml"
SELF_TRAIN = ["segmenter.pseudo.enabled=true", "segmenter.infer.threshold_rule=area"]


def test_fit_trains_on_every_label_and_segment_reads_the_model(tmp_path: Path) -> None:
    """Three labelled cases and no test split (`univg finetune` would find nothing to score): all three
    are trained on, the other images self-trained on and thresholded over, and the model segments them."""
    task = write_task(tmp_path / "task", ["none"] * 3, size=(48, 56))
    scans = write_task(tmp_path / "scans", ["none"] * 4, size=(48, 56), seed=1)
    out = tmp_path / "fit"
    cfg = load_finetune_config(TINY, SELF_TRAIN)
    model_dir = fit(task, out, cfg, unlabelled_path=scans.parent / "images", progress=False)
    seg = Segmenter.load(model_dir)
    assert seg.record["num_real_cases"] == 3
    assert seg.record["pseudo_labels"]["num_images"] == 4  # the four scans, labels unread
    assert str(seg.record["threshold_source"]).startswith("area: ")
    assert (out / "synthetic" / "preview.png").is_file() and (out / "finetune.log").is_file()
    assert "univg on 3 labelled case(s)" in (out / "finetune.log").read_text()
    masks = tmp_path / "masks"
    assert (
        main(["segment", "--model", str(out), "--images", str(scans.parent / "images"), "--out", str(masks)])
        == 0
    )
    written = sorted(p.name for p in masks.glob("*.png"))
    first = cv2.imread(str(masks / written[0]), cv2.IMREAD_GRAYSCALE)
    assert len(written) == 4 and first is not None and first.shape == (48, 56)
    # finished: a rerun is refused, --resume auto keeps the model as it is
    with pytest.raises(FileExistsError, match="--resume auto"):
        fit(task, out, cfg, unlabelled_path=scans.parent / "images", progress=False)
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    fit(task, out, cfg, unlabelled_path=scans.parent / "images", resume=True, progress=False)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_fit_trains_on_the_named_cases_outside_the_test_split(tmp_path: Path) -> None:
    task = write_task(tmp_path / "task", ["train", "train", "train", "test"], size=(48, 56))
    out = tmp_path / "fit"
    assert main(["fit", "--task", str(task), "--out", str(out), "--profile", "tiny", "--no-progress"]) == 0
    assert Segmenter.load(out / "model").record["num_real_cases"] == 3  # the test case is held out
    split = json.loads((out / "model" / "config.json").read_text())["record"]
    assert split["threshold_source"].startswith("training shots")  # no unlabelled image: the shots' rule
    named = tmp_path / "named"
    fit(task, named, load_finetune_config(TINY), cases=["case_00", "case_02"], progress=False)
    assert Segmenter.load(named / "model").record["num_real_cases"] == 2


@pytest.mark.parametrize(
    ("splits", "cases", "over", "message"),
    [
        (["test", "test"], None, [], "no labelled case outside the test split"),
        (["train", "test"], ["case_01"], [], r"case\(s\) case_01 are in the test split"),
        (["train", "test"], ["nope"], [], "no case named nope"),
        (
            ["train", "test"],
            None,
            ["pretrained_segmenter=weights/segmenter-univg58k-cpu-fast"],
            "not this run",
        ),
    ],
)
def test_fit_refuses_bad_input_before_writing(
    tmp_path: Path, splits: list[str], cases: list[str] | None, over: list[str], message: str
) -> None:
    task = write_task(tmp_path / "task", splits, size=(48, 56))
    with pytest.raises(ValueError, match=message):
        fit(task, tmp_path / "fit", load_finetune_config(TINY, over), cases=cases, progress=False)
    assert not (tmp_path / "fit").exists()
