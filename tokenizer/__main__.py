"""`python -m tokenizer train CONFIG [overrides]`, the same as `berth tokenizer train`."""

import sys

from berth.cli import main

sys.exit(main(["tokenizer", *sys.argv[1:]]))
