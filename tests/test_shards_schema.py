"""Sample keys, members and the checks where sample data enters."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from shards_testdata import hand_sample

from data_engine.corpus import Sample
from data_engine.io import encode_png
from shards.schema import (
    FOV,
    IMAGE,
    MASK,
    META,
    PNG_STRATEGIES,
    SampleError,
    ShardError,
    decode_sample,
    encode_sample,
    iter_samples,
    iter_samples_bytes,
    key_index,
    sample_key,
)
from shards.writer import ShardWriter, shard_name


def test_key_is_corpus_and_nine_digit_index_without_dots() -> None:
    assert sample_key("univg58k", 17) == "univg58k_000000017"
    assert key_index("univg58k_000000017") == 17
    with pytest.raises(ValueError):
        sample_key("bad.name", 0)
    with pytest.raises(SampleError):
        key_index("x_17")


@pytest.mark.parametrize("strategy", PNG_STRATEGIES)
@pytest.mark.parametrize("i", [0, 1, 3])  # colour+fov, grey, grey+fov
def test_encode_decode_round_trip_is_exact(i: int, strategy: str) -> None:
    sample = hand_sample(i)
    members = encode_sample(sample, 1, strategy)
    assert (FOV in members) == (sample.fov is not None)
    back = decode_sample("c_000000000", members)
    assert np.array_equal(back.image, sample.image) and back.image.shape == sample.image.shape
    assert np.array_equal(back.mask, sample.mask) and back.mask.ndim == 2
    assert (back.fov is None) == (sample.fov is None)
    assert back.meta == sample.meta


def _textured_sample() -> Sample:
    """A 64 px colour sample with noise and smooth shading, so that encodings differ in their bytes."""
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
    image = np.stack([ramp, ramp // 2, 255 - ramp], axis=2) + rng.integers(0, 8, (64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:24, 5:60] = 255
    fov = np.full((64, 64), 255, np.uint8)
    fov[:4] = 0
    return Sample(image=image, mask=mask, fov=fov, meta={"modality": "fundus"})


def test_png_strategies_code_the_same_pixels_as_plain_pngs() -> None:
    from PIL import Image

    sample = _textured_sample()
    zlib, rle = encode_sample(sample, 1), encode_sample(sample, 1, "rle")
    # "zlib" (the default) is what every shard before the rle strategy held: encode_png at the level
    assert zlib[IMAGE] == encode_png(sample.image, 1) and zlib[MASK] == encode_png(sample.mask, 1)
    assert rle[IMAGE] != zlib[IMAGE] and rle[META] == zlib[META]
    # under rle, zlib levels 1-9 code alike; the bytes are a pure function of the pixels
    assert encode_sample(sample, 9, "rle") == rle == encode_sample(sample, 1, "rle")
    back = decode_sample("c_000000000", rle)
    assert np.array_equal(back.image, sample.image) and np.array_equal(back.mask, sample.mask)
    assert back.fov is not None and sample.fov is not None and np.array_equal(back.fov, sample.fov)
    # stock readers see ordinary 8-bit PNGs (PIL: RGB order, masks in mode L with 0 / 255)
    with Image.open(io.BytesIO(rle[IMAGE])) as im:
        assert np.array_equal(np.asarray(im)[:, :, ::-1], sample.image)
    with Image.open(io.BytesIO(rle[MASK])) as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), sample.mask)
    with pytest.raises(ValueError, match="strategy"):
        encode_sample(sample, 1, "lzw")
    with pytest.raises(ValueError, match="row_filter"):
        encode_png(sample.mask, 1, rle=True, row_filter="median")


def test_meta_json_is_canonical_and_takes_numpy_values() -> None:
    sample = hand_sample(1)
    sample.meta = {"modality": "xca", "b": np.float64(0.5), "a": np.arange(2)}
    assert encode_sample(sample, 1)[META] == b'{"a":[0,1],"b":0.5,"modality":"xca"}'


def test_mask_that_is_not_single_channel_is_rejected() -> None:
    members = encode_sample(hand_sample(1), 1)
    mask_bgr = cv2.cvtColor(hand_sample(1).mask, cv2.COLOR_GRAY2BGR)
    members[MASK] = cv2.imencode(".png", mask_bgr)[1].tobytes()
    with pytest.raises(SampleError, match="mask.png"):
        decode_sample("c_000000001", members)


def test_soft_mask_values_are_rejected_on_decode_and_encode() -> None:
    members = encode_sample(hand_sample(1), 1)
    soft = np.zeros((16, 16), np.uint8)
    soft[3, 3] = 128
    members[MASK] = cv2.imencode(".png", soft)[1].tobytes()
    with pytest.raises(SampleError, match="0 or 255"):
        decode_sample("c_000000001", members)
    with pytest.raises(SampleError, match="0 or 255"):
        encode_sample(Sample(image=soft, mask=soft, fov=None, meta={"modality": "xca"}), 1)


def test_missing_member_bad_png_and_bad_meta_are_sample_errors() -> None:
    members = encode_sample(hand_sample(1), 1)
    with pytest.raises(SampleError, match="missing"):
        decode_sample("k_000000001", {k: v for k, v in members.items() if k != MASK})
    with pytest.raises(SampleError, match="image.png"):
        decode_sample("k_000000001", {**members, IMAGE: members[IMAGE][:40]})
    with pytest.raises(SampleError, match="meta.json"):
        decode_sample("k_000000001", {**members, META: b'{"no_modality": 1}'})
    bad = hand_sample(1)
    bad.meta = {"source": "x"}
    with pytest.raises(SampleError, match="modality"):
        encode_sample(bad, 1)


def test_image_and_mask_of_different_sizes_are_rejected() -> None:
    members = encode_sample(hand_sample(1), 1)
    members[MASK] = encode_sample(hand_sample(1, size_px=8), 1)[MASK]
    with pytest.raises(SampleError, match="shape"):
        decode_sample("k_000000001", members)


def _shard_bytes(tmp_path: Path, n: int = 3) -> bytes:
    with ShardWriter(tmp_path / shard_name("c", 0)) as w:
        for i in range(n):
            w.add(sample_key("c", i), encode_sample(hand_sample(i), 1), "xca")
        record = w.commit()
    return (tmp_path / record.name).read_bytes()


# the two readers of a tar: tarfile over a stream (pipes, URLs) and the direct walk over bytes in memory
READERS = {
    "stream": lambda data: list(iter_samples(io.BytesIO(data))),
    "memory": lambda data: list(iter_samples_bytes(data)),
}


@pytest.mark.parametrize("reader", READERS)
def test_iter_samples_groups_members_by_key(tmp_path: Path, reader: str) -> None:
    got = READERS[reader](_shard_bytes(tmp_path))
    assert [k for k, _ in got] == ["c_000000000", "c_000000001", "c_000000002"]
    assert sorted(got[0][1]) == sorted([FOV, IMAGE, MASK, META]) and sorted(got[1][1]) == [IMAGE, MASK, META]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("cut", ["mid_member", "header_boundary", "no_end_blocks"])
def test_truncated_tar_is_a_shard_error(tmp_path: Path, cut: str, reader: str) -> None:
    data = _shard_bytes(tmp_path)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    end_of_last_member = members[-1].offset_data + members[-1].size
    size = {
        "mid_member": members[2].offset_data + 5,
        "header_boundary": next(m.offset for m in members if m.name.startswith("c_000000001")),
        "no_end_blocks": end_of_last_member + (-end_of_last_member) % 512,  # data padded, zero blocks cut
    }[cut]
    with pytest.raises(ShardError):
        READERS[reader](data[:size])


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT, directory: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_the_memory_walk_reads_pax_and_gnu_extensions_as_tarfile_does(fmt: int) -> None:
    # a key over ustar's 100-character name field: pax / GNU long-name headers, which the walk hands to
    # tarfile from that header on; a short key before it is read by the walk itself
    long_key = "k" * 120
    members = [
        ("a_1.image.png", b"x" * 700),
        (f"{long_key}.image.png", b"y" * 5),
        (f"{long_key}.meta.json", b"{}"),
    ]
    data = _tar(members, fmt)
    got = READERS["memory"](data)
    assert got == READERS["stream"](data)
    assert got == [
        ("a_1", {"image.png": b"x" * 700}),
        (long_key, {"image.png": b"y" * 5, "meta.json": b"{}"}),
    ]


def _broken_tar(what: str) -> bytes:
    if what == "bad checksum":
        good = _tar([("a_1.image.png", b"x" * 700), ("a_1.mask.png", b"m"), ("a_2.image.png", b"z")])
        assert len(READERS["memory"](good)) == len(READERS["stream"](good)) == 2
        flipped = bytearray(good)
        flipped[512 + 1024 + 3] ^= 0x01  # inside the second header's name: its checksum no longer matches
        return bytes(flipped)
    return {
        "directory": lambda: _tar([("a_1.image.png", b"x")], directory="d"),
        "no suffix": lambda: _tar([("a_1", b"x")]),
        "repeated": lambda: _tar([("a_1.image.png", b"x"), ("a_1.image.png", b"y")]),
        "a path": lambda: _tar([("d/a_1.image.png", b"x")]),
    }[what]()


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("what", ["bad checksum", "directory", "no suffix", "repeated", "a path"])
def test_broken_tar_members_are_shard_errors(reader: str, what: str) -> None:
    with pytest.raises(ShardError):
        READERS[reader](_broken_tar(what))
