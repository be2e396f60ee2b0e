"""`univg demo`: the whole pipeline at toy scale on a CPU, in minutes, with nothing downloaded.

    univg demo                                  # -> runs/demo
    univg demo --out DIR [--overwrite | --resume auto] [--quick] [--workers N] [--no-progress]

Each stage is the project's own command, called in this process, handing over through files in --out:

  1. corpus    shards.build.build_corpus, configs/corpus/demo.yaml: four of the five modalities; the one
               the config gives a zero share (fundus) is the modality fine-tuning meets as new
  2. pretrain  pretrain.train.train, configs/pretrain/demo.yaml: the tiny generator on those shards
  3. task      data_engine.corpus.make_sample of the held-out modality: a few-shot task on disk
               (images/, masks/, fov/ where the modality has one, pairs.csv with train and test rows)
  4. finetune  finetune.run.run_finetune, configs/finetune/demo.yaml: shots -> synthesis -> segmenters
               (univg: engine synthesis; univg_gen: the pretrained generator LoRA-adapted to the shots;
               baseline; full) -> evaluation on the test rows -> summary.json, report.md, pictures
  5. summary   wall time per stage, Dice per method, where the pictures are: console and summary.json

Run folder (--out):
    config.yaml   every stage's resolved config (written first)      demo.log   this command's log
    stages.json   wall time of each finished stage                    summary.json   the final summary
    shards/       manifest.json, *.tar, preview.png                   pretrain/      a `univg pretrain` run
    task/         pairs.csv, images/, masks/                          finetune/      a `univg finetune` run
A stage is done when its last file exists (shards/preview.png, pretrain/summary.json completed,
task/pairs.csv, finetune/summary.json); `--resume auto` skips done stages and lets an interrupted one
continue the way its own command does (kept shards, the newest checkpoint, finished segmenters).
`--quick` shrinks every stage further (seconds each; what the test runs).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_engine import MODALITIES

if TYPE_CHECKING:
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig
    from shards.config import CorpusConfig

log = logging.getLogger("univg.demo")
summary_log = logging.getLogger("univg.demo.summary")

ROOT = Path(__file__).resolve().parents[1]
CORPUS_YAML = ROOT / "configs" / "corpus" / "demo.yaml"
PRETRAIN_YAML = ROOT / "configs" / "pretrain" / "demo.yaml"
FINETUNE_YAML = ROOT / "configs" / "finetune" / "demo.yaml"
FORMAT = "univg-demo/1"
STAGES = ("corpus", "pretrain", "task", "finetune")

# --quick: every stage a few seconds (the test's size); dotted overrides on the demo YAMLs
QUICK_OVERRIDES: dict[str, list[str]] = {
    "corpus": ["num_samples=48", "samples_per_shard=16"],
    "pretrain": [
        "train.max_steps=4",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
        "train.log_every_steps=2",
        "train.eval_every_steps=0",
        "train.checkpoint_every_steps=0",
        "train.eval_num_samples=2",
        "sampling.grid_per_modality=1",
        "sampling.num_inference_steps=4",
        "data.shuffle_buffer=16",
    ],
    "finetune": [
        "split.shots=2",
        "segmenter.net.base_channels=8",
        "segmenter.patch.patch_size_px=32",
        "segmenter.patch.batch_size=4",
        "segmenter.patch.synthetic_pool_size=8",
        "segmenter.optim.max_steps=4",
        "segmenter.optim.warmup_steps=1",
        "segmenter.log_every_steps=2",
        "synthesis.num_pairs=6",
        "synthesis.samples_per_shard=6",
        "generator.adapt.max_steps=2",
        "generator.adapt.snapshot_steps=[]",
        "generator.adapt.warmup_steps=1",
        "generator.adapt.batch_size=2",
        "generator.adapt.log_every_steps=1",
        "generator.feedback.segmenter_steps=2",
        "generator.feedback.num_pairs=2",
        "generator.num_pairs=4",
        "generator.batch_size=4",
        "generator.num_inference_steps=2",
    ],
}


@dataclass(frozen=True)
class TaskConfig:
    """The few-shot task the demo makes of the held-out modality with the data engine."""

    image_size_px: int = 96  # side of every task image (px); a multiple of 8, >= 32
    num_train: int = 20  # labelled pool cases, split train (count): shots are drawn from them
    num_test: int = 5  # scored cases, split test (count)
    seed: int = 1  # engine seed of the task (the corpus uses 0: other masks, other noise)
    num_graphs_per_modality: int = 4  # engine graph library for recombined / regrown masks (count)

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"task: num_train={self.num_train} and num_test={self.num_test} must be >= 1")


QUICK_TASK = TaskConfig(image_size_px=64, num_train=4, num_test=2)


@dataclass(frozen=True)
class Plan:
    """Every stage's resolved config and folder: what config.yaml records."""

    out: Path
    quick: bool
    corpus: CorpusConfig  # stage 1
    pretrain: PretrainConfig  # stage 2, out and data.shards inside `out`
    task: TaskConfig  # stage 3
    modality: str  # the held-out modality: the task's
    finetune: FinetuneConfig  # stage 4

    def to_dict(self) -> dict[str, Any]:
        from univg.config import to_dict

        return {
            "format": FORMAT,
            "quick": self.quick,
            "corpus": to_dict(self.corpus),
            "pretrain": to_dict(self.pretrain),
            "task": {"modality": self.modality, **dataclasses.asdict(self.task)},
            "finetune": to_dict(self.finetune),
        }


def held_out_modality(corpus_cfg: CorpusConfig) -> str:
    """The first built-in modality the corpus config leaves out (share 0 or not listed)."""
    shares = corpus_cfg.engine.modalities
    missing = [m for m in MODALITIES if shares.get(m, 0.0) == 0.0]
    if not missing:
        raise ValueError(
            f"{CORPUS_YAML}: engine.modalities gives every built-in modality a share; set one to 0 "
            "(the demo's few-shot task is made of the modality the generator never saw)"
        )
    return missing[0]


def make_plan(out: Path, quick: bool) -> Plan:
    """Load the three demo YAMLs (plus the --quick overrides) with every path inside `out`."""
    from finetune.config import load_finetune_config
    from pretrain.config import load_pretrain_config
    from shards.config import load_corpus_config

    def quick_of(stage: str) -> list[str]:
        return QUICK_OVERRIDES[stage] if quick else []

    corpus = load_corpus_config(CORPUS_YAML, quick_of("corpus"))
    pretrain = load_pretrain_config(
        PRETRAIN_YAML, [f"out={out / 'pretrain'}", f"data.shards={out / 'shards'}", *quick_of("pretrain")]
    )
    finetune = load_finetune_config(FINETUNE_YAML, quick_of("finetune"))
    return Plan(
        out=out,
        quick=quick,
        corpus=corpus,
        pretrain=pretrain,
        task=QUICK_TASK if quick else TaskConfig(),
        modality=held_out_modality(corpus),
        finetune=finetune,
    )


# --- the run folder ---


def prepare_out(plan: Plan, resume: bool, overwrite: bool) -> None:
    """Create --out, or check it may be continued (--resume auto, same config) or replaced (--overwrite)."""
    from finetune.run import prepare_run_dir

    prepare_run_dir(
        plan.out,
        plan.to_dict(),
        resume,
        overwrite,
        kind="univg demo run",
        owned=lambda previous: isinstance(previous, dict) and previous.get("format") == FORMAT,
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def setup_logging(out: Path) -> list[logging.Handler]:
    """INFO of this command to the console and <out>/demo.log (each stage keeps its own log too); the
    final summary (logger univg.demo.summary) goes to both without time stamps."""
    handlers: list[logging.Handler] = []
    for logger, fmt in ((log, "%(asctime)s demo | %(message)s"), (summary_log, "%(message)s")):
        for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(out / "demo.log")):
            h.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
            logger.addHandler(h)
            handlers.append(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return handlers


# --- stages: each returns a one-line description of what it made ---


def stage_corpus(plan: Plan, num_workers: int, progress: bool) -> str:
    """Build (or complete) the demo corpus and its preview picture; preview.png is written last."""
    from shards.build import build_corpus, summary
    from shards.inspect import preview_corpus

    folder = plan.out / "shards"
    result = build_corpus(plan.corpus, folder, num_workers=num_workers, progress=progress, log=log.info)
    for line in summary(result).splitlines():
        log.info(line)
    preview_corpus(folder, folder / "preview.png", per_modality=4, tile_px=96)
    return _corpus_line(folder)


def _corpus_line(folder: Path) -> str:
    from shards.manifest import load_manifest

    m = load_manifest(folder)
    mix = " | ".join(f"{k} {v}" for k, v in m.modalities.items())
    return f"{m.num_samples} pairs ({mix}) in {len(m.shards)} shards"


@contextlib.contextmanager
def _one_process_group() -> Iterator[None]:
    """Let train() make its one-process group, then take it down and restore the launcher variables, so
    the later stages run as plain processes (the variables train() sets would look like a launch)."""
    import torch.distributed as dist

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pretrain_done(plan: Plan) -> dict[str, Any] | None:
    path = plan.out / "pretrain" / "summary.json"
    if not path.is_file():
        return None
    summary: dict[str, Any] = json.loads(path.read_text())
    ok = summary.get("status") == "completed" and summary.get("step") == plan.pretrain.train.max_steps
    return summary if ok and summary.get("generator") else None


def stage_pretrain(plan: Plan, resume: bool) -> str:
    """Pretrain the generator on the demo shards (continuing the newest checkpoint when resuming)."""
    from pretrain.train import train

    run = plan.out / "pretrain"
    with _one_process_group():  # train() returns completed runs only (a diverged one raises)
        summary = train(plan.pretrain, resume="auto" if resume and run.is_dir() else None)
    return _pretrain_line(summary)


def _pretrain_line(summary: dict[str, Any]) -> str:
    return (
        f"{summary['step']} steps, final loss {summary['final_loss']:.4f}, generator {summary['generator']}"
    )


def write_task(folder: Path, cfg: TaskConfig, modality: str, progress: bool = True) -> Path:
    """Render cfg.num_train + cfg.num_test pairs of `modality` with the data engine into `folder` as a task
    (images/, masks/, fov/ where the modality has a field of view, pairs.csv); returns the CSV path.
    Written under a temporary name and renamed, so a task folder is always complete."""
    from tqdm import tqdm

    from data_engine.corpus import EngineConfig, LibraryConfig, make_sample
    from data_engine.io import encode_png

    engine = EngineConfig(
        seed=cfg.seed,
        image_size_px=cfg.image_size_px,
        modalities={modality: 1.0},
        library=LibraryConfig(num_graphs_per_modality=cfg.num_graphs_per_modality),
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("images", "masks"):
        (tmp / sub).mkdir(parents=True)
    splits = ["train"] * cfg.num_train + ["test"] * cfg.num_test
    rows = []
    for i, split in enumerate(tqdm(splits, desc=f"task {modality}", unit="pair", disable=not progress)):
        sample = make_sample(engine, i)
        name = f"{modality}_{i:03d}.png"
        (tmp / "images" / name).write_bytes(encode_png(sample.image, 1))
        (tmp / "masks" / name).write_bytes(encode_png(sample.mask, 1))
        fov = ""
        if sample.fov is not None:
            (tmp / "fov").mkdir(exist_ok=True)
            (tmp / "fov" / name).write_bytes(encode_png(sample.fov, 1))
            fov = f"fov/{name}"
        rows.append({"image": f"images/{name}", "mask": f"masks/{name}", "fov": fov, "split": split})
    with open(tmp / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "mask", "fov", "split"])
        writer.writeheader()
        writer.writerows(rows)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder / "pairs.csv"


def stage_task(plan: Plan, progress: bool) -> str:
    """The few-shot task of the held-out modality."""
    write_task(plan.out / "task", plan.task, plan.modality, progress)
    return _task_line(plan)


def _task_line(plan: Plan) -> str:
    t = plan.task
    return (
        f"{t.num_train + t.num_test} {plan.modality} pairs at {t.image_size_px} px ({t.num_train} train, "
        f"{t.num_test} test) -> {plan.out / 'task' / 'pairs.csv'}"
    )


def stage_finetune(plan: Plan, resume: bool, progress: bool) -> str:
    """Few-shot fine-tuning on the task: every method, evaluated on the test rows."""
    from finetune.run import run_finetune

    pretrained = _pretrain_done(plan)
    assert pretrained is not None  # the pretrain stage ran first
    summary = run_finetune(
        plan.out / "task" / "pairs.csv",
        plan.out / "finetune",
        plan.finetune,
        resume=resume,
        progress=progress,
        generator_dir=Path(pretrained["generator"]),
    )
    return _finetune_line(summary)


def _finetune_line(summary: dict[str, Any]) -> str:
    return (
        f"{summary['shots']} shots x {summary['num_draws']} draw(s), methods "
        f"{', '.join(summary['methods'])}, scored on {summary['num_eval_cases']} test case(s)"
    )


# --- the run ---


def _stage_done(plan: Plan, stage: str) -> str | None:
    """A done stage's description, or None when it must run."""
    out = plan.out
    if stage == "corpus" and (out / "shards" / "preview.png").is_file():
        return _corpus_line(out / "shards")
    if stage == "pretrain" and (summary := _pretrain_done(plan)) is not None:
        return _pretrain_line(summary)
    if stage == "task" and (out / "task" / "pairs.csv").is_file():
        return _task_line(plan)
    if stage == "finetune" and (out / "finetune" / "summary.json").is_file():
        return _finetune_line(json.loads((out / "finetune" / "summary.json").read_text()))
    return None


def run_demo(
    out: str | Path = "runs/demo",
    quick: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`univg demo` as a function (module docstring); returns what summary.json holds."""
    started = time.perf_counter()
    plan = make_plan(Path(out), quick)
    prepare_out(plan, resume, overwrite)
    handlers = setup_logging(plan.out)
    workers = num_workers if num_workers is not None else min(2, os.cpu_count() or 1)
    stages_path = plan.out / "stages.json"
    stages: dict[str, Any] = json.loads(stages_path.read_text()) if stages_path.is_file() else {}
    run_stage: dict[str, Callable[[], str]] = {
        "corpus": lambda: stage_corpus(plan, workers, progress),
        "pretrain": lambda: stage_pretrain(plan, resume),
        "task": lambda: stage_task(plan, progress),
        "finetune": lambda: stage_finetune(plan, resume, progress),
    }
    try:
        log.info(
            "univg demo -> %s%s | corpus without %s, %s task of %d shots",
            plan.out,
            " (quick)" if quick else "",
            plan.modality,
            plan.modality,
            plan.finetune.split.shots,
        )
        for number, stage in enumerate(STAGES, 1):
            done = _stage_done(plan, stage)
            if done is not None and stage in stages:
                log.info("stage %d/%d %s: done already (%s)", number, len(STAGES), stage, done)
                stages[stage]["kept"] = True
                continue
            log.info("stage %d/%d %s", number, len(STAGES), stage)
            tick = time.perf_counter()
            what = run_stage[stage]()
            stages[stage] = {"wall_s": round(time.perf_counter() - tick, 1), "what": what, "kept": False}
            _write_atomic(stages_path, json.dumps(stages, indent=1) + "\n")
            log.info("stage %d/%d %s: %.1f s | %s", number, len(STAGES), stage, stages[stage]["wall_s"], what)
        summary = _summarise(plan, stages, time.perf_counter() - started)
        _write_atomic(plan.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        summary_log.info("\n%s\n", format_summary(summary))
        return summary
    finally:
        for h in handlers:
            log.removeHandler(h)
            summary_log.removeHandler(h)
            h.close()


def _summarise(plan: Plan, stages: dict[str, Any], wall_s: float) -> dict[str, Any]:
    out = plan.out
    ft = json.loads((out / "finetune" / "summary.json").read_text())
    samples = sorted((out / "pretrain" / "samples").glob("step_*.png"))
    pictures = {
        "corpus preview": out / "shards" / "preview.png",
        "pretraining samples (mask | generated | real)": samples[-1] if samples else None,
    }
    draw_0 = out / "finetune" / "draw_0"
    pictures["synthetic pairs, data engine (univg)"] = draw_0 / "synthetic" / "preview.png"
    pictures["synthetic pairs, adapted generator (univg_gen)"] = draw_0 / "univg_gen/synthetic/preview.png"
    pictures["comparison"] = out / "finetune" / "comparison.png"
    pictures["report"] = out / "finetune" / "report.md"
    methods = {
        m: {k: s[k]["mean"] for k in ("dice", "cldice", "nsd", "iou", "auc") if k in s}
        for m, s in ft["methods"].items()
    }
    return {
        "format": FORMAT,
        "out": str(out),
        "quick": plan.quick,
        "modality": plan.modality,
        "shots": ft["shots"],
        "num_draws": ft["num_draws"],
        "num_eval_cases": ft["num_eval_cases"],
        "stages": stages,
        "methods": methods,
        "finetune_summary": str(out / "finetune" / "summary.json"),
        "pictures": {k: str(v) for k, v in pictures.items() if v is not None and Path(v).is_file()},
        "wall_s": round(wall_s, 1),
        "stages_wall_s": round(sum(s["wall_s"] for s in stages.values()), 1),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The one-screen report printed at the end."""
    lines = [
        f"univg demo finished in {summary['wall_s']:.0f} s ({summary['stages_wall_s']:.0f} s of stages, "
        f"kept ones counted at their first run) -> {summary['out']}",
        "",
        "stage       wall s   what",
    ]
    for stage, s in summary["stages"].items():
        kept = " (kept)" if s.get("kept") else ""
        lines.append(f"{stage:<10}{s['wall_s']:>8.1f}   {s['what']}{kept}")
    lines += [
        "",
        f"{summary['modality']}, a modality the generator never saw: {summary['shots']} shots, "
        f"{summary['num_draws']} draw(s), {summary['num_eval_cases']} test case(s)",
        "method       Dice   clDice   NSD 2px",
    ]
    for method, m in summary["methods"].items():
        cells = [f"{m[k]:.4f}" if m.get(k) is not None else "  -   " for k in ("dice", "cldice", "nsd")]
        lines.append(f"{method:<10} {cells[0]:>7}  {cells[1]:>7}  {cells[2]:>7}")
    lines += ["", "pictures and report:"]
    for what, path in summary["pictures"].items():
        lines.append(f"  {what:<46} {path}")
    return "\n".join(lines)


# --- CLI ---


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `univg demo`."""
    parser.description = (
        "The whole pipeline at toy scale on a CPU, nothing downloaded: corpus without one modality -> "
        "pretrain the generator -> a few-shot task of the left-out modality -> fine-tune and score."
    )
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing demo run in --out")
    parser.add_argument(
        "--resume", choices=["auto"], default=None, help="continue a run in --out: done stages are kept"
    )
    parser.add_argument("--quick", action="store_true", help="every stage smaller still (seconds; the test)")
    parser.add_argument(
        "--workers", type=int, default=None, help="corpus build processes (default: up to 2 cores)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run `univg demo`; the summary is logged to the console and demo.log."""
    run_demo(
        args.out,
        quick=args.quick,
        resume=args.resume == "auto",
        overwrite=args.overwrite,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    return 0
