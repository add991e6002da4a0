"""A fault-injecting TCP proxy that tests put between the broker and Redis.

It forwards bytes both ways and, on command, fails the way networks do:
- ``blackhole()``: a partition. Bytes in both directions are dropped, on existing connections
  and on new ones (accepted, never forwarded); nothing is closed, so clients see only silence
  and time out. ``heal()`` forwards again for new connections and closes the blackholed ones,
  whose stream state nobody can know, so their clients reconnect.
- ``drop_reply_once(marker)``: a lost reply. The next client chunk holding ``marker`` reaches
  the server, the server's answer is read and thrown away, and that client connection is closed:
  the command ran but its caller cannot know.

    async with await TcpProxy.start("127.0.0.1", redis_port) as proxy:
        client = redis.asyncio.Redis.from_url(proxy.url_for_redis())
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType

CHUNK = 64 * 1024
LISTEN_HOST = "127.0.0.1"


@dataclass(eq=False)
class _Link:
    """One client connection and, unless it was born in a partition, its server connection."""

    client: asyncio.StreamWriter
    blackholed: bool
    server: asyncio.StreamWriter | None = None
    dropping_reply: bool = False  # the marker went up: the next server chunk is swallowed
    pumps: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        """Abort both sides now (no flush, no graceful FIN wait): the stream is abandoned."""
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()


class TcpProxy:
    """A TCP proxy on a free loopback port in front of ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0  # set once listening
        self.connections = 0  # accepted so far
        self.dropped_replies = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._blackholed = False
        self._drop_marker: bytes | None = None
        self._dropped = asyncio.Condition()

    @classmethod
    async def start(cls, target_host: str, target_port: int) -> TcpProxy:
        """A proxy already listening."""
        proxy = cls(target_host, target_port)
        await proxy._listen()
        return proxy

    def url_for_redis(self, db: int = 0) -> str:
        return f"redis://{LISTEN_HOST}:{self.port}/{db}"

    # -- faults ------------------------------------------------------------------------------
    def blackhole(self) -> None:
        """Drop every byte from now on, on every connection, closing none (a partition)."""
        self._blackholed = True
        for link in self._links:
            link.blackholed = True

    def silence(self) -> None:
        """The connections open now drop every byte for good, closing none (a peer gone without
        a reset, a NAT entry dropped); new connections are forwarded."""
        for link in self._links:
            link.blackholed = True

    def heal(self) -> None:
        """Forward again for new connections; close the blackholed ones so clients reconnect."""
        self._blackholed = False
        for link in [link for link in self._links if link.blackholed]:
            link.close()

    def drop_reply_once(self, marker: bytes) -> None:
        """Arm a lost reply for the next client chunk holding ``marker``."""
        self._drop_marker = marker

    async def wait_dropped(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Until ``n`` replies have been dropped; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout), self._dropped:
            await self._dropped.wait_for(lambda: self.dropped_replies >= n)

    # -- life cycle --------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop listening and abort every connection, blackholed or not."""
        if self._server is not None:
            self._server.close()
        for link in self._links:
            link.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        if self._server is None:
            await self._listen()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, LISTEN_HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    # -- forwarding --------------------------------------------------------------------------
    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self.connections += 1
        link = _Link(client, blackholed=self._blackholed)
        self._links.add(link)
        try:
            if link.blackholed:  # born in a partition: nothing reaches the server
                while await client_reader.read(CHUNK):
                    pass
                return
            server_reader, link.server = await asyncio.open_connection(
                self.target_host, self.target_port
            )
            link.pumps = [
                asyncio.create_task(self._pump(link, client_reader, link.server, up=True)),
                asyncio.create_task(self._pump(link, server_reader, client, up=False)),
            ]
            # Redis never half-closes: when either direction ends, the connection is over.
            await asyncio.wait(link.pumps, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass  # the target refused or a side reset: the client sees its connection end
        finally:
            link.close()
            for pump in link.pumps:
                pump.cancel()
            await asyncio.gather(*link.pumps, return_exceptions=True)
            self._links.discard(link)
            self._handlers.discard(handler)

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        """Copy one direction until EOF, applying the faults in force to each chunk."""
        with contextlib.suppress(OSError):
            while chunk := await reader.read(CHUNK):
                if link.blackholed:
                    continue  # dropped on the floor, like packets in a partition
                if up and self._drop_marker is not None and self._drop_marker in chunk:
                    self._drop_marker = None
                    link.dropping_reply = True  # before forwarding: the reply may be quick
                elif not up and link.dropping_reply:
                    link.close()  # the reply is read and never forwarded
                    async with self._dropped:
                        self.dropped_replies += 1
                        self._dropped.notify_all()
                    return
                writer.write(chunk)
                await writer.drain()
