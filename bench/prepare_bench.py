"""Benchmark of `berth prepare` at corpus scale: time, peak memory and disk, by corpus size.

    .venv/bin/python bench/prepare_bench.py [--repeats 4 16] [--num-proc 1 2] [--files]

For each size, People's Daily (the embedded corpus, 5.6 MB of text) is written out that many times, into one text
file or (`--files`) one file per copy (each copy's paragraphs with the copy's number prefixed, so no two documents
are equal), and prepared with `berth prepare configs/pretrain/mini_zh.yaml` in a fresh process for each
`--num-proc`, with empty caches (berth's `data.cache_dir` and datasets' own, `HF_DATASETS_CACHE`, both in a
temporary directory). Reported: seconds, the peak resident memory of the largest process (the `berth prepare`
process or one of its `data.num_proc` workers) and of all of them together, the largest anonymous (non-file)
resident memory of one process, sampled every 20 ms, and everything left on disk in both caches, as a multiple of
the text's size.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from berth.corpora.embedded import peoples_daily


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def anonymous_bytes(pid: int) -> int:
    """Resident memory that is the process's own (RssAnon): not the pages of memory-mapped Arrow files, which
    count in RSS once read but are page cache the kernel can drop."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def prepare_once(corpus: Path, work: Path, num_proc: int) -> tuple[float, float, float, float, int]:
    """(seconds, peak RSS in GB of the largest process and of the process tree, bytes left in both caches) of one
    fresh `berth prepare`."""
    cache, hf_cache = work / "berth-cache", work / "hf-cache"
    env = {**os.environ, "HF_DATASETS_CACHE": str(hf_cache), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "berth", "-q", "prepare", "configs/pretrain/mini_zh.yaml"]
    command += [f"corpus.sources=[{corpus}]", f"data.cache_dir={cache}", f"data.num_proc={num_proc}"]
    start = time.perf_counter()
    log = (work / "prepare.log").open("w")  # a file, not a pipe: nobody reads a pipe while the child runs
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    largest = together = anonymous = 0
    while child.poll() is None:  # sampled every 20 ms: the largest process, and the process tree's sum
        try:
            tree = [psutil.Process(child.pid), *psutil.Process(child.pid).children(recursive=True)]
            sizes = [p.memory_info().rss for p in tree]
            anonymous = max(anonymous, *(anonymous_bytes(p.pid) for p in tree))
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            continue
        largest, together = max(largest, *sizes), max(together, sum(sizes))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    log.close()
    if child.returncode:
        raise SystemExit((work / "prepare.log").read_text()[-3000:])
    disk = disk_bytes(cache) + (disk_bytes(hf_cache) if hf_cache.exists() else 0)
    return seconds, largest / 1e9, together / 1e9, anonymous / 1e9, disk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--num-proc", type=int, nargs="+", default=[2])
    parser.add_argument("--files", action="store_true", help="one file per copy (a directory source)")
    args = parser.parse_args()
    paragraphs = peoples_daily(unit="paragraph")["text"]
    print(
        "| copies of People's Daily | files | num_proc | text MB | seconds | peak RSS GB, largest process "
        "| all processes | anonymous, largest process | disk MB | disk / text |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for copies in args.repeats:
        for num_proc in args.num_proc:
            with tempfile.TemporaryDirectory() as scratch:
                work = Path(scratch)
                corpus = work / "corpus"
                corpus.mkdir()
                for copy in range(copies):
                    name = f"copy-{copy:03d}.txt" if args.files else "all.txt"
                    with (corpus / name).open("a", encoding="utf-8") as out:
                        for text in paragraphs:
                            out.write(f"{copy} {text}\n")
                text_bytes = disk_bytes(corpus)
                seconds, largest, together, anonymous, disk = prepare_once(corpus, work, num_proc)
                print(
                    f"| {copies} | {'files' if args.files else 'one file'} | {num_proc} | {text_bytes / 1e6:.0f} | "
                    f"{seconds:.0f} | {largest:.2f} | {together:.2f} | {anonymous:.2f} | {disk / 1e6:.0f} | "
                    f"{disk / text_bytes:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
