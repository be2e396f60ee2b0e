"""`univg pretrain`: train the generator on a shard corpus.

univg pretrain --config configs/pretrain/tiny.yaml [--out runs/x] [--optim.lr 3e-4] [train.max_steps=50]
univg pretrain --config C --resume auto        # continue the newest complete checkpoint (or start)
univg pretrain --config C --overwrite          # replace an existing run folder
torchrun --nproc_per_node 2 -m pretrain --config C
deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 --module pretrain --config C
"""

from __future__ import annotations

import argparse

from pretrain.config import PretrainConfig
from univg.config import add_config_options, cli_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `univg pretrain`."""
    parser.add_argument("--config", required=True, help="pretrain YAML, e.g. configs/pretrain/tiny.yaml")
    parser.add_argument("--out", default=None, help="run folder (default: the config's `out`)")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|CHECKPOINT",
        help="auto: continue the run folder's newest complete checkpoint (or start if it has none); "
        "or a checkpoint folder",
    )
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
    # the deepspeed launcher appends --local_rank=N; the environment's LOCAL_RANK says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    add_config_options(parser, PretrainConfig, skip=("out",))  # --out is a plain option


def overrides_of(args: argparse.Namespace) -> list[str]:
    out = [f"out={args.out}"] if args.out else []
    return cli_overrides(args, args.overrides) + out


def run(args: argparse.Namespace) -> int:
    """Load the config, train, return the exit status (1 if the loss diverged)."""
    from pretrain.config import load_pretrain_config
    from pretrain.train import train

    cfg = load_pretrain_config(args.config, overrides_of(args))
    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except FloatingPointError:
        return 1  # already logged, summary.json says "diverged"
    return 0
