"""Checkpoint folders: written whole or not at all, found again by `--resume auto`, pruned to the last K.

    <run>/checkpoints/step_<step:07d>/
        generator/   EMA UNet via diffusers save_pretrained (safetensors), scheduler, univg_generator.json;
                     model.kind controlnet: EMA controlnet/ (diffusers), modality_tokens.safetensors, json
        state/       DeepSpeed save_checkpoint: module, optimizer (ZeRO partitions), LR schedule
        meta.json    step, resolved config, data position, manifest hash, world size

Every file goes to `checkpoints/.tmp-step_<step>/` first; rank 0 writes meta.json last and then renames
the folder to its final name. A folder named step_* with a meta.json is therefore complete; a crash at
any point leaves at most a .tmp-* folder, which the next start deletes. Nothing is ever unpickled:
meta.json is JSON, the generator safetensors, and DeepSpeed's state files are read weights-only
(`weights_only_loads`). Assumes a file system that every rank sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"
META = "meta.json"
DS_TAG = "ds"  # DeepSpeed's tag inside state/: the step is already in the folder name
STEP_RE = re.compile(r"^step_(\d{7,})$")


def checkpoint_dir(run: Path, step: int) -> Path:
    return run / CHECKPOINTS / f"step_{step:07d}"


def complete_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    root = run / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def newest_checkpoint(run: Path) -> Path | None:
    done = complete_checkpoints(run)
    return done[-1][1] if done else None


def temp_folders(run: Path) -> list[Path]:
    root = run / CHECKPOINTS
    return sorted(root.glob(TMP_PREFIX + "*")) if root.is_dir() else []


def write_json(path: Path, obj: Any) -> None:
    """Write JSON durably: temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(folder: Path) -> dict[str, Any]:
    """meta.json of a checkpoint folder; ValueError naming the file when it is missing or malformed."""
    path = folder / META
    if not path.is_file():
        raise ValueError(f"{folder} is not a complete checkpoint: {META} is missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    for key in ("step", "config", "data_position", "world_size"):
        if key not in meta:
            raise ValueError(f"{path} lacks {key!r}: not a univg pretrain checkpoint")
    return meta


def manifest_hash(shards: str | Path) -> str:
    """sha256 of a corpus's manifest.json bytes: names the exact data a checkpoint was trained on."""
    path = Path(shards)
    path = path / "manifest.json" if path.is_dir() else path
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    engine: Any,
    write_generator: Any,
    run: Path,
    step: int,
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` (collective: every rank calls it). `write_generator(folder)` runs on
    rank 0 only and writes the generator/ folder. Returns the final folder."""
    import torch.distributed as dist

    rank = dist.get_rank()
    final = checkpoint_dir(run, step)
    tmp = final.with_name(TMP_PREFIX + final.name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / "state"), tag=DS_TAG, client_state={}, save_latest=False)
    dist.barrier()  # every rank's state files are on disk
    if rank == 0:
        write_generator(tmp / "generator")
        write_json(tmp / META, meta)  # last file: its presence marks the folder complete
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (a rerun of a finished step): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for _, old in complete_checkpoints(run)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Make every torch.load inside weights-only, even DeepSpeed's explicit weights_only=False, allowing
    just the three plain-data DeepSpeed classes its state files hold (an enum, a dataclass and the loss
    scaler's attributes). A state file holding anything else fails to load instead of running code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


UNET_WEIGHT_FILES = {"": "diffusion_pytorch_model.safetensors"}  # EMA state-dict prefix -> file in generator/


def load_checkpoint(
    engine: Any,
    ema: torch.nn.Module | None,
    folder: Path,
    weight_files: Mapping[str, str] = UNET_WEIGHT_FILES,
) -> None:
    """Restore DeepSpeed's module, optimizer and LR schedule, and (rank 0) the EMA weights from the
    generator/ files that `weight_files` names by state-dict prefix (controlnet: controlnet.WEIGHT_FILES);
    every file is read weights-only or as safetensors. ValueError if a state file holds anything but data."""
    from safetensors.torch import load_file

    try:
        with weights_only_loads():
            path, _ = engine.load_checkpoint(
                str(folder / "state"), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{folder / 'state'}: refusing to load a state file that is not plain data ({e})"
        ) from e
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the state in {folder / 'state'}")
    if ema is not None:
        device, state = str(next(ema.parameters()).device), {}
        for prefix, name in weight_files.items():
            weights = load_file(str(folder / "generator" / name), device=device)
            state.update({prefix + key: value for key, value in weights.items()})
        ema.load_state_dict(state)
