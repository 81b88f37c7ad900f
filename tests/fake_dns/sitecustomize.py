"""A hosts file for a test subprocess, since this machine has no DNS: ``GPUCTL_TEST_HOSTS="name=address,…"``.

Put this folder on ``PYTHONPATH`` and Python imports it at start-up; ``socket.getaddrinfo`` then answers the listed
names with their address (as /etc/hosts would) and asks the real resolver for every other name. The address rules
of gpuctl.inputs still run on what it answers, so a name mapped to 127.0.0.1 is refused as it would be for real.
"""

from __future__ import annotations

import os
import socket

_HOSTS = dict(pair.split("=", 1) for pair in os.environ.get("GPUCTL_TEST_HOSTS", "").split(",") if "=" in pair)

if _HOSTS:
    _real_getaddrinfo = socket.getaddrinfo

    def _getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
        name = host.decode() if isinstance(host, bytes) else host
        address = _HOSTS.get(str(name).rstrip("."))
        if address is None:
            return _real_getaddrinfo(host, port, family, type, proto, flags)
        return [(socket.AF_INET, type or socket.SOCK_STREAM, proto, "", (address, int(port or 0)))]

    socket.getaddrinfo = _getaddrinfo
