"""`univg shards build`: make a corpus's shards on one machine's cores, or as one node of many.

    result = build_corpus(cfg, Path("data/shards/tiny"), num_workers=2)

Shard s holds samples [s * per_shard, min(N, (s + 1) * per_shard)) and sample i is
`make_sample(cfg.engine, i)`, a pure function of (config, seed, i), so any shard is rebuilt alone and
byte-identical. Node R of N builds the shards with s % N == R (a SLURM array job builds the corpus:
`--num-nodes $SLURM_ARRAY_TASK_COUNT --node-rank $SLURM_ARRAY_TASK_ID`, with a 0-based array); each
worker process builds whole shards.

Resuming: every finished shard is renamed into place and then its build record (config hash, size,
sha256) is committed under records/. A rerun keeps each shard whose record matches the config and whose
sha256 verifies, deletes this node's leftover temporary files, and builds the rest: a build killed at
any moment (SIGKILL included) is completed by running the same command again.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import univg
from shards.config import CorpusConfig
from shards.manifest import (
    MANIFEST,
    RECORDS_DIR,
    SLICE_RE,
    Manifest,
    load_manifest,
    merge_slices,
    read_json,
    read_record,
    record_path,
    slice_name,
    write_manifest,
    write_record,
)
from shards.schema import encode_sample, sample_key
from shards.writer import SHARD_RE, ShardRecord, ShardWriter, final_name_of_temp, sha256_file, shard_name
from univg.config import config_hash, to_dict

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass
class BuildResult:
    """What one build run did, for the summary and the benchmark."""

    out: Path  # corpus folder
    manifest_path: Path  # manifest.json, or this node's slice
    manifest: Manifest  # of this node's shards (the whole corpus when num_nodes == 1)
    num_shards_kept: int  # shards that verified and were kept (count)
    num_shards_built: int  # shards made by this run (count)
    num_samples_built: int  # samples made by this run (count)
    num_workers: int  # worker processes (count)
    wall_s: float  # seconds from start to manifest written
    build_s: float  # seconds spent building missing shards (wall)
    stage_s: dict[str, float] = field(default_factory=dict)  # summed worker seconds: make, encode, write
    peak_rss_bytes: dict[int, int] = field(default_factory=dict)  # worker pid -> peak resident set (bytes)
    merged: bool = False  # whether this run also wrote manifest.json from all node slices


# --- worker side: one per process, set up once ---


@dataclass
class _Worker:
    cfg: CorpusConfig
    out: Path
    cfg_hash: str
    tick: Callable[[], None]  # called after each sample: drives the progress bar
    init_error: str | None = None


_WORKER: _Worker | None = None


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the build process dies, so no orphan keeps writing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(cfg: CorpusConfig, out: Path, cfg_hash: str, counter: Any, parent_pid: int | None) -> None:
    """Per-process set-up: one thread per library, engine caches warmed once, progress counter."""
    global _WORKER
    if parent_pid is not None:
        _die_with_parent(parent_pid)

    def tick() -> None:
        with counter.get_lock():
            counter.value += 1

    _WORKER = _Worker(cfg=cfg, out=out, cfg_hash=cfg_hash, tick=tick)
    try:
        import cv2

        cv2.setNumThreads(1)
        from data_engine.corpus import graph_library

        graph_library(cfg.engine)  # the per-process graph library, built once here rather than in shard 0
    except Exception as e:  # reported by the first task, with its message (a raising initializer would not)
        _WORKER.init_error = f"worker set-up failed: {type(e).__name__}: {e}"


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _check_shard(shard: int) -> tuple[int, ShardRecord | None]:
    """The kept record of `shard` if its file and build record verify against the config, else None."""
    w = _WORKER
    assert w is not None
    name = shard_name(w.cfg.name, shard)
    path = w.out / name
    found = read_record(record_path(w.out, name))
    if found is None or not path.is_file():
        return shard, None
    rec_hash, record = found
    expected_count = len(w.cfg.shard_indices(shard))
    if rec_hash != w.cfg_hash or record.name != name or record.num_samples != expected_count:
        return shard, None
    if path.stat().st_size != record.num_bytes or sha256_file(path) != record.sha256:
        return shard, None
    return shard, record


def _build_shard(shard: int) -> tuple[int, ShardRecord, int, int, dict[str, float]]:
    """Make, encode and write shard `shard`; returns (shard, record, pid, peak RSS bytes, stage seconds)."""
    from data_engine.corpus import make_sample

    w = _WORKER
    assert w is not None
    if w.init_error:
        raise RuntimeError(w.init_error)
    cfg = w.cfg
    stage_s = {"make": 0.0, "encode": 0.0, "write": 0.0}
    with ShardWriter(w.out / shard_name(cfg.name, shard)) as writer:
        for i in cfg.shard_indices(shard):
            t0 = time.perf_counter()
            sample = make_sample(cfg.engine, i)
            t1 = time.perf_counter()
            members = encode_sample(sample, cfg.png_compression, cfg.png_strategy)
            t2 = time.perf_counter()
            writer.add(sample_key(cfg.name, i), members, str(sample.meta["modality"]))
            stage_s["make"] += t1 - t0
            stage_s["encode"] += t2 - t1
            stage_s["write"] += time.perf_counter() - t2
            w.tick()
        t3 = time.perf_counter()
        record = writer.commit()
    write_record(w.out, record, w.cfg_hash)
    stage_s["write"] += time.perf_counter() - t3
    return shard, record, os.getpid(), _peak_rss_bytes(), stage_s


# --- driver side ---


@contextlib.contextmanager
def _single_threaded_env() -> Iterator[None]:
    """Spawned workers inherit one-thread settings for OpenMP/BLAS (read when those libraries load)."""
    saved = {k: os.environ.get(k) for k in _THREAD_ENV}
    os.environ.update({k: "1" for k in _THREAD_ENV})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_tasks(
    pool: ProcessPoolExecutor | None, fn: Callable[[int], Any], items: Sequence[int], poll: Callable[[], None]
) -> Iterator[Any]:
    """fn over items, in-process (pool None) or on the pool; yields results as they finish, polling often.
    A worker's exception is re-raised here; a worker that died (killed, out of memory) is a RuntimeError."""
    if pool is None:
        for item in items:
            yield fn(item)
        return
    pending = {pool.submit(fn, item) for item in items}
    while pending:
        done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        poll()
        for future in done:
            try:
                yield future.result()
            except BrokenProcessPool as e:
                raise RuntimeError(
                    "a build worker process died (killed, or out of memory?); finished shards are kept: "
                    "rerun the same command to continue"
                ) from e


def _stop(pool: ProcessPoolExecutor, clean: bool) -> None:
    """Shut the pool down; after an error or interrupt, kill workers still busy with a shard."""
    if not clean:
        # ProcessPoolExecutor cannot cancel running tasks; their half-written shards are temp files
        # that the next run deletes.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _existing_hashes(out: Path) -> dict[str, str]:
    """Config hash -> a file in `out` that carries it (manifests, slices, build records)."""
    found: dict[str, str] = {}
    for p in sorted(out.iterdir()):
        if p.name == MANIFEST or SLICE_RE.match(p.name):
            try:
                found.setdefault(str(read_json(p).get("config_hash")), p.name)
            except (ValueError, AttributeError):
                found.setdefault("<unreadable>", p.name)
    records = out / RECORDS_DIR
    if records.is_dir():
        for p in sorted(records.glob("*.json")):
            rec = read_record(p)
            found.setdefault(rec[0] if rec else "<unreadable>", f"{RECORDS_DIR}/{p.name}")
    return found


def _corpus_files(out: Path) -> list[Path]:
    """Every file in `out` that a build writes (shards of any corpus, manifests, records, temp files)."""
    files = [
        p
        for p in out.iterdir()
        if SHARD_RE.match(p.name)
        or p.name == MANIFEST
        or SLICE_RE.match(p.name)
        or final_name_of_temp(p.name)
    ]
    if (out / RECORDS_DIR).is_dir():
        files.append(out / RECORDS_DIR)
    return files


def check_output_folder(name: str, out: Path, cfg_hash: str, overwrite: bool) -> None:
    """Refuse a folder that holds another corpus (or another config), unless `overwrite` clears it."""
    if not out.is_dir():
        return
    hashes = _existing_hashes(out)
    others = {h: f for h, f in hashes.items() if h != cfg_hash}
    foreign = sorted(p.name for p in out.iterdir() if (m := SHARD_RE.match(p.name)) and m["corpus"] != name)
    if not others and not foreign:
        return
    if not overwrite:
        what = [f"{f} has config hash {h[:12]}" for h, f in others.items()]
        what += [f"shard {foreign[0]} belongs to another corpus"] if foreign else []
        raise FileExistsError(
            f"{out} already holds a different corpus ({'; '.join(what)}); the config asks for corpus "
            f"{name!r} with config hash {cfg_hash[:12]}. Pass --overwrite to replace it, or choose "
            "another --out."
        )
    for p in _corpus_files(out):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _remove_own_temp_files(cfg: CorpusConfig, out: Path, num_nodes: int, node_rank: int) -> int:
    """Delete leftovers of killed runs: this node's temporary shard, record and slice files (every
    temporary file when the build is not split over nodes; other nodes may be writing theirs)."""
    mine = {shard_name(cfg.name, s) for s in range(node_rank, cfg.num_shards, num_nodes)}
    mine |= {record_path(out, n).name for n in list(mine)}
    mine.add(slice_name(node_rank, num_nodes))
    removed = 0
    for folder in (out, out / RECORDS_DIR):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            final = final_name_of_temp(p.name)
            if final is not None and (num_nodes == 1 or final in mine):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def build_corpus(
    cfg: CorpusConfig,
    out: str | Path,
    *,
    num_workers: int = 1,
    num_nodes: int = 1,
    node_rank: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BuildResult:
    """Build (or complete) this node's shards of `cfg` in `out` and write its manifest; see module doc."""
    if num_workers < 1:
        raise ValueError(f"--workers={num_workers} must be >= 1")
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise ValueError(f"--node-rank={node_rank} must be in 0..{num_nodes - 1} (--num-nodes={num_nodes})")
    start = time.perf_counter()
    out = Path(out)
    cfg_hash = config_hash(cfg)
    check_output_folder(cfg.name, out, cfg_hash, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    my_shards = [s for s in range(cfg.num_shards) if s % num_nodes == node_rank]
    removed = _remove_own_temp_files(cfg, out, num_nodes, node_rank)
    if removed:
        log(f"removed {removed} temporary file(s) left by an interrupted build")
    num_workers = max(1, min(num_workers, len(my_shards)))

    from tqdm import tqdm

    records: dict[int, ShardRecord] = {}
    peak_rss: dict[int, int] = {}
    stage_s = {"make": 0.0, "encode": 0.0, "write": 0.0}
    pool: ProcessPoolExecutor | None = None
    ctx = mp.get_context("spawn")  # no fork: OpenCV/tqdm threads in the parent would be copied mid-state
    counter = ctx.Value("q", 0)
    clean = False
    try:
        if num_workers > 1:
            with _single_threaded_env():
                pool = ProcessPoolExecutor(
                    num_workers,
                    mp_context=ctx,
                    initializer=_init_worker,
                    initargs=(cfg, out, cfg_hash, counter, os.getpid()),
                )
        else:
            _init_worker(cfg, out, cfg_hash, counter, None)

        for shard, record in _run_tasks(pool, _check_shard, my_shards, lambda: None):
            if record is not None:
                records[shard] = record
        todo = [s for s in my_shards if s not in records]
        if records:
            log(f"kept {len(records)} shard(s) that verify; building {len(todo)}")
        num_todo_samples = sum(len(cfg.shard_indices(s)) for s in todo)
        build_start = time.perf_counter()
        with tqdm(
            total=num_todo_samples,
            unit="sample",
            desc=f"build {cfg.name}",
            disable=not progress,
            smoothing=0.1,
        ) as bar:

            def poll() -> None:
                bar.update(counter.value - bar.n)

            if pool is None:
                assert _WORKER is not None

                def tick_bar() -> None:
                    bar.update(1)

                _WORKER.tick = tick_bar
            for shard, record, pid, rss, seconds in _run_tasks(pool, _build_shard, todo, poll):
                records[shard] = record
                peak_rss[pid] = max(peak_rss.get(pid, 0), rss)
                for k, v in seconds.items():
                    stage_s[k] += v
            poll()
        build_s = time.perf_counter() - build_start
        clean = True
    finally:
        if pool is not None:
            _stop(pool, clean)

    manifest = Manifest(
        corpus=cfg.name,
        config=to_dict(cfg),
        config_hash=cfg_hash,
        univg_version=univg.__version__,
        shards=tuple(records[s] for s in my_shards),
        node_rank=node_rank if num_nodes > 1 else None,
        num_nodes=num_nodes if num_nodes > 1 else None,
    )
    merged = False
    if num_nodes == 1:
        manifest_path = out / MANIFEST
        write_manifest(manifest_path, manifest)
    else:
        manifest_path = out / slice_name(node_rank, num_nodes)
        write_manifest(manifest_path, manifest)
        try:  # the last node to finish writes manifest.json; earlier ones leave it to that node or `merge`
            write_manifest(out / MANIFEST, merge_slices(out, cfg.num_shards))
            merged = True
        except (ValueError, FileNotFoundError):
            pass
    return BuildResult(
        out=out,
        manifest_path=manifest_path,
        manifest=manifest,
        num_shards_kept=len(my_shards) - len(todo),
        num_shards_built=len(todo),
        num_samples_built=num_todo_samples,
        num_workers=num_workers,
        wall_s=time.perf_counter() - start,
        build_s=build_s,
        stage_s=stage_s,
        peak_rss_bytes=peak_rss,
        merged=merged,
    )


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def summary(result: BuildResult) -> str:
    """The one-screen report printed at the end of a build."""
    m = result.manifest
    part = "" if m.node_rank is None else f" (node {m.node_rank} of {m.num_nodes})"
    lines = [
        f"corpus {m.corpus}{part}: {m.num_samples} samples in {len(m.shards)} shards "
        f"({result.num_shards_built} built, {result.num_shards_kept} kept) -> {result.out}",
        f"  bytes        {format_bytes(m.num_bytes)} "
        f"({format_bytes(m.num_bytes / max(1, m.num_samples))}/sample)",
        "  modalities   " + " | ".join(f"{k} {v}" for k, v in m.modalities.items()),
    ]
    if result.num_samples_built:
        rate = result.num_samples_built / max(result.build_s, 1e-9)
        lines.append(
            f"  time         {result.wall_s:.1f} s wall | {rate:.2f} samples/s | "
            f"{rate / result.num_workers:.2f} samples/s per core ({result.num_workers} worker(s))"
        )
        total = sum(result.stage_s.values()) or 1.0
        lines.append(
            "  worker time  " + " | ".join(f"{k} {100 * v / total:.0f}%" for k, v in result.stage_s.items())
        )
    else:
        lines.append(f"  time         {result.wall_s:.1f} s wall (nothing to build)")
    if result.peak_rss_bytes:
        lines.append(f"  peak RSS     {format_bytes(max(result.peak_rss_bytes.values()))} per worker (max)")
    lines.append(f"  manifest     {result.manifest_path} (config {m.config_hash[:12]})")
    if m.node_rank is not None:
        lines.append(
            "  merged       all node slices into manifest.json"
            if result.merged
            else f"  next         when every node is done: univg shards merge {result.out}"
        )
    return "\n".join(lines)


def merge(out: str | Path) -> Manifest:
    """`univg shards merge DIR`: node slices -> manifest.json (refusing mixed configs or missing shards)."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"corpus folder {out} does not exist")
    manifest = merge_slices(out)
    write_manifest(out / MANIFEST, manifest)
    return load_manifest(out)
