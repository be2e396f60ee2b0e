"""The shard writer: deterministic bytes, atomic appearance, readable by stock tools."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from shards_testdata import hand_config, hand_sample, write_hand_corpus

from shards.schema import encode_sample, sample_key
from shards.writer import TAR_MTIME, ShardWriter, shard_name


def _write(folder: Path, indices: range) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(folder / shard_name("c", 0)) as w:
        for i in indices:
            w.add(sample_key("c", i), encode_sample(hand_sample(i), 1), hand_sample(i).meta["modality"])
        record = w.commit()
    path = folder / record.name
    assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record.num_bytes == path.stat().st_size and record.num_samples == len(indices)
    return path


def test_same_samples_give_byte_identical_shards(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", range(6))
    b = _write(tmp_path / "b", range(6))
    assert a.read_bytes() == b.read_bytes()


def _tarfile_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """The same members written by the standard library's tarfile, with the writer's fixed metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for suffix in sorted(members):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime, info.mode = len(members[suffix]), TAR_MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(members[suffix]))
    return buffer.getvalue()


@pytest.mark.parametrize("num_samples", [0, 1, 7])
def test_shard_bytes_are_what_stdlib_tarfile_writes(tmp_path: Path, num_samples: int) -> None:
    samples = [(sample_key("c", i), encode_sample(hand_sample(i), 1)) for i in range(num_samples)]
    with ShardWriter(tmp_path / shard_name("c", 0)) as w:
        for key, members in samples:
            w.add(key, members, "xca")
        record = w.commit()
    written = (tmp_path / record.name).read_bytes()
    assert written == _tarfile_bytes(samples)
    assert len(written) % tarfile.RECORDSIZE == 0 and record.num_bytes == len(written)


def test_record_counts_modalities(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / shard_name("c", 0)) as w:
        for i in range(8):
            w.add(sample_key("c", i), encode_sample(hand_sample(i), 1), hand_sample(i).meta["modality"])
        record = w.commit()
    assert record.modalities == {"dsa": 1, "fundus": 2, "mra": 1, "octa": 1, "ultrasound": 1, "xca": 2}


def test_members_have_fixed_metadata_and_sorted_order(tmp_path: Path) -> None:
    path = _write(tmp_path, range(2))
    with tarfile.open(path) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [
        "c_000000000.fov.png", "c_000000000.image.png", "c_000000000.mask.png", "c_000000000.meta.json",
        "c_000000001.image.png", "c_000000001.mask.png", "c_000000001.meta.json",
    ]  # fmt: skip
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {
        (TAR_MTIME, 0, 0, "", "", 0o644)
    }


def test_an_unfinished_shard_never_appears_under_its_final_name(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="make_sample blew up"):
        with ShardWriter(tmp_path / shard_name("c", 0)) as w:
            w.add(sample_key("c", 0), encode_sample(hand_sample(0), 1), "fundus")
            raise RuntimeError("make_sample blew up")
    assert list(tmp_path.iterdir()) == []


def test_keys_must_increase_and_members_be_known(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / shard_name("c", 0)) as w:
        w.add(sample_key("c", 1), encode_sample(hand_sample(1), 1), "xca")
        with pytest.raises(ValueError, match="increase"):
            w.add(sample_key("c", 0), encode_sample(hand_sample(0), 1), "fundus")
        with pytest.raises(ValueError, match="unknown member"):
            w.add(sample_key("c", 2), {"depth.png": b"x"}, "xca")
        with pytest.raises(ValueError, match="key"):
            w.add("c.2", {}, "xca")
    with pytest.raises(ValueError, match="shard file name"):
        ShardWriter(tmp_path / "c-1.tar")


def test_tar_tf_lists_the_members(tmp_path: Path) -> None:
    path = _write(tmp_path, range(3))
    listing = subprocess.run(
        ["tar", "-tf", str(path)], check=True, capture_output=True, text=True
    ).stdout.split()
    assert len(listing) == 3 + 3 + 1 + 3 and listing[0] == "c_000000000.fov.png"


def test_stock_webdataset_reads_the_shards(tmp_path: Path) -> None:
    cfg = write_hand_corpus(tmp_path, hand_config(num_samples=20, samples_per_shard=8))
    urls = [str(tmp_path / shard_name(cfg.name, s)) for s in range(cfg.num_shards)]
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [sample_key(cfg.name, i) for i in range(20)]
    for s in samples:
        i = int(s["__key__"][-9:])
        assert s["mask.png"] == encode_sample(hand_sample(i), 1)["mask.png"]
        assert ("fov.png" in s) == (i % 3 == 0)
