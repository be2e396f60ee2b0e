"""`univg finetune` end to end at toy size: split -> synthesis -> segmenters -> evaluation -> report,
resume, the run folder contract, and bad input that must stop the run before it writes anything."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from finetune_testdata import DATA, write_collimated_task, write_lumen_task, write_task

from finetune.config import FinetuneConfig, load_finetune_config
from finetune.run import run_finetune
from shards.inspect import verify_corpus
from univg.config import ConfigError

TINY = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "tiny.yaml"


def tiny(overrides: list[str] | None = None) -> FinetuneConfig:
    return load_finetune_config(TINY, overrides)


@pytest.fixture(scope="module")
def task_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("task")
    return write_task(root, ["train"] * 4 + ["test"] * 2, size=(64, 72), colour=True, with_fov=True)


@pytest.fixture(scope="module")
def finished_run(task_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    run_finetune(task_csv, out, tiny(), progress=False)
    return out


def test_run_folder_contract(finished_run: Path) -> None:
    out = finished_run
    for name in ("config.yaml", "finetune.log", "summary.json", "report.md", "comparison.png"):
        assert (out / name).is_file(), name
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert (out / "full" / "eval" / "summary.json").is_file()
    for d in (0, 1):
        split = json.loads((out / f"draw_{d}" / "split.json").read_text())
        assert split["shots"] == 2 and split["seed"] == d and split["eval_from"] == "test"
        assert set(split["train"]).isdisjoint(split["eval"])
        for method in ("univg", "baseline"):
            ev = out / f"draw_{d}" / method / "eval"
            summary = json.loads((ev / "summary.json").read_text())
            assert summary["num_cases"] == 2 and summary["method"] == method
            assert summary["train_cases"] == split["train"]
            assert sorted(p.name for p in (ev / "pred").iterdir()) == ["case_04.png", "case_05.png"]
            assert (ev / "overlays" / "case_04.png").is_file() and (ev / "cases.csv").is_file()
        syn = out / f"draw_{d}" / "synthetic"
        assert (syn / "preview.png").is_file()
        report = verify_corpus(syn, progress=False)
        assert report.ok and report.num_samples == 10
    # the two draws drew different shots, with different synthetic sets
    s0 = json.loads((out / "draw_0" / "split.json").read_text())["train"]
    s1 = json.loads((out / "draw_1" / "split.json").read_text())["train"]
    assert s0 != s1


def test_summary_aggregates_the_draws(finished_run: Path) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["shots"] == 2 and summary["num_draws"] == 2 and summary["num_eval_cases"] == 2
    assert set(summary["methods"]) == {"univg", "baseline", "full"}
    for method in ("univg", "baseline"):
        dice = summary["methods"][method]["dice"]
        per_draw = [
            json.loads((finished_run / f"draw_{d}" / method / "eval" / "summary.json").read_text())["mean"][
                "dice"
            ]
            for d in (0, 1)
        ]
        assert dice["per_draw"] == pytest.approx(per_draw)
        assert dice["mean"] == pytest.approx(np.mean(per_draw)) and dice["std"] == pytest.approx(
            np.std(per_draw)
        )
    assert summary["methods"]["full"]["num_draws"] == 1
    report = (finished_run / "report.md").read_text()
    assert "| univg |" in report and "| baseline |" in report and "| full |" in report
    lr = summary["segmenter"]["lr"]
    assert summary["segmenter"]["pretrained_start"] is None
    assert f"Every method starts from random weights, peak lr {lr:g}." in report
    # what the scores were computed on: CPU results may differ on a CPU with other vector units
    machine = summary["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if platform.machine() in ("x86_64", "AMD64"):  # one marketing name covers CPU generations
        assert re.fullmatch(r"family \d+ model \d+", machine["cpu_id"])
        assert f"{machine['cpu']}, {machine['cpu_id']} (" in report
    assert machine["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert machine["packages"]["numpy"] == np.__version__ and machine["cpu_count"] == os.cpu_count()
    assert machine["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert f"({machine['cpu_capability']}, {machine['cpu_count']} cores)" in report
    picture = cv2.imread(str(finished_run / "comparison.png"))
    assert picture is not None and picture.shape[0] >= 2 * 256  # one row per scored case


def test_resume_keeps_finished_stages_and_refuses_other_configs(finished_run: Path, task_csv: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("model.safetensors")}
    summary = run_finetune(task_csv, finished_run, tiny(), resume=True, progress=False)
    after = {p: p.stat().st_mtime_ns for p in finished_run.rglob("model.safetensors")}
    assert before == after  # nothing retrained
    assert (
        summary["methods"]["univg"]["dice"]["per_draw"]
        == json.loads((finished_run / "summary.json").read_text())["methods"]["univg"]["dice"]["per_draw"]
    )
    with pytest.raises(FileExistsError, match="--resume auto"):
        run_finetune(task_csv, finished_run, tiny(), progress=False)
    with pytest.raises(ValueError, match="segmenter.optim.max_steps"):
        run_finetune(
            task_csv, finished_run, tiny(["segmenter.optim.max_steps=5"]), resume=True, progress=False
        )


def test_resume_after_an_interrupted_stage(task_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny(["split.num_draws=1", "methods=[univg,baseline]"])
    run_finetune(task_csv, out, cfg, progress=False)
    first = json.loads((out / "summary.json").read_text())
    # as if killed during the baseline's evaluation and before the summary
    for p in [out / "summary.json", out / "draw_0" / "baseline" / "eval" / "summary.json"]:
        p.unlink()
    run_finetune(task_csv, out, cfg, resume=True, progress=False)
    again = json.loads((out / "summary.json").read_text())
    assert again["methods"]["baseline"]["dice"] == first["methods"]["baseline"]["dice"]
    assert again["methods"]["univg"]["dice"] == first["methods"]["univg"]["dice"]
    # a finished run moved elsewhere resumes there and summarises its own folders
    moved = tmp_path / "moved"
    out.rename(moved)
    (moved / "summary.json").unlink()
    run_finetune(task_csv, moved, cfg, resume=True, progress=False)
    there = json.loads((moved / "summary.json").read_text())
    assert there["methods"]["univg"]["dice"] == first["methods"]["univg"]["dice"]
    assert there["methods"]["univg"]["eval"] == ["draw_0/univg/eval"]


def test_overwrite_replaces_a_run_but_never_a_foreign_folder(task_csv: Path, tmp_path: Path) -> None:
    cfg = tiny(["split.num_draws=1", "methods=[baseline]"])
    out = tmp_path / "run"
    run_finetune(task_csv, out, cfg, progress=False)
    (out / "stale.txt").write_text("x")
    run_finetune(task_csv, out, cfg, overwrite=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "summary.json").is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(FileExistsError, match="not a univg run"):
        run_finetune(task_csv, foreign, cfg, overwrite=True, progress=False)
    assert (foreign / "thesis.tex").is_file()


def test_named_cases(task_csv: Path, tmp_path: Path) -> None:
    cfg = tiny(["methods=[baseline]"])
    summary = run_finetune(task_csv, tmp_path / "run", cfg, cases=["case_01", "case_03"], progress=False)
    assert summary["num_draws"] == 1 and summary["draws"][0]["train"] == ["case_01", "case_03"]


def test_a_task_mixing_grey_and_colour_files(tmp_path: Path) -> None:
    """One shot saved grey, the other colour (two export formats of one scanner): the synthesis reads the grey
    one as three equal channels, so the shots share one vessel profile, and the run completes."""
    from shards.inspect import iter_corpus
    from shards.manifest import load_manifest

    csv = write_task(tmp_path / "task", ["train"] * 3 + ["test"] * 2, size=(64, 72), colour=True)
    colour = cv2.imread(str(tmp_path / "task" / "images" / "case_01.png"), cv2.IMREAD_COLOR)
    assert colour is not None
    cv2.imwrite(str(tmp_path / "task" / "images" / "case_01.png"), colour[:, :, 1])  # saved grey
    out = tmp_path / "run"
    summary = run_finetune(csv, out, tiny(["methods=[univg]"]), cases=["case_00", "case_01"], progress=False)
    assert summary["methods"]["univg"]["num_draws"] == 1
    synthetic = out / "draw_0" / "synthetic"
    images = [sample.image for _key, sample, _raw in iter_corpus(synthetic, load_manifest(synthetic))]
    assert images and all(image.ndim == 3 and image.shape[2] == 3 for image in images)


def test_a_task_of_one_wide_lumen_per_image(tmp_path: Path) -> None:
    """Shots of one near-round lumen 30-50 px across each (ultrasound's carotid, not a vessel tree): the
    synthetic masks stay blobs of the shots' size, drawn dark into a background that keeps its level. Before
    wide vessels took the medial-axis radius, lumens came back up to 4.3x the largest shot's area."""
    from shards.inspect import iter_corpus
    from shards.manifest import load_manifest

    csv = write_lumen_task(tmp_path / "task", ["train"] * 5 + ["test"] * 2)
    out = tmp_path / "run"
    summary = run_finetune(
        csv, out, tiny(["methods=[univg]", "split.num_draws=1", "split.shots=3"]), progress=False
    )
    assert summary["methods"]["univg"]["num_draws"] == 1
    shot_areas = []
    for name in json.loads((out / "draw_0" / "split.json").read_text())["train"]:
        shot = cv2.imread(str(tmp_path / "task" / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        assert shot is not None
        shot_areas.append(np.count_nonzero(shot))
    synthetic = out / "draw_0" / "synthetic"
    samples = [sample for _key, sample, _raw in iter_corpus(synthetic, load_manifest(synthetic))]
    assert len(samples) >= 8
    for sample in samples:
        # grafting may place several lumens; each is one shot's, at most 1.2x its size (1.44x its area)
        num, _labels, stats, _ = cv2.connectedComponentsWithStats(sample.mask)
        assert num > 1 and stats[1:, cv2.CC_STAT_AREA].max() <= 1.6 * max(shot_areas), sample.meta["index"]
        lumen = sample.image[cv2.erode(sample.mask, np.ones((5, 5), np.uint8)) > 0].astype(np.float64)
        far = sample.image[cv2.dilate(sample.mask, np.ones((21, 21), np.uint8)) == 0].astype(np.float64)
        assert far.size and far.mean() > 60, sample.meta["index"]  # the background keeps its level
        if lumen.size:
            assert lumen.mean() < 0.6 * far.mean(), sample.meta["index"]  # and the lumen is dark


def test_masks_are_cleared_outside_the_field_estimated_from_the_image(tmp_path: Path) -> None:
    """A task without FOV masks whose images have a dark, flat outside: the shots keep their vessels inside
    the estimated field, so the run records the estimate as used, and its scored masks and `univg segment`'s
    masks and probabilities are the model's, cleared outside that field; `field_from_image=never` records
    and clears nothing."""
    from data_engine.io import read_image
    from finetune.field import estimate_field
    from finetune.segment import segment_folder
    from finetune.segmenter import Segmenter

    csv = write_collimated_task(tmp_path / "task", ["train"] * 3 + ["test"] * 2)
    out = tmp_path / "run"
    run_finetune(csv, out, tiny(["methods=[univg]", "split.num_draws=1"]), progress=False)
    model_dir = out / "draw_0" / "univg" / "model"
    decision = json.loads((model_dir / "config.json").read_text())["record"]["field_from_image"]
    assert decision["rule"] == "auto" and decision["used"] is True and decision["worst_shot_loss"] == 0.0
    summary = json.loads((out / "draw_0" / "univg" / "eval" / "summary.json").read_text())
    assert summary["field_from_image"] == decision
    assert json.loads((out / "summary.json").read_text())["methods"]["univg"]["field_from_image"] == [True]
    assert "dark or white flat region joined to each image's border in univg 1 of 1 trainings" in (
        (out / "report.md").read_text()
    )
    seg = Segmenter.load(model_dir)
    assert seg.field_from_image
    for name in ("coll_3", "coll_4"):
        image = read_image(tmp_path / "task" / "images" / f"{name}.png")
        field = estimate_field(image)
        assert 0.3 < field.mean() < 0.7  # the round field, its outside found
        raw = seg.predict_proba(image) > seg.threshold
        pred = cv2.imread(
            str(out / "draw_0" / "univg" / "eval" / "pred" / f"{name}.png"), cv2.IMREAD_GRAYSCALE
        )
        assert pred is not None and np.array_equal(pred > 0, raw & field)
    written = segment_folder(model_dir, tmp_path / "task" / "images", tmp_path / "seg", probabilities=True,
                             progress=False)  # fmt: skip
    for mask_path in written:
        image = read_image(tmp_path / "task" / "images" / mask_path.name)
        field = estimate_field(image)
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        prob = cv2.imread(str(tmp_path / "seg" / "probabilities" / mask_path.name), cv2.IMREAD_GRAYSCALE)
        assert mask is not None and prob is not None
        assert not mask[~field].any() and not prob[~field].any()
        assert np.array_equal(mask > 0, seg.predict_output(image) > seg.threshold)
        # the network's own probability there is not 0: the zeros above are the clearing's
        assert seg.predict_proba(image)[~field].min() > 0
    off = tmp_path / "off"
    run_finetune(
        csv, off, tiny(["methods=[univg]", "split.num_draws=1", "segmenter.infer.field_from_image=never"]),
        progress=False,
    )  # fmt: skip
    assert "Field of view from the image" not in (off / "report.md").read_text()
    off_model = Segmenter.load(off / "draw_0" / "univg" / "model")
    assert off_model.record["field_from_image"]["used"] is False and not off_model.field_from_image
    image = read_image(tmp_path / "task" / "images" / "coll_3.png")
    assert np.array_equal(off_model.predict_output(image), off_model.predict_proba(image))


def test_eval_task_scores_shots_of_one_set_on_another(task_csv: Path, tmp_path: Path) -> None:
    # the other set: grey, another size, no test split (so every case is scored), names that collide
    other = write_task(tmp_path / "other", ["none"] * 3, size=(56, 60), colour=False, seed=9)
    cfg = tiny(["methods=[univg,baseline,full]", "split.num_draws=1"])
    out = tmp_path / "run"
    summary = run_finetune(task_csv, out, cfg, progress=False, eval_task_path=other)
    assert summary["task"] == task_csv.parent.name
    assert summary["eval_task"] == "other" and summary["eval_task_path"] == str(other)
    assert (
        summary["num_eval_cases"] == 3
        and summary["eval_from"] == "every case of other (it has no test split)"
    )
    split = json.loads((out / "draw_0" / "split.json").read_text())
    assert split["eval"] == ["case_00", "case_01", "case_02"] and split["eval_task"] == "other"
    assert set(split["train"]) <= {"case_00", "case_01", "case_02", "case_03"}  # the first set's train split
    for folder in ("draw_0/univg", "draw_0/baseline", "full"):
        ev = json.loads((out / folder / "eval" / "summary.json").read_text())
        assert ev["task"] == "other" and ev["num_cases"] == 3
        assert ev["task_path"] == str(other) and ev["trained_on_task_path"] == str(task_csv)
        # scored against the other set's labels: its masks, not the first set's files of the same names
        pred = cv2.imread(str(out / folder / "eval" / "pred" / "case_01.png"), cv2.IMREAD_GRAYSCALE)
        assert pred is not None and pred.shape == (56, 60)
    full = json.loads((out / "full" / "eval" / "summary.json").read_text())
    assert full["train_cases"] == ["case_00", "case_01", "case_02", "case_03"]
    assert (
        (out / "report.md")
        .read_text()
        .startswith(f"# Few-shot segmentation: {summary['task']}, scored on other")
    )
    # the split file scores with univg evaluate against the other set (its eval names are the other's cases)
    from finetune.evaluate import evaluate_folder

    again = evaluate_folder(
        out / "draw_0" / "baseline" / "eval" / "pred",
        other,
        tmp_path / "again",
        split_path=out / "draw_0" / "split.json",
        progress=False,
    )
    baseline = json.loads((out / "draw_0" / "baseline" / "eval" / "summary.json").read_text())
    assert again["mean"]["dice"] == pytest.approx(baseline["mean"]["dice"])
    # a scored image that is one of the training pool's: refused before anything is written
    rows = ["image,mask,fov,split"] + [
        f"{task_csv.parent}/images/case_{i:02d}.png,{task_csv.parent}/masks/case_{i:02d}_gt.png,,test"
        for i in (1, 4)
    ]
    leaky = tmp_path / "leaky.csv"
    leaky.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="case_01 use images of .* training pool"):
        run_finetune(task_csv, tmp_path / "leak", cfg, progress=False, eval_task_path=leaky)
    assert not (tmp_path / "leak").exists()


def test_eval_scale_scores_a_set_at_another_resolution(task_csv: Path, tmp_path: Path) -> None:
    """--eval-scale: the other set's images (here the task's own test cases at twice the size) are resized by
    F for the network and scored at their own size, exactly as `univg segment --scale F` predicts them; the
    run records F, its report names it, and a resume with another F is refused."""
    from finetune.segmenter import Segmenter

    rows = ["image,mask,fov,split"]
    (tmp_path / "big").mkdir()
    for name in ("case_04", "case_05"):
        image = cv2.imread(str(task_csv.parent / "images" / f"{name}.png"), cv2.IMREAD_COLOR)
        mask = cv2.imread(str(task_csv.parent / "masks" / f"{name}_gt.png"), cv2.IMREAD_GRAYSCALE)
        assert image is not None and mask is not None
        cv2.imwrite(str(tmp_path / "big" / f"{name}.png"), cv2.resize(image, None, fx=2, fy=2))
        big_mask = cv2.resize(mask, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(tmp_path / "big" / f"{name}_gt.png"), big_mask)
        rows.append(f"big/{name}.png,big/{name}_gt.png,,test")
    big = tmp_path / "big.csv"
    big.write_text("\n".join(rows) + "\n")
    cfg = tiny(["methods=[baseline]", "split.num_draws=1"])
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--eval-scale 0.0 must be a positive number"):
        run_finetune(task_csv, out, cfg, progress=False, eval_task_path=big, eval_scale=0.0)
    assert not out.exists()
    summary = run_finetune(task_csv, out, cfg, progress=False, eval_task_path=big, eval_scale=0.5)
    assert summary["eval_scale"] == 0.5
    ev = json.loads((out / "draw_0" / "baseline" / "eval" / "summary.json").read_text())
    assert ev["eval_scale"] == 0.5 and ev["num_cases"] == 2
    segmenter = Segmenter.load(out / "draw_0" / "baseline" / "model", "cpu")
    for name in ("case_04", "case_05"):
        image = cv2.imread(str(tmp_path / "big" / f"{name}.png"), cv2.IMREAD_COLOR)
        pred = cv2.imread(
            str(out / "draw_0" / "baseline" / "eval" / "pred" / f"{name}.png"), cv2.IMREAD_GRAYSCALE
        )
        assert image is not None and pred is not None and pred.shape == image.shape[:2]
        expected = segmenter.predict_proba(image, 0.5) > segmenter.threshold
        assert np.array_equal(pred > 0, expected)
        assert not np.array_equal(expected, segmenter.predict_proba(image) > segmenter.threshold)
    assert "its images resized by 0.5 for the network" in (out / "report.md").read_text().splitlines()[0]
    with pytest.raises(ValueError, match="eval_scale"):
        run_finetune(task_csv, out, cfg, progress=False, eval_task_path=big, resume=True)


def test_images_larger_than_the_input_cap_train_downscaled_and_score_at_native_size(
    task_csv: Path, tmp_path: Path
) -> None:
    # 64 x 72 images, network input capped at 40 px (as cpu-fast caps at 1024): shots, synthetic pairs and
    # pseudo-labels go in downscaled; predictions come back at the images' own size and are scored there
    cfg = tiny(
        [
            "methods=[univg]",
            "split.num_draws=1",
            "segmenter.input.max_side_px=40",
            "segmenter.pseudo.enabled=true",
        ]
    )
    out = tmp_path / "run"
    summary = run_finetune(task_csv, out, cfg, progress=False)
    ev = json.loads((out / "draw_0" / "univg" / "eval" / "summary.json").read_text())
    assert ev["pseudo_labels"]["num_images"] == 2 and ev["num_cases"] == 2
    for name in ("case_04", "case_05"):
        pred = cv2.imread(
            str(out / "draw_0" / "univg" / "eval" / "pred" / f"{name}.png"), cv2.IMREAD_GRAYSCALE
        )
        assert pred is not None and pred.shape == (64, 72)
    assert 0.0 <= summary["methods"]["univg"]["dice"]["mean"] <= 1.0
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["segmenter"]["input"]["max_side_px"] == 40  # univg segment reads it back with the weights
    # the synthesis worked from the shots at the input size (64 x 72 -> 36 x 40), not at native size
    from finetune.run import _ShardPairs

    sizes = {(image.shape[:2], mask.shape) for image, mask in _ShardPairs(out / "draw_0" / "synthetic")}
    assert sizes == {((36, 40), (36, 40))}


def test_area_threshold_rule_reads_the_unlabelled_pool(tmp_path: Path) -> None:
    """infer.threshold_rule=area: the threshold where the undrawn train images' predicted vessel fraction is
    the shots' labelled one, measured on the outputs as they are scored (here cleared outside each image's
    estimated field of view)."""
    from data_engine.ingest import load_case, read_task
    from finetune.segmenter import Segmenter, area_threshold

    task_csv = write_collimated_task(tmp_path / "task", ["train"] * 4 + ["test"])
    cfg = tiny(["methods=[baseline]", "segmenter.infer.threshold_rule=area"])
    out = tmp_path / "run"
    run_finetune(task_csv, out, cfg, cases=["coll_1", "coll_3"], progress=False)
    model = out / "draw_0" / "baseline" / "model"
    seg = Segmenter.load(model)
    assert (
        seg.record["threshold_source"].startswith("area:")
        and "2 unlabelled image(s)" in seg.record["threshold_source"]
    )
    assert "shots_threshold" in seg.record and seg.field_from_image
    # the same threshold again from the saved weights: the two train cases not drawn, the shots' labels
    by_name = {c.name: load_case(c) for c in read_task(task_csv).cases}
    shots = [by_name[n] for n in ("coll_1", "coll_3")]
    pool = [by_name[n] for n in ("coll_0", "coll_2")]

    def area(outputs: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float]:
        return area_threshold(
            [m for _i, m, _f in shots],
            [f for _i, _m, f in shots],
            [outputs(i) for i, _m, _f in pool],
            [f for _i, _m, f in pool],
        )

    t, fraction = area(seg.predict_output)
    assert seg.threshold == pytest.approx(t) and 0 < fraction < 1
    assert area(seg.predict_proba)[0] != pytest.approx(t)  # the raw maps' rule would cut elsewhere
    summary = json.loads((out / "draw_0" / "baseline" / "eval" / "summary.json").read_text())
    assert summary["threshold"] == pytest.approx(t)
    # a resume that has to score again keeps it: the rule does not run twice on a saved model
    stamp = (model / "config.json").stat().st_mtime_ns
    shutil.rmtree(out / "draw_0" / "baseline" / "eval")
    (out / "summary.json").unlink()
    run_finetune(task_csv, out, cfg, cases=["coll_1", "coll_3"], resume=True, progress=False)
    assert (model / "config.json").stat().st_mtime_ns == stamp
    again = json.loads((out / "draw_0" / "baseline" / "eval" / "summary.json").read_text())
    assert again["threshold"] == pytest.approx(t)
    run_summary = json.loads((out / "summary.json").read_text())["methods"]["baseline"]
    assert run_summary["threshold"][0] == pytest.approx(t)
    assert run_summary["threshold_source"][0].startswith("area:")
    assert f"(threshold {t:.3g}, area rule)" in (out / "report.md").read_text()


def test_self_training_labels_the_pool_minus_the_shots_for_univg_only(task_csv: Path, tmp_path: Path) -> None:
    from finetune.segmenter import Segmenter

    cfg = tiny(["methods=[univg,baseline]", "segmenter.pseudo.enabled=true", "segmenter.pseudo.max_images=8"])
    out = tmp_path / "run"
    run_finetune(task_csv, out, cfg, cases=["case_01", "case_03"], progress=False)
    univg = Segmenter.load(out / "draw_0" / "univg" / "model").record
    steps = cfg.segmenter.optim.max_steps
    assert univg["pseudo_labels"]["num_images"] == 2  # case_00 and case_02: the train pool minus the shots
    assert univg["pseudo_labels"]["at_step"] == round(cfg.segmenter.pseudo.start_fraction * steps)
    assert univg["pseudo_patches"] > 0
    baseline = Segmenter.load(out / "draw_0" / "baseline" / "model").record
    assert baseline["pseudo_labels"] is None and baseline["pseudo_patches"] == 0
    # it trained with self-training off, as its saved config says, and the log has no warning about it
    assert Segmenter.load(out / "draw_0" / "univg" / "model").cfg.pseudo.enabled
    assert not Segmenter.load(out / "draw_0" / "baseline" / "model").cfg.pseudo.enabled
    assert "no unlabelled image was given" not in (out / "finetune.log").read_text()
    methods = json.loads((out / "summary.json").read_text())["methods"]
    assert methods["univg"]["pseudo_images"] == [2] and methods["baseline"]["pseudo_images"] == [0]
    report = (out / "report.md").read_text()
    assert "self-trained on 2 unlabelled image(s)" in report
    assert "Self-training (segmenter.pseudo): univg also trained" in report
    assert "cut at the threshold best on the shots" in report
    # the baseline self-trains only when named
    # (and here with the labels cut at the shots' vessel fraction)
    cfg = tiny(
        [
            "methods=[baseline]",
            "segmenter.pseudo.enabled=true",
            "segmenter.pseudo.methods=[baseline]",
            "segmenter.pseudo.threshold_rule=area",
        ]
    )
    run_finetune(task_csv, tmp_path / "base", cfg, cases=["case_01", "case_03"], progress=False)
    record = Segmenter.load(tmp_path / "base" / "draw_0" / "baseline" / "model").record
    assert record["pseudo_labels"]["num_images"] == 2
    assert record["pseudo_labels"]["threshold_rule"] == "area"
    assert "(pseudo.threshold_rule=area)" in (tmp_path / "base" / "report.md").read_text()
    with pytest.raises(ConfigError, match="pseudo.methods: 'full' cannot self-train"):
        tiny(["segmenter.pseudo.methods=[full]"])


def test_unlabelled_points_self_training_and_the_area_rule_at_other_images(
    task_csv: Path, tmp_path: Path
) -> None:
    from data_engine.ingest import load_case, read_task
    from data_engine.io import read_image
    from finetune.segmenter import Segmenter, area_threshold

    by_name = {c.name: c for c in read_task(task_csv).cases}
    # shots of the first task scored on another, self-training on the other's train split (3 cases; the
    # first task would give 2: its train pool minus the 2 shots)
    other = write_task(tmp_path / "other", ["train"] * 3 + ["test"] * 2, size=(56, 60), seed=9)
    overrides = ["split.num_draws=1", "segmenter.pseudo.enabled=true", "segmenter.pseudo.max_images=8"]
    cfg = tiny(["methods=[univg]", "segmenter.infer.threshold_rule=area", *overrides])
    out = tmp_path / "run"
    summary = run_finetune(task_csv, out, cfg, progress=False, eval_task_path=other, unlabelled_path=other)
    seg = Segmenter.load(out / "draw_0" / "univg" / "model")
    assert seg.record["pseudo_labels"]["num_images"] == 3
    assert "over 3 unlabelled image(s)" in seg.record["threshold_source"]
    # the area threshold again from the saved weights over the other task's train images: it is theirs
    shots = [load_case(by_name[n]) for n in summary["draws"][0]["train"]]
    pool = [read_image(tmp_path / "other" / "images" / f"case_{i:02d}.png") for i in range(3)]
    t, _fraction = area_threshold(
        [m for _i, m, _f in shots],
        [f for _i, _m, f in shots],
        [seg.predict_proba(i) for i in pool],
        [None] * 3,
    )
    assert seg.threshold == pytest.approx(t)
    assert summary["unlabelled_from"] == "other (3 image(s) of its train split, labels never read)"
    assert summary["unlabelled_path"] == str(other)
    assert "the images of `--unlabelled` other (3 image(s)" in (out / "report.md").read_text()
    # a plain folder of images (no masks, no FOV, another size): all of them
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(5):
        cv2.imwrite(
            str(plain / f"scan{i}.png"), np.random.default_rng(i).integers(0, 255, (50, 52), np.uint8)
        )
    cfg = tiny(["methods=[baseline]", "segmenter.pseudo.methods=[baseline]", *overrides])
    run_finetune(task_csv, tmp_path / "plain_run", cfg, progress=False, unlabelled_path=plain)
    record = Segmenter.load(tmp_path / "plain_run" / "draw_0" / "baseline" / "model").record
    assert record["pseudo_labels"]["num_images"] == 5
    # the shot task itself: its 4 train cases less the draw's 2 shots, as without --unlabelled
    run_finetune(task_csv, tmp_path / "self_run", cfg, progress=False, unlabelled_path=task_csv)
    record = Segmenter.load(tmp_path / "self_run" / "draw_0" / "baseline" / "model").record
    assert record["pseudo_labels"]["num_images"] == 2
    # images that are scored: refused before anything is written (the other task's images/ holds its test
    # cases too)
    with pytest.raises(ValueError, match=r"case_03, case_04 are among the images scored"):
        run_finetune(
            task_csv,
            tmp_path / "leak",
            cfg,
            progress=False,
            eval_task_path=other,
            unlabelled_path=other.parent / "images",
        )
    assert not (tmp_path / "leak").exists()
    with pytest.raises(FileNotFoundError, match="no such task manifest or image folder"):
        run_finetune(task_csv, tmp_path / "none", cfg, progress=False, unlabelled_path=tmp_path / "nowhere")


# --- bad input: a clear error, and no run folder ---


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created although the input was bad"


def test_too_many_shots(task_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="only 4 labelled case"):
        run_finetune(task_csv, out, tiny(["split.shots=5"]), progress=False)
    _assert_nothing_written(out)


def test_empty_mask_among_the_shots(tmp_path: Path) -> None:
    csv = write_task(tmp_path / "task", ["train", "train", "test"], size=(40, 48))
    cv2.imwrite(str(tmp_path / "task" / "masks" / "case_01_gt.png"), np.zeros((40, 48), np.uint8))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"case_01_gt\.png is empty"):
        run_finetune(csv, out, tiny(), progress=False)
    _assert_nothing_written(out)


def test_size_mismatch_and_unreadable_files(tmp_path: Path) -> None:
    csv = write_task(tmp_path / "task", ["train", "train", "test"], size=(40, 48))
    cv2.imwrite(str(tmp_path / "task" / "masks" / "case_00_gt.png"), np.full((30, 48), 255, np.uint8))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"case_00_gt\.png is 48x30 px but image"):
        run_finetune(csv, out, tiny(), progress=False)
    _assert_nothing_written(out)
    (tmp_path / "task" / "masks" / "case_00_gt.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"case_00_gt\.png"):
        run_finetune(csv, out, tiny(), progress=False)
    _assert_nothing_written(out)


def test_unknown_split_name(tmp_path: Path) -> None:
    csv = write_task(tmp_path / "task", ["train", "train", "test"], size=(40, 48))
    csv.write_text(csv.read_text().replace(",test", ",holdout"))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="holdout"):
        run_finetune(csv, out, tiny(), progress=False)
    _assert_nothing_written(out)


def test_cli_errors_are_one_line(task_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "univg.cli", "finetune", "--task", str(task_csv), "--out", str(out)]
    bad_profile = subprocess.run([*args, "--profile", "nope"], capture_output=True, text=True)
    assert bad_profile.returncode == 2 and "--profile 'nope' is not one of" in bad_profile.stderr
    bad_key = subprocess.run(
        [*args, "--profile", "tiny", "segmenter.optim.max_stepz=3"], capture_output=True, text=True
    )
    assert bad_key.returncode == 2 and "max_stepz" in bad_key.stderr
    _assert_nothing_written(out)


def test_cli_end_to_end_then_segment_and_evaluate(task_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "univg.cli", "finetune", "--task", str(task_csv), "--out", str(out)]
    done = subprocess.run(
        [*cmd, "--profile", "tiny", "--draws", "1", "--methods", "univg", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "univg    Dice" in done.stdout and (out / "report.md").is_file()
    pred = tmp_path / "pred"
    images = task_csv.parent / "images"
    seg = subprocess.run(
        [
            sys.executable,
            "-m",
            "univg.cli",
            "segment",
            "--model",
            str(out),
            "--images",
            str(images),
            "--out",
            str(pred),
        ],
        capture_output=True,
        text=True,
    )
    assert seg.returncode == 0, seg.stderr
    ev = subprocess.run(
        [sys.executable, "-m", "univg.cli", "evaluate", "--pred", str(pred), "--task", str(task_csv),
         "--split", str(out / "draw_0" / "split.json"), "--no-progress"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    scored = json.loads((pred / "evaluation" / "summary.json").read_text())
    in_run = json.loads((out / "draw_0" / "univg" / "eval" / "summary.json").read_text())
    # the same model on the same cases: univg segment + evaluate agree with the run's own evaluation
    assert scored["mean"]["dice"] == pytest.approx(in_run["mean"]["dice"], abs=1e-6)


def test_segment_at_another_scale(finished_run: Path, task_csv: Path, tmp_path: Path) -> None:
    """--scale resizes each image for the network; masks and probabilities come back at its own size."""
    from data_engine.io import read_image
    from finetune.segment import segment_folder
    from finetune.segmenter import Segmenter

    images = task_csv.parent / "images"
    written = segment_folder(
        finished_run, images, tmp_path / "half", probabilities=True, progress=False, scale=0.5
    )
    seg = Segmenter.load(finished_run / "model")
    for mask_path in written:
        image = read_image(images / mask_path.name)
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        assert mask is not None and mask.shape == image.shape[:2]
        # the contract: the network sees the image at half size, the probability is resized back
        half = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
        expected = cv2.resize(seg.predict_proba(half), (image.shape[1], image.shape[0]))
        got = seg.predict_proba(image, scale=0.5)
        assert np.array_equal(got, np.clip(expected, 0, 1))
        assert np.array_equal(mask > 0, got > seg.threshold)
        prob = cv2.imread(str(tmp_path / "half" / "probabilities" / mask_path.name), cv2.IMREAD_GRAYSCALE)
        assert prob is not None and np.array_equal(prob, np.rint(got * 255).astype(np.uint8))
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"--scale {bad} must be a positive number"):
            segment_folder(finished_run, images, tmp_path / "bad", progress=False, scale=bad)
        assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not (DATA / "OCTA500_3M" / "pairs.csv").is_file(), reason=f"no real data in {DATA}")
def test_tiny_finetune_on_real_images(tmp_path: Path) -> None:
    """Real OCTA and X-ray images (bright and dark vessels, 300 px): the whole run at toy size."""
    for name in ("OCTA500_3M", "CIMAT_XCA80"):
        task = DATA / name / "pairs.csv"
        if not task.is_file():
            continue
        cfg = tiny(
            ["split.num_draws=1", "methods=[univg,baseline]", "synthesis.num_pairs=6", "max_eval_cases=3"]
        )
        run_finetune(task, tmp_path / name, cfg, progress=False)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["num_eval_cases"] == len(
            json.loads((tmp_path / name / "draw_0" / "split.json").read_text())["eval"]
        )
        assert 0.0 <= summary["methods"]["univg"]["dice"]["mean"] <= 1.0
        assert (tmp_path / name / "draw_0" / "synthetic" / "preview.png").is_file()


# --- univg_gen: the adapted generator draws the synthetic images, chosen by leave-one-out feedback ---


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data_engine import MODALITIES
    from pretrain.config import DiffusionConfig, ModelConfig, SamplingConfig
    from pretrain.model import GeneratorInfo, build_noise_scheduler, build_unet, save_generator

    folder = tmp_path_factory.mktemp("pretrain") / "checkpoints" / "step_0000010" / "generator"
    model = ModelConfig(image_size_px=32, block_out_channels=(8, 16), norm_num_groups=8, attention_head_dim=8)
    diffusion = DiffusionConfig()
    info = GeneratorInfo(model, diffusion, SamplingConfig(num_inference_steps=2), MODALITIES, step=10)
    save_generator(build_unet(model), build_noise_scheduler(diffusion), folder, info)
    return folder.parent


GEN = [
    "split.num_draws=1",
    "split.shots=3",
    "methods=[univg_gen,baseline]",
    "generator.adapt.max_steps=4",
    "generator.adapt.snapshot_steps=[2]",
    "generator.adapt.batch_size=2",
    "generator.adapt.crop_side_px=48",
    "generator.feedback.num_folds=2",
    "generator.feedback.segmenter_steps=2",
    "generator.feedback.num_pairs=3",
    "generator.num_pairs=6",
]


def test_univg_gen_adapts_selects_and_synthesizes(
    task_csv: Path, tiny_generator: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = tiny([*GEN, "generator.feedback.allow_real_only=false"])
    summary = run_finetune(task_csv, out, cfg, progress=False, generator_dir=tiny_generator)
    gen = out / "draw_0" / "univg_gen"
    # the adapter (final + the step-2 snapshot), loadable as a pipeline
    from finetune.generator import load_adapted_pipeline, snapshot_dirs

    assert [step for step, _ in snapshot_dirs(gen / "adapter")] == [2, 4]
    _pipe, slot = load_adapted_pipeline(gen / "adapter")
    assert slot == 5  # the spare slot: the task's modality is new to the generator
    # feedback: 2 adaptation lengths x 2 guidance scales x 2 mixes, each scored on 2 held-out shots
    selection = json.loads((gen / "selection.json").read_text())
    assert len(selection["candidates"]) == 8 and len(selection["loo_dice"]) == 8
    assert len(selection["folds"]) == 2 and selection["chosen"] in selection["candidates"]
    best = int(np.argmax(selection["loo_dice"]))
    assert selection["chosen"] == selection["candidates"][best]
    log = (out / "finetune.log").read_text()
    assert "leave-one-out Dice" in log and "<- chosen" in log
    # the chosen mix is what the final segmenter trained with
    model_cfg = json.loads((gen / "model" / "config.json").read_text())
    assert model_cfg["segmenter"]["patch"]["synthetic_fraction"] == selection["chosen"]["synthetic_fraction"]
    # the generated set: shards that verify, and the preview
    report = verify_corpus(gen / "synthetic", progress=False)
    assert report.ok and report.num_samples == 6 and (gen / "synthetic" / "preview.png").is_file()
    assert set(summary["methods"]) == {"univg_gen", "baseline"}
    assert "| univg_gen |" in (out / "report.md").read_text()


def test_univg_gen_falls_back_to_the_shots_when_they_score_best(
    task_csv: Path, tiny_generator: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run_finetune(
        task_csv, out, tiny([*GEN, "methods=[univg_gen]"]), progress=False, generator_dir=tiny_generator
    )
    gen = out / "draw_0" / "univg_gen"
    selection = json.loads((gen / "selection.json").read_text())
    real_only = selection["loo_dice_none"] > max(selection["loo_dice"])
    # "none" is chosen exactly when the shots alone beat every candidate on the held-out shots
    assert (selection["chosen"]["adapter"] is None) == real_only
    trained = json.loads((gen / "model" / "config.json").read_text())
    if real_only:
        assert trained["record"]["num_synthetic_pairs_seen"] == 0 and not (gen / "synthetic").exists()
    else:
        assert trained["record"]["num_synthetic_pairs_seen"] > 0


def test_univg_gen_needs_a_generator(task_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="needs a pretrained generator"):
        run_finetune(task_csv, out, tiny(GEN), progress=False)
    with pytest.raises(ValueError, match="not a univg generator folder"):
        run_finetune(task_csv, out, tiny(GEN), progress=False, generator_dir=tmp_path)
    _assert_nothing_written(out)


def test_a_task_fed_inverted_is_recorded_reported_and_segmented_inverted(tmp_path: Path) -> None:
    """input.polarity=inverted (what `auto` picks where the start reads the shots better so): the model
    records it, the report says so, and its scored masks and `univg segment`'s use the inverted input."""
    from data_engine.io import read_image
    from finetune.segment import segment_folder
    from finetune.segmenter import Segmenter

    csv = write_collimated_task(tmp_path / "task", ["train"] * 3 + ["test"] * 2)
    out = tmp_path / "run"
    overrides = ["methods=[univg,baseline]", "split.num_draws=1", "segmenter.input.polarity=inverted"]
    run_finetune(csv, out, tiny(overrides), progress=False)
    assert json.loads((out / "summary.json").read_text())["methods"]["univg"]["inverted"] == [True]
    assert "went into the network inverted in univg 1 of 1, baseline 1 of 1 trainings" in (
        (out / "report.md").read_text()
    )
    model_dir = out / "draw_0" / "univg" / "model"
    seg = Segmenter.load(model_dir)
    assert seg.inverted and seg.record["input_polarity"]["rule"] == "inverted"
    as_is = Segmenter(seg.network, seg.cfg, seg.threshold, {**seg.record, "input_polarity": None})
    image = read_image(tmp_path / "task" / "images" / "coll_3.png")
    np.testing.assert_allclose(seg.predict_proba(image), as_is.predict_proba(255 - image), atol=1e-4)
    pred = cv2.imread(str(out / "draw_0" / "univg" / "eval" / "pred" / "coll_3.png"), cv2.IMREAD_GRAYSCALE)
    assert pred is not None and np.array_equal(pred > 0, seg.predict_output(image) > seg.threshold)
    (written,) = [
        p
        for p in segment_folder(model_dir, tmp_path / "task" / "images", tmp_path / "seg", progress=False)
        if p.name == "coll_3.png"
    ]
    mask = cv2.imread(str(written), cv2.IMREAD_GRAYSCALE)
    assert mask is not None and np.array_equal(mask > 0, pred > 0)
