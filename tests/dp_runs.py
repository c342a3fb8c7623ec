"""Run several training configs one after another inside one data-parallel launch (tests only):

    torchrun --nproc-per-node 2 -m tests.dp_runs SPEC.json

SPEC.json is a list of config dicts. One launch pays Python's start-up once for all of them,
which on a shared 2-core machine is most of a tiny run's cost.
"""
from __future__ import annotations

import json
import sys

from tunesmith.train import train


def main(spec: str) -> None:
    for cfg in json.loads(open(spec).read()):
        train(cfg)


if __name__ == "__main__":
    main(sys.argv[1])
