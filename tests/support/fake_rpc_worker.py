"""A stand-in for ``ggml-rpc-server`` on loopback, for the faults a real one does not show on demand:
a worker of another llama.cpp build (another protocol version in its HELLO answer), one that
accepts and never answers, and one that hangs up at the handshake.

It speaks the same framing as ggml-rpc.cpp (``| cmd: u8 | size: u64 | payload |`` in,
``| size: u64 | payload |`` out) for HELLO, DEVICE_COUNT and GET_DEVICE_MEMORY, and records what
each connection sent.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field

HELLO, DEVICE_COUNT, GET_DEVICE_MEMORY = 14, 15, 11


@dataclass
class FakeRpcWorker:
    """``mode``: "answer" (HELLO with ``version``, then devices), "silent" (accept, read, never
    answer) or "hang-up" (read the HELLO, then close)."""

    mode: str = "answer"
    version: tuple[int, int, int] = (7, 0, 0)
    devices: list[tuple[int, int]] = field(default_factory=lambda: [(3 << 30, 4 << 30)])  # (free, total)
    received: list[bytes] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._listener.settimeout(0.05)  # so close() is not held up by a blocked accept
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> FakeRpcWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self._talk(conn)
                except (OSError, struct.error):
                    pass

    def _read(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _request(self, conn: socket.socket) -> tuple[int, bytes]:
        cmd, size = struct.unpack("<BQ", self._read(conn, 9))
        payload = self._read(conn, size)
        self.received.append(bytes([cmd]) + struct.pack("<Q", size) + payload)
        return cmd, payload

    def _answer(self, conn: socket.socket, payload: bytes) -> None:
        conn.sendall(struct.pack("<Q", len(payload)) + payload)

    def _talk(self, conn: socket.socket) -> None:
        cmd, _ = self._request(conn)
        if self.mode == "hang-up":
            return
        if self.mode == "silent":
            self._stop.wait(30)  # hold the connection without a word
            return
        if cmd != HELLO:
            return
        major, minor, patch = self.version
        self._answer(conn, bytes([major, minor, patch, 0]) + bytes(24))
        while True:
            cmd, payload = self._request(conn)
            if cmd == DEVICE_COUNT:
                self._answer(conn, struct.pack("<I", len(self.devices)))
            elif cmd == GET_DEVICE_MEMORY:
                (index,) = struct.unpack("<I", payload)
                self._answer(conn, struct.pack("<QQ", *self.devices[index]))
            else:
                return
