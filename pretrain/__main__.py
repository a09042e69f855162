"""`accelerate launch -m pretrain CONFIG [overrides]`, the same as `berth pretrain CONFIG [overrides]`."""

import sys

from berth.cli import main

sys.exit(main(["pretrain", *sys.argv[1:]]))
