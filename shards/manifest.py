"""The corpus manifest, node-slice manifests, and per-shard build records.

A corpus folder holds:

    <corpus>-000000.tar ...              the shards
    records/<corpus>-000000.json ...     one build record per finished shard (config hash + shard record),
                                         committed atomically right after its shard: what a rerun trusts
    manifest.node-<R>-of-<N>.json        what node R of an N-node build made (only with --num-nodes)
    manifest.json                        the whole corpus: name, config, config hash, package version,
                                         every shard's samples/bytes/sha256, totals per modality

The manifest holds no timestamps or host names, so equal configs give byte-equal manifests and the
manifest's own sha256 identifies the corpus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards.writer import SHARD_RE, ShardRecord, atomic_write_bytes, shard_name

FORMAT = "univg-shards/1"
MANIFEST = "manifest.json"
RECORDS_DIR = "records"
SLICE_RE = re.compile(r"^manifest\.node-(?P<rank>[0-9]+)-of-(?P<num_nodes>[0-9]+)\.json$")


def slice_name(node_rank: int, num_nodes: int) -> str:
    """File name of node `node_rank`'s slice manifest."""
    return f"manifest.node-{node_rank}-of-{num_nodes}.json"


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON with a final newline."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_json(path: Path) -> Any:
    """Parse a JSON file, raising ValueError naming the file if it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


# --- per-shard build records ---


def record_path(out: Path, shard_file: str) -> Path:
    """Where the build record of shard file `shard_file` lives."""
    return out / RECORDS_DIR / (shard_file.removesuffix(".tar") + ".json")


def write_record(out: Path, record: ShardRecord, config_hash: str) -> None:
    """Commit a shard's build record (after the shard itself is in place)."""
    (out / RECORDS_DIR).mkdir(exist_ok=True)
    write_json(record_path(out, record.name), {"config_hash": config_hash, "shard": record.to_dict()})


def read_record(path: Path) -> tuple[str, ShardRecord] | None:
    """(config hash, record) of a build record file, or None if it is absent or unreadable."""
    try:
        d = read_json(path)
        return str(d["config_hash"]), ShardRecord.from_dict(d["shard"], str(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- manifests ---


@dataclass(frozen=True)
class Manifest:
    """A whole-corpus manifest, or one node's slice of it (node_rank/num_nodes set)."""

    corpus: str  # corpus name, the prefix of keys and shard names
    config: dict[str, Any]  # resolved corpus config, as plain data
    config_hash: str  # univg.config.config_hash of the config
    univg_version: str  # package version that wrote the manifest
    shards: tuple[ShardRecord, ...]  # in shard order
    node_rank: int | None = None  # which node made this slice; None for the whole corpus
    num_nodes: int | None = None  # nodes the build was split over; None for the whole corpus

    @property
    def num_samples(self) -> int:
        return sum(r.num_samples for r in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(r.num_bytes for r in self.shards)

    @property
    def modalities(self) -> dict[str, int]:
        """Samples per modality over all shards, sorted by name."""
        totals: dict[str, int] = {}
        for r in self.shards:
            for m, n in r.modalities.items():
                totals[m] = totals.get(m, 0) + n
        return dict(sorted(totals.items()))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "corpus": self.corpus}
        if self.node_rank is not None:
            d["node_rank"], d["num_nodes"] = self.node_rank, self.num_nodes
        d.update(
            {
                "config_hash": self.config_hash,
                "univg_version": self.univg_version,
                "num_shards": len(self.shards),
                "num_samples": self.num_samples,
                "num_bytes": self.num_bytes,
                "modalities": self.modalities,
                "config": self.config,
                "shards": [r.to_dict() for r in self.shards],
            }
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> Manifest:
        """Parse and cross-check a manifest; ValueError names `source` and the problem."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ValueError(f"{source}: not a univg shard manifest (format {FORMAT!r} expected)")
        try:
            m = cls(
                corpus=str(d["corpus"]),
                config=dict(d["config"]),
                config_hash=str(d["config_hash"]),
                univg_version=str(d["univg_version"]),
                shards=tuple(ShardRecord.from_dict(r, source) for r in d["shards"]),
                node_rank=None if d.get("node_rank") is None else int(d["node_rank"]),
                num_nodes=None if d.get("num_nodes") is None else int(d["num_nodes"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: manifest lacks or mistypes field {e}") from e
        names = [r.name for r in m.shards]
        if len(set(names)) != len(names):
            raise ValueError(f"{source}: a shard is listed twice")
        for r in m.shards:
            if SHARD_RE.match(r.name).group("corpus") != m.corpus:  # type: ignore[union-attr]
                raise ValueError(f"{source}: shard {r.name} does not belong to corpus {m.corpus!r}")
        for key, value in (
            ("num_samples", m.num_samples),
            ("num_bytes", m.num_bytes),
            ("modalities", m.modalities),
        ):
            if key in d and d[key] != value:
                raise ValueError(f"{source}: {key}={d[key]!r} disagrees with the shards' sum {value!r}")
        return m


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Atomically write a manifest or slice."""
    write_json(path, manifest.to_dict())


def load_manifest(path: str | Path) -> Manifest:
    """Read `manifest.json` (or a slice); a folder means its manifest.json."""
    path = Path(path)
    if path.is_dir():
        folder = path
        path = path / MANIFEST
        if not path.is_file():
            slices = sorted(p.name for p in folder.glob("manifest.node-*.json"))
            hint = f"; it has node slices {slices}: run `univg shards merge {folder}`" if slices else ""
            raise FileNotFoundError(f"{folder} has no {MANIFEST}{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    return Manifest.from_dict(read_json(path), str(path))


def shard_index(name: str) -> int:
    """Shard number in a shard file name."""
    m = SHARD_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a shard file name")
    return int(m.group("shard"))


def merge_slices(out: Path, expected_num_shards: int | None = None) -> Manifest:
    """Merge `manifest.node-*-of-*.json` in `out` into one Manifest (not written).

    Refuses slices of different configs, records that disagree, and any shard missing from every slice
    or from the folder. `expected_num_shards` defaults to the count the slices' config implies.
    """
    paths = sorted((p for p in out.iterdir() if SLICE_RE.match(p.name)), key=lambda p: p.name)
    if not paths:
        raise FileNotFoundError(f"{out} has no node slice manifests (manifest.node-<R>-of-<N>.json)")
    slices = [Manifest.from_dict(read_json(p), str(p)) for p in paths]
    first, first_path = slices[0], paths[0]
    for s, p in zip(slices[1:], paths[1:], strict=True):
        if s.config_hash != first.config_hash or s.corpus != first.corpus:
            raise ValueError(
                f"slices of different configs: {p.name} has corpus {s.corpus!r} config {s.config_hash[:12]}, "
                f"{first_path.name} has corpus {first.corpus!r} config {first.config_hash[:12]}; "
                "rebuild the stale node(s) or remove their slice"
            )
    by_name: dict[str, ShardRecord] = {}
    for s, p in zip(slices, paths, strict=True):
        for r in s.shards:
            if r.name in by_name and by_name[r.name] != r:
                raise ValueError(f"{p.name} and another slice disagree about shard {r.name}")
            by_name[r.name] = r
    if expected_num_shards is None:
        num_samples = int(first.config["num_samples"])
        per_shard = int(first.config["samples_per_shard"])
        expected_num_shards = -(-num_samples // per_shard)
    expected = [shard_name(first.corpus, s) for s in range(expected_num_shards)]
    missing = [n for n in expected if n not in by_name]
    if missing:
        nodes = sorted({(s.num_nodes or 1) for s in slices})
        raise ValueError(
            f"{len(missing)} of {len(expected)} shards are in no slice (first: {missing[:3]}); slices "
            f"present: {[p.name for p in paths]}; build the missing node ranks (of --num-nodes {nodes}) "
            "and merge again"
        )
    extra = sorted(set(by_name) - set(expected))
    if extra:
        raise ValueError(f"slices list shards beyond the config's {len(expected)}: {extra[:3]}")
    absent = [n for n in expected if not (out / n).is_file()]
    if absent:
        raise ValueError(f"{len(absent)} shards listed in the slices are not in {out} (first: {absent[:3]})")
    wrong_size = [n for n in expected if (out / n).stat().st_size != by_name[n].num_bytes]
    if wrong_size:
        raise ValueError(f"shards whose size differs from their slice record: {wrong_size[:3]}")
    return Manifest(
        corpus=first.corpus,
        config=first.config,
        config_hash=first.config_hash,
        univg_version=first.univg_version,
        shards=tuple(by_name[n] for n in expected),
    )


def manifests_in(out: Path) -> Iterable[Path]:
    """manifest.json and every slice in `out`."""
    for p in sorted(out.iterdir()):
        if p.name == MANIFEST or SLICE_RE.match(p.name):
            yield p
