"""Real sockets that fail the way networks do, for the client's failure messages: nothing listening, a
listener that never answers, a self-signed TLS listener, and a canned HTTP reply (a proxy's page, a
server of another API version, a full queue). Each runs in a daemon thread until its block ends.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A port whose connections are accepted (by the kernel's backlog) and never answered."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """``(cert, key)`` of a fresh self-signed certificate for localhost (openssl)."""
    if shutil.which("openssl") is None:
        import pytest

        pytest.skip("openssl not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _serve(listener: socket.socket, handle) -> threading.Thread:
    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _read_request(conn) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def _reply(status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()] + ["Connection: close", "", ""]
    return "\r\n".join(lines).encode() + body


@contextlib.contextmanager
def canned_http(
    status: int,
    body: str | dict,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> Iterator[str]:
    """An HTTP listener answering every request with the same reply; yields its base URL."""
    payload = (json.dumps(body) if isinstance(body, dict) else body).encode()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def handle(conn: socket.socket) -> None:
        with conn:
            _read_request(conn)
            conn.sendall(_reply(status, payload, content_type, headers))

    _serve(listener, handle)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@contextlib.contextmanager
def tls_listener(folder: Path) -> Iterator[str]:
    """An HTTPS listener with a self-signed certificate (answering JSON after the handshake); yields its URL."""
    cert, key = self_signed_cert(folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def handle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError), context.wrap_socket(conn, server_side=True) as tls:
            _read_request(tls)
            tls.sendall(_reply(200, b"{}", "application/json"))

    _serve(listener, handle)
    try:
        yield f"https://localhost:{listener.getsockname()[1]}"
    finally:
        listener.close()
