"""How a process that a launcher started as one of several ends: `end_launched_process`. Plain Python, without
torch: the command line imports it at its top, before the offline switches are set."""

from __future__ import annotations

import logging
import os
import sys


def end_launched_process(code: int) -> None:
    """End this process now with exit status `code`, skipping Python's finalization, when a launcher started it as
    one of several (WORLD_SIZE above 1); streams and log handlers are flushed first. Returns in any other process.

    Gloo runs each collective in worker threads that outlive `destroy_process_group` as long as anything still
    holds the group (FSDP2's device meshes in torch's DTensor caches, DeepSpeed's default arguments). A worker
    that drops the tensors of a finished collective after Python has begun to finalize cannot take the GIL, and
    the process aborts ("terminate called without an active exception", SIGABRT) after a run that succeeded.
    Ending without finalization leaves no such window; the run's files, trackers and process group are closed by
    then.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
