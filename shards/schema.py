"""How one sample sits in a shard: its key, its tar members, and their encoding.

    key = sample_key("univg58k", 17)            # "univg58k_000000017" (no dot: WebDataset splits there)
    members = encode_sample(sample, level=1)    # {"image.png": b..., "mask.png": b..., "meta.json": b...}
    members = encode_sample(sample, 1, "rle")   # the corpus build's encoding: same pixels, ~2.5x faster
    sample = decode_sample(key, members)        # checked: dtypes, shapes, mask values {0, 255}

Tar member `<key>.<suffix>` holds one of the suffixes in MEMBERS. PNGs are coded by data_engine.io, with one
of PNG_STRATEGIES (a reader needs to know none of them: every one is plain lossless PNG). Images
are uint8 grey or 3-channel (BGR in memory, as OpenCV writes it); masks and fields of view are
single-channel uint8 holding only 0 and 255, decoded as single-channel (never through a colour decoder,
which could blend values).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import deque
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np

from data_engine.corpus import Sample
from data_engine.io import decode_png, encode_png

IMAGE, MASK, FOV, META = "image.png", "mask.png", "fov.png", "meta.json"
MEMBERS: tuple[str, ...] = (FOV, IMAGE, MASK, META)  # sorted: the order they are written in
REQUIRED: tuple[str, ...] = (IMAGE, MASK, META)
KEY_RE = re.compile(r"^(?P<corpus>[A-Za-z0-9_-]+)_(?P<index>[0-9]{9})$")
MODALITY_RE = re.compile(r"^[a-z0-9_-]+$")
_END_OF_ARCHIVE = bytes(1024)  # a tar ends with two 512-byte zero blocks
_NO_END = "tar ends without its end-of-archive blocks (truncated or corrupt)"
# How encode_sample codes PNG members. "zlib": zlib's default strategy at the given level, libpng picking
# a row filter per row (every shard before 2026-12-01; still what ingest and synthesis write). "rle":
# zlib's run-length strategy with one fixed row filter (levels 1-9 give the same bytes, 0 stores): at
# 512 px 2.5x faster to encode, 14 % smaller and faster to decode (BENCHMARKS.md, "PNG strategy and
# uint8 reader batches").
PNG_STRATEGIES: tuple[str, ...] = ("zlib", "rle")


class SampleError(ValueError):
    """A sample whose members are missing, undecodable, or out of range."""


class ShardError(ValueError):
    """A shard whose tar structure is broken: truncated, bad header, stray member."""


def sample_key(corpus: str, index: int) -> str:
    """Key of sample `index` of `corpus`: `<corpus>_<index:09d>`."""
    key = f"{corpus}_{index:09d}"
    if index < 0 or not KEY_RE.match(key):
        raise ValueError(f"no valid sample key for corpus {corpus!r}, index {index}")
    return key


def key_index(key: str) -> int:
    """The sample index a key ends with."""
    m = KEY_RE.match(key)
    if not m:
        raise SampleError(f"sample key {key!r} is not <corpus>_<index:09d>")
    return int(m.group("index"))


# --- PNG codec: data_engine.io owns it; here its errors become SampleErrors naming the member ---


def _png_encode(array: np.ndarray, level: int, strategy: str, binary: bool) -> bytes:
    try:
        if strategy == "zlib":
            return encode_png(array, level)
        # rle: images predicted from the mean of left and upper neighbours ("avg": smallest of the fixed
        # filters on the corpus images); masks / FOVs unfiltered (runs of 0 and 255 are already runs).
        return encode_png(array, level, rle=True, row_filter="none" if binary else "avg")
    except ValueError as e:
        raise SampleError(str(e)) from e


def _png_decode(key: str, suffix: str, data: bytes, grayscale: bool) -> np.ndarray:
    try:
        return decode_png(data, grayscale=grayscale)
    except ValueError as e:
        raise SampleError(f"{key}.{suffix}: {e}") from e


# --- encode ---


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"meta value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def encode_meta(meta: Mapping[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no spaces, no NaN): equal metas give equal bytes."""
    modality = meta.get("modality")
    if not isinstance(modality, str) or not MODALITY_RE.match(modality):
        raise SampleError(
            f"meta['modality']={modality!r} must be a lower-case name (letters, digits, '_', '-')"
        )
    try:
        text = json.dumps(meta, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=False)
    except ValueError as e:
        raise SampleError(f"meta is not valid JSON (NaN or infinity?): {e}") from e
    return text.encode()


def encode_sample(sample: Sample, level: int, strategy: str = "zlib") -> dict[str, bytes]:
    """PNG/JSON members of a sample, by suffix. `level` is the zlib level 0-9, `strategy` one of
    PNG_STRATEGIES."""
    if strategy not in PNG_STRATEGIES:
        raise ValueError(f"PNG strategy {strategy!r} must be one of {list(PNG_STRATEGIES)}")
    if np.count_nonzero(sample.mask) != np.count_nonzero(sample.mask == 255):
        raise SampleError("mask values must be 0 or 255")
    if sample.image.ndim == 3 and sample.image.shape[2] != 3:
        raise SampleError(f"image must have 1 or 3 channels, got shape {sample.image.shape}")
    members = {
        IMAGE: _png_encode(sample.image, level, strategy, binary=False),
        MASK: _png_encode(sample.mask, level, strategy, binary=True),
    }
    if sample.fov is not None:
        if np.count_nonzero(sample.fov) != np.count_nonzero(sample.fov == 255):
            raise SampleError("fov values must be 0 or 255")
        members[FOV] = _png_encode(sample.fov, level, strategy, binary=True)
    members[META] = encode_meta(sample.meta)
    return members


# --- decode ---


def _decode_binary(key: str, suffix: str, data: bytes, shape: tuple[int, int]) -> np.ndarray:
    array = _png_decode(key, suffix, data, grayscale=True)  # single-channel uint8 or SampleError
    if array.shape != shape:
        raise SampleError(f"{key}.{suffix}: shape {array.shape} differs from the image's {shape}")
    if np.count_nonzero(array) != np.count_nonzero(array == 255):
        raise SampleError(f"{key}.{suffix}: values must be 0 or 255 (a lossy or soft mask?)")
    return array


def decode_meta(key: str, data: bytes) -> dict[str, Any]:
    """The meta.json member as a dict holding a string `modality`."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError(f"{key}.{META}: not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("modality"), str):
        raise SampleError(f"{key}.{META}: must be a JSON object with a string 'modality'")
    return meta


def decode_sample(key: str, members: Mapping[str, bytes]) -> Sample:
    """Decode and check the members of one sample; raises SampleError naming the key and member."""
    missing = [m for m in REQUIRED if m not in members]
    if missing:
        raise SampleError(f"{key}: missing member(s) {missing}; has {sorted(members)}")
    image = _png_decode(key, IMAGE, members[IMAGE], grayscale=False)  # uint8 HxW or HxWx3, or SampleError
    shape = (int(image.shape[0]), int(image.shape[1]))
    mask = _decode_binary(key, MASK, members[MASK], shape)
    fov = _decode_binary(key, FOV, members[FOV], shape) if FOV in members else None
    meta = decode_meta(key, members[META])
    return Sample(image=image, mask=mask, fov=fov, meta=meta)


# --- tar layout ---


class _TailReader:
    """Read-through wrapper that remembers the last few chunks, so the end-of-archive blocks can be
    checked on any stream (files, pipes) after tarfile has consumed them."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.total = 0
        self._chunks: deque[bytes] = deque(maxlen=4)  # tarfile reads 10 kB records; the end is within 2

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self.total += len(data)
            self._chunks.append(data)
        return data

    def bytes_at(self, offset: int, n: int) -> bytes | None:
        """n bytes from stream position `offset` (reading on if needed), or None if no longer held."""
        while self.total < offset + n and self.read(offset + n - self.total):
            pass
        held = b"".join(self._chunks)
        start = self.total - len(held)
        if offset < start:
            return None
        return held[offset - start : offset - start + n]


def _tarfile_members(fileobj: IO[bytes], source: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member of an uncompressed tar stream, read by the standard tarfile module."""
    stream = _TailReader(fileobj)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for info in tar:
                if not info.isreg():
                    raise ShardError(f"{source}: member {info.name!r} is not a regular file")
                extracted = tar.extractfile(info)
                assert extracted is not None  # regular files always extract
                data = extracted.read()
                if len(data) != info.size:
                    raise ShardError(f"{source}: member {info.name!r} is truncated")
                yield info.name, data
            end_offset = tar.offset
    except tarfile.TarError as e:
        raise ShardError(f"{source}: broken tar ({e})") from e
    except EOFError as e:
        raise ShardError(f"{source}: truncated tar ({e})") from e
    end = stream.bytes_at(end_offset, len(_END_OF_ARCHIVE))
    if end is not None and end != _END_OF_ARCHIVE:
        raise ShardError(f"{source}: {_NO_END}")


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0")  # ustar type flags of a regular file


def _octal(field: bytes) -> int | None:
    digits = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return None


def _signed_checksum(header: bytes) -> int:
    return sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32


def _memory_members(data: bytes, source: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member of a tar held in memory: ustar headers walked directly (checksum,
    type, size, bounds, end-of-archive blocks), several times faster than tarfile. Headers this walk does
    not read (pax or GNU extensions, base-256 sizes: not what ShardWriter writes) hand the rest of the
    archive to tarfile."""
    pos, num_bytes = 0, len(data)
    while True:
        header = data[pos : pos + _BLOCK]
        if len(header) < _BLOCK:
            raise ShardError(f"{source}: truncated tar (it ends at byte {num_bytes} inside a header)")
        if header == _ZERO_BLOCK:
            if data[pos : pos + len(_END_OF_ARCHIVE)] != _END_OF_ARCHIVE:
                raise ShardError(f"{source}: {_NO_END}")
            return
        stored = _octal(header[148:156])
        unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
        if stored != unsigned and stored != _signed_checksum(header):  # old writers summed signed bytes
            raise ShardError(f"{source}: broken tar (bad header checksum at byte {pos})")
        type_flag = header[156:157]
        if type_flag in (b"x", b"g", b"L", b"K") or header[124] & 0x80:  # pax / GNU / base-256 size
            yield from _tarfile_members(io.BytesIO(data[pos:]), source)
            return
        size = _octal(header[124:136])
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        text = name.decode("utf-8", "surrogateescape")
        if type_flag not in _REGULAR:
            raise ShardError(f"{source}: member {text!r} is not a regular file")
        if size is None:
            raise ShardError(f"{source}: broken tar (bad size field of {text!r})")
        begin = pos + _BLOCK
        if begin + size > num_bytes:
            raise ShardError(f"{source}: member {text!r} is truncated")
        yield text, data[begin : begin + size]
        pos = begin + -(-size // _BLOCK) * _BLOCK


def _group_samples(
    members: Iterator[tuple[str, bytes]], source: str
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive members `<key>.<suffix>` -> (key, {suffix: bytes}); the last sample only once the
    archive has ended cleanly."""
    key: str | None = None
    group: dict[str, bytes] = {}
    for name, data in members:
        name_key, dot, suffix = name.partition(".")
        if not dot or not suffix or "/" in name:
            raise ShardError(f"{source}: member {name!r} is not <key>.<member>")
        if name_key != key:
            if key is not None:
                yield key, group
            key, group = name_key, {}
        if suffix in group:
            raise ShardError(f"{source}: member {name!r} appears twice")
        group[suffix] = data
    if key is not None:
        yield key, group


def iter_samples(fileobj: IO[bytes], source: str = "shard") -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each sample of an uncompressed tar stream, in tar order.

    Raises ShardError (naming `source`) for a broken archive: a truncated member, a bad header, a
    non-file member, a member name without a suffix, a repeated member, or a missing end-of-archive
    marker, which is how a shard cut at a header boundary shows. The last sample is yielded only after
    the end marker is checked.
    """
    return _group_samples(_tarfile_members(fileobj, source), source)


def iter_samples_bytes(data: bytes, source: str = "shard") -> Iterator[tuple[str, dict[str, bytes]]]:
    """iter_samples over a shard held in memory (the same samples and errors, without tarfile)."""
    return _group_samples(_memory_members(data, source), source)
