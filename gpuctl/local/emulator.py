"""moto's server for local mode: its EC2 code imported before it listens, and a SIGTERM that ends it at once.

* moto imports a service's code on the first request for it, and EC2's (which brings most of the others) takes
  seconds, and then sets up the region's EC2 (default VPC …): paid on the first EC2 call, that is seconds of
  `gpuctl local up` with nothing else to do. Done here at start-up instead, it overlaps with what `up` does
  meanwhile in its own process (loading the AWS service models of its clients).
* Everything moto holds is in memory and goes with the process, so SIGTERM/SIGINT end it with ``os._exit``:
  tearing down an interpreter holding all of moto's service models takes seconds (1.6 s measured), which every
  `gpuctl local down` and demo would wait for.

It serves with moto's own ``ThreadedMotoServer`` (werkzeug, one thread per request), as ``moto_server`` does.

    python -m gpuctl.local.emulator -H 127.0.0.1 -p 5000 --region us-east-1
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuctl.local.emulator",
                                     description="moto's server for gpuctl's local mode.")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    parser.add_argument("--region", default=None, help="also set up EC2 for this region before listening")
    args = parser.parse_args(argv)

    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends  # (see the module docstring)
    from moto.server import ThreadedMotoServer

    if args.region:  # the default VPC, subnets and security group: most of a second on the first EC2 call
        assert ec2_backends[DEFAULT_ACCOUNT_ID][args.region] is not None

    # Blocked before the server's thread starts (threads inherit the mask), so only sigwait below receives them.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False).start()
    print(f"gpuctl local emulator: moto on http://{args.host}:{args.port}", flush=True)
    received = signal.sigwait(stop_signals)
    print(f"gpuctl local emulator: {signal.Signals(received).name}, exiting", flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
