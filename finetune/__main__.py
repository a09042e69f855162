"""`accelerate launch -m finetune CONFIG [overrides]`, the same as `berth finetune CONFIG [overrides]`."""

import sys

from berth.cli import main

sys.exit(main(["finetune", *sys.argv[1:]]))
