"""`python -m berth COMMAND ...`, and under Accelerate `accelerate launch -m berth pretrain CONFIG [overrides]`."""

import sys

from berth.app.cli import main

sys.exit(main())
