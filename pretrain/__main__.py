"""`python -m pretrain --config C`: the entry point for `deepspeed -m pretrain` and `torchrun -m pretrain`."""

import sys

from univg.cli import main

sys.exit(main(["pretrain", *sys.argv[1:]]))
