"""Loaded by every Python process of the deployment test (PYTHONPATH points here):
records each network destination a process looks up or connects to that is not on
this machine's loopback, in the file FEDLORA_SOCKET_WATCH names. The deployment test
then asserts that file stays empty: nothing phones home (Flower's telemetry and update
check, Ray's usage stats, a model hub), whatever process it would come from."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Any

LOOPBACK_NAMES = {None, "", "localhost", "localhost.localdomain", "ip6-localhost"}


def _is_loopback(host: Any) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _append(path: str, line: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(descriptor, line.encode())
    finally:
        os.close(descriptor)


def _install(log_path: str) -> None:
    program = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else "?")
    # Which processes are watched: the test checks every kind of process is.
    _append(log_path + ".processes", f"{os.getpid()} {program}\n")

    def record(event: str, host: Any, port: Any) -> None:
        _append(log_path, f"{os.getpid()} {program} {event} {host!r} {port!r}\n")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.getaddrinfo":
            host, port = args[0], args[1]
            if not _is_loopback(host):
                record(event, host, port)
        elif event in ("socket.connect", "socket.sendto"):
            sock, address = args[0], args[1]
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
                record(event, address[0], address[1])

    sys.addaudithook(hook)


if os.environ.get("FEDLORA_SOCKET_WATCH"):
    _install(os.environ["FEDLORA_SOCKET_WATCH"])
