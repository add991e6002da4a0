"""Listening sockets for ``broker serve --workers`` (:mod:`broker.workers`): a check that the
port is free, then one ``SO_REUSEPORT`` socket per worker, bound here and listened on by the
worker."""

from __future__ import annotations

import socket

Address = tuple[socket.AddressFamily, tuple[object, ...]]


def _socket(family: socket.AddressFamily, *, reuse_port: bool) -> socket.socket:
    """A TCP socket set up as asyncio sets up a server's."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def free_addresses(host: str, port: int) -> list[Address]:
    """The addresses to serve, after checking with ordinary binds that nothing listens on them
    (port 0: one free port, the same for all)."""
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses: list[Address] = []
    probes: list[socket.socket] = []
    try:
        for family, _, _, _, sockaddr in found:
            if any((family, sockaddr[0]) == (f, a[0]) for f, a in addresses):
                continue  # the same address for another protocol
            address = (sockaddr[0], port, *sockaddr[2:])
            probe = _socket(family, reuse_port=False)
            probes.append(probe)
            probe.bind(address)
            port = probe.getsockname()[1]
            addresses.append((family, (sockaddr[0], port, *sockaddr[2:])))
    finally:
        for probe in probes:
            probe.close()
    return addresses


def bind(addresses: list[Address]) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = _socket(family, reuse_port=True)
            sockets.append(sock)
            sock.bind(address)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
