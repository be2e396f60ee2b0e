"""`univg demo --quick` end to end as a subprocess: corpus without fundus -> pretrain -> fundus task ->
finetune -> summary, the run folder contract, --resume auto keeping every stage, refusal without
--overwrite."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_engine import MODALITIES
from univg.demo import QUICK_TASK

ROOT = Path(__file__).resolve().parents[1]


def univg_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a plain process, as a user starts it
    return subprocess.run(
        [sys.executable, "-m", "univg", "demo", "--quick", "--no-progress", "--workers", "1", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    result = univg_demo("--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_demo_writes_every_stage_and_the_summary(demo_run: tuple[Path, str]) -> None:
    out, stdout = demo_run
    for name in ("config.yaml", "demo.log", "stages.json", "summary.json"):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["format"] == "univg-demo/1" and config["quick"] is True

    # 1. corpus: every built-in modality but the held-out one
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    held_out = config["task"]["modality"]
    assert held_out == "fundus"
    assert set(manifest["modalities"]) == set(MODALITIES) - {held_out}
    # 2. pretrain: a completed run with a generator checkpoint and a sample grid
    pre = json.loads((out / "pretrain" / "summary.json").read_text())
    assert pre["status"] == "completed" and pre["step"] == config["pretrain"]["train"]["max_steps"]
    generator = Path(pre["generator"])
    assert generator.parent.parent == out / "pretrain" / "checkpoints"
    assert (generator / "diffusion_pytorch_model.safetensors").is_file()
    # 3. task: the held-out modality, the manifest format of data_engine.ingest
    with open(out / "task" / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["split"] for r in rows] == ["train"] * QUICK_TASK.num_train + ["test"] * QUICK_TASK.num_test
    assert all((out / "task" / r["image"]).is_file() and (out / "task" / r["mask"]).is_file() for r in rows)
    # 4. finetune: every method scored, Dice a fraction
    ft = json.loads((out / "finetune" / "summary.json").read_text())
    methods = config["finetune"]["methods"]
    assert methods == ["univg", "univg_gen", "baseline", "full"] and list(ft["methods"]) == methods
    for stats in ft["methods"].values():
        assert 0.0 <= stats["dice"]["mean"] <= 1.0
    # 5. the demo's summary: stage times, Dice per method, pictures that exist
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["corpus", "pretrain", "task", "finetune"]
    assert all(s["wall_s"] >= 0 and not s["kept"] for s in summary["stages"].values())
    assert list(summary["methods"]) == methods
    assert all(0.0 <= m["dice"] <= 1.0 for m in summary["methods"].values())
    pictures = summary["pictures"]
    for what in ("corpus preview", "comparison", "report"):
        assert what in pictures, what
    assert any(k.startswith("pretraining samples") for k in pictures)
    assert any(k.startswith("synthetic pairs") for k in pictures)
    assert all(Path(p).is_file() for p in pictures.values())
    assert str(out / "finetune" / "comparison.png") in stdout and "Dice" in stdout


def test_existing_run_is_refused_without_overwrite_and_resume_keeps_every_stage(
    demo_run: tuple[Path, str],
) -> None:
    out, _ = demo_run
    refused = univg_demo("--out", str(out))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    before = json.loads((out / "summary.json").read_text())
    resumed = univg_demo("--out", str(out), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = json.loads((out / "summary.json").read_text())
    assert all(s["kept"] for s in after["stages"].values())
    assert after["methods"] == before["methods"]


def test_overwrite_refuses_a_folder_that_is_not_a_demo_run(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = univg_demo("--out", str(tmp_path), "--overwrite")
    assert result.returncode == 2 and "not a univg demo run" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
