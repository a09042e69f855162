"""What the processes of a run decide together: whether a directory is shared between them, and work split among
them (`Collective`, which the pretraining data's epoch count uses), so that no process works alone while the others
wait at a barrier."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from berth.core.errors import BerthError


def all_true(acc: Accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on every process."""
    if acc.num_processes == 1:
        return flag
    count = acc.reduce(torch.tensor([int(flag)], device=acc.device), reduction="sum")
    return int(count.item()) == acc.num_processes


def shared_everywhere(acc: Accelerator, directory: Path) -> bool:
    """Whether every process sees the same `directory` (a shared filesystem): the main process writes a file with
    a fresh name into it, and every process looks for it. One process: True."""
    if acc.num_processes == 1:
        return True
    directory.mkdir(parents=True, exist_ok=True)
    token = [secrets.token_hex(8) if acc.is_main_process else ""]
    broadcast_object_list(token)
    marker = directory / f".berth-shared-{token[0]}"
    if acc.is_main_process:
        marker.write_text("")
    acc.wait_for_everyone()
    shared = all_true(acc, marker.is_file())
    acc.wait_for_everyone()
    if acc.is_main_process:
        marker.unlink(missing_ok=True)
    return shared


def check_output_shared(acc: Accelerator, output_dir: Path) -> None:
    """A launch over several machines needs one output_dir for all of them: every process writes its part of each
    checkpoint there (its RNG states; under DeepSpeed its optimizer shard)."""
    if acc.num_processes > 1 and not shared_everywhere(acc, output_dir):
        raise BerthError(
            f"output_dir {output_dir} is not shared by every machine of this launch (a file the main process "
            "wrote there is missing on another); each process writes its part of every checkpoint there, so put "
            "output_dir on a filesystem every machine mounts"
        )


class Collective:
    """The processes of a run as the data preparation sees them: its rank among them, whether it writes a cache
    file the processes share, whether all of them agree on something, and everyone's results gathered."""

    def __init__(self, acc: Accelerator, shared_cache: bool):
        self.acc = acc
        self.rank, self.processes = acc.process_index, acc.num_processes
        # on a shared filesystem one process writes for all; otherwise one per machine
        self.writer = acc.is_main_process if shared_cache else acc.is_local_main_process

    def all(self, flag: bool) -> bool:
        return all_true(self.acc, flag)

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's `items`, concatenated in rank order, on every process."""
        return list(gather_object(items)) if self.processes > 1 else list(items)
