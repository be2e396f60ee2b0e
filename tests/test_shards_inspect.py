"""verify / preview / stats on hand-made corpora, through the real `univg shards` command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import pytest
from shards_testdata import flip_bit, hand_config, member_offset, truncate, write_hand_corpus

from shards.inspect import corpus_stats
from shards.schema import sample_key
from shards.writer import shard_name
from univg.cli import main


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    write_hand_corpus(tmp_path / "c", hand_config(num_samples=24, samples_per_shard=8))
    return tmp_path / "c"


def test_verify_passes_a_good_corpus(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shards", "verify", str(corpus), "--no-progress"]) == 0
    assert "3/3 shards ok, 24 samples checked" in capsys.readouterr().out


def test_verify_names_truncated_and_bit_flipped_shards(
    corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncate(corpus / shard_name("hand", 0), 4096)
    offset, size = member_offset(corpus / shard_name("hand", 2), f"{sample_key('hand', 17)}.mask.png")
    flip_bit(corpus / shard_name("hand", 2), offset + size // 2)
    assert main(["shards", "verify", str(corpus), "--no-progress", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert f"BAD {shard_name('hand', 0)}:" in err and "truncated" in err
    assert f"BAD {shard_name('hand', 2)}:" in err and "sha256" in err
    assert shard_name("hand", 1) not in err


def test_verify_decodes_every_sample_even_when_hashes_match(
    corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # rewrite the manifest around a damaged shard: size and sha256 now agree, the sample does not decode
    offset, size = member_offset(corpus / shard_name("hand", 1), f"{sample_key('hand', 9)}.image.png")
    flip_bit(corpus / shard_name("hand", 1), offset + size // 2)
    manifest = json.loads((corpus / "manifest.json").read_text())
    data = (corpus / shard_name("hand", 1)).read_bytes()
    manifest["shards"][1]["sha256"] = hashlib.sha256(data).hexdigest()
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    assert main(["shards", "verify", str(corpus), "--no-progress"]) == 1
    assert f"BAD {shard_name('hand', 1)}: {sample_key('hand', 9)}.image.png" in capsys.readouterr().err


def test_verify_without_manifest_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shards", "verify", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


def test_preview_draws_a_row_per_modality(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert (
        main(["shards", "preview", str(corpus), "--out", str(out), "--per-modality", "2", "--tile-px", "32"])
        == 0
    )
    grid = cv2.imread(str(out))
    assert grid is not None and grid.shape[0] == 28 + 6 * (32 + 4)  # header + 6 modalities (5 + ultrasound)
    assert grid.shape[1] == 120 + 2 * (2 * 32 + 4 + 8)


def test_stats_match_hand_counted_values(corpus: Path, tmp_path: Path) -> None:
    stats = corpus_stats(corpus)
    xca = stats["modalities"]["xca"]  # samples 1, 7, 13, 19: grey images of value i, a 10-px vessel
    assert (xca["num_samples"], xca["num_examined"]) == (4, 4)
    assert xca["vessel_fraction"] == pytest.approx(10 / 256)
    assert xca["intensity_mean"] == pytest.approx((1 + 7 + 13 + 19) / 4)
    assert xca["fov_fraction"] is None  # 1, 7, 13, 19: none divisible by 3
    fundus = stats["modalities"]["fundus"]  # samples 0, 6, 12, 18: all with a 14x14 FOV
    assert fundus["fov_fraction"] == pytest.approx(196 / 256)
    assert stats["num_samples"] == 24 and stats["bytes_per_sample"] > 0
    out = tmp_path / "stats.json"
    assert main(["shards", "stats", str(corpus), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["modalities"]["xca"]["num_samples"] == 4


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "CIMAT_XCA80" / "pairs.csv"


@pytest.mark.skipif(not REAL.is_file(), reason=f"real data set not present at {REAL}")
def test_ingest_real_pairs_into_shards_that_verify_and_load(tmp_path: Path) -> None:
    from shards.reader import make_dataset

    out = tmp_path / "xca"
    args = ["shards", "ingest", "--task", str(REAL), "--modality", "xca", "--splits", "train"]
    assert main([*args, "--out", str(out), "--samples-per-shard", "16", "--no-progress"]) == 0
    assert main(["shards", "verify", str(out), "--no-progress"]) == 0
    items = list(make_dataset(str(out), seed=0, resampled=False, image_size_px=64))
    assert len(items) == 40 and {it["key"].split("_0")[0] for it in items} == {"cimat_xca80"}
    assert all(it["mask"].sum() > 0 and it["image"].shape == (3, 64, 64) for it in items)
    # the same folder refuses another collection unless told to overwrite
    other = [
        "shards",
        "ingest",
        "--task",
        str(REAL),
        "--modality",
        "xca",
        "--splits",
        "test",
        "--out",
        str(out),
    ]
    assert main([*other, "--no-progress"]) == 2
    assert main([*other, "--no-progress", "--overwrite"]) == 0


def test_verify_refuses_zero_workers(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shards", "verify", str(corpus), "--no-progress", "--workers", "0"]) == 2
    assert "--workers=0 must be >= 1" in capsys.readouterr().err
