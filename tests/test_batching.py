"""Continuous batching (``wsi_llava.model.batching``) against answering alone with ``WSILlava.stream``.

CPU: the batched step runs eagerly (the CUDA-graph buckets run on the GPU benchmark). The demo model
(SmolLM2-135M) answers with random visual tokens; every batched answer must equal its alone run.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from kits.llm import make_tiny_wsi_llava

from wsi_llava.errors import ModelError
from wsi_llava.model.batching import BatchDecoder, Batcher, bucket
from wsi_llava.model.fast_decode import FastDecoder
from wsi_llava.progress import CancelToken

QUESTIONS = [
    "Describe the tissue.",
    "What is shown in this slide?",
    "Is there necrosis?",
    "What is the diagnosis?",
    "Which cells dominate this region?",
    "Is the tumour invasive?",
    "Describe the stroma.",
    "What grade is this carcinoma?",
    "Are there mitoses?",
]


def _in_thread(fn):
    """``fn()`` in a worker thread, like the batcher's loop: on a loaded 2-core machine torch ran several
    times slower from the main thread, which only made this file slow."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    assert out, "the worker thread raised (see its traceback)"
    return out[0]


@pytest.fixture(scope="module")
def demo():
    from wsi_llava.model import load_model

    return _in_thread(lambda: load_model("demo", device="cpu"))


def _visual(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.n_visual_tokens, model.spec.projector.in_dim, generator=g)


def _alone(model, question, vis, **kw):
    """``model.stream`` alone: its chunks and result."""
    return _in_thread(lambda: (list(model.stream(question, vis, **kw)), model.last_generation))


def _same(chunks, result, ref) -> None:
    ref_chunks, ref_result = ref
    assert chunks == ref_chunks
    assert result is not None
    assert (result.text, result.new_token_ids, result.stop_reason) == (
        ref_result.text,
        ref_result.new_token_ids,
        ref_result.stop_reason,
    )
    assert result.text == "".join(chunks) and result.n_new_tokens == len(result.new_token_ids)
    assert result.prompt_len == ref_result.prompt_len


def _consume(stream, into: list, errors: list) -> threading.Thread:
    def run() -> None:
        try:
            into.extend(stream)
        except Exception as e:  # surfaced by the test thread
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t


def _no_batcher_threads() -> bool:
    return not any(t.name == "wsi-batcher" for t in threading.enumerate())


def test_concurrent_staggered_answers_equal_answering_alone(demo):
    """Nine answers, joining at different times, consumed from several threads: each equals its alone run."""
    reqs = []
    for i, q in enumerate(QUESTIONS):
        kw = {"max_new_tokens": 3 + (i * 2) % 7}
        if i == 5:
            kw.update(temperature=0.8, top_p=0.9, seed=7)
        reqs.append((q, _visual(demo, 100 + i), kw))
    refs = [_alone(demo, q, v, **kw) for q, v, kw in reqs]
    # the longest answer goes first, so that the later ones join while it is mid-answer
    order = sorted(range(len(reqs)), key=lambda i: -len(refs[i][1].new_token_ids))
    assert len(refs[order[0]][1].new_token_ids) >= 4
    assert len({tuple(r[1].new_token_ids) for r in refs}) > 3  # different answers, not one repeated
    assert {r[1].stop_reason for r in refs} >= {"max_tokens"}

    got: dict[int, list[str]] = {i: [] for i in order}
    streams, threads, errors = {}, [], []
    with Batcher(demo, max_batch=4) as batcher:
        first = order[0]
        q, v, kw = reqs[first]
        streams[first] = batcher.submit(q, v, **kw)
        got[first].append(next(streams[first]))  # it is decoding now
        for n, i in enumerate(order[1:]):
            q, v, kw = reqs[i]
            streams[i] = batcher.submit(q, v, **kw)
            threads.append(_consume(streams[i], got[i], errors))
            if n == 3:
                got[first].append(next(streams[first], ""))
                time.sleep(0.05)
        threads.append(_consume(streams[first], got[first], errors))
        for t in threads:
            t.join(60)
        assert not errors
        assert batcher.active == 0 and batcher.waiting == 0
    for i in order:
        _same([c for c in got[i] if c], streams[i].result, refs[i])
        assert streams[i].result.decode_path == "batched"
    assert _no_batcher_threads()


# --- the tiny Llama of tests/kits (fast): cancelling, call(), errors, the fallback, the step's logits ---

Q = "What is shown in this slide?"


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    return make_tiny_wsi_llava(tiny_llm_dir)


def _tiny_vis(seed: int) -> torch.Tensor:
    return torch.randn(8, 32, generator=torch.Generator().manual_seed(seed))


def test_cancel_frees_the_slot_for_a_waiting_answer(tiny):
    ref = _alone(tiny, "Describe the tissue.", _tiny_vis(2), max_new_tokens=60)
    assert len(ref[1].new_token_ids) == 60  # random weights: no early end
    with Batcher(tiny, max_batch=1) as batcher:
        long = batcher.submit(Q, _tiny_vis(1), max_new_tokens=200)
        token = CancelToken()
        held = batcher.submit(Q, _tiny_vis(3), max_new_tokens=200, cancel=token)  # cancelled while waiting
        nxt = batcher.submit("Describe the tissue.", _tiny_vis(2), max_new_tokens=60)
        first = next(long)
        assert batcher.active == 1 and batcher.waiting == 2
        token.cancel()
        assert list(held) == [] and held.result.stop_reason == "cancelled"
        assert held.result.new_token_ids == []
        long.cancel()
        rest = list(long)  # ends without running to 200 tokens
        assert long.result.text == first + "".join(rest)
        assert long.result.stop_reason == "cancelled" and long.result.n_new_tokens < 200
        assert batcher.active + batcher.waiting == 1  # its slot went to the waiting answer
        chunks = list(nxt)
        _same(chunks, nxt.result, ref)
    assert _no_batcher_threads()


def test_call_runs_in_the_loop_between_steps(tiny):
    ref = _alone(tiny, Q, _tiny_vis(4), max_new_tokens=80)
    with Batcher(tiny) as batcher:
        s = batcher.submit(Q, _tiny_vis(4), max_new_tokens=80)
        first = next(s)
        seen = []

        def probe() -> tuple[str, int]:
            seen.append(threading.current_thread().name)
            return "evidence", batcher.active

        assert batcher.call(probe) == ("evidence", 1)  # the answer is in the batch, paused
        assert seen == ["wsi-batcher"]

        def broken() -> None:
            raise ValueError("no gradient here")

        with pytest.raises(ValueError, match="no gradient here"):
            batcher.call(broken)
        assert batcher.call(lambda: torch.is_inference_mode_enabled()) is False  # autograd is usable
        _same([first, *s], s.result, ref)  # decoding went on unchanged
        assert batcher.call(lambda: 7) == 7  # with nothing active too
    with pytest.raises(ModelError, match="closed"):
        batcher.call(lambda: 1)


def test_bad_requests_fail_at_submit_and_close_ends_everything(tiny):
    batcher = Batcher(tiny, max_batch=1)
    with pytest.raises(ModelError, match="temperature"):
        batcher.submit(Q, _tiny_vis(1), temperature=-1.0)
    with pytest.raises(ModelError, match="visual tokens of shape"):
        batcher.submit(Q, torch.zeros(8, 5))
    running = batcher.submit(Q, _tiny_vis(1), max_new_tokens=300)
    queued = batcher.submit(Q, _tiny_vis(2), max_new_tokens=300)
    assert next(running)
    batcher.close()
    batcher.close()  # idempotent
    assert _no_batcher_threads()
    list(running)
    assert list(queued) == []
    assert running.result.stop_reason == "cancelled" and queued.result.stop_reason == "cancelled"
    with pytest.raises(ModelError, match="closed"):
        batcher.submit(Q, _tiny_vis(1))


def test_a_failure_ends_only_the_answers_it_concerns(tiny, monkeypatch):
    real_embed = tiny.embed

    def embed(input_ids, visual_tokens, *args, **kwargs):
        if float(visual_tokens.abs().max()) > 100:
            raise RuntimeError("simulated prefill failure")
        return real_embed(input_ids, visual_tokens, *args, **kwargs)

    monkeypatch.setattr(tiny, "embed", embed)
    ref = _alone(tiny, Q, _tiny_vis(5), max_new_tokens=10)
    with Batcher(tiny) as batcher:
        good = batcher.submit(Q, _tiny_vis(5), max_new_tokens=10)
        bad = batcher.submit(Q, _tiny_vis(6) * 1000, max_new_tokens=10)
        with pytest.raises(RuntimeError, match="simulated prefill failure"):
            list(bad)
        with pytest.raises(ZeroDivisionError):  # a cancel callable that raises ends its own answer
            list(batcher.submit(Q, _tiny_vis(6), max_new_tokens=10, cancel=lambda: 1 / 0))
        _same(list(good), good.result, ref)

        # a failing decode step ends every answer in it; the loop serves the next ones
        calls = []
        real_step = BatchDecoder.step

        def step(self, tokens, positions):
            calls.append(len(tokens))
            if len(calls) == 2:
                raise RuntimeError("simulated step failure")
            return real_step(self, tokens, positions)

        monkeypatch.setattr(BatchDecoder, "step", step)
        a = batcher.submit(Q, _tiny_vis(7), max_new_tokens=10)
        b = batcher.submit(Q, _tiny_vis(8), max_new_tokens=10)
        for s in (a, b):
            with pytest.raises(RuntimeError, match="simulated step failure"):
                list(s)
        later = batcher.submit(Q, _tiny_vis(5), max_new_tokens=10)
        _same(list(later), later.result, ref)
    assert _no_batcher_threads()


def test_an_unsupported_llm_answers_round_robin(tiny_llm_dir, caplog):
    from peft import LoraConfig, get_peft_model

    m = make_tiny_wsi_llava(tiny_llm_dir)
    m.llm = get_peft_model(
        m.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    m.llm.eval()
    reqs = [(Q, _tiny_vis(10 + i), {"max_new_tokens": 6 + 4 * i}) for i in range(3)]
    reqs[1][2].update(temperature=1.0, seed=3)
    refs = [_alone(m, q, v, **kw) for q, v, kw in reqs]
    with caplog.at_level("WARNING", logger="wsi_llava.model.batching"), Batcher(m, max_batch=2) as batcher:
        streams = [batcher.submit(q, v, **kw) for q, v, kw in reqs]
        got, errors = [[] for _ in streams], []
        threads = [_consume(s, g, errors) for s, g in zip(streams, got, strict=True)]
        for t in threads:
            t.join(60)
    assert not errors and "peft" in caplog.text
    for s, g, ref in zip(streams, got, refs, strict=True):
        _same(g, s.result, ref)
        assert s.result.decode_path == "eager"


def test_batched_step_logits_equal_single_stream_static_steps(tiny, monkeypatch, caplog):
    """Three answers at different positions through one batched step (padded to a bucket, buffers
    grown, a slot compacted away, a failed capture) against each one's own static FastDecoder."""
    from wsi_llava.model import fast_decode

    monkeypatch.setattr(fast_decode, "CAPACITY_STEP", 16)
    llm = tiny.llm
    prompts = [("Is there necrosis?", 20), (Q, 21), ("Describe the tissue. What is the diagnosis?", 22)]
    dec = BatchDecoder(llm, pad=True)
    singles, lengths = [], []
    gen = torch.Generator().manual_seed(9)
    with torch.inference_mode():
        for slot, (q, seed) in enumerate(prompts):
            s = tiny.embed(torch.tensor([tiny.prompt(q).input_ids]), _tiny_vis(seed)[None])
            n = s.inputs_embeds.shape[1]
            out = llm(inputs_embeds=s.inputs_embeds, position_ids=s.position_ids, use_cache=True)
            dec.ensure(slot + 1, n + 12)
            dec.load(slot, out.past_key_values, n)
            one = FastDecoder(llm, "static")
            one.ensure_capacity(n + 12)
            one.load_prefix(out.past_key_values, n)
            singles.append(one)
            lengths.append(n)
        assert len(set(lengths)) == 3 and dec.slots == bucket(3) == 4 and dec.capacity % 16 == 0

        def check(rows: list[int]) -> None:
            toks = torch.randint(0, llm.config.vocab_size, (len(rows),), generator=gen).tolist()
            got, graphed = dec.step(toks, [lengths[r] for r in rows])
            assert got.shape == (len(rows), llm.config.vocab_size) and not graphed
            for i, r in enumerate(rows):
                want = singles[r].step(toks[i], lengths[r])[0]
                torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
                lengths[r] += 1

        for _ in range(4):
            check([0, 1, 2])
        dec.move(2, 0, lengths[2])  # answer 0 left: the last slot moves into its place
        for _ in range(3):
            check([2, 1])
        dec.use_graphs = True  # pretend, to exercise the fallback when capturing fails

        def failing_capture(rows):
            raise RuntimeError("simulated capture failure")

        monkeypatch.setattr(dec, "_capture", failing_capture)
        with caplog.at_level("WARNING", logger="wsi_llava.model.batching"):
            check([2, 1])
        assert not dec.use_graphs and "simulated capture failure" in caplog.text
        check([2, 1])


def test_answers_about_one_selection_share_its_prefix_and_equal_answering_alone(demo):
    """Four questions about the same visual tokens (each passed as its own tensor, as the server's
    requests are): the prefix is prefilled once, and every batched answer equals its alone run."""
    vis = _visual(demo, 200)
    reqs = [(q, {"max_new_tokens": 4 + i}) for i, q in enumerate(QUESTIONS[:4])]
    refs = [_alone(demo, q, vis, **kw) for q, kw in reqs]
    got: list[list[str]] = [[] for _ in reqs]
    errors: list = []
    with Batcher(demo, max_batch=4) as batcher:
        streams = [batcher.submit(q, vis.clone(), **kw) for q, kw in reqs]
        threads = [_consume(s, got[i], errors) for i, s in enumerate(streams)]
        for t in threads:
            t.join(60)
        assert not errors
        assert (batcher.prefixes.misses, batcher.prefixes.hits) == (1, 3)
    for i, s in enumerate(streams):
        _same([c for c in got[i] if c], s.result, refs[i])


def test_prefix_cache_prefill_equals_the_whole_prompt_and_stays_bounded(tiny):
    """Logits and K/V of a prefix-cached prefill equal one prefill of the whole prompt; other visual
    tokens or other text before the image miss; the byte bound evicts the least recently used."""
    from wsi_llava.model.fast_decode import cache_kv
    from wsi_llava.model.generation import checked_request, prefill, splice
    from wsi_llava.model.prefix_cache import PrefixCache

    vis, other = _tiny_vis(30), _tiny_vis(31)
    cache = PrefixCache()
    with torch.inference_mode():
        hits = []
        necrosis = "Is there necrosis?"
        for q, v in [(Q, vis), (necrosis, vis.clone()), (Q, other), (necrosis, other.clone()), (Q, vis)]:
            _vt, parts, _gen = checked_request(tiny, q, v)
            s, past, logits, hit = cache.prefill(tiny, parts, v)
            hits.append(hit)
            ref_past, ref_logits = prefill(tiny, splice(tiny, parts, v))
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
            n = s.inputs_embeds.shape[1]
            for layer in range(tiny.llm.config.num_hidden_layers):
                for got, want in zip(cache_kv(past, layer), cache_kv(ref_past, layer), strict=True):
                    assert got.shape[2] == want.shape[2] == n
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert hits == [False, True, False, True, True]
        one = cache.nbytes // 2
        assert one > 0 and (cache.hits, cache.misses) == (3, 2)

        small = PrefixCache(max_bytes=one)  # room for one prefix: the newest stays
        for v in (vis, other, vis):
            _vt, parts, _gen = checked_request(tiny, Q, v)
            assert small.prefill(tiny, parts, v)[3] is False
            assert 0 < small.nbytes <= one
        off = PrefixCache(max_bytes=0)
        _vt, parts, _gen = checked_request(tiny, Q, vis)
        assert off.prefill(tiny, parts, vis)[3] is False and off.prefill(tiny, parts, vis)[3] is False
        assert off.nbytes == 0


def test_prompts_prefilled_together_equal_each_prefilled_alone(tiny):
    """``prefill_many``: questions of different lengths about two selections, in chunks of two rows;
    each prompt's logits and its cache row (up to its own length) equal its whole-prompt prefill."""
    from wsi_llava.model.fast_decode import cache_kv
    from wsi_llava.model.generation import checked_request, prefill, splice
    from wsi_llava.model.prefix_cache import PrefixCache

    a, b = _tiny_vis(40), _tiny_vis(41)
    asks = [(Q, a), ("Is there necrosis?", b), ("Describe the tissue. What is the diagnosis?", a.clone()),
            ("Grade?", a.clone()), (QUESTIONS[4], b.clone())]  # fmt: skip
    cache = PrefixCache()
    with torch.inference_mode():
        prompts = [(checked_request(tiny, q, v)[1], v) for q, v in asks]
        done = cache.prefill_many(tiny, prompts, max_rows=2)
        assert (cache.misses, cache.hits) == (2, 3)
        assert [p.hit for p in done] == [False, False, True, True, True]
        assert [p.row for p in done] == [0, 0, 1, 0, 1]  # selection a: rows 0, 1 then a chunk of its own
        lengths = set()
        for (parts, v), p in zip(prompts, done, strict=True):
            ref_past, ref_logits = prefill(tiny, splice(tiny, parts, v))
            torch.testing.assert_close(p.logits, ref_logits[0], rtol=1e-5, atol=1e-5)
            n = p.spliced.inputs_embeds.shape[1]
            lengths.add(n)
            for layer in range(tiny.llm.config.num_hidden_layers):
                for got, want in zip(cache_kv(p.cache, layer), cache_kv(ref_past, layer), strict=True):
                    assert got.shape[2] >= n == want.shape[2]
                    torch.testing.assert_close(got[p.row, :, :n], want[0], rtol=1e-5, atol=1e-5)
        assert len(lengths) >= 3  # rows of one call were padded to the longest


def test_answers_joining_in_one_turn_are_prefilled_together(tiny, monkeypatch):
    """Answers queued while the loop is busy join in one turn through one ``prefill_many`` call and
    still equal answering alone."""
    vis = _tiny_vis(50)
    reqs = [(q, {"max_new_tokens": 10 + i}) for i, q in enumerate(QUESTIONS[:4])]
    refs = [_alone(tiny, q, vis, **kw) for q, kw in reqs]
    with Batcher(tiny, max_batch=4) as batcher:
        calls = []
        real = batcher.prefixes.prefill_many
        monkeypatch.setattr(
            batcher.prefixes,
            "prefill_many",
            lambda m, prompts, **kw: calls.append(len(prompts)) or real(m, prompts, **kw),
        )
        release, started = threading.Event(), threading.Event()

        def hold() -> None:  # in the loop thread: nothing joins until it returns
            started.set()
            release.wait(30)

        busy = threading.Thread(target=lambda: batcher.call(hold))
        busy.start()
        assert started.wait(30)
        streams = [batcher.submit(q, vis.clone(), **kw) for q, kw in reqs]
        release.set()
        busy.join()
        results = [(list(s), s.result) for s in streams]
    assert calls == [4]
    for (chunks, result), ref in zip(results, refs, strict=True):
        _same(chunks, result, ref)


def test_warm_slots_fit_half_the_free_memory():
    from wsi_llava.model.batching import warm_slots

    assert warm_slots(16, per_slot=10, free=1000) == 16
    assert warm_slots(10, per_slot=10, free=1000) == 16  # the bucket holding them
    assert warm_slots(16, per_slot=10, free=200) == 8  # 16 x 10 > 100: the next smaller bucket
    assert warm_slots(16, per_slot=10, free=50) == 2
    assert warm_slots(16, per_slot=10, free=0) == 1
    assert warm_slots(100, per_slot=1, free=10_000) == 128  # beyond the largest bucket: its multiples
    assert warm_slots(100, per_slot=1, free=200) == 64


def test_warm_prepares_nothing_where_steps_run_eagerly(tiny):
    ref = _alone(tiny, Q, _tiny_vis(7), max_new_tokens=20)
    with Batcher(tiny, max_batch=4) as batcher:
        assert batcher.warm() is None  # CPU: no graphs to capture, no buffers allocated ahead
        stream = batcher.submit(Q, _tiny_vis(7), max_new_tokens=20)
        _same(list(stream), stream.result, ref)


@pytest.mark.gpu
def test_warm_captures_every_bucket_once_and_answers_stay_the_same(tiny_llm_dir):
    """CUDA: after ``warm`` the buffers hold ``max_batch`` answers and every bucket's step is captured;
    staggered answers then join without a capture or a buffer regrowth, each equal to answering alone."""
    model = make_tiny_wsi_llava(tiny_llm_dir)
    model.llm.to("cuda")
    model.projector.to("cuda")
    model.fast_decode = "graph"
    vis = [_tiny_vis(20 + i).cuda() for i in range(6)]
    refs = [_alone(model, QUESTIONS[i], vis[i], max_new_tokens=24) for i in range(6)]
    with Batcher(model, max_batch=8) as batcher:
        info = batcher.warm()
        assert info is not None and info["buckets"] == [1, 2, 4, 8] and info["slots"] == 8
        dec = batcher._dec
        captured, k0 = dec.capture_seconds, dec.k[0]
        assert batcher.warm()["buckets"] == []  # warm twice: nothing more to capture
        streams = []
        for i in range(6):
            streams.append(batcher.submit(QUESTIONS[i], vis[i], max_new_tokens=24))
            time.sleep(0.01)
        for s, ref in zip(streams, refs, strict=True):
            _same(list(s), s.result, ref)
            assert s.result.decode_path == "batched-graph"
        assert dec.capture_seconds == captured and dec.k[0] is k0
