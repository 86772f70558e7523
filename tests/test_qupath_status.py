"""``wsi-llava qupath status`` against a port that accepts connections but never answers: a total deadline."""

from __future__ import annotations

import socket
import threading

from click.testing import CliRunner

from wsi_llava_qupath.commands import qupath


def test_status_gives_up_on_a_port_that_never_answers():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    held: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                conn, _ = srv.accept()
                held.append(conn)  # kept open, never read from, never answered
        except OSError:  # the listening socket was closed
            pass

    threading.Thread(target=accept, daemon=True).start()
    got: dict = {}
    cli = threading.Thread(
        target=lambda: got.update(
            r=CliRunner().invoke(qupath, ["status", "--port", str(port), "--timeout", "0.5"])
        ),
        daemon=True,
    )
    try:
        cli.start()
        cli.join(60)  # a bound on a hang: without a deadline the command never returns
        assert not cli.is_alive(), "qupath status still waits for an answer that never comes"
        r = got["r"]
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert f"port {port}" in r.output and "no answer within 0.5 s" in r.output
        assert "QuPath's Py4J gateway" in r.output
        assert held  # it did connect: the deadline covers the wait for the reply
    finally:
        srv.close()
        for conn in held:
            conn.close()  # the abandoned py4j read ends here
