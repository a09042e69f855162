"""Writing directories so that a kill, a crash or a full disk never leaves a run without its last good copy.

A directory (a checkpoint, best/, final/) is written under a temporary name beside its target, flushed to disk,
and then put in place. Where Linux offers it, the new directory and the old one are swapped in one atomic
`renameat2(RENAME_EXCHANGE)`, and the old one is removed after; elsewhere the old one is moved aside first, and
`recover` puts it back at the next start if a kill fell between the two renames.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temporary_sibling(target: Path) -> Path:
    """A fresh name beside `target` to write its new version under."""
    return target.parent / f"{TMP_PREFIX}{target.name}-{time.time_ns()}"


def fsync_tree(root: Path) -> None:
    """Flush every file below `root`, and the directories, to disk, so a rename never exposes unwritten data."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2). False where the call is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory `new` in place of `target`; at every moment one complete version exists."""
    fsync_tree(new)
    if target.exists():
        if _exchange(new, target):
            shutil.rmtree(new)  # `new` now holds the old version
        else:
            old = target.parent / f"{OLD_PREFIX}{target.name}-{time.time_ns()}"
            target.rename(old)
            new.rename(target)
            shutil.rmtree(old)
    else:
        new.rename(target)
    _fsync_dir(target.parent)


def recover(directory: Path) -> None:
    """At the start of a run: put back a version moved aside by a save that was killed before its new version was
    in place, and remove the temporary directories of killed saves."""
    if not directory.is_dir():
        return
    for old in sorted(directory.glob(f"{OLD_PREFIX}*")):
        name = old.name.removeprefix(OLD_PREFIX).rsplit("-", 1)[0]
        if not (directory / name).exists():
            logger.warning("%s: restoring it from %s (a save was interrupted)", directory / name, old.name)
            old.rename(directory / name)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in directory.glob(f"{TMP_PREFIX}*"):
        logger.info("removing %s, left by an interrupted save", tmp)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
