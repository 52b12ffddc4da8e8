"""Close the TCP connection of a peer that stalls, by its gRPC peer string.

grpcio's asyncio server has no way to cancel one call after its handler returned: a reply that
the peer never takes (it keeps its HTTP/2 window shut) stays in gRPC core's buffers until the
connection ends. So the server ends the connection itself: it finds its own socket whose remote
address is the peer's (`context.peer()`, e.g. `ipv4:127.0.0.1:52514`) and shuts it down. gRPC
core sees the connection drop and frees every call on it; other connections are untouched.
Behind a proxy that multiplexes callers on one connection this cuts them all (they retry).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from urllib.parse import unquote

log = logging.getLogger(__name__)


def peer_address(peer: str) -> tuple[str, int] | None:
    """(host, port) of a gRPC peer string (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`, `ipv6:%5B::1%5D:5`);
    None for other kinds (unix sockets)."""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    host, _, port = unquote(rest).rpartition(":")
    try:
        return _normal(host.strip("[]")), int(port)
    except ValueError:
        return None


def _normal(host: str) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer) as IPv4."""
    return host.removeprefix("::ffff:")


def _sockets() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                fds.append(fd)
        except (ValueError, OSError):
            continue
    return fds


def cut(peer: str) -> bool:
    """Shut down this process's TCP connection(s) to `peer`; True if one was found."""
    address = peer_address(peer)
    if address is None:
        return False
    found = False
    for fd in _sockets():
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                continue
            try:
                remote = sock.getpeername()
            except OSError:
                continue  # a listening socket
            if (_normal(remote[0]), remote[1]) == address:
                sock.shutdown(socket.SHUT_RDWR)
                found = True
        except OSError as e:
            log.debug("could not close the connection to %s: %s", peer, e)
        finally:
            sock.close()  # the duplicate only; the shutdown acts on the connection itself
    return found
