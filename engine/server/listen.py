"""The listening sockets of `hayabusa serve`, opened before the model loads and handed to uvicorn: a port in use fails
in a second instead of after the weights, and nothing can take the port in between."""

from __future__ import annotations

import errno
import socket

BACKLOG = 2048  # uvicorn's default


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening TCP sockets on every address `host` resolves to, as asyncio's create_server (uvicorn's own way)
    would bind them, at `port` (0: one free port, the same on each). ValueError naming host and port otherwise."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"cannot listen on {host}:{port}: {host!r} does not resolve ({err.strerror})") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):  # (/etc/hosts may list one twice)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: "::" is IPv6 only, 0.0.0.0 gets its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
    except OSError as err:
        for sock in sockets:
            sock.close()
        hint = "; another process listens there: pick another --port, or --port 0 for a free one" \
            if err.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}{hint}") from None
    return sockets
