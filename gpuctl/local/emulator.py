"""moto's server for local mode, with its EC2 code imported before it listens.

moto imports a service's code on the first request for it, and EC2's (which brings most of the others) takes
seconds: paid on the first EC2 call, that is seconds of `gpuctl local up` with nothing else to do. Imported here
at start-up instead, it overlaps with what `up` does meanwhile in its own process (loading the AWS service models
of its clients). Arguments are moto's server's own (``-H``, ``-p``).

    python -m gpuctl.local.emulator -H 127.0.0.1 -p 5000
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    import moto.ec2.models  # noqa: F401  (see the module docstring)
    from moto.server import main as serve

    serve(argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
