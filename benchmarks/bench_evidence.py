"""Evidence benchmark: does the relevance map lie on the tissue a question asks about? CPU, demo model.

    python benchmarks/bench_evidence.py [--world DIR] [--slides N] [--out FILE]

On a held-out synthetic world (``wsi-llava synth DIR --n-slides 12 --seed 777 --size 2560 --split test``,
made if missing) every tile's tissue class is known from the world's QuPath GeoJSON. For each slide and each
class it shows (tumour, necrosis, lymphocytic infiltrate) the demo is asked a slide question ("Is there
tumour on this slide?") and a region question about a rectangle around the class's largest annotation
(twice its size, so it also holds other tissue). Each relevance map is scored against the class mask of the
tiles it covers: ROC-AUC, and the pointing game (is the top tile of the class?). Side by side:

* ``before``: the method shipped before, kept here as the baseline: attention of the answer positions to the
  visual tokens (last half of the LLM's layers), each pooling bin's score spread evenly over its tiles;
* ``integrated_gradients``: what every front end shows, the ``Answer.evidence`` of ``SlideSession.ask``
  (:func:`wsi_llava.model.evidence.tile_relevance`, the core's number of steps);
* ``random``: uniform random scores (seeded).

Writes ``benchmarks/results/evidence.json`` and puts ``evidence_mean_auc`` / ``evidence_mean_auc_before``
into ``benchmarks/results/summary.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = {  # key in the manifest -> (slide question, region question, QuPath class in the GeoJSON)
    "tumour": ("Is there tumour on this slide?", "Is there tumour in this region?", "Tumor"),
    "necrosis": ("Is there necrosis on this slide?", "Is there necrosis in this region?", "Necrosis"),
    "lymphocytes": (
        "Is there a lymphocytic infiltrate on this slide?",
        "Is there a lymphocytic infiltrate in this region?",
        "Immune cells",
    ),
}
logger = logging.getLogger("bench_evidence")


def roc_auc(mask: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of ``scores`` for the boolean ``mask`` (Mann-Whitney U with average ranks for ties)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average rank over each run of equal scores
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos, neg = int(mask.sum()), int((~mask).sum())
    return float((ranks[mask].sum() - pos * (pos + 1) / 2) / (pos * neg))


def before_scores(model: Any, question: str, visual: Any, answer: list[int], n_tiles: int) -> np.ndarray:
    """The earlier method: answer-position attention to the visual tokens, bins spread over their tiles."""
    import torch

    from wsi_llava.slide_encoder.pooling import pool_bins

    parts = model.prompt(question)
    ids = torch.tensor([parts.input_ids + answer])
    s = model.embed(ids, visual[None])
    start, n_vis = int(s.image_starts[0]), s.n_visual
    end = len(parts.input_ids) - 1 + n_vis
    rows = list(range(end - 1, end - 1 + len(answer)))
    target = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    previous = target.config._attn_implementation
    target.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.llm(inputs_embeds=s.inputs_embeds, output_attentions=True, use_cache=False)
    finally:
        target.set_attn_implementation(previous)
    atts = out.attentions[len(out.attentions) // 2 :]
    bins = sum(a[0][:, rows, start : start + n_vis].double().mean(0).sum(0) for a in atts).numpy()
    edges = pool_bins(n_tiles, len(bins))
    tiles = np.zeros(n_tiles)
    for b, (lo, hi) in zip(bins, edges, strict=True):
        tiles[lo:hi] += b / (hi - lo)
    return tiles / tiles.sum()


def class_mask(grid: Any, regions: list[Any], qupath_class: str, indices: np.ndarray) -> np.ndarray:
    """Which of the tiles at ``indices`` have their centre in an annotation of ``qupath_class``."""
    from wsi_llava.errors import RegionError
    from wsi_llava.slide.tiling import select_tiles

    hit = np.zeros(len(grid.coords), bool)
    for r in regions:
        if (r.properties.get("classification") or {}).get("name") == qupath_class:
            with contextlib.suppress(RegionError):  # an annotation with no tile in it
                hit[select_tiles(grid, r)] = True
    return hit[indices]


def around(regions: list[Any], qupath_class: str, w: int, h: int) -> Any:
    """A rectangle twice the size of the class's largest annotation, centred on it, inside the slide."""
    from wsi_llava.slide.region import Region

    cands = [r for r in regions if (r.properties.get("classification") or {}).get("name") == qupath_class]
    big = max(cands, key=lambda r: np.ptp(np.asarray(r.points), axis=0).prod())
    pts = np.asarray(big.points, dtype=float)
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    cx, cy, rw, rh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * 2, (y1 - y0) * 2
    x, y = max(0.0, cx - rw / 2), max(0.0, cy - rh / 2)
    return Region.rectangle(x, y, min(rw, w - x), min(rh, h - y), name=f"around {big.name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=Path, default=Path("runs/bench_evidence/heldout_777"))
    ap.add_argument("--slides", type=int, default=12, help="held-out slides (seed 777)")
    ap.add_argument("--out", type=Path, default=RESULTS / "evidence.json")
    ap.add_argument("--summary", type=Path, default=RESULTS / "summary.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from wsi_llava.model import load_model
    from wsi_llava.model.evidence import DEFAULT_STEPS
    from wsi_llava.session import SlideSession
    from wsi_llava.slide.geojson import read_geojson

    steps = DEFAULT_STEPS  # what the session's evidence pass uses
    if not (args.world / "manifest.json").is_file():
        cmd = ["wsi-llava", "synth", str(args.world), "--n-slides", str(args.slides), "--seed", "777"]
        subprocess.run([*cmd, "--size", "2560", "--split", "test"], check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads((args.world / "manifest.json").read_text())
    model = load_model("demo", device="cpu")
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for entry in manifest["slides"][: args.slides]:
        regions = read_geojson(args.world / entry["annotations"], skip_unsupported=True)
        with SlideSession(
            args.world / entry["path"], model=model, cache_dir=args.world.parent / "cache"
        ) as sess:
            w, h = sess.reader.dimensions
            for key, (q_slide, q_region, qupath_class) in CLASSES.items():
                if key not in entry["tissue_types"]:
                    continue
                for scope, question, region in (
                    ("slide", q_slide, None),
                    ("region", q_region, around(regions, qupath_class, w, h)),
                ):
                    indices = sess.tiles_for(region)
                    mask = class_mask(sess.grid, regions, qupath_class, indices)
                    if mask.all() or not mask.any():
                        continue
                    t = time.perf_counter()
                    answer = sess.ask(question, region, max_new_tokens=8)  # with its evidence, as shown
                    ids = list(sess.model.last_generation.new_token_ids)
                    assert answer.evidence.tile_indices == [int(i) for i in indices]
                    ig = np.asarray(answer.evidence.scores)
                    seconds = time.perf_counter() - t
                    methods = {
                        "before": before_scores(
                            model, question, sess.visual_tokens(indices), ids, len(indices)
                        ),
                        "integrated_gradients": ig,
                        "random": rng.random(len(indices)),
                    }
                    row = {
                        "slide": entry["stem"],
                        "class": key,
                        "scope": scope,
                        "question": question,
                        "answer": answer.answer,
                        "tiles": len(indices),
                        "class_fraction": round(float(mask.mean()), 4),
                        "seconds": round(seconds, 2),
                    }
                    for name, sc in methods.items():
                        row[f"auc_{name}"] = round(roc_auc(mask, np.asarray(sc, float)), 4)
                        row[f"hit_{name}"] = bool(mask[int(np.argmax(sc))])
                        row[f"mass_{name}"] = round(
                            float(np.asarray(sc)[mask].sum() / np.asarray(sc).sum()), 4
                        )
                    rows.append(row)
                    logger.info(
                        "%s %s %s: AUC before %.3f, IG %.3f, random %.3f",
                        entry["stem"], scope, key, row["auc_before"], row["auc_integrated_gradients"], row["auc_random"],
                    )  # fmt: skip

    def agg(name: str, sel: list[dict[str, Any]]) -> dict[str, float]:
        auc = np.array([r[f"auc_{name}"] for r in sel])
        return {
            "mean_auc": round(float(auc.mean()), 4),
            "std_auc": round(float(auc.std()), 4),
            "min_auc": round(float(auc.min()), 4),
            "pointing_game": round(float(np.mean([r[f"hit_{name}"] for r in sel])), 4),
            "mean_mass_on_class": round(float(np.mean([r[f"mass_{name}"] for r in sel])), 4),
        }

    names = ("before", "integrated_gradients", "random")
    groups = {"all": rows} | {s: [r for r in rows if r["scope"] == s] for s in ("slide", "region")}
    groups |= {c: [r for r in rows if r["class"] == c] for c in CLASSES}
    table = {g: {n: agg(n, sel) for n in names} | {"n": len(sel)} for g, sel in groups.items() if sel}
    result = {
        "what": "relevance maps scored against the synthetic world's tissue classes (slides where the class is present)",
        "world": str(args.world),
        "model": "demo",
        "device": "cpu",
        "llm_dtype": str(model.dtype).removeprefix("torch."),
        "steps": steps,
        "mean_class_fraction": round(float(np.mean([r["class_fraction"] for r in rows])), 4),
        "table": table,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_paper_model_cli import merge_summary, write_json

    write_json(args.out, result)
    merge_summary(
        args.summary,
        {
            "evidence_mean_auc": table["all"]["integrated_gradients"]["mean_auc"],
            "evidence_mean_auc_before": table["all"]["before"]["mean_auc"],
        },
    )
    print(f"\nevidence on {args.world} ({len(rows)} questions, demo, CPU, {steps} steps)")
    print(f"{'group':<12} {'n':>3}  " + "  ".join(f"{n + ' AUC':>26} {'hit':>5}" for n in names))
    for g, t in table.items():
        cells = "  ".join(
            f"{t[n]['mean_auc']:>18.3f} ± {t[n]['std_auc']:.3f} {t[n]['pointing_game']:>5.2f}" for n in names
        )
        print(f"{g:<12} {t['n']:>3}  {cells}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
