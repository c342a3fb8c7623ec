"""`tunesmith train CONFIG --nproc N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]`.

A thin front to torchrun (torch.distributed.run, in-process): it starts N copies of
`python -m tunesmith train CONFIG ...` on this machine, each with RANK / WORLD_SIZE / MASTER_*
set, and accelerate (inside `train()`) turns them into a data-parallel run. The same run can be
started with plain `torchrun --nproc-per-node N -m tunesmith train CONFIG` or with
`accelerate launch --config_file configs/accelerate/ddp.yaml -m tunesmith train CONFIG`; what
this front adds is an exit code that means what a single process's would (130 / 143 when a
signal stopped the run with a checkpoint, 2 for an error) instead of torchrun's 1 for any failure.
"""
from __future__ import annotations

import signal
import sys

from tunesmith.errors import TunesmithError

STOPPED = {128 + signal.SIGINT: "SIGINT", 128 + signal.SIGTERM: "SIGTERM"}


def torchrun_args(config: str, rest: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
                  endpoint: str | None = None, resume: bool = False) -> list[str]:
    """torchrun's command line for this run."""
    if nproc < 1 or nnodes < 1:
        raise TunesmithError("--nproc and --nnodes must be at least 1")
    argv = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes)]
    if nnodes > 1:
        if not endpoint or ":" not in endpoint:
            raise TunesmithError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT: node 0's address and a free port, "
                                 "the same on every machine")
        if not 0 <= node_rank < nnodes:
            raise TunesmithError(f"--node-rank must be 0 .. {nnodes - 1}")
        # static rendezvous: node 0 hosts the store at HOST:PORT and every node says which it is
        argv += ["--node-rank", str(node_rank), "--rdzv-backend", "static", "--rdzv-endpoint", endpoint]
    return argv + ["-m", "tunesmith", "train", config, *rest, *(["--resume"] if resume else [])]


def launch(config: str, rest: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
           endpoint: str | None = None, resume: bool = False) -> int:
    """Run the data-parallel processes to the end; returns the exit code for the command."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = torchrun_args(config, rest, nproc, nnodes, node_rank, endpoint, resume)
    again = " ".join(["tunesmith train", config, *rest, f"--nproc {nproc}"]
                     + ([f"--nnodes {nnodes} --node-rank {node_rank} --rdzv-endpoint {endpoint}"] if nnodes > 1 else [])
                     + ["--resume"])
    try:
        run(parse_args(argv))
    except SignalException as e:  # the launcher itself was signalled; torchrun passed it on to the processes
        print(f"{e.sigval.name}: the processes were asked to stop at the next step with a checkpoint\n"
              f"  continue: {again}", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        stopped = codes & set(STOPPED)
        # A process exits 130/143 only after the processes agreed to stop and the checkpoint was written;
        # torchrun then SIGTERMs the ones still shutting down, which may die of it (-15): same outcome.
        if stopped and codes <= set(STOPPED) | {-signal.SIGTERM, -signal.SIGINT}:
            print(f"stopped by {STOPPED[max(stopped)]} with a checkpoint\n  continue: {again}", file=sys.stderr)
            return max(stopped)
        print(f"data-parallel run failed: exit codes by rank "
              f"{ {r: f.exitcode for r, f in sorted(e.failures.items())} } (the processes' errors are above)",
              file=sys.stderr)
        return 2 if 2 in codes else 1
    return 0
