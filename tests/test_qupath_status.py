"""QuPath gateways that stop answering: ``qupath status`` has a total deadline, every later call a read timeout."""

from __future__ import annotations

import socket
import threading
import time

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


def test_calls_after_connect_give_up_on_a_qupath_that_stops_answering():
    """A gateway that answers the handshake, then nothing: ``describe`` ends with one clear error in time."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    held: list[socket.socket] = []
    commands: list[str] = []

    def serve(conn: socket.socket) -> None:
        reader = conn.makefile("r", encoding="utf-8")
        lines: list[str] = []
        try:
            for line in reader:
                lines.append(line.rstrip("\n"))
                if lines[-1] != "e":
                    continue
                commands.append("\n".join(lines))
                lines = []
                if len(commands) == 1:  # getQuPath(): a reference to a Java object, as QuPath answers
                    conn.sendall(b"!yro1\n")
                # every later command is read and never answered: QuPath stuck behind a dialog
        except OSError:
            pass

    def accept() -> None:
        try:
            while True:
                conn, _ = srv.accept()
                held.append(conn)
                threading.Thread(target=serve, args=(conn,), daemon=True).start()
        except OSError:  # the listening socket was closed
            pass

    threading.Thread(target=accept, daemon=True).start()
    got: dict = {}

    def run() -> None:
        t0 = time.monotonic()
        got["r"] = CliRunner().invoke(qupath, ["describe", "--port", str(port), "--timeout", "1"])
        got["seconds"] = time.monotonic() - t0

    cli = threading.Thread(target=run, daemon=True)
    try:
        cli.start()
        cli.join(60)  # a bound on a hang: without a read timeout the command never returns
        assert not cli.is_alive(), "qupath describe still waits for a reply that never comes"
        r = got["r"]
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert f"QuPath at 127.0.0.1:{port} did not answer getCurrentImageData within 1 s" in r.output, (
            r.output
        )
        assert "--timeout" in r.output and r.output.count("Error:") == 1
        assert 1 <= got["seconds"] < 30, got["seconds"]
        assert "getQuPath" in commands[0]  # answered; then the stall
        assert any("getCurrentImageData" in c for c in commands[1:])
    finally:
        srv.close()
        for conn in held:
            conn.close()
