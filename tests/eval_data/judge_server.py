"""A scripted OpenAI-compatible ``/v1/chat/completions`` server for the eval tests (run as a process).

The ``model`` field picks the behaviour (text after ``#`` only makes names unique per test):
- ``rules``: a rule-based judge for comma-separated answers ("apple, banana, ..."): claims are the
  comma-separated items; a claim scores 1 (addressed) when the other text lists it, else 0;
- ``fixed:S1,S2,...``: claims c1..cn, scored with the given scores in order;
- ``garbage-once``: the first reply to a conversation is not a list; the retry gets ``rules``;
- ``garbage``: never a list;
- ``slow``: answers after 3 s (for time-outs);
- ``429x2``: the first two requests of each conversation get HTTP 429 (Retry-After: 0), then ``rules``;
- ``ok-then-500:N``: the first N requests answer by ``rules``, every later one gets HTTP 500;
- ``notchat``: HTTP 200 with a body that is not a chat completion;
- ``notutf8``: HTTP 200 with a body that is not UTF-8 text;
- ``bools``: claims c0, c1, scored ``true`` / ``false`` instead of numbers.
``GET /stats`` returns request counts per model and the largest number of requests in flight per model;
``GET /heal/<model>`` makes that model answer by ``rules`` from then on (a judge that came back).
Prints ``PORT <n>`` on stdout once it listens.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.parse
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
STATS = {"requests": defaultdict(int), "inflight": defaultdict(int), "max_inflight": defaultdict(int)}
SEEN: dict[str, int] = defaultdict(int)
HEALED: set[str] = set()


def _items(text: str) -> list[str]:
    parts = re.split(r",|\band\b", text)
    return [p.strip(" .\n\t").lower() for p in parts if p.strip(" .\n\t")]


def _after(text: str, header: str) -> str:
    i = text.rfind(header)
    return text[i + len(header) :] if i >= 0 else text


def rules(messages: list[dict]) -> str:
    system, user = messages[0]["content"], messages[1]["content"]
    if "split" in system.lower():  # claim extraction
        return json.dumps(_items(_after(user, "Answer to split into claims:\n")))
    start = user.index("[")
    claims, _ = json.JSONDecoder().raw_decode(user[start:])
    other = (
        _after(user, "Model response:\n")
        if "Model response:\n" in user
        else _after(user, "Ground-truth answer:\n")
    )
    have = set(_items(other))
    return json.dumps(
        [
            {
                "claim": c,
                "explanation": "listed" if c in have else "not listed",
                "addressed": c in have,
                "score": 1 if c in have else 0,
            }
            for c in claims
        ]
    )


def fixed(messages: list[dict], scores: list[float]) -> str:
    if "split" in messages[0]["content"].lower():
        return json.dumps([f"c{i}" for i in range(len(scores))])
    return json.dumps([{"claim": f"c{i}", "explanation": "-", "score": s} for i, s in enumerate(scores)])


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: dict | str | bytes, headers: dict | None = None) -> None:
        if isinstance(body, bytes):
            data = body
        else:
            data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/heal/"):
            with LOCK:
                HEALED.add(urllib.parse.unquote(self.path[len("/heal/") :]))
            self._send(200, {"ok": True})
        elif self.path.rstrip("/") == "/stats":
            with LOCK:
                self._send(
                    200, {"requests": dict(STATS["requests"]), "max_inflight": dict(STATS["max_inflight"])}
                )
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": "not found"})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        name, messages = body["model"], body["messages"]
        mode = "rules" if name in HEALED else name.split("#")[0]
        conv = json.dumps(messages[:2], sort_keys=True)
        with LOCK:
            STATS["requests"][name] += 1
            n_model = STATS["requests"][name]
            SEEN[name + conv] += 1
            n_conv = SEEN[name + conv]
            STATS["inflight"][name] += 1
            STATS["max_inflight"][name] = max(STATS["max_inflight"][name], STATS["inflight"][name])
        try:
            time.sleep(
                0.1 if mode == "rules" and "#conc" in name else 0.02
            )  # lets concurrent requests overlap
            if mode == "slow":
                time.sleep(3)
            if mode == "429x2" and n_conv <= 2:
                self._send(429, {"error": "rate limited"}, {"Retry-After": "0"})
                return
            if mode.startswith("ok-then-500:") and n_model > int(mode.split(":")[1]):
                self._send(500, {"error": "server exploded"})
                return
            if mode == "notchat":
                self._send(200, {"unexpected": True})
                return
            if mode == "notutf8":
                self._send(200, b'{"choices": [{"message": {"content": "caf\xe9"}}]}')
                return
            if mode == "garbage" or (mode == "garbage-once" and len(messages) == 2):
                text = "Sure! The claims are apple and banana, I think."
            elif mode == "bools":
                text = fixed(messages, [True, False])
            elif mode.startswith("fixed:"):
                text = fixed(messages, [float(x) for x in mode.split(":")[1].split(",")])
            else:
                text = rules(messages)
            self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
        finally:
            with LOCK:
                STATS["inflight"][name] -= 1


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
