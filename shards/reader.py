"""Reading shards for training and evaluation: seeded, split by node and worker, shuffled, checked.

    loader = make_loader(shard_urls("data/shards/univg58k"), batch_size=32, num_workers=8, seed=0)
    batch = next(iter(loader))   # image_B3HW float32 [-1, 1], mask_B1HW / fov_B1HW float32 {0, 1},
                                 # modality_B int64 (index into MODALITIES; len(MODALITIES) = spare slot), key

    loader = make_loader(..., output_dtype="uint8")   # image_B3HW uint8 RGB 0..255, mask / fov uint8 {0, 255}
    batch = to_float_batch(next(iter(loader)), "cuda")  # converted on the GPU: the float32 batch above

Why uint8: a DataLoader worker hands every batch over in fresh shared memory, which the worker must
allocate and write; at 512 px that is 5 MB a sample as float32, 1.3 MB as uint8 (BENCHMARKS.md, "Shard
reader": on a 2-core VM the float32 hand-over costs nearly as much as decoding the sample). The
conversion is the float32 reader's own arithmetic, so the two give equal tensors (tested on CPU).

    loader = make_loader(..., output_dtype="uint8", recycle=0)   # workers refill their batch buffers

Why recycle: even as uint8, first-touching fresh shared memory for every batch is the reader's largest
cost beyond decoding on a VM. With `recycle=k` each worker keeps a few shared batch buffers and writes
into them again; the batch you draw and the k before it stay intact, older ones may change under you
(the training loop converts each batch before drawing the next, so it uses k = 0). A shared table says
which buffers the caller still holds: a worker never writes into one of those (it takes fresh memory
instead), and buffers of batches the DataLoader dropped (an abandoned iteration) are freed.

Order of work in each stream (one stream = one DataLoader worker of one rank):
  shard order -> read shard bytes (verify size/sha256 against the folder's manifest when there is one)
  -> split the tar into samples -> shuffle buffer of raw (undecoded) samples -> decode + check -> tensors.

Shard order. One pass (`resampled=False`, for evaluation): the shard list is permuted by (seed, epoch),
identically everywhere, and stream (rank, worker) takes every world_size-th shard from `rank`, then every
num_workers-th of those from `worker`: streams are disjoint and together cover the corpus once.
Resampled (`resampled=True`, for training): each stream walks endless permutations of all shards seeded
by (seed, epoch, rank, worker). Rank and world size come from torch.distributed when initialised, else
from RANK/WORLD_SIZE, else (0, 1); pass `rank`/`world_size` to override.

Bad data does not stop training: a shard whose size or sha256 disagrees with its manifest, or whose tar
is truncated or broken, is skipped (the rest of it, for streams that cannot be checked up front), a
sample that fails to decode or check is dropped; each gives a CorruptShardWarning and is counted in
`dataset.counters` (shared across DataLoader workers).
"""

from __future__ import annotations

import collections
import hashlib
import math
import multiprocessing as mp
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from multiprocessing import context as mp_context
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset

from data_engine import MODALITIES
from shards.manifest import MANIFEST, SLICE_RE, load_manifest
from shards.schema import SampleError, ShardError, decode_sample, iter_samples, iter_samples_bytes
from shards.writer import ShardRecord

T = TypeVar("T")
SPARE_MODALITY = len(MODALITIES)  # index for a modality the corpus never had


class CorruptShardWarning(UserWarning):
    """A shard or sample was skipped because it is truncated, corrupt or fails its checks."""


def modality_index(name: str) -> int:
    """Index of a modality name in MODALITIES; unknown names get the spare slot len(MODALITIES)."""
    return MODALITIES.index(name) if name in MODALITIES else SPARE_MODALITY


# --- URLs ---


def _local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    if url.startswith("file:"):
        return Path(url[len("file:") :])
    if url.startswith("pipe:") or "://" in url:
        return None
    return Path(url)


def shard_urls(dir_or_pattern: str | Path) -> list[str]:
    """Shard URLs from a corpus folder (via its manifest.json), a manifest file, a brace pattern
    (`dir/corpus-{000000..000009}.tar`), a single path, or a `pipe:` URL (braces expanded too)."""
    spec = str(dir_or_pattern)
    local = _local_path(spec)
    if local is not None and (
        local.is_dir() or (local.is_file() and (local.name == MANIFEST or SLICE_RE.match(local.name)))
    ):
        manifest = load_manifest(local)
        folder = local if local.is_dir() else local.parent
        return [str(folder / r.name) for r in manifest.shards]
    urls = list(braceexpand(spec))
    missing = [u for u in urls if (p := _local_path(u)) is not None and not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist (first: {missing[0]})")
    if not urls:
        raise ValueError(f"{spec!r} names no shards")
    return urls


# --- counters shared by DataLoader workers ---


class ReadCounters:
    """Counts shared by every process reading one dataset (shared memory, created by the main process)."""

    FIELDS = ("shards", "samples", "bad_shards", "bad_samples", "reused_buffers")

    def __init__(self) -> None:
        self._array = mp.Array("q", len(self.FIELDS))

    def add(self, name: str, n: int = 1) -> None:
        i = self.FIELDS.index(name)
        with self._array.get_lock():
            self._array[i] += n

    def get(self, name: str) -> int:
        return int(self._array[self.FIELDS.index(name)])

    @property
    def shards(self) -> int:
        """Shards opened (count)."""
        return self.get("shards")

    @property
    def samples(self) -> int:
        """Samples yielded (count)."""
        return self.get("samples")

    @property
    def bad_shards(self) -> int:
        """Shards skipped, wholly or from the point of damage (count)."""
        return self.get("bad_shards")

    @property
    def bad_samples(self) -> int:
        """Samples dropped because they failed to decode or check (count)."""
        return self.get("bad_samples")

    @property
    def reused_buffers(self) -> int:
        """Batches written into a shared buffer a worker had used before (make_loader(recycle=...))."""
        return self.get("reused_buffers")

    def as_dict(self) -> dict[str, int]:
        return {f: self.get(f) for f in self.FIELDS}

    def __getstate__(self) -> dict[str, Any]:
        return _array_state(self._array)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._array = state["array"] if "array" in state else mp.Array("q", state["values"])


def _array_state(array: Any) -> dict[str, Any]:
    """Pickled state of a shared array: shared memory travels only to processes being started
    (DataLoader workers); any other copy (pickle, deepcopy) gets its own array of the current values."""
    if mp_context.get_spawning_popen() is not None:
        return {"array": array}
    return {"values": [int(v) for v in array[:]]}


# --- batch buffers a worker refills once the consumer is done with them ---

SLOT_KEY = "_slot"  # batch entry naming its buffer: (worker, slot, batch number); make_loader removes it


class SlotTable:
    """Which of its shared batch buffers each DataLoader worker may write into (shared memory, created
    by the main process). Row w: [number of batches worker w has made, then per buffer 0 (free) or
    1 + the number of the batch written into it]. Only the worker marks a buffer taken; only the
    consumer frees it, once the caller has drawn enough later batches (`make_loader(recycle=...)`)."""

    def __init__(self, num_workers: int, num_slots: int) -> None:
        self.num_workers, self.num_slots = num_workers, num_slots
        self._array = mp.RawArray("q", num_workers * (num_slots + 1))

    def _row(self, worker: int) -> int:
        return worker * (self.num_slots + 1)

    def claim(self, worker: int) -> tuple[int, int]:
        """(free buffer or -1 when every one is held, number of this batch); in the worker."""
        row = self._row(worker)
        number = int(self._array[row])
        self._array[row] = number + 1
        for slot in range(self.num_slots):
            if self._array[row + 1 + slot] == 0:
                self._array[row + 1 + slot] = number + 1
                return slot, number
        return -1, number

    def release(self, worker: int, slot: int, number: int) -> None:
        """Free a buffer the caller is done with; in the consumer."""
        i = self._row(worker) + 1 + slot
        if slot >= 0 and self._array[i] == number + 1:
            self._array[i] = 0

    def release_lost(self, worker: int, number: int, held: Iterable[tuple[int, int, int]]) -> None:
        """Free the buffers of worker's batches older than `number` that never reached the caller (the
        DataLoader drops prefetched batches when an iteration is abandoned); a worker's batches arrive in
        the order it made them, so an older one not held now was dropped."""
        keep = {slot for w, slot, _ in held if w == worker}
        row = self._row(worker)
        for slot in range(self.num_slots):
            value = int(self._array[row + 1 + slot])
            if 0 < value <= number and slot not in keep:
                self._array[row + 1 + slot] = 0

    def num_taken(self) -> int:
        return sum(
            1
            for w in range(self.num_workers)
            for s in range(self.num_slots)
            if self._array[self._row(w) + 1 + s] != 0
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "num_slots": self.num_slots, **_array_state(self._array)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.num_workers, self.num_slots = state["num_workers"], state["num_slots"]
        self._array = state["array"] if "array" in state else mp.RawArray("q", state["values"])


# --- shard integrity against the folder's manifest ---

_MANIFEST_CACHE: dict[Path, tuple[int, dict[str, ShardRecord]]] = {}
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) whose sha256 matched, per process


def _manifest_record(path: Path) -> ShardRecord | None:
    """The record of a local shard in the manifest.json of its folder, or None where there is none."""
    manifest_path = path.parent / MANIFEST
    try:
        mtime = manifest_path.stat().st_mtime_ns
    except OSError:
        return None
    cached = _MANIFEST_CACHE.get(manifest_path)
    if cached is None or cached[0] != mtime:
        try:
            records = {r.name: r for r in load_manifest(manifest_path).shards}
        except (OSError, ValueError):
            records = {}
        cached = (mtime, records)
        _MANIFEST_CACHE[manifest_path] = cached
    return cached[1].get(path.name)


def _read_local_shard(path: Path, verify: bool) -> bytes:
    """The bytes of a local shard, checked against its manifest record; ShardError if they disagree."""
    st = path.stat()
    record = _manifest_record(path) if verify else None
    if record is not None and st.st_size != record.num_bytes:
        raise ShardError(f"{path}: {st.st_size} bytes, manifest says {record.num_bytes} (truncated?)")
    with open(path, "rb") as f:
        data = f.read()
    if record is not None:
        stamp = (str(path), st.st_size, st.st_mtime_ns)
        if stamp not in _VERIFIED:
            if hashlib.sha256(data).hexdigest() != record.sha256:
                raise ShardError(f"{path}: sha256 differs from the manifest (corrupt)")
            _VERIFIED.add(stamp)
    return data


# --- tensors ---


def _resize(array: np.ndarray, size_px: int, binary: bool) -> np.ndarray:
    h, w = array.shape[:2]
    if (h, w) == (size_px, size_px):
        return array
    shrink = size_px < min(h, w)
    out = cv2.resize(array, (size_px, size_px), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if binary:  # area averaging keeps thin vessels as partial values; threshold at half back to {0, 255}
        out = np.where(out >= 128, np.uint8(255), np.uint8(0))
    return out


OUTPUT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "uint8": torch.uint8}


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """Uninitialised tensor; in shared memory when made in a DataLoader worker, so the batch reaches the
    main process without the copy that moving it to shared memory would cost."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    num_bytes = math.prod(shape) * dtype.itemsize
    storage = torch.UntypedStorage._new_shared(num_bytes)  # what default_collate does in workers
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _fill_image(image_3HW: torch.Tensor, image: np.ndarray) -> None:
    """uint8 HxW grey or HxWx3 BGR -> float32 3xHxW RGB in [-1, 1] (grey replicated), in place."""
    planes = [image] if image.ndim == 2 else cv2.split(image)[::-1]  # BGR -> RGB, contiguous planes
    for c, plane in enumerate(planes):
        torch.mul(torch.from_numpy(plane), 2.0 / 255.0, out=image_3HW[c])
    image_3HW[: len(planes)].sub_(1.0)
    if len(planes) == 1:
        image_3HW[1].copy_(image_3HW[0])
        image_3HW[2].copy_(image_3HW[0])


def _fill_binary(out_1HW: torch.Tensor, array: np.ndarray | None) -> None:
    """uint8 HxW {0, 255} -> float32 1xHxW {0, 1} in place; None -> all ones."""
    if array is None:
        out_1HW.fill_(1.0)
    else:
        torch.div(torch.from_numpy(array), 255.0, out=out_1HW[0])


def _fill_image_uint8(image_3HW: torch.Tensor, image: np.ndarray) -> None:
    """uint8 HxW grey or HxWx3 BGR -> uint8 3xHxW RGB (grey replicated), in place."""
    out = image_3HW.numpy()
    if image.ndim == 2:
        out[:] = image  # broadcast over the three channels
    else:
        for c, plane in enumerate(cv2.split(image)[::-1]):  # contiguous planes copy fastest
            out[c] = plane


def _fill_binary_uint8(out_1HW: torch.Tensor, array: np.ndarray | None) -> None:
    """uint8 HxW {0, 255} -> uint8 1xHxW {0, 255} in place; None -> all 255."""
    if array is None:
        out_1HW.fill_(255)
    else:
        out_1HW.numpy()[0] = array


def to_float_batch(
    batch: dict[str, Any], device: torch.device | str | None = None, non_blocking: bool = False
) -> dict[str, Any]:
    """A batch or item of `output_dtype="uint8"` on `device` (default: where it is) with the float32
    layout of the default reader: image in [-1, 1], mask / fov in {0, 1}, the very values the float32
    reader gives (same arithmetic, in float32). Float32 tensors and `modality` are only moved; other
    entries (`key`) are kept as they are. Convert after moving: the copy to a GPU is then 4x smaller."""
    out = dict(batch)
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.to(device, non_blocking=non_blocking) if device is not None else value
        if value.dtype == torch.uint8 and name == "image":
            value = value.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)  # as _fill_image
        elif value.dtype == torch.uint8 and name in ("mask", "fov"):
            value = value.to(torch.float32).div_(255.0)  # as _fill_binary
        out[name] = value
    return out


def _checked_arrays(
    key: str, members: dict[str, bytes], image_size_px: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Decode and check one raw sample: (image, mask, fov or None, modality index); SampleError if bad."""
    sample = decode_sample(key, members)
    image, mask, fov = sample.image, sample.mask, sample.fov
    if image_size_px is not None:
        image = _resize(image, image_size_px, binary=False)
        mask = _resize(mask, image_size_px, binary=True)
        fov = None if fov is None else _resize(fov, image_size_px, binary=True)
    return image, mask, fov, modality_index(str(sample.meta["modality"]))


def decode_item(
    key: str, members: dict[str, bytes], image_size_px: int | None = None, output_dtype: str = "float32"
) -> dict[str, Any]:
    """One raw sample -> the training dict (see module doc); SampleError if it fails its checks."""
    return _item(key, *_checked_arrays(key, members, image_size_px), dtype=_output_dtype(output_dtype))


class _BatchBuilder:
    """Writes decoded samples straight into preallocated batch tensors (one pass over the pixels), as
    float32 (image [-1, 1], masks {0, 1}) or as uint8 (values as stored, masks {0, 255})."""

    def __init__(
        self,
        batch_size: int,
        shared: bool,
        dtype: torch.dtype = torch.float32,
        buffers: _WorkerBuffers | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.shared = shared
        self.dtype = dtype
        self.buffers = buffers  # reused shared buffers (make_loader(recycle=...)), else fresh ones
        self._fill_image, self._fill_binary = (
            (_fill_image_uint8, _fill_binary_uint8) if dtype == torch.uint8 else (_fill_image, _fill_binary)
        )
        self._reset()

    def _reset(self) -> None:
        self.keys: list[str] = []
        self.modalities: list[int] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.slot: tuple[int, int, int] | None = None

    def add(
        self, key: str, image: np.ndarray, mask: np.ndarray, fov: np.ndarray | None, modality: int
    ) -> None:
        h, w = mask.shape
        if not self.tensors:
            b = self.batch_size
            shapes: dict[str, tuple[int, ...]] = {
                "image": (b, 3, h, w),
                "mask": (b, 1, h, w),
                "fov": (b, 1, h, w),
            }
            if self.buffers is not None:
                self.tensors, self.slot = self.buffers.take(shapes, self.dtype)
            else:
                self.tensors = {n: _new_tensor(shape, self.dtype, self.shared) for n, shape in shapes.items()}
        elif self.tensors["mask"].shape[2:] != (h, w):
            have = tuple(self.tensors["mask"].shape[2:])
            raise ValueError(
                f"{key} is {h}x{w} px but its batch is {have}: pass image_size_px to make_loader"
            )
        j = len(self.keys)
        self._fill_image(self.tensors["image"][j], image)
        self._fill_binary(self.tensors["mask"][j], mask)
        self._fill_binary(self.tensors["fov"][j], fov)
        self.keys.append(key)
        self.modalities.append(modality)

    def full(self) -> bool:
        return len(self.keys) == self.batch_size

    def take(self) -> dict[str, Any]:
        n = len(self.keys)
        batch: dict[str, Any] = {name: t[:n] for name, t in self.tensors.items()}
        batch["modality"] = torch.tensor(self.modalities, dtype=torch.int64)
        batch["key"] = list(self.keys)
        if self.slot is not None:
            batch[SLOT_KEY] = self.slot
        self._reset()
        return batch


class _WorkerBuffers:
    """One worker's shared batch buffers: made on first use, written again once the consumer frees
    them in the SlotTable; a fresh buffer whenever every one is still held."""

    def __init__(self, table: SlotTable, worker: int, counters: ReadCounters) -> None:
        self.table, self.worker, self.counters = table, worker, counters
        self.buffers: dict[int, dict[str, torch.Tensor]] = {}

    def take(
        self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
    ) -> tuple[dict[str, torch.Tensor], tuple[int, int, int]]:
        slot, number = self.table.claim(self.worker)
        have = self.buffers.get(slot) if slot >= 0 else None
        if have is None or any(t.shape != shapes[n] or t.dtype != dtype for n, t in have.items()):
            have = {n: _new_tensor(shape, dtype, shared=True) for n, shape in shapes.items()}
            if slot >= 0:
                self.buffers[slot] = have
        else:
            self.counters.add("reused_buffers")
        return have, (self.worker, slot, number)


# --- the dataset ---


def _shuffle(items: Iterable[T], buffer_size: int, rng: np.random.Generator) -> Iterator[T]:
    """Buffer shuffle: hold `buffer_size` items, emit a random one per new one, then the rest shuffled."""
    if buffer_size <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[int(j)]


def _distributed_info() -> tuple[int, int] | None:
    """(rank, world size) from torch.distributed if initialised, else RANK/WORLD_SIZE, else None."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


class ShardDataset(IterableDataset):
    """Samples of WebDataset shards as training dicts; see the module doc for order and checks."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        seed: int,
        resampled: bool,
        shuffle_buffer: int,
        image_size_px: int | None,
        epoch: int,
        verify: bool,
        rank: int | None,
        world_size: int | None,
        batch_size: int | None = None,
        output_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.output_dtype = output_dtype
        self._dtype = _output_dtype(output_dtype)
        self.urls = list(urls)
        self.seed = seed
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.image_size_px = image_size_px
        self.epoch = epoch
        self.verify = verify
        # Resolved here, in the main process: DataLoader workers may not see the process group.
        self._node = (
            (rank, world_size) if rank is not None and world_size is not None else _distributed_info()
        )
        self.counters = ReadCounters()
        self.slots: SlotTable | None = None  # set by make_loader(recycle=...): workers reuse buffers
        self._buffers: _WorkerBuffers | None = None  # this worker's, kept across epochs

    def set_epoch(self, epoch: int) -> None:
        """Reorder for another pass (takes effect at the next iter(), in workers started after it)."""
        self.epoch = epoch

    def node(self) -> tuple[int, int]:
        """(rank, world size) this dataset splits for."""
        return self._node or _distributed_info() or (0, 1)

    def stream_shards(self, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[str]:
        """Shard URLs stream (rank, worker) reads, in order (endless when resampled)."""
        if self.resampled:
            rng = np.random.default_rng([self.seed, self.epoch, rank, worker, 1])
            while True:
                for j in rng.permutation(len(self.urls)):
                    yield self.urls[int(j)]
        order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(len(self.urls))
        mine = [self.urls[int(j)] for j in order][rank::world_size][worker::num_workers]
        yield from mine

    def _warn(self, counter: str, message: str) -> None:
        self.counters.add(counter)
        warnings.warn(message, CorruptShardWarning, stacklevel=3)

    def raw_samples(self, urls: Iterable[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, members) of each shard in turn; broken shards are skipped, warned about and counted."""
        import webdataset as wds

        num_failed_in_a_row = 0
        for url in urls:
            self.counters.add("shards")
            local = _local_path(url)
            stream: Any = None
            num_samples = 0
            try:
                if local is not None:
                    samples = iter_samples_bytes(_read_local_shard(local, self.verify), url)
                else:
                    stream = wds.gopen(url, "rb")
                    samples = iter_samples(stream, url)
                for sample in samples:
                    num_samples += 1
                    yield sample
            except (ShardError, OSError) as e:
                self._warn("bad_shards", f"skipping shard {url}: {e}")
                num_failed_in_a_row = 0 if num_samples else num_failed_in_a_row + 1
                if num_failed_in_a_row >= len(self.urls):  # an endless stream would spin here silently
                    raise RuntimeError(
                        f"{num_failed_in_a_row} shards in a row were unreadable (last: {url}); "
                        "run `univg shards verify` on the corpus"
                    ) from e
            else:
                num_failed_in_a_row = 0
            finally:
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:  # a pipe whose command failed: already counted above
                        pass

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = self.node()
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker, 2])
        raw = self.raw_samples(self.stream_shards(rank, world_size, worker, num_workers))
        if info is not None and self.slots is not None and self._buffers is None:
            self._buffers = _WorkerBuffers(self.slots, worker, self.counters)
        batch = (
            _BatchBuilder(self.batch_size, shared=info is not None, dtype=self._dtype, buffers=self._buffers)
            if self.batch_size
            else None
        )
        for key, members in _shuffle(raw, self.shuffle_buffer, rng):
            try:
                image, mask, fov, modality = _checked_arrays(key, members, self.image_size_px)
            except SampleError as e:
                self._warn("bad_samples", f"skipping sample: {e}")
                continue
            self.counters.add("samples")
            if batch is None:
                yield _item(key, image, mask, fov, modality, dtype=self._dtype)
                continue
            batch.add(key, image, mask, fov, modality)
            if batch.full():
                yield batch.take()
        if batch is not None and batch.keys:
            yield batch.take()


def _output_dtype(name: str) -> torch.dtype:
    if name not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype={name!r} must be one of {list(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[name]


def _item(
    key: str,
    image: np.ndarray,
    mask: np.ndarray,
    fov: np.ndarray | None,
    modality: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    builder = _BatchBuilder(1, shared=False, dtype=dtype)
    builder.add(key, image, mask, fov, modality)
    batch = builder.take()
    return {
        "image": batch["image"][0],
        "mask": batch["mask"][0],
        "fov": batch["fov"][0],
        "modality": batch["modality"][0],
        "key": key,
    }


def make_dataset(
    urls: str | Sequence[str],
    *,
    seed: int,
    resampled: bool = True,
    shuffle_buffer: int = 1000,
    image_size_px: int | None = None,
    epoch: int = 0,
    verify: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    batch_size: int | None = None,
    output_dtype: str = "float32",
) -> ShardDataset:
    """A torch IterableDataset over shards: endless and reshuffled (`resampled`) or one pass split
    disjointly over ranks and workers. `urls`: a corpus folder, brace pattern, pipe: URL, or a list of
    shard URLs. `shuffle_buffer` counts raw samples (about 0.3 MB each at 512 px). `image_size_px`
    resizes square (masks by area then threshold). `verify` checks local shards' size and sha256
    against their folder's manifest.json. `rank`/`world_size` override the detected distributed setup.
    `batch_size` makes it yield batches assembled in the worker (what make_loader does).
    `output_dtype` "uint8" yields image / mask / fov as uint8 (values as stored: image RGB 0..255, masks
    {0, 255}), a quarter of the bytes to hand over; `to_float_batch` turns them into the float32 layout.
    """
    url_list = shard_urls(urls) if isinstance(urls, str | Path) else list(urls)
    if not url_list:
        raise ValueError("make_dataset: no shard URLs given")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    _output_dtype(output_dtype)
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0 (0 or 1 means no shuffling)")
    if image_size_px is not None and image_size_px < 1:
        raise ValueError(f"image_size_px={image_size_px} must be positive")
    if (rank is None) != (world_size is None) or (
        world_size is not None and not 0 <= (rank or 0) < world_size
    ):
        raise ValueError(f"rank={rank}, world_size={world_size}: give both, with 0 <= rank < world_size")
    return ShardDataset(
        url_list,
        seed=seed,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        image_size_px=image_size_px,
        epoch=epoch,
        verify=verify,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        output_dtype=output_dtype,
    )


def _init_loader_worker(worker_id: int) -> None:
    cv2.setNumThreads(1)  # parallelism comes from the workers; OpenCV's own threads would oversubscribe
    torch.set_num_threads(1)


class RecyclingLoader(DataLoader):
    """A DataLoader whose workers write batches into buffers they reuse (make_loader(recycle=k)): the
    batch you draw, and the k before it, stay intact; older ones may be overwritten. It frees a buffer
    when the caller draws the (k+1)-th batch after it, and removes the buffer tag from each batch."""

    def __init__(self, dataset: ShardDataset, keep: int, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.keep = keep
        self._held: collections.deque[tuple[int, int, int]] = collections.deque()

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        slots = self.dataset.slots  # type: ignore[attr-defined]
        for batch in super().__iter__():
            worker, slot, number = tag = tuple(batch.pop(SLOT_KEY))
            slots.release_lost(worker, number, self._held)
            self._held.append(tag)
            while len(self._held) > self.keep + 1:
                slots.release(*self._held.popleft())
            yield batch


def make_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    pin_memory: bool | None = None,
    recycle: int | None = None,
    prefetch_factor: int = 2,
    **dataset_kwargs: Any,
) -> DataLoader:
    """A torch DataLoader over make_dataset(urls, seed=seed, **dataset_kwargs), yielding batches (dicts
    of stacked tensors, `key` a list). Batches are assembled in the workers, straight into shared
    memory, so each pixel is written once (the DataLoader itself runs with batch_size=None); a one-pass
    loader's last batch per worker may be short. `pin_memory` defaults to whether CUDA is available.
    With `output_dtype="uint8"`, convert on the device: `to_float_batch(batch, device, non_blocking=True)`.

    `recycle=k` (k >= 0; needs workers) makes each worker reuse prefetch_factor + k + 2 shared batch
    buffers instead of fresh shared memory per batch, which on some hosts costs as much as decoding
    (BENCHMARKS.md, "Shard reader"). Then only the batch you draw and the k before it stay intact: copy or
    move what you keep longer (a training step that moves or converts its batch right away needs k = 0).
    A buffer still held when its turn comes is replaced by a fresh one, so nothing waits and nothing is
    overwritten early; `loader.dataset.slots.num_taken()` counts the buffers held now."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if recycle is not None and recycle < 0:
        raise ValueError(f"recycle={recycle} must be >= 0 (batches kept intact behind the current one)")
    dataset = make_dataset(urls, seed=seed, batch_size=batch_size, **dataset_kwargs)
    kwargs: dict[str, Any] = {
        "batch_size": None,
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
        "persistent_workers": num_workers > 0,
        "worker_init_fn": _init_loader_worker,
        "prefetch_factor": prefetch_factor if num_workers > 0 else None,
    }
    if recycle is None or num_workers == 0:  # in one process batches are private memory: nothing to reuse
        return DataLoader(dataset, **kwargs)
    dataset.slots = SlotTable(num_workers, prefetch_factor + recycle + 2)
    return RecyclingLoader(dataset, recycle, **kwargs)


__all__ = [
    "CorruptShardWarning",
    "ReadCounters",
    "RecyclingLoader",
    "ShardDataset",
    "SlotTable",
    "decode_item",
    "make_dataset",
    "make_loader",
    "modality_index",
    "shard_urls",
    "to_float_batch",
]
