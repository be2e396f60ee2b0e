"""The corpus build with the real data engine: determinism, resume, refusal, nodes, SIGKILL."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from shards_testdata import flip_bit

from shards.build import build_corpus
from shards.config import CorpusConfig, load_corpus_config
from shards.inspect import iter_corpus, verify_corpus
from shards.manifest import MANIFEST, load_manifest, merge_slices, record_path, slice_name
from shards.writer import TMP_MARK, sha256_file, shard_name
from univg.cli import main
from univg.config import ConfigError, config_hash

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "corpus" / "tiny.yaml"
# 48 pairs at 64 px (as tiny.yaml) in 6 shards of 8: several shards per worker and node, small for CI
OVERRIDES = [
    "num_samples=48",
    "samples_per_shard=8",
    "engine.image_size_px=64",
    "engine.library.num_graphs_per_modality=2",
]


def _cfg(*extra: str) -> CorpusConfig:
    return load_corpus_config(TINY, [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process build: the bytes every other build must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    build_corpus(_cfg(), out, num_workers=1, progress=False)
    return out


def _copy(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest)
    return dest


def test_build_writes_shards_records_and_a_manifest_that_verifies(reference: Path) -> None:
    cfg = _cfg()
    manifest = load_manifest(reference)
    assert (manifest.corpus, manifest.config_hash, manifest.num_samples) == ("tiny", config_hash(cfg), 48)
    assert [r.name for r in manifest.shards] == [shard_name("tiny", s) for s in range(6)]
    assert sum(manifest.modalities.values()) == 48 and set(manifest.modalities) == set(cfg.engine.modalities)
    assert all(record_path(reference, r.name).is_file() for r in manifest.shards)
    report = verify_corpus(reference, progress=False)
    assert report.ok and report.num_samples == 48
    assert not [p for p in reference.iterdir() if TMP_MARK in p.name]


def test_same_config_gives_the_same_bytes_with_two_workers(reference: Path, tmp_path: Path) -> None:
    result = build_corpus(_cfg(), tmp_path, num_workers=2, progress=False)
    assert result.num_workers == 2 and result.peak_rss_bytes  # really ran in worker processes
    assert (tmp_path / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()


def test_rerun_keeps_verified_shards_and_rebuilds_missing_and_damaged_ones(
    reference: Path, tmp_path: Path
) -> None:
    out = _copy(reference, tmp_path / "c")
    (out / shard_name("tiny", 1)).unlink()
    flip_bit(out / shard_name("tiny", 4), 700)
    (out / f".{shard_name('tiny', 2)}{TMP_MARK}host-1-dead").write_bytes(b"partial")
    (out / MANIFEST).unlink()
    result = build_corpus(_cfg(), out, num_workers=1, progress=False)
    assert (result.num_shards_kept, result.num_shards_built) == (4, 2)
    assert (out / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()
    assert not [p for p in out.iterdir() if TMP_MARK in p.name]


def test_another_config_in_the_folder_is_refused_unless_overwrite(reference: Path, tmp_path: Path) -> None:
    out = _copy(reference, tmp_path / "c")
    other = _cfg("engine.seed=1")
    with pytest.raises(FileExistsError) as e:
        build_corpus(other, out, progress=False)
    assert config_hash(other)[:12] in str(e.value) and config_hash(_cfg())[:12] in str(e.value)
    assert (out / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()  # nothing lost
    build_corpus(other, out, overwrite=True, progress=False)
    assert load_manifest(out).config_hash == config_hash(other)


def test_png_strategies_build_the_same_pixels_and_a_bad_one_is_a_config_error(
    reference: Path, tmp_path: Path
) -> None:
    old = _cfg("png_strategy=zlib")  # the encoding of shards built before "rle" became the default
    assert _cfg().png_strategy == "rle" and config_hash(old) != config_hash(_cfg())
    build_corpus(old, tmp_path, num_workers=1, progress=False)
    new_samples = list(iter_corpus(reference, load_manifest(reference)))
    old_samples = list(iter_corpus(tmp_path, load_manifest(tmp_path)))
    assert [k for k, _s, _m in old_samples] == [k for k, _s, _m in new_samples]
    for (_k, a, raw_a), (_k2, b, raw_b) in zip(old_samples, new_samples, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
        if a.fov is None or b.fov is None:
            assert a.fov is None and b.fov is None
        else:
            assert np.array_equal(a.fov, b.fov)
        assert raw_a["meta.json"] == raw_b["meta.json"]
    with pytest.raises(ConfigError, match="png_strategy"):
        _cfg("png_strategy=lzw")


def test_unknown_modality_and_config_key_are_clean_cli_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["shards", "build", "--config", str(TINY), "--out", str(tmp_path / "x"), "--no-progress"]
    assert main([*base, "--engine.modalities", "{fundus: 1, ultrasoundx: 1}"]) == 2
    assert "unknown modality 'ultrasoundx'" in capsys.readouterr().err
    assert main([*base, "engine.sed=1"]) == 2
    assert "unknown config key engine.sed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*base, "--engine.sed", "1"])
    assert e.value.code == 2 and "--engine.sed" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_overrides_reach_the_config(tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ["shards", "build", "--config", str(TINY), "--out", str(out), "--no-progress", *OVERRIDES]
    assert main([*args, "--num_samples", "8", "--engine.modalities.xca", "0"]) == 0
    manifest = load_manifest(out)
    assert manifest.num_samples == 8 and "xca" not in manifest.modalities


def test_two_nodes_build_slices_that_merge_into_the_single_node_manifest(
    reference: Path, tmp_path: Path
) -> None:
    for rank in (1, 0):
        result = build_corpus(_cfg(), tmp_path, num_nodes=2, node_rank=rank, progress=False)
        assert [r.name for r in result.manifest.shards] == [shard_name("tiny", s) for s in range(rank, 6, 2)]
    assert result.merged  # the last node to finish wrote manifest.json
    assert (tmp_path / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()
    (tmp_path / MANIFEST).unlink()
    assert main(["shards", "merge", str(tmp_path)]) == 0
    assert (tmp_path / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()


def test_merge_refuses_missing_nodes_and_mixed_configs(reference: Path, tmp_path: Path) -> None:
    build_corpus(_cfg(), tmp_path / "a", num_nodes=2, node_rank=0, progress=False)
    with pytest.raises(ValueError, match="in no slice"):
        merge_slices(tmp_path / "a")
    build_corpus(_cfg("engine.seed=1"), tmp_path / "b", num_nodes=2, node_rank=1, progress=False)
    shutil.copy(tmp_path / "b" / slice_name(1, 2), tmp_path / "a" / slice_name(1, 2))
    with pytest.raises(ValueError, match="different configs"):
        merge_slices(tmp_path / "a")


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_at_a_random_moment_then_rerun_matches_an_uninterrupted_build(
    reference: Path, tmp_path: Path, workers: int
) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "univg", "shards", "build", "--config", str(TINY), "--out", str(out)]
    cmd += ["--no-progress", "--workers", str(workers), *OVERRIDES]
    # Kill at a seeded random point: after 1-3 of the 6 shards are committed, while another is half-written.
    num_committed = int(np.random.default_rng(workers).integers(1, 4))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        committed = len(list((out / "records").glob("*.json"))) if (out / "records").is_dir() else 0
        if committed >= num_committed and any(TMP_MARK in p.name for p in out.glob(".*.tar*")):
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    time.sleep(0.5)
    before = _listing(out)
    time.sleep(0.5)
    assert _listing(out) == before, "something kept writing after the build was killed (orphan workers?)"
    reference_shards = {r.name: r.sha256 for r in load_manifest(reference).shards}
    for p in out.glob("*.tar"):  # a shard under its final name is complete and correct
        assert sha256_file(p) == reference_shards[p.name]
    assert not (out / MANIFEST).exists()
    result = build_corpus(_cfg(), out, num_workers=workers, progress=False)
    assert result.num_shards_built >= 1
    assert (out / MANIFEST).read_bytes() == (reference / MANIFEST).read_bytes()
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name]
