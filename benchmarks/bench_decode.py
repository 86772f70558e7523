"""Decode benchmark: ``WSILlava.stream`` eager vs fast decoding (static KV + CUDA graph) on a 7B Llama.

    python benchmarks/bench_decode.py [--quick] [--out results/decode.json] [--modes graph,compile]
    python benchmarks/bench_decode.py --tiny --device cpu        # a dry run of the whole script

Random weights in the Vicuna-7B shape (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 32000), bf16,
batch 1, greedy, a vicuna_v1 prompt of 64 text tokens + 576 visual tokens (features cached: the
visual tokens are given). In one process, on one card:

* the baselines, each warmed by two full-length calls (its first call is reported apart): HF
  ``generate()`` with its default DynamicCache, and ``generate(cache_implementation="static")``, which
  transformers compiles itself; then ``WSILlava.stream`` with fast decoding off and in each fast mode
  (the default one gives ``summary``): decode tokens/s = (n - 1) / (last token's time - first's);
* time to first token (TTFT) of ``stream``, eager and fast, median of ``--ttft-reps``;
* the memory-bandwidth bound: weight bytes read per token / measured device-to-device copy bandwidth;
* the numerical check: greedy ids of each path against eager ``stream``, and teacher-forced logits of
  the fast step against the eager HF step (relative L2 error per step, argmax agreement);
* peak GPU memory per section.

The tokenizer is a word-level one with the model's 32,000 ids built here (nothing is downloaded):
the text is meaningless, the token counts and the decode loop are the real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "decode.json"
N_VISUAL = 576
N_TEXT = 64
VIS_DIM = 1024


# --- the model ----------------------------------------------------------------------------------------


def make_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer over ids 0..vocab_size-1 (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_model(tiny: bool, device: str, dtype: Any, n_visual: int) -> Any:
    """A ``WSILlava`` over a random Llama (7B shape, or a tiny one) with a random mlp2x_gelu projector."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wsi_llava.model.projector import build_projector
    from wsi_llava.model.spec import GenerationSpec, LLMSpec, ModelSpec, ProjectorSpec
    from wsi_llava.model.wsi_llava import WSILlava

    if tiny:
        shape = {
            "hidden_size": 128,
            "intermediate_size": 344,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
        }
    else:
        shape = {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
        }
    cfg = LlamaConfig(
        **shape,
        num_key_value_heads=shape["num_attention_heads"],
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    torch.manual_seed(1)
    projector = build_projector("mlp2x_gelu", VIS_DIM, cfg.hidden_size).to(device=device, dtype=dtype).eval()
    spec = ModelSpec(
        name="bench-7b" if not tiny else "bench-tiny",
        llm=LLMSpec(source="random"),
        projector=ProjectorSpec(type="mlp2x_gelu", in_dim=VIS_DIM, out_dim=cfg.hidden_size),
        template="vicuna_v1",
        generation=GenerationSpec(max_new_tokens=128, temperature=0.0),
        n_visual_tokens=n_visual,
    )
    return WSILlava(llm, make_tokenizer(cfg.vocab_size), projector, spec)


def question_for(model: Any, n_text: int) -> str:
    """A question whose vicuna_v1 prompt has exactly ``n_text`` text tokens (the placeholder excluded)."""
    for n_words in range(1, 400):
        q = " ".join(f"w{100 + i}" for i in range(n_words))
        n = len(model.prompt(q).input_ids) - 1
        if n == n_text:
            return q
        if n > n_text:
            break
    raise SystemExit(f"cannot build a prompt of {n_text} text tokens")


# --- measurement helpers ---------------------------------------------------------------------------


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int, reps: int) -> float:
    """Device-to-device copy, bytes read + written per second (median of ``reps``)."""
    import torch

    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times[2:])


class _Clock:
    """A ``generate()`` streamer that only records when each put arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.ids: list[int] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def hf_generate(
    model: Any, question: str, vis: Any, n_new: int, device: str, cache_implementation: str | None = None
) -> dict:
    """A baseline: ``llm.generate`` (greedy) from the same spliced prompt, with its default dynamic cache
    or ``cache_implementation="static"`` (which transformers compiles itself)."""
    import torch

    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}

    s = model.embed(torch.tensor([model.prompt(question).input_ids]), vis[None])
    clock = _Clock()
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.llm.generate(
            inputs_embeds=s.inputs_embeds,
            attention_mask=s.attention_mask,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
            **extra,
        )
    sync(device)
    t_end = time.perf_counter()
    token_times = clock.times[1:]  # the first put is the (empty) prompt
    n = len(token_times)
    return {
        "new_tokens": n,
        "ids": out[0].tolist()[-n:],
        "ttft_ms": 1e3 * (token_times[0] - t0),
        "decode_tok_s": (n - 1) / (token_times[-1] - token_times[0]),
        "end_to_end_tok_s": n / (t_end - t0),
    }


def run_stream(model: Any, question: str, vis: Any, n_new: int, device: str, mode: Any) -> dict:
    """One ``stream`` call, timed per yielded chunk (one per token with this tokenizer)."""
    model.fast_decode = mode
    times = []
    sync(device)
    t0 = time.perf_counter()
    for _ in model.stream(question, vis, max_new_tokens=n_new, temperature=0.0):
        times.append(time.perf_counter())
    sync(device)
    t_end = time.perf_counter()
    gen = model.last_generation
    n = gen.n_new_tokens
    return {
        "new_tokens": n,
        "chunks": len(times),
        "ids": list(gen.new_token_ids),
        "decode_path": gen.decode_path,
        "stop_reason": gen.stop_reason,
        "ttft_ms": 1e3 * (times[0] - t0) if times else None,
        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
        "end_to_end_tok_s": n / (t_end - t0),
        "prefill_ms": 1e3 * gen.prefill_seconds,
        "decode_seconds": gen.decode_seconds,
    }


def ttft(model: Any, question: str, vis: Any, device: str, mode: Any, reps: int) -> list[float]:
    """Milliseconds from calling ``stream`` to its first chunk, ``reps`` times (after one warm-up)."""
    model.fast_decode = mode
    out = []
    for r in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        it = model.stream(question, vis, max_new_tokens=8, temperature=0.0)
        next(it)
        t = time.perf_counter() - t0
        it.close()
        if r:
            out.append(1e3 * t)
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def eager_step_logits(model: Any, question: str, vis: Any, ids: list[int], steps: int) -> Any:
    """(steps, vocab) float logits of the eager HF step (the loop ``stream`` runs with fast decoding off)."""
    import torch

    from wsi_llava.model.generation import cache_of, prefill, splice

    s = splice(model, model.prompt(question), vis)
    n = s.inputs_embeds.shape[1]
    arg = model._cache_arg()
    with torch.inference_mode():
        cache, _ = prefill(model, s)
        ref = []
        for i in range(steps):
            out = model.llm(
                input_ids=torch.tensor([[ids[i]]], device=model.device),
                attention_mask=torch.ones((1, n + i + 1), dtype=torch.long, device=model.device),
                use_cache=True,
                **{arg: cache},
            )
            cache = cache_of(out)
            ref.append(out.logits[0, -1].float())
    return torch.stack(ref)


def fast_step_logits(model: Any, question: str, vis: Any, ids: list[int], steps: int) -> Any:
    """(steps, vocab) float logits of the model's fast decoder (graph replays), fed the same ids."""
    import torch

    from wsi_llava.model.generation import prefill, splice

    dec = model._fast[1]
    s = splice(model, model.prompt(question), vis)
    n = s.inputs_embeds.shape[1]
    with torch.inference_mode():
        cache, _ = prefill(model, s)
        dec.ensure_capacity(n + steps + 1)
        dec.load_prefix(cache, n)
        return torch.stack([dec.step(ids[i], n + i)[0].float().clone() for i in range(steps)])


def compare_logits(got: Any, ref: Any) -> dict:
    """Relative L2 error per step, max abs difference, argmax agreement, and the reference's top-2 gaps."""
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
    top2 = ref.topk(2, dim=-1).values
    agree = (got.argmax(-1) == ref.argmax(-1)).tolist()
    return {
        "steps": len(rel),
        "max_rel_l2": max(rel),
        "median_rel_l2": statistics.median(rel),
        "max_abs": float((got - ref).abs().max()),
        "argmax_agree": f"{sum(agree)}/{len(agree)}",
        "ref_min_top2_gap": float((top2[:, 0] - top2[:, 1]).min()),
    }


def replay_ms(model: Any, reps: int = 50) -> float | None:
    """GPU time of one decode step alone: back-to-back graph replays timed with events."""
    import torch

    dec = model._fast[1] if model._fast else None
    if dec is None or dec._graph is None:
        return None
    for _ in range(3):
        dec._graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dec._graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def fp32_checks(
    model: Any, question: str, vis: Any, n_new: int, steps: int, ids: list[int], logits: dict
) -> dict:
    """An fp32 copy of the model: the reference for the bf16 logits, and greedy ids eager vs fast in fp32."""
    import copy

    import torch

    from wsi_llava.model.wsi_llava import WSILlava

    m32 = WSILlava(
        copy.deepcopy(model.llm).float(), model.tokenizer, copy.deepcopy(model.projector).float(), model.spec
    )
    vis32 = vis.float()
    ref32 = eager_step_logits(m32, question, vis32, ids, steps)
    out: dict[str, Any] = {"bf16_vs_fp32_reference": {k: compare_logits(v, ref32) for k, v in logits.items()}}
    runs = {}
    for label, mode in (("eager", False), ("graph", "graph")):
        m32.fast_decode = mode
        m32.generate_text(question, vis32, max_new_tokens=n_new, temperature=0.0)
        runs[label] = list(m32.last_generation.new_token_ids)
    out["fp32_greedy"] = {
        "new_tokens": len(runs["eager"]),
        "ids_equal_eager_vs_graph": runs["eager"] == runs["graph"],
        "first_divergence": first_divergence(runs["graph"], runs["eager"]),
        "step_logits_graph_vs_eager": compare_logits(
            fast_step_logits(m32, question, vis32, runs["eager"], steps),
            eager_step_logits(m32, question, vis32, runs["eager"], steps),
        ),
    }
    del m32
    torch.cuda.empty_cache()
    return out


# --- main ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 new tokens, fewer repeats")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama (dry run of the script)")
    ap.add_argument("--modes", default="graph,compile", help="fast modes to measure, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--ttft-reps", type=int, default=7)
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 reference (needs 2x the weights)")
    args = ap.parse_args(argv)

    import torch
    import transformers

    os.environ.pop("WSI_LLAVA_FAST_DECODE", None)
    logging_setup()
    device = args.device
    cuda = device == "cuda"
    n_new = args.new_tokens or (32 if args.quick else 128)
    reps = 2 if args.quick else 3
    dtype = torch.bfloat16 if cuda else torch.float32
    n_visual = 64 if args.tiny else N_VISUAL
    res: dict[str, Any] = {
        "benchmark": "decode",
        "card": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "model": "random Llama, Vicuna-7B shape" if not args.tiny else "random tiny Llama",
        "dtype": str(dtype).replace("torch.", ""),
        "batch": 1,
        "prompt": {"visual_tokens": n_visual, "text_tokens": N_TEXT},
        "new_tokens": n_new,
        "quick": args.quick,
        "errors": {},
    }
    out_path = args.out

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(res, indent=2, default=str) + "\n")

    def section(name: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:
            res["errors"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            return None
        finally:
            save()

    def peak_reset() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None

    t0 = time.perf_counter()
    model = build_model(args.tiny, device, dtype, n_visual)
    sync(device)
    res["build_seconds"] = round(time.perf_counter() - t0, 1)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.llm.parameters())
    res["llm_params"] = sum(p.numel() for p in model.llm.parameters())
    res["weight_gb"] = round(weight_bytes / 1e9, 3)
    question = question_for(model, N_TEXT)
    gen = torch.Generator().manual_seed(2)
    vis = torch.randn(n_visual, VIS_DIM, generator=gen).to(device=device, dtype=dtype)
    res["prompt"]["positions"] = len(model.prompt(question).input_ids) - 1 + n_visual
    if cuda:
        res["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        bw = section("bandwidth", lambda: copy_bandwidth(device, 2**30, 10))
        if bw:
            res["copy_bandwidth_tb_s"] = round(bw / 1e12, 3)
            res["bound_tok_s"] = round(bw / weight_bytes, 1)

    # baselines: HF generate with its dynamic cache, and with its static cache (compiled by transformers);
    # each warmed by full-length calls first, so that neither rests on a cold first call
    for label, impl in (("hf_generate", None), ("hf_generate_static", "static")):

        def hf_runs(impl: str | None = impl) -> dict:
            t = time.perf_counter()
            first = hf_generate(model, question, vis, n_new, device, impl)
            first_s = time.perf_counter() - t
            hf_generate(model, question, vis, n_new, device, impl)
            peak_reset()
            runs = [hf_generate(model, question, vis, n_new, device, impl) for _ in range(reps)]
            rates = [r["decode_tok_s"] for r in runs]
            best = runs[rates.index(statistics.median(rates))] if len(rates) % 2 else runs[0]
            return {
                **best,
                "decode_tok_s": statistics.median(rates),
                "decode_tok_s_runs": rates,
                "first_call_seconds": round(first_s, 2),
                "first_call_decode_tok_s": first["decode_tok_s"],
                "peak_gib": peak(),
            }

        res[label] = section(label, hf_runs)
    base = res["hf_generate"]
    static = res["hf_generate_static"]

    # our stream, eager
    peak_reset()
    eager = section("stream_eager", lambda: run_stream(model, question, vis, n_new, device, False))
    res["stream_eager"] = eager and {**eager, "peak_gib": peak()}
    if eager and base:
        res["stream_eager"]["ids_equal_hf_generate"] = eager["ids"] == base["ids"][: len(eager["ids"])]
        res["stream_eager"]["first_divergence_vs_hf_generate"] = first_divergence(eager["ids"], base["ids"])
    again = section("stream_eager_again", lambda: run_stream(model, question, vis, n_new, device, False))
    if eager and again:
        res["stream_eager"]["ids_equal_second_run"] = again["ids"] == eager["ids"]
    steps = min(n_new - 1, 64)
    logits: dict[str, Any] = {}
    if eager:
        ref = section("eager_logits", lambda: eager_step_logits(model, question, vis, eager["ids"], steps))
        if ref is not None:
            logits["eager"] = ref

    # our stream, fast
    res["fast"] = {}
    for mode in [m for m in args.modes.split(",") if m]:
        model._fast = None

        def fast_runs(mode: str = mode) -> dict:
            peak_reset()
            t = time.perf_counter()
            first = run_stream(model, question, vis, n_new, device, mode)
            first_s = time.perf_counter() - t
            dec = model._fast[1] if model._fast else None
            runs = [run_stream(model, question, vis, n_new, device, mode) for _ in range(reps)]
            ids_all = [first["ids"], *(r["ids"] for r in runs)]
            rates = [r["decode_tok_s"] for r in runs]
            best = runs[rates.index(statistics.median(rates))] if len(rates) % 2 else runs[0]
            out = {
                **best,
                "decode_tok_s": statistics.median(rates),
                "decode_tok_s_runs": rates,
                "first_call_seconds": round(first_s, 2),
                "capture_seconds": round(dec.capture_seconds, 2) if dec else None,
                "kv_capacity": dec.capacity if dec else None,
                "decoder_mode": dec.mode if dec else None,
                "ids_all_runs_equal": all(i == ids_all[0] for i in ids_all),
                "first_divergence_between_runs": [first_divergence(i, ids_all[0]) for i in ids_all[1:]],
                "peak_gib": peak(),
                "graph_replay_ms": replay_ms(model) if cuda else None,
            }
            if eager:
                out["ids_equal_eager"] = best["ids"] == eager["ids"]
                out["first_divergence"] = first_divergence(best["ids"], eager["ids"])
                out["speedup_vs_stream_eager"] = round(out["decode_tok_s"] / eager["decode_tok_s"], 2)
            if base:
                out["speedup_vs_hf_generate"] = round(out["decode_tok_s"] / base["decode_tok_s"], 2)
            if static:
                out["speedup_vs_hf_static"] = round(out["decode_tok_s"] / static["decode_tok_s"], 3)
                out["ids_equal_hf_static"] = best["ids"] == static["ids"][: len(best["ids"])]
            if res.get("bound_tok_s"):
                out["fraction_of_bound"] = round(out["decode_tok_s"] / res["bound_tok_s"], 3)
            if "eager" in logits:
                logits[mode] = fast_step_logits(model, question, vis, eager["ids"], steps)
                out["step_logits_vs_eager"] = compare_logits(logits[mode], logits["eager"])
            return out

        res["fast"][mode] = section(f"fast_{mode}", fast_runs)

    # time to first token
    res["ttft_ms"] = {}
    for label, mode in [("eager", False)] + [(f"fast_{m}", m) for m, r in res["fast"].items() if r]:
        ms = section(
            f"ttft_{label}", lambda mode=mode: ttft(model, question, vis, device, mode, args.ttft_reps)
        )
        if ms:
            res["ttft_ms"][label] = {
                "median": round(statistics.median(ms), 2),
                "runs": [round(x, 2) for x in ms],
            }
    if eager and "eager" in logits and not args.no_fp32:
        model._fast = None
        res["fp32"] = section(
            "fp32", lambda: fp32_checks(model, question, vis, n_new, steps, eager["ids"], logits)
        )
    from wsi_llava.model.fast_decode import DEFAULT_CUDA_MODE

    default = res["fast"].get(DEFAULT_CUDA_MODE)
    res["default_mode"] = DEFAULT_CUDA_MODE
    if default and cuda:
        res["summary"] = {"decode_default_tok_s": round(default["decode_tok_s"], 1)}
        if static:
            res["summary"]["decode_default_vs_hf_static"] = default["speedup_vs_hf_static"]
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    for r in [
        res.get("hf_generate"),
        res.get("hf_generate_static"),
        res.get("stream_eager"),
        *res["fast"].values(),
    ]:
        if r:
            r["ids"] = r["ids"][:16] + (["..."] if len(r["ids"]) > 16 else [])
    save()
    print_table(res)
    return 0


def logging_setup() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_table(res: dict) -> None:
    def f(x: Any, nd: int = 1) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    print(f"\n{res['card']} | torch {res['torch']} | transformers {res['transformers']} | {res['model']}")
    print(
        f"copy bandwidth {res.get('copy_bandwidth_tb_s', '-')} TB/s -> bound {res.get('bound_tok_s', '-')} tok/s"
    )
    print(f"{'path':<22}{'decode tok/s':>14}{'TTFT ms':>10}{'tokens':>8}{'ids = eager':>13}{'peak GiB':>10}")
    rows = [
        ("HF generate (dynamic)", res.get("hf_generate")),
        ("HF generate (static)", res.get("hf_generate_static")),
        ("stream eager", res.get("stream_eager")),
    ]
    rows += [(f"stream fast/{m}", r) for m, r in res["fast"].items()]
    for name, r in rows:
        if not r:
            print(f"{name:<22}{'failed':>14}")
            continue
        same = r.get("ids_equal_eager", r.get("ids_equal_hf_generate", "-"))
        print(
            f"{name:<22}{f(r['decode_tok_s']):>14}{f(r['ttft_ms']):>10}{r['new_tokens']:>8}{str(same):>13}"
            f"{f(r.get('peak_gib'), 2):>10}"
        )
    for label, t in res.get("ttft_ms", {}).items():
        print(f"TTFT {label}: median {t['median']} ms over {len(t['runs'])}")
    for m, r in res["fast"].items():
        if r and "step_logits_vs_eager" in r:
            print(f"step logits fast/{m} vs eager (bf16): {r['step_logits_vs_eager']}")
            print(
                f"  graph replay alone: {r.get('graph_replay_ms')} ms/step; runs equal: {r['ids_all_runs_equal']}"
            )
    for k, v in (res.get("fp32") or {}).get("bf16_vs_fp32_reference", {}).items():
        print(f"bf16 {k} vs fp32 reference: {v}")
    if res.get("fp32"):
        print(f"fp32 greedy eager vs graph: {res['fp32']['fp32_greedy']}")
    if res["errors"]:
        print("errors:", json.dumps(res["errors"], indent=1))


if __name__ == "__main__":
    sys.exit(main())
