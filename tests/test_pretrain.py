"""Pretraining end to end on CPU: real shards from `univg shards build`, the tiny UNet, DeepSpeed over gloo.

The runs are subprocesses of the real commands (`univg pretrain`, `torchrun -m pretrain`, `deepspeed
--module pretrain`); the bad-input tests call the CLI in-process and fail before any process group exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pretrain.config import deepspeed_config, derive, load_pretrain_config
from pretrain.train import STALE_LOCK_S, lr_factor, stale_extension_locks
from univg.cli import main
from univg.config import ConfigError, to_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain" / "tiny.yaml"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
for _key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_key, None)
LOG_LINE = re.compile(
    r"step (\d+)/(\d+) \| loss \d+\.\d{4} \| lr \d\.\de[-+]\d\d \| gnorm \d+\.\d\d \| \d+ ms/step \| "
    r"\d+ img/s \| mem \d+\.\d GiB"
)
REF_STEPS = 30  # the uninterrupted reference run: optimizer steps
REF_EVERY = 10  # ... and its checkpoint interval


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Runs in this process use one thread: on a shared 2-core machine more threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 pairs at 32 px in 6 shards, built by the real command."""
    out = tmp_path_factory.mktemp("shards") / "tiny"
    cmd = [
        sys.executable,
        "-m",
        "univg",
        "shards",
        "build",
        "--config",
        str(ROOT / "configs/corpus/tiny.yaml"),
        "--out",
        str(out),
        "--no-progress",
        "num_samples=48",
        "samples_per_shard=8",
        "engine.image_size_px=32",
        "engine.library.num_graphs_per_modality=2",
    ]
    subprocess.run(cmd, check=True, env=ENV, cwd=ROOT, capture_output=True, timeout=600)
    return out


def _args(out: Path, shards: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(TINY),
        "--out",
        str(out),
        f"data.shards={shards}",
        "train.log_every_steps=1",
        "train.eval_every_steps=0",
        "data.shuffle_buffer=16",
        *extra,
    ]


def _pretrain(out: Path, shards: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "univg", "pretrain", *_args(out, shards, *extra)]


def _run(cmd: list[str], timeout_s: float = 420) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _rows(run: Path, key: str) -> dict[int, dict[str, Any]]:
    """metrics.jsonl rows that carry `key`, by step (a resumed run's rows replace the earlier ones)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if key in r}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted one-process run of 30 steps, checkpoints every 10."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_pretrain(out, shards, f"train.max_steps={REF_STEPS}", f"train.checkpoint_every_steps={REF_EVERY}"))
    return out


# --- one process ---


def test_loss_goes_down_and_the_run_folder_holds_its_promises(reference: Path) -> None:
    losses = _rows(reference, "loss")
    assert sorted(losses) == list(range(1, REF_STEPS + 1))
    first = sum(losses[s]["loss"] for s in range(1, 6)) / 5
    last = sum(losses[s]["loss"] for s in range(REF_STEPS - 4, REF_STEPS + 1)) / 5
    assert last < 0.85 * first, (first, last)  # v-prediction on 32 px: about 0.62 -> 0.46 in 30 steps
    evals = _rows(reference, "eval_loss")  # the EMA weights on fixed examples, timesteps and noise
    assert set(evals) == {0, REF_STEPS} and evals[REF_STEPS]["eval_loss"] < 0.7 * evals[0]["eval_loss"]

    log = (reference / "train.log").read_text()
    assert [int(m.group(1)) for m in LOG_LINE.finditer(log)] == list(range(1, REF_STEPS + 1))
    assert "world size 1 | micro batch 8 | grad accumulation 1 | global batch 8 | ZeRO 0 | fp32" in log
    assert load_pretrain_config(reference / "config.yaml").out == str(reference)  # resolved config, reusable
    summary = json.loads((reference / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["final_loss"]) == (
        "completed",
        30,
        losses[30]["loss"],
    )
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert names == ["step_0000020", "step_0000030"]  # keep_last_checkpoints: 2, no temp folders left
    ckpt = reference / "checkpoints" / "step_0000030"
    assert {p.name for p in ckpt.iterdir()} == {"generator", "state", "meta.json"}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 30 and meta["data_position"]["segment_start_step"] == 30
    assert meta["data_position"]["samples_consumed"] == 30 * 8 and len(meta["manifest_hash"]) == 64
    assert meta["config"] == to_dict(load_pretrain_config(reference / "config.yaml"))
    assert (reference / "samples" / "step_0000030.png").is_file()
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))


def test_generator_reloads_with_plain_diffusers_and_samples(reference: Path, shards: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    from pretrain.pipeline import VesselPipeline
    from shards.reader import make_dataset

    folder = reference / "checkpoints" / "step_0000030" / "generator"
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    unet = UNet2DModel.from_pretrained(str(folder))
    scheduler = DDPMScheduler.from_pretrained(str(folder))
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.num_class_embeds) == (5, 3, 6)
    assert scheduler.config.prediction_type == "v_prediction"

    dataset = make_dataset(str(shards), seed=0, resampled=False, shuffle_buffer=0, image_size_px=32)
    items = [it for _, it in zip(range(4), dataset, strict=False)]
    mask_B1HW = torch.stack([it["mask"] for it in items])
    modality_B = torch.tensor([0, 3, 4, 5])  # fundus, octa, mra and the spare slot
    pipe = VesselPipeline(unet.eval(), scheduler, num_inference_steps=20)
    image_B3HW = pipe(mask_B1HW, modality_B, seeds=[0, 1, 2, 3])
    assert image_B3HW.shape == (4, 3, 32, 32) and image_B3HW.dtype == torch.float32
    assert image_B3HW.min() >= -1 and image_B3HW.max() <= 1 and image_B3HW.std() > 0.05
    alone = pipe(mask_B1HW[2:3], modality_B[2:3], seeds=[2])  # a sample does not depend on its batch
    torch.testing.assert_close(alone[0], image_B3HW[2], atol=1e-4, rtol=0)
    again = VesselPipeline.from_pretrained(folder)(
        mask_B1HW, modality_B, seeds=[0, 1, 2, 3], num_inference_steps=20
    )
    torch.testing.assert_close(again, image_B3HW)  # same seeds, same images
    guided = pipe(mask_B1HW, modality_B, seeds=[0, 1, 2, 3], guidance_scale=3.0, sampler="dpm")
    assert guided.shape == (4, 3, 32, 32) and not torch.allclose(guided, image_B3HW)
    with pytest.raises(ValueError, match="one seed per mask"):
        pipe(mask_B1HW, modality_B, seeds=[0])


def test_sigkill_then_resume_auto_gives_the_uninterrupted_losses(
    reference: Path, shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = _pretrain(out, shards, f"train.max_steps={REF_STEPS}", f"train.checkpoint_every_steps={REF_EVERY}")
    proc = subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = out / "checkpoints" / f"step_{REF_EVERY:07d}"
        deadline = time.monotonic() + 300
        while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # mid-training: 20 steps and two checkpoints were still to come
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "summary.json").exists()
    steps = sorted(
        int(p.name[5:]) for p in (out / "checkpoints").glob("step_*") if (p / "meta.json").is_file()
    )
    assert steps and steps[-1] < REF_STEPS
    resume_at = steps[-1]
    meta = json.loads((out / "checkpoints" / f"step_{resume_at:07d}" / "meta.json").read_text())
    assert meta["step"] == meta["data_position"]["segment_start_step"] == resume_at
    stale = out / "checkpoints" / ".tmp-step_0000040"  # what a crash during a save leaves
    (stale / "state").mkdir(parents=True)

    _run(
        _pretrain(
            out,
            shards,
            f"train.max_steps={REF_STEPS}",
            f"train.checkpoint_every_steps={REF_EVERY}",
            "--resume",
            "auto",
        )
    )
    log = (out / "train.log").read_text()
    assert f"resumed from {out / 'checkpoints' / f'step_{resume_at:07d}'} at step {resume_at}" in log
    assert not stale.exists()
    # Same data position, noise, weights, optimizer, LR schedule and EMA: bit-identical numbers.
    want, got = _rows(reference, "loss"), _rows(out, "loss")
    for s in range(resume_at + 1, REF_STEPS + 1):
        assert (got[s]["loss"], got[s]["gnorm"], got[s]["lr"]) == (
            want[s]["loss"],
            want[s]["gnorm"],
            want[s]["lr"],
        )
    assert _rows(out, "eval_loss")[REF_STEPS] == _rows(reference, "eval_loss")[REF_STEPS]
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith(f"step_{resume_at:07d}")


# --- several processes ---


@pytest.mark.slow
def test_two_processes_deepspeed_launcher_zero3_then_torchrun_resume(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = [
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.checkpoint_every_steps=2",
        "train.deepspeed_config=configs/deepspeed/zero3.json",
    ]
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), "--module"]
    _run([*launcher, "pretrain", *_args(out, shards, "train.max_steps=4", *common)])
    state = out / "checkpoints" / "step_0000004" / "state" / "ds"
    assert {p.name for p in state.glob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    log = (out / "train.log").read_text()
    assert "world size 2 | micro batch 2 | grad accumulation 2 | global batch 8 | ZeRO 3" in log

    rdzv = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}"]
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", *rdzv, "-m", "pretrain"]
    _run([*torchrun, *_args(out, shards, "train.max_steps=6", *common, "--resume", "auto")])
    log = (out / "train.log").read_text()
    assert f"resumed from {out / 'checkpoints' / 'step_0000004'} at step 4" in log
    losses = _rows(out, "loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(0 < r["loss"] < 10 for r in losses.values())
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["derived"]["world_size"]) == ("completed", 6, 2)
    from diffusers import UNet2DModel  # the ZeRO-3 partitions were gathered into a whole generator

    unet = UNet2DModel.from_pretrained(str(out / "checkpoints" / "step_0000006" / "generator"))
    assert sum(p.numel() for p in unet.parameters()) > 100_000


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_with_zero2(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    port = _free_port()
    args = _args(
        out,
        shards,
        "train.max_steps=3",
        "train.global_batch_size=8",
        "train.micro_batch_size=4",
        "train.deepspeed_config=configs/deepspeed/zero2.json",
    )
    nodes = [
        subprocess.Popen(
            [
                str(BIN / "torchrun"),
                "--nnodes",
                "2",
                "--node_rank",
                str(r),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "pretrain",
                *args,
            ],
            env=ENV,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (1, 0)
    ]
    outputs = [p.communicate(timeout=420)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["derived"]["world_size"]) == ("completed", 3, 2)
    assert summary["derived"]["zero_stage"] == 2
    state = out / "checkpoints" / "step_0000003" / "state" / "ds"
    assert len(list(state.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one optimizer partition per node


# --- bad input: a clear error before any step ---


def _cli_error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(["pretrain", *args]) == 2
    return capsys.readouterr().err


def test_image_size_the_unet_cannot_take_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model.image_size_px=36 must be a positive multiple of 8"):
        load_pretrain_config(
            TINY,
            [
                "model.block_out_channels=[8,16,16,32]",
                "model.attention_levels=[false,false,false,true]",
                "model.image_size_px=36",
            ],
        )
    with pytest.raises(ConfigError, match="not_a_field"):
        load_pretrain_config(TINY, ["optim.not_a_field=1"])


def test_batch_split_lr_schedule_and_deepspeed_json() -> None:
    cfg = load_pretrain_config(TINY, ["train.global_batch_size=16", "train.micro_batch_size=4"])
    d = derive(cfg, world_size=2, cuda=False)
    assert (d.grad_accum_steps, d.bf16, d.backend) == (2, False, "gloo")
    ds = deepspeed_config(cfg, d)
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (16, 4, 2)
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == 1.0
    assert derive(cfg, world_size=1, cuda=True).bf16  # auto: bf16 on CUDA
    with pytest.raises(ValueError, match=r"global_batch_size=16 is not a multiple of .* world size 3"):
        derive(cfg, world_size=3, cuda=False)
    with pytest.raises(ValueError, match="bf16 needs CUDA"):
        derive(load_pretrain_config(TINY, ["train.precision=bf16"]), world_size=1, cuda=False)
    factors = [lr_factor(s, cfg) for s in range(cfg.train.max_steps)]
    assert factors[0] == pytest.approx(1 / 5) and factors[4] == pytest.approx(1.0)
    assert (
        all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
        and factors[-1] > cfg.optim.min_lr_ratio
    )


def test_deepspeed_json_that_fights_the_config_is_an_error(tmp_path: Path) -> None:
    cfg_of = lambda js: load_pretrain_config(TINY, [f"train.deepspeed_config={js}"])  # noqa: E731
    with_opt = tmp_path / "opt.json"
    with_opt.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ValueError, match="sets 'optimizer'"):
        derive(cfg_of(with_opt), world_size=1, cuda=False)
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_batch_size": 64}))
    cfg = cfg_of(fixed)
    with pytest.raises(ValueError, match="train_batch_size=64 but the pretrain config gives 8"):
        deepspeed_config(cfg, derive(cfg, world_size=1, cuda=False))


def test_world_size_that_does_not_divide_the_global_batch_fails_before_training(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    out = tmp_path / "run"
    err = _cli_error(capsys, _args(out, shards))
    assert "train.global_batch_size=8 is not a multiple of train.micro_batch_size=8 x world size 3" in err
    assert not out.exists()


def test_missing_or_damaged_shards_fail_before_training(
    shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _cli_error(capsys, _args(tmp_path / "a", tmp_path / "nowhere"))
    assert "data.shards" in err and "univg shards build" in err
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    victim = sorted(damaged.glob("*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    victim.write_bytes(bytes(data))
    err = _cli_error(capsys, _args(tmp_path / "b", damaged))
    assert f"shard {victim} fails its manifest sha256" in err
    victim.write_bytes(bytes(data[:-512]))
    err = _cli_error(capsys, _args(tmp_path / "c", damaged, "data.check_sha256=false"))
    assert f"shard {victim} has {len(data) - 512} bytes, the manifest says {len(data)}" in err
    victim.unlink()
    assert f"shard {victim} is missing" in _cli_error(capsys, _args(tmp_path / "d", damaged))
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_existing_run_and_foreign_checkpoint_are_refused_before_any_step(
    reference: Path, shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = (run / "metrics.jsonl").read_text()
    err = _cli_error(capsys, _args(run, shards))
    assert f"run folder {run} exists: pass --overwrite" in err
    err = _cli_error(capsys, _args(run, shards, "model.block_out_channels=[8,16]", "--resume", "auto"))
    assert "holds a generator of another config (model.block_out_channels: [16, 32] vs [8, 16]" in err
    err = _cli_error(capsys, _args(run, shards, "diffusion.prediction_type=epsilon", "--resume", "auto"))
    assert "diffusion.prediction_type: 'v_prediction' vs 'epsilon'" in err
    err = _cli_error(capsys, _args(run, shards, "--resume", str(run / "checkpoints")))
    assert "not a complete checkpoint folder" in err
    assert (run / "metrics.jsonl").read_text() == before  # nothing ran, nothing was written
    precious = tmp_path / "not_a_run"
    (precious / "notes.txt").parent.mkdir()
    (precious / "notes.txt").write_text("keep me")
    err = _cli_error(capsys, _args(precious, shards, "--overwrite"))
    assert "is not a run folder (no config.yaml), so it is not deleted" in err
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000020", "step_0000030"]


@pytest.fixture
def one_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher variables of a one-process group, for runs inside this test process."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():  # fmt: skip
        monkeypatch.setenv(key, value)


def test_non_finite_loss_stops_the_run(shards: Path, tmp_path: Path, one_process_env: None) -> None:
    from pretrain.train import train

    out = tmp_path / "run"
    # an absurd learning rate (no clipping) blows the weights up: the loss overflows within a few steps
    overrides = [f"out={out}", f"data.shards={shards}", "optim.lr=1e30", "optim.warmup_steps=0",
                 "diffusion.prediction_type=epsilon",
                 "optim.grad_clip=0", "train.max_steps=20", "data.num_workers=0",
                 "train.checkpoint_every_steps=0"]  # fmt: skip
    cfg = load_pretrain_config(TINY, overrides)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["step"] < 20 and summary["checkpoints"] == []


class _Planted:
    """A pickle that runs code when loaded: what a hostile checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_state_file_that_would_run_code_is_refused(
    reference: Path, tmp_path: Path, one_process_env: None
) -> None:
    from pretrain.train import train

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    marker = tmp_path / "code_ran"
    state = run / "checkpoints" / "step_0000030" / "state" / "ds" / "mp_rank_00_model_states.pt"
    torch.save({"module": _Planted(marker)}, state)
    cfg = load_pretrain_config(
        run / "config.yaml", [f"out={run}", "train.max_steps=31", "data.num_workers=0"]
    )
    with pytest.raises(ValueError, match="refusing to load a state file that is not plain data"):
        train(cfg, resume="auto")
    assert not marker.exists()


# --- the optional ControlNet generator (UniVG's recipe) on a tiny random "SD 1.5" ---


def _tiny_sd15(folder: Path) -> None:
    """A Stable Diffusion folder in diffusers layout with tiny random weights (nothing downloaded)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    down = ("CrossAttnDownBlock2D", "DownBlock2D")
    unet: Any = UNet2DConditionModel(
        sample_size=4, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
        down_block_types=down, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        attention_head_dim=4,
    )  # fmt: skip
    vae: Any = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    )  # fmt: skip
    scheduler: Any = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")


def test_controlnet_generator_trains_samples_and_reloads(shards: Path, tmp_path: Path) -> None:
    import torch.nn.functional as F

    from pretrain.controlnet import ControlNetGenerator
    from shards.reader import make_dataset

    sd = tmp_path / "sd15"
    _tiny_sd15(sd)
    with pytest.raises(ValueError, match="unet/ is missing"):
        ControlNetGenerator.from_sd15(tmp_path)
    gen = ControlNetGenerator.from_sd15(sd)
    dataset = make_dataset(str(shards), seed=0, resampled=False, shuffle_buffer=0, image_size_px=32)
    items = [it for _, it in zip(range(4), dataset, strict=False)]
    x0_B3HW, mask_B1HW = torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items])
    cond_B2HW = torch.cat([mask_B1HW, torch.stack([it["fov"] for it in items])], dim=1)
    modality_B = torch.stack([it["modality"] for it in items])
    g = torch.Generator().manual_seed(0)
    latents_B4hw = gen.encode(x0_B3HW, g)
    assert latents_B4hw.shape == (4, 4, 4, 4)
    noise = torch.randn(latents_B4hw.shape, generator=g)
    t_B = torch.tensor([100, 300, 500, 700])
    noisy = gen.scheduler.add_noise(latents_B4hw, noise, t_B)
    opt = torch.optim.AdamW(gen.trainable_parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(gen(noisy, t_B, modality_B, cond_B2HW), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in [*gen.unet.parameters(), *gen.vae.parameters()])  # frozen SD
    assert all(p.grad is not None for p in gen.controlnet.parameters() if p.requires_grad)

    image_B3HW = gen.sample(mask_B1HW, modality_B, seeds=[0, 1, 2, 3], num_inference_steps=5)
    assert image_B3HW.shape == (4, 3, 32, 32) and image_B3HW.min() >= -1 and image_B3HW.max() <= 1
    guided = gen.sample(mask_B1HW, modality_B, seeds=[0, 1, 2, 3], num_inference_steps=5, guidance_scale=3.0)
    assert guided.shape == image_B3HW.shape and not torch.equal(guided, image_B3HW)
    gen.save(tmp_path / "trained")
    again = ControlNetGenerator.from_sd15(sd, controlnet_folder=tmp_path / "trained")
    with torch.no_grad():
        torch.testing.assert_close(
            again(noisy, t_B, modality_B, cond_B2HW), gen(noisy, t_B, modality_B, cond_B2HW)
        )


# --- `univg pretrain` with model.kind: controlnet, on the tiny random "SD 1.5" ---

CN_STEPS = 4  # optimizer steps of the controlnet run, checkpoints every 2


def _controlnet_overrides(out: Path, shards: Path, sd: Path, *extra: str) -> list[str]:
    """tiny.yaml turned into a controlnet run on the tiny SD: its scheduler (scaled_linear, epsilon)."""
    return [f"out={out}", f"data.shards={shards}", "model.kind=controlnet", f"model.sd_path={sd}",
            "diffusion.beta_schedule=scaled_linear", "diffusion.prediction_type=epsilon",
            "data.num_workers=0", "data.shuffle_buffer=16", "train.global_batch_size=4",
            "train.micro_batch_size=4", "train.log_every_steps=1", "train.eval_every_steps=0",
            "train.eval_num_samples=4", "sampling.num_inference_steps=2", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sd = tmp_path_factory.mktemp("sd") / "sd15"
    _tiny_sd15(sd)
    return sd


@pytest.fixture(scope="module")
def controlnet_run(shards: Path, tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """An uninterrupted in-process controlnet run of 4 steps: (run folder, the generator it built)."""
    from pretrain.controlnet import ControlNetGenerator
    from pretrain.train import train

    out = tmp_path_factory.mktemp("controlnet") / "run"
    built: list[Any] = []
    from_sd15 = ControlNetGenerator.from_sd15.__func__  # type: ignore[attr-defined]

    def spy(cls: Any, *args: Any, **kwargs: Any) -> Any:
        built.append(from_sd15(cls, *args, **kwargs))
        return built[-1]

    launch = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(_free_port())}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for key, value in launch.items():
            mp.setenv(key, value)
        mp.setattr(ControlNetGenerator, "from_sd15", classmethod(spy))
        cfg = load_pretrain_config(
            TINY,
            _controlnet_overrides(
                out, shards, tiny_sd, f"train.max_steps={CN_STEPS}", "train.checkpoint_every_steps=2"
            ),
        )
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(cfg)
        finally:
            torch.set_num_threads(before)
    assert len(built) == 1
    return out, built[0]


def test_controlnet_pretrain_trains_only_the_controlnet_and_writes_its_checkpoints(
    controlnet_run: tuple[Path, Any], tiny_sd: Path
) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pretrain.checkpoint import weights_only_loads
    from pretrain.controlnet import ControlNetGenerator
    from pretrain.model import load_generator

    run, gen = controlnet_run
    losses = _rows(run, "loss")
    assert sorted(losses) == list(range(1, CN_STEPS + 1))
    assert all(0 < r["loss"] < 10 and r["gnorm"] > 0 for r in losses.values())  # finite, with gradients
    assert set(_rows(run, "eval_loss")) == {0, CN_STEPS} and (run / "samples" / "step_0000004.png").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["step"]) == ("completed", CN_STEPS)
    assert "ControlNet + modality tokens" in (run / "train.log").read_text()

    # frozen SD: bit-identical to the folder after training, and never seen by DeepSpeed or the optimizer
    for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        fresh = cls.from_pretrained(str(tiny_sd / part)).state_dict()
        trained = getattr(gen, part).state_dict()
        assert fresh.keys() == trained.keys() and all(torch.equal(fresh[k], trained[k]) for k in fresh)
    ckpt = run / "checkpoints" / "step_0000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert {p.name for p in ckpt.iterdir()} == {"generator", "state", "meta.json"}
    with weights_only_loads():
        state = torch.load(ckpt / "state" / "ds" / "mp_rank_00_model_states.pt")
    module = state["module"]
    assert module and all(k.startswith(("controlnet.", "modality_tokens.")) for k in module)
    assert module["controlnet.controlnet_mid_block.weight"].abs().max() > 0  # zero-initialised, now trained

    folder = ckpt / "generator"
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert files == {"controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors",
                     "modality_tokens.safetensors", "univg_generator.json"}  # fmt: skip
    info = json.loads((folder / "univg_generator.json").read_text())
    assert (info["kind"], info["sd_path"], info["model"]["kind"], info["step"]) == (
        "controlnet", str(tiny_sd), "controlnet", CN_STEPS,
    )  # fmt: skip
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == meta["data_position"]["segment_start_step"] == CN_STEPS
    with pytest.raises(ValueError, match="holds a controlnet generator"):
        load_generator(folder)
    again = ControlNetGenerator.from_pretrained(folder)  # the EMA weights on the SD that sd_path names
    mask_B1HW = torch.zeros(1, 1, 32, 32)
    mask_B1HW[..., 12:20, :] = 1
    image_B3HW = again.sample(mask_B1HW, torch.tensor([5]), seeds=[0], num_inference_steps=2)
    assert image_B3HW.shape == (1, 3, 32, 32) and bool(torch.isfinite(image_B3HW).all())


def test_controlnet_resume_auto_gives_the_uninterrupted_losses_and_refuses_a_unet_config(
    controlnet_run: tuple[Path, Any], shards: Path, tiny_sd: Path, tmp_path: Path, one_process_env: None
) -> None:
    from pretrain.train import train

    reference, _ = controlnet_run
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step_0000004")  # as if killed between the two checkpoints
    (out / "summary.json").unlink()
    overrides = _controlnet_overrides(
        out, shards, tiny_sd, f"train.max_steps={CN_STEPS}", "train.checkpoint_every_steps=2"
    )
    as_unet = [o for o in overrides if not o.startswith(("model.kind", "model.sd_path"))]
    with pytest.raises(ValueError, match=r"another config \(model.kind: 'controlnet' vs 'unet'"):
        train(load_pretrain_config(TINY, as_unet), resume="auto")
    train(load_pretrain_config(TINY, overrides), resume="auto")
    assert f"resumed from {out / 'checkpoints' / 'step_0000002'} at step 2" in (out / "train.log").read_text()
    want, got = _rows(reference, "loss"), _rows(out, "loss")
    for s in range(3, CN_STEPS + 1):
        assert (got[s]["loss"], got[s]["gnorm"], got[s]["lr"]) == (
            want[s]["loss"],
            want[s]["gnorm"],
            want[s]["lr"],
        )
    assert _rows(out, "eval_loss")[CN_STEPS] == _rows(reference, "eval_loss")[CN_STEPS]


def test_controlnet_config_errors_come_before_any_step(
    shards: Path, tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    yaml_cfg = load_pretrain_config(ROOT / "configs" / "pretrain" / "controlnet-sd15.yaml")
    assert (yaml_cfg.model.kind, yaml_cfg.model.image_size_px, yaml_cfg.train.precision) == (
        "controlnet", 512, "bf16",
    )  # fmt: skip
    assert yaml_cfg.train.deepspeed_config.endswith("zero2.json")
    with pytest.raises(ConfigError, match="model.kind=controlnet needs model.sd_path"):
        load_pretrain_config(TINY, ["model.kind=controlnet"])
    with pytest.raises(ConfigError, match="is only read by model.kind=controlnet"):
        load_pretrain_config(TINY, [f"model.sd_path={tiny_sd}"])
    with pytest.raises(ConfigError, match="image_size_px=36 must be a positive multiple of 8"):
        load_pretrain_config(
            TINY, ["model.kind=controlnet", f"model.sd_path={tiny_sd}", "model.image_size_px=36"]
        )
    with pytest.raises(ConfigError, match="DDIM only"):
        load_pretrain_config(
            TINY, ["model.kind=controlnet", f"model.sd_path={tiny_sd}", "sampling.sampler=dpm"]
        )

    def cli(out: Path, sd: Path, *extra: str) -> str:
        args = _controlnet_overrides(out, shards, sd, *extra)
        return _cli_error(capsys, ["--config", str(TINY), *args])

    err = cli(tmp_path / "a", tmp_path / "nowhere")
    assert f"model.sd_path={str(tmp_path / 'nowhere')!r}: no such folder" in err
    no_vae = tmp_path / "no_vae"
    shutil.copytree(tiny_sd, no_vae, ignore=shutil.ignore_patterns("vae"))
    assert "not a diffusers Stable Diffusion folder: vae/config.json is missing" in cli(
        tmp_path / "b", no_vae
    )
    err = cli(tmp_path / "c", tiny_sd, "model.image_size_px=40")  # tiny SD: VAE / 8, UNet / 2
    assert "model.image_size_px=40 must be a multiple of 16" in err
    err = cli(tmp_path / "d", tiny_sd, "diffusion.prediction_type=v_prediction")
    assert "diffusion.prediction_type='v_prediction' but the SD scheduler" in err
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_a_lock_a_killed_op_compile_left_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An old `lock` in torch's extension cache (what a compile killed half-way leaves, on which every later
    DeepSpeed start waits) is named; a fresh one (another process compiling now) is not."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert stale_extension_locks() == []  # no cache yet
    old, fresh = tmp_path / "ext" / "deepspeed_shm_comm" / "lock", tmp_path / "ext" / "other_op" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    past = time.time() - STALE_LOCK_S - 60
    os.utime(old, (past, past))
    assert stale_extension_locks() == [old]
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default cache: ~/.cache/torch_extensions/py*_*/
    default = tmp_path / "home" / ".cache" / "torch_extensions" / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    default.parent.mkdir(parents=True)
    default.touch()
    os.utime(default, (past, past))
    assert stale_extension_locks() == [default]
