"""The `univg` command: one subcommand per job, each defined next to the stage that owns it.

    univg shards build --config configs/corpus/tiny.yaml --out data/shards/tiny
    univg shards verify|preview|stats DIR
    univg pretrain --config configs/pretrain/tiny.yaml [--resume auto] [dotted overrides]
    univg finetune --task my_task/pairs.csv --shots 5 --out runs/my_task [--profile cpu-fast|gpu]
    univg fit --task my_task/ --out models/my_task [--unlabelled DIR]   # the model to keep, all labels
    univg segment --model runs/my_task --images DIR --out DIR;  univg evaluate --pred DIR --task T
    univg demo [--out runs/demo] [--quick]    # all of it at toy scale on a CPU

Stage modules are imported only when their subcommand runs, so `univg shards ...` never pays for
torch or DeepSpeed start-up.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module providing add_arguments(parser) and run(args) -> int
_COMMANDS = {
    "shards": ("shards.cli", "build, verify, preview, inspect and merge WebDataset shard corpora"),
    "pretrain": ("pretrain.cli", "train the mask- and modality-conditioned diffusion generator (DeepSpeed)"),
    "finetune": ("finetune.run", "few-shot segmentation: shots -> synthesis -> segmenters -> report"),
    "fit": ("finetune.fit", "train the segmenter to keep on every label of a task (nothing held out)"),
    "segmenter-pretrain": (
        "finetune.pretrain_segmenter",
        "pretrain a segmenter on a shard corpus, as the starting point of few-shot runs",
    ),
    "segment": ("finetune.segment", "write vessel masks for a folder of images with a trained segmenter"),
    "evaluate": ("finetune.evaluate", "score predictions against a task's labels (summary.json, overlays)"),
    "demo": ("univg.demo", "the whole pipeline at toy scale on a CPU in minutes, nothing downloaded"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="univg", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_text) in _COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        parser.parse_args(argv)  # prints usage or the error for an unknown command, and exits
        return 2
    module = importlib.import_module(_COMMANDS[argv[0]][0])
    cmd_parser = argparse.ArgumentParser(prog=f"univg {argv[0]}", description=_COMMANDS[argv[0]][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"univg {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
