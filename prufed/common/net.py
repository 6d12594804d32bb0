"""Address helpers shared by the aggregator's servers and the edge agent."""

from __future__ import annotations

import ipaddress
import socket


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8 and ::1, and for a name that resolves only to those (e.g. `localhost`).

    Parsed with `ipaddress`, never by prefix: `127.example.com` is not loopback."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)
