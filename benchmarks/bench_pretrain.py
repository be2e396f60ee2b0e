"""Pretraining speed: step time, img/s, memory and (CUDA) model FLOPs utilisation, beside loader throughput.

    python benchmarks/bench_pretrain.py cpu --shards data/shards/tiny   # tiny + small, loader, 2 vs 1 procs
    python benchmarks/bench_pretrain.py cuda                            # base, 256 px, bf16, ZeRO-2, MFU

Each measurement is a fresh process running the real training step (DeepSpeed engine, AdamW, clipping,
the same forward/loss/backward as pretrain/train.py) on fixed tensors of the right shape, so it times the
model and DeepSpeed, not the loader; the loader is timed on its own over real shards with the same
batch size, so the two numbers can be compared (a loader slower than the step starves training).
Steps: `--warmup` untimed, then `--steps` timed. MFU = FLOPs of one forward+backward (counted by
torch.utils.flop_counter.FlopCounterMode on a plain copy of the UNet) x micro batches per step / step
time / the GPU's peak dense bf16 FLOP/s (table below, or --peak-tflops).
Data-parallel efficiency (CPU): the same global batch on 1 process vs 2 (torchrun, gloo, one thread
each): speedup = t1 / t2, efficiency = speedup / 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Peak dense bf16 tensor FLOP/s by GPU name (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L4": 121.0,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_steps(args: argparse.Namespace) -> dict[str, Any]:
    """Time the real training step in this process (one rank of a launch, or alone)."""
    import deepspeed
    import torch
    import torch.nn.functional as F

    from pretrain.config import deepspeed_config, derive, load_pretrain_config
    from pretrain.model import build_noise_scheduler, build_unet, count_parameters, unet_input
    from pretrain.train import init_distributed, launch_env, peak_memory_gib

    cfg = load_pretrain_config(args.config, args.overrides)
    rank, local_rank, world_size = launch_env()
    derived = derive(cfg, world_size)
    init_distributed(derived, local_rank)
    device = torch.device(derived.device)
    dtype = torch.bfloat16 if derived.bf16 else torch.float32
    b, s = derived.micro_batch_size, cfg.model.image_size_px

    torch.manual_seed(0)
    flops_per_micro = 0
    if rank == 0:  # count on a plain copy: DeepSpeed's hooks stay out of it
        from torch.utils.flop_counter import FlopCounterMode

        probe = build_unet(cfg.model).to(device, dtype)
        x = torch.randn(b, 5, s, s, device=device, dtype=dtype)
        t = torch.randint(0, 1000, (b,), device=device)
        m = torch.randint(0, 5, (b,), device=device)
        with FlopCounterMode(display=False) as counter:
            probe(x, t, class_labels=m).sample.float().square().mean().backward()
        flops_per_micro = counter.get_total_flops()
        del probe, x
    unet = build_unet(cfg.model)
    num_params = count_parameters(unet)
    scheduler = build_noise_scheduler(cfg.diffusion)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr)
    engine, _, _, _ = deepspeed.initialize(model=unet, optimizer=opt, config=deepspeed_config(cfg, derived))
    g = torch.Generator(device="cpu").manual_seed(rank)
    x0_B3HW = (torch.rand(b, 3, s, s, generator=g) * 2 - 1).to(device)
    mask_B1HW = (torch.rand(b, 1, s, s, generator=g) > 0.9).float().to(device)
    fov_B1HW = torch.ones_like(mask_B1HW)
    modality_B = torch.randint(0, 5, (b,), generator=g).to(device)

    def one_step() -> None:
        for _ in range(derived.grad_accum_steps):
            t_B = torch.randint(0, 1000, (b,), device=device)
            noise_B3HW = torch.randn_like(x0_B3HW)
            noisy_B3HW = scheduler.add_noise(x0_B3HW, noise_B3HW, t_B)
            pred = engine(unet_input(noisy_B3HW, mask_B1HW, fov_B1HW).to(dtype), t_B, class_labels=modality_B)
            loss = F.mse_loss(pred.sample.float(), noise_B3HW)
            engine.backward(loss)
            engine.step()

    def sync() -> None:
        if derived.device == "cuda":
            torch.cuda.synchronize()
        torch.distributed.barrier()

    for _ in range(args.warmup):
        one_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    result = {
        "config": str(args.config),
        "image_size_px": s,
        "params_m": num_params / 1e6,
        "world_size": world_size,
        "micro_batch": b,
        "grad_accum": derived.grad_accum_steps,
        "global_batch": derived.global_batch_size,
        "zero_stage": derived.zero_stage,
        "precision": "bf16" if derived.bf16 else "fp32",
        "ms_per_step": 1000 * step_s,
        "img_per_s": derived.global_batch_size / step_s,
        "peak_mem_gib": peak_memory_gib(derived.device),
        "flops_per_step_per_rank": flops_per_micro * derived.grad_accum_steps,
    }
    if derived.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        result["gpu"] = name
        result["peak_tflops"] = peak
        achieved = flops_per_micro * derived.grad_accum_steps / step_s
        result["achieved_tflops"] = achieved / 1e12
        result["mfu"] = achieved / (peak * 1e12) if peak else None
    return result


def loader_img_per_s(shards: str, batch_size: int, size_px: int, num_workers: int, num_batches: int) -> float:
    """Images per second out of make_loader on real shards (resampled, as in training), after warm-up."""
    from shards.reader import make_loader

    loader = make_loader(
        shards,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=0,
        image_size_px=size_px,
        shuffle_buffer=64,
    )
    it = iter(loader)
    for _ in range(max(2, num_workers)):
        next(it)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return num_batches * batch_size / (time.perf_counter() - t0)


def run_steps(config: str, overrides: list[str], nproc: int, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in fresh process(es): alone, or under torchrun for nproc > 1."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        inner = [str(Path(__file__).resolve()), "steps", "--config", config, "--json", str(out),
                 "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
        if getattr(args, "peak_tflops", None):
            inner += ["--peak-tflops", str(args.peak_tflops)]
        inner += overrides
        if nproc == 1:
            cmd = [sys.executable, *inner]
        else:
            torchrun = str(Path(sys.executable).parent / "torchrun")
            cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), *inner]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else dict(os.environ)
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        return dict(json.loads(out.read_text()))


def header() -> None:
    script = os.path.relpath(Path(sys.argv[0]).resolve(), Path.cwd())
    print(f"command: python {shlex.join([script, *sys.argv[1:]])}")
    cpu_name = platform.processor() or platform.machine()
    print(f"machine: {cpu_name}, {os.cpu_count()} CPU cores, {platform.system()}")
    print(f"date: {datetime.date.today().isoformat()}")


def cpu(args: argparse.Namespace) -> None:
    header()
    print(f"threads per process: {args.threads}; steps: {args.warmup} warm-up + {args.steps} timed")
    print(f"{'config':<7} {'px':>4} {'params':>7} {'procs':>5} {'micro':>5} {'accum':>5} {'global':>6} "
          f"{'ms/step':>8} {'img/s':>7} {'loader img/s':>13}")  # fmt: skip
    for name, size in (("tiny", 32), ("small", 64)):
        config = f"configs/pretrain/{name}.yaml"
        over = [f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch}",
                "train.deepspeed_config=configs/deepspeed/zero0.json"]  # fmt: skip
        r = run_steps(config, over, 1, args)
        loader = loader_img_per_s(args.shards, args.batch, size, args.loader_workers, args.loader_batches)
        print(f"{name:<7} {size:>4} {r['params_m']:>6.2f}M {1:>5} {r['micro_batch']:>5} {r['grad_accum']:>5} "
              f"{r['global_batch']:>6} {r['ms_per_step']:>8.0f} {r['img_per_s']:>7.1f} "
              f"{loader:>13.0f}")  # fmt: skip
    print(f"(loader: make_loader, {args.loader_workers} workers, batch {args.batch}, resampled, real shards)")

    g = 2 * args.batch
    base = [f"train.global_batch_size={g}", "train.deepspeed_config=configs/deepspeed/zero0.json"]
    one = run_steps("configs/pretrain/tiny.yaml", [*base, f"train.micro_batch_size={g}"], 1, args)
    two = run_steps("configs/pretrain/tiny.yaml", [*base, f"train.micro_batch_size={args.batch}"], 2, args)
    speedup = one["ms_per_step"] / two["ms_per_step"]
    print(f"data parallel, tiny, global batch {g}: 1 process {one['ms_per_step']:.0f} ms/step "
          f"({one['img_per_s']:.1f} img/s), 2 processes {two['ms_per_step']:.0f} ms/step "
          f"({two['img_per_s']:.1f} img/s): speedup {speedup:.2f}, efficiency {speedup / 2:.0%}")  # fmt: skip


def cuda(args: argparse.Namespace) -> None:
    header()
    over = [f"model.image_size_px={args.size}", "train.precision=bf16",
            f"train.deepspeed_config=configs/deepspeed/zero{args.zero}.json",
            f"train.micro_batch_size={args.micro}",
            f"train.global_batch_size={args.micro * args.accum}"]  # fmt: skip
    r = run_steps(args.config, over, 1, args)
    print(json.dumps(r, indent=1))
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a (give --peak-tflops)"
    print(f"{r['gpu']}: {Path(args.config).stem} {r['params_m']:.1f}M params, {args.size} px, bf16, "
          f"ZeRO-{args.zero}, micro {args.micro} x accum {args.accum}: {r['ms_per_step']:.0f} ms/step, "
          f"{r['img_per_s']:.1f} img/s, peak mem {r['peak_mem_gib']:.1f} GiB, "
          f"{r['achieved_tflops']:.0f} TFLOP/s, MFU {mfu}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cpu", help="tiny and small on CPU, loader throughput, data-parallel efficiency")
    c.add_argument("--shards", required=True, help="a built corpus (univg shards build ...)")
    c.add_argument("--batch", type=int, default=8, help="micro = global batch per measurement (default 8)")
    c.add_argument("--loader-workers", type=int, default=1)
    c.add_argument("--loader-batches", type=int, default=40)
    c.add_argument("--threads", type=int, default=1, help="OMP threads per process (default 1)")
    g = sub.add_parser("cuda", help="base config on one GPU: img/s, step time, memory, MFU")
    g.add_argument("--config", default="configs/pretrain/base.yaml")
    g.add_argument("--size", type=int, default=256, help="image side (px)")
    g.add_argument("--micro", type=int, default=32, help="micro batch")
    g.add_argument("--accum", type=int, default=1, help="micro batches per step")
    g.add_argument("--zero", type=int, default=2, help="ZeRO stage")
    g.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of this GPU")
    g.add_argument("--threads", type=int, default=0, help="OMP threads (default: leave as is)")
    s = sub.add_parser("steps", help="(internal) time steps in this process; run alone or under torchrun")
    s.add_argument("--config", required=True)
    s.add_argument("--json", required=True)
    s.add_argument("--peak-tflops", type=float, default=None)
    s.add_argument("overrides", nargs="*")
    for p in (c, g, s):
        p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
        p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    args = parser.parse_args()
    if args.mode == "steps":
        result = measure_steps(args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.json).write_text(json.dumps(result))
    elif args.mode == "cpu":
        cpu(args)
    else:
        cuda(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
