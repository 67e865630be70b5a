"""One request to a model's llama-server child: a small HTTP/1.1 client on asyncio streams.

The front relays every token of every stream, so what it costs per event matters on a machine
whose cores llama.cpp is using: this reads the child's chunked answer straight off its socket
(about half the CPU per event of a general-purpose client). Each request has a connection of its
own (``Connection: close``): a Unix socket connects in microseconds, and no kept-alive connection
can be met just as the child drops it.

Failures to reach the child or to read its answer raise one of ``FAILURES`` (a refused or reset
connection, an answer cut short, a malformed one): the caller asks the pool whether the child died.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, AsyncIterator

if TYPE_CHECKING:
    from llmctl.engine.server_process import Address

CONNECT_TIMEOUT_S = 5.0
MAX_HEADER_LINES = 100
READ_SIZE = 64 * 1024
# OSError: refused, reset, timed out; EOFError: asyncio.IncompleteReadError; ValueError: a malformed line
FAILURES = (OSError, EOFError, ValueError)


class ChildClosed(ConnectionError):
    """The child closed the connection before its answer was whole."""


class Upstream:
    """The child's answer: status, headers (lower-case names), then its body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status_code: int, headers: dict[str, str]) -> None:
        self.reader, self.writer = reader, writer
        self.status_code, self.headers = status_code, headers
        self.closed = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer decoded)."""
        reader = self.reader
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    raise ChildClosed("the answer ended mid-chunk")
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    return  # trailers, if any, are left unread: the connection closes
                data = await reader.readexactly(size + 2)
                yield data[:-2]
        length = self.headers.get("content-length")
        if length is not None and length.isdigit():
            remaining = int(length)
            while remaining:
                data = await reader.read(min(remaining, READ_SIZE))
                if not data:
                    raise ChildClosed("the answer ended early")
                remaining -= len(data)
                yield data
            return
        while data := await reader.read(READ_SIZE):
            yield data

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    async def aclose(self) -> None:
        """Close the connection: a child still answering sees its client gone and stops."""
        if self.closed:
            return
        self.closed = True
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def _connect(address: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the child, within ``CONNECT_TIMEOUT_S``."""
    try:
        if address.uds is None:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", address.port), CONNECT_TIMEOUT_S)
        return await asyncio.wait_for(_connect_unix(str(address.uds)), CONNECT_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ConnectionError(f"no answer from {address.base_url} within {CONNECT_TIMEOUT_S:g} s") from None


async def _connect_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a Unix socket whose listen queue may be full (a burst of clients): Linux then
    answers EAGAIN at once, where TCP would wait, and asyncio takes that for a connection in
    progress and hands back a socket that is not connected. Here EAGAIN is retried on a fresh
    socket, briefly; a refused connection (no child listening) is not."""
    pause = 0.002
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)
            continue
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_unix_connection(sock=sock)


async def post(address: Address, path: str, body: bytes) -> Upstream:
    """Send ``body`` to ``path`` and read the answer's head (for a stream: once it begins)."""
    reader, writer = await _connect(address)
    try:
        head = [f"POST {path} HTTP/1.1", "Host: llama-server", "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close"]
        head += [f"{name}: {value}" for name, value in address.headers().items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ChildClosed("no answer" if not status_line else f"not an HTTP answer: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = await reader.readline()
            if line in (b"\r\n", b"\n"):
                return Upstream(reader, writer, int(parts[1]), headers)
            if not line:
                raise ChildClosed("the answer ended in its headers")
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        raise ChildClosed(f"more than {MAX_HEADER_LINES} header lines")
    except BaseException:
        writer.close()
        raise
