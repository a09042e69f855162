"""How often a launched run that succeeded aborts at exit, by how its processes end.

    .venv/bin/python bench/teardown_bench.py [--launches 40] [--ending python berth] [--busy 2]

Each launch starts 2 processes over gloo (torch.distributed.run, as `accelerate launch` does), shards a small
model with FSDP2, takes 3 optimizer steps and an evaluation forward, gathers the whole weights and optimizer
state as berth's checkpoints do, waits at a barrier and destroys the process group. Then each process ends:

- `python`: returns to the interpreter, which finalizes;
- `berth`: `berth.core.process.end_launched_process(0)`, as `berth` ends under a launcher.

Reported for each ending: launches, how many exited non-zero, and how many of those printed "terminate called
without an active exception" (a gloo worker that dropped a tensor after finalization began). The launches
alternate between the endings, so both see the same machine load. The abort needs a worker thread that falls
behind its process's main thread, which a loaded machine makes likelier: `--busy N` keeps N busy processes
running beside the launches (as the test suite's other work does).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

def run():
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(8, 64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        model(torch.randn(3, 64))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    get_model_state_dict(model, options=options)
    get_optimizer_state_dict(model, optimizer, options=options)
    dist.barrier()
    dist.destroy_process_group()

run()
if sys.argv[1] == "berth":
    from berth.core.process import end_launched_process
    end_launched_process(0)
"""


def launch(script: Path, ending: str, port: int) -> tuple[int, bool]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*argv, str(script), ending], env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, "terminate called without an active exception" in done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=40, help="launches per ending")
    parser.add_argument("--ending", nargs="+", default=["python", "berth"], choices=["python", "berth"])
    parser.add_argument("--busy", type=int, default=0, help="busy processes to run beside the launches")
    parser.add_argument("--port", type=int, default=29650, help="the first rendezvous port; each launch takes the next")
    args = parser.parse_args()
    counts = {ending: [0, 0, 0] for ending in args.ending}  # launches, failed, aborted by the gloo race
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        run_all(args, counts)
    finally:
        for process in busy:
            process.kill()
    print("| ending | launches | exited non-zero | of those, the gloo abort at exit |")
    print("|---|---:|---:|---:|")
    for ending, (launches, failed, aborted) in counts.items():
        print(f"| {ending} | {launches} | {failed} | {aborted} |")


def run_all(args: argparse.Namespace, counts: dict[str, list[int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "fsdp_run.py"
        script.write_text(CHILD)
        port = args.port
        for i in range(args.launches):
            for ending in args.ending:
                code, race = launch(script, ending, port)
                port += 1
                counts[ending][0] += 1
                counts[ending][1] += int(code != 0)
                counts[ending][2] += int(race)
            print(f"{i + 1}/{args.launches}: " + "; ".join(f"{e} {c[1]} failed" for e, c in counts.items()), flush=True)


if __name__ == "__main__":
    main()
