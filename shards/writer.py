"""Write one shard: a deterministic tar that appears under its final name only when complete.

    with ShardWriter(out_dir / shard_name("tiny", 3)) as w:
        for key, members, modality in samples:
            w.add(key, members, modality)
        record = w.commit()        # fsync, rename into place, fsync the folder

Bytes depend only on the members: fixed mtime/uid/gid/owner/mode, USTAR headers, members of a sample in
sorted order, samples in the order added (which must be increasing key order). The same samples
therefore give the same sha256 on any machine. The stream is written directly, one write per sample, with
headers from `tarfile.TarInfo`: byte for byte what `tarfile.open(mode="w", format=USTAR_FORMAT)` writes
for the same members, without its 16 KiB copy loop.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from shards.schema import KEY_RE, MEMBERS

TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: any fixed time works; the wall clock would make shards differ
TAR_MODE = 0o644
SHARD_RE = re.compile(r"^(?P<corpus>[A-Za-z0-9_-]+)-(?P<shard>[0-9]{6})\.tar$")
TMP_MARK = ".tmp-"  # temporary files are `.<final name>.tmp-<host>-<pid>-<random>` in the same folder


def shard_name(corpus: str, shard: int) -> str:
    """File name of shard `shard` of `corpus`: `<corpus>-<shard:06d>.tar`."""
    return f"{corpus}-{shard:06d}.tar"


def temp_path(final: Path) -> Path:
    """A fresh temporary name next to `final` (same folder, so the rename is atomic)."""
    tag = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    return final.parent / f".{final.name}{TMP_MARK}{tag}"


def final_name_of_temp(name: str) -> str | None:
    """The final file name a temporary file was for, or None if `name` is not one of ours."""
    if not name.startswith(".") or TMP_MARK not in name:
        return None
    return name[1:].split(TMP_MARK, 1)[0]


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest says about one shard."""

    name: str  # file name, relative to the corpus folder
    num_samples: int  # samples in the shard (count)
    num_bytes: int  # file size (bytes)
    sha256: str  # hex digest of the whole file
    modalities: dict[str, int] = field(default_factory=dict)  # samples per modality name (count)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_samples": self.num_samples,
            "num_bytes": self.num_bytes,
            "sha256": self.sha256,
            "modalities": dict(sorted(self.modalities.items())),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> ShardRecord:
        """Parse a record, raising ValueError naming `source` if a field is missing or mistyped."""
        try:
            record = cls(
                name=str(d["name"]),
                num_samples=int(d["num_samples"]),
                num_bytes=int(d["num_bytes"]),
                sha256=str(d["sha256"]),
                modalities={str(k): int(v) for k, v in dict(d["modalities"]).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed shard record {dict(d)!r} ({e!r})") from e
        if not SHARD_RE.match(record.name) or not re.fullmatch(r"[0-9a-f]{64}", record.sha256):
            raise ValueError(f"{source}: malformed shard record {dict(d)!r}")
        return record


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


_BLOCK = tarfile.BLOCKSIZE  # 512: a tar header, and the unit every member's data is padded to
_RECORD = tarfile.RECORDSIZE  # 10240: the archive is padded to whole records, as tarfile and GNU tar do


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a member with our fixed metadata (the bytes tarfile would write)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")


class ShardWriter:
    """One shard tar, written to a temporary name and renamed into place by `commit()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not SHARD_RE.match(self.path.name):
            raise ValueError(f"shard file name {self.path.name!r} is not <corpus>-<shard:06d>.tar")
        self._tmp = temp_path(self.path)
        self._file = open(self._tmp, "wb")  # closed in commit() or abort()
        self._sha256 = hashlib.sha256()
        self._num_bytes = 0
        self._last_key: str | None = None
        self._modalities: dict[str, int] = {}
        self._num_samples = 0
        self._done = False

    def add(self, key: str, members: Mapping[str, bytes], modality: str) -> None:
        """Append one sample; keys must be valid and strictly increasing within the shard."""
        if self._done:
            raise RuntimeError(f"{self.path.name}: add() after commit() or abort()")
        if not KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} is not <corpus>_<index:09d>")
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"sample key {key!r} does not follow {self._last_key!r} (keys must increase)")
        unknown = sorted(set(members) - set(MEMBERS))
        if unknown:
            raise ValueError(f"{key}: unknown member(s) {unknown}; allowed: {list(MEMBERS)}")
        # The sample's whole tar stretch (header, data, NUL padding to a block, per member) in one write
        # and one hash update: tarfile.addfile would copy each member in 16 KiB pieces.
        parts: list[bytes] = []
        for suffix in sorted(members):
            data = members[suffix]
            parts += (_ustar_header(f"{key}.{suffix}", len(data)), data, bytes(-len(data) % _BLOCK))
        self._write(b"".join(parts))
        self._last_key = key
        self._num_samples += 1
        self._modalities[modality] = self._modalities.get(modality, 0) + 1

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha256.update(data)
        self._num_bytes += len(data)

    def commit(self) -> ShardRecord:
        """Finish the tar, make it durable and give it its final name; returns its record."""
        if self._done:
            raise RuntimeError(f"{self.path.name}: commit() after commit() or abort()")
        self._done = True
        try:
            end = self._num_bytes + 2 * _BLOCK  # two zero blocks end the archive
            self._write(bytes(2 * _BLOCK + (-end % _RECORD)))
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)
        return ShardRecord(
            name=self.path.name,
            num_samples=self._num_samples,
            num_bytes=self._num_bytes,
            sha256=self._sha256.hexdigest(),
            modalities=dict(sorted(self._modalities.items())),
        )

    def abort(self) -> None:
        """Drop the partial shard; nothing appears under the final name."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()  # no-op after commit(); otherwise the shard was not finished
