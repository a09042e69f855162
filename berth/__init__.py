"""berth: the `berth` command and the run-time pieces every stage shares (config, errors, hub access)."""

from berth.core.errors import BerthError

__all__ = ["BerthError"]
__version__ = "0.1.0"
