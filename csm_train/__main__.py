"""`python -m csm_train`: a CPU smoke run of the training step on the tiny preset (see smoke.py)."""

import argparse

from csm_train.smoke import run

parser = argparse.ArgumentParser(prog="python -m csm_train", description=__doc__)
parser.add_argument("--preset", default="tiny", help="tiny | 100m | 1b | 3b | 8b")
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--batch-size", type=int, default=4)
args = parser.parse_args()
run(preset=args.preset, steps=args.steps, batch_size=args.batch_size)
