"""berth: the `berth` command and the run-time pieces every stage shares (config, errors, hub access)."""

from berth.errors import BerthError

__all__ = ["BerthError"]
__version__ = "0.1.0"
