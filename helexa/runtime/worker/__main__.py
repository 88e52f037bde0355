"""``python -m helexa.runtime.worker --fd N --model ID``: a worker process (see
:mod:`helexa.runtime.worker.child`). Started by a neuron, never by hand."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from typing import get_args

import trio

from .. import cpu_policy
from .child import serve
from .pipe import Pipe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helexa.runtime.worker")
    ap.add_argument("--fd", type=int, required=True, help="this worker's end of the neuron's socketpair")
    ap.add_argument("--model", default="?", help="the model this worker runs (for logs and ps)")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--cpu-policy", default="normal", choices=get_args(cpu_policy.Policy), help="the neuron's (cpu_policy)")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)-7s worker[{args.model}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Ctrl-C on the neuron's terminal reaches its whole process group: the neuron drains
    # and unloads its models (which ends this worker), so the worker itself ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Said, not inherited: the neuron forks from whichever of its threads trio lends it.
    cpu_policy.apply(args.cpu_policy, who=f"worker[{args.model}]")
    sock = socket.socket(fileno=args.fd)
    trio.run(serve, Pipe(sock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
