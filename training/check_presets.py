"""The questions our front ends ask, checked on a held-out synthetic world, as the front ends ask them.

Region questions go through ``SlideSession.ask`` with the world's QuPath GeoJSON polygons (the tiles
whose centres lie in the polygon, as napari, QuPath and ``wsi-llava describe`` select them); slide
questions cover every tile. Each answer is judged by string rules against the world's ground truth:

* class mentions: ``tumour/tumor`` (not followed by ``necrosis``), ``strom*``, ``necro*`` (``tumour
  necrosis`` counts as necrosis), ``lymphocyt*`` or ``immune cells``, ``adipo*`` or ``fat``. A mention is
  negated, and ignored, when ``no``, ``not``, ``without`` or ``nor`` precedes it in the same clause with at
  most one word between (``no significant lymphocytic infiltrate``).
* region, every question: the first class mentioned is the annotation's class and no other class is
  mentioned; ``yes/no`` questions (tumour?, necrosis?) must also open with the right word (Yes exactly when
  the annotation is tumour, resp. necrosis). Tumour regions asked for the diagnosis or the grade must also
  name the slide's diagnosis (as below) or grade (``G1``-``G3``), reported apart as ``fact``.
* slide, tissue questions (describe, tissue types): the set of classes mentioned is the slide's set.
* slide, diagnosis: the slide's diagnosis is named (``no tumour`` also as ``benign``) and no other one is.
* slide, grade: the first ``G1``-``G3`` is the slide's grade; a slide without tumour must name no grade
  and say ``no tumour`` (or ``not applicable`` / ``benign``).
* slide, yes/no: the first ``yes``/``no`` word is the truth (tumour present, resp. necrosis present).
* slide, "tissue types and diagnosis": both the tissue rule and the diagnosis rule.

Usage: python training/check_presets.py WORLD_DIR OUT.json [--model demo] [--device cpu] [--cache DIR] [--slides N]
       [--stems slide_011,...] [--time-limit SECONDS]
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

logger = logging.getLogger("check_presets")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("tumour", "stroma", "necrosis", "lymphocytes", "fat")
#: the acceptance rule: every region question names the right class for each of these at >= THRESHOLD
REQUIRED = ("tumour", "stroma", "necrosis", "lymphocytes")
THRESHOLD = 0.9
DIAGNOSES = {
    "adenocarcinoma": ["adenocarcinoma"],
    "squamous cell carcinoma": ["squamous cell carcinoma"],
    "small cell carcinoma": ["small cell carcinoma"],
    "no tumour": ["no tumour", "benign"],
}
_TERMS = re.compile(
    r"(?P<necrosis>\btumou?r necrosis\b|\bnecro\w*)|(?P<tumour>\btumou?r\b)|(?P<stroma>\bstrom\w*)"
    r"|(?P<lymphocytes>\blymphocyt\w*|\bimmune cells?\b)|(?P<fat>\badipo\w*|\bfat\b)"
)
_NEGATION = re.compile(r"\b(?:no|not|without|nor)\s+(?:[\w-]+\s+)?$")
_CLAUSE_END = re.compile(r"[.:;,!?()]")
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_GRADE = re.compile(r"\bG[1-3]\b")


# --- the questions ---------------------------------------------------------------------------------
def _literal(path: Path, name: str) -> Any:
    """The value of a top-level ``NAME = <literal>`` in a module, read without importing it (no Qt)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise LookupError(f"{path}: no top-level {name} = <literal>")


def front_end_questions() -> dict[str, list[tuple[str, str]]]:
    """``{"region": [(question, where it comes from)], "slide": [...]}``: each front end's own strings."""
    presets = _literal(ROOT / "napari_wsi_llava" / "_widget.py", "PRESETS")
    region: list[tuple[str, str]] = [(q, f"napari preset {k!r}") for k, q in presets.items()]
    slide: list[tuple[str, str]] = [(q, f"napari preset {k!r}, whole slide") for k, q in presets.items()]
    region += [
        (_literal(ROOT / "core" / "wsi_llava" / "describe.py", "DEFAULT_QUESTION"), "wsi-llava describe"),
        (_literal(ROOT / "qupath_ext" / "wsi_llava_qupath" / "commands.py", "DESCRIBE_QUESTION"), "qupath"),
        (_literal(ROOT / "core" / "wsi_llava" / "demo.py", "REGION_QUESTION"), "wsi-llava demo"),
        ("Describe this region.", "README tour"),
        ("What tissue is this?", "README tour"),
        ("Is there necrosis?", "README (qupath ask --selected)"),
        ("What is in this region?", "paraphrase"),
    ]
    slide += [
        (_literal(ROOT / "core" / "wsi_llava" / "demo.py", "SLIDE_QUESTION"), "wsi-llava demo"),
        ("What tissue types are present?", "README tour"),
        ("What is the diagnosis?", "README tour"),
    ]

    def dedupe(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Each question once, with every place that asks it."""
        seen: dict[str, list[str]] = {}
        for q, src in items:
            seen.setdefault(q, []).append(src)
        return [(q, "; ".join(srcs)) for q, srcs in seen.items()]

    return {"region": dedupe(region), "slide": dedupe(slide)}


def question_kind(question: str) -> str:
    """What a question asks for: ``tumour?``, ``necrosis?``, ``diagnosis``, ``grade``, ``tissue`` or both."""
    q = question.lower()
    if q.startswith(("is there", "are there", "does", "is ")):
        return "necrosis?" if "necro" in q else "tumour?"
    if "grade" in q:
        return "grade"
    if "diagnosis" in q and "tissue" in q:
        return "tissue+diagnosis"
    if "diagnosis" in q:
        return "diagnosis"
    return "tissue"


# --- judging ---------------------------------------------------------------------------------------
def class_mentions(text: str) -> list[str]:
    """Tissue classes the text names, in order, negated mentions left out."""
    low = text.lower()
    out = []
    for m in _TERMS.finditer(low):
        before = low[: m.start()]
        cut = max((c.end() for c in _CLAUSE_END.finditer(before)), default=0)
        if _NEGATION.search(before[cut:]):
            continue
        out.append(m.lastgroup or "")
    return out


def _yes_no(text: str) -> str | None:
    """The first ``yes`` / ``no`` word of the text, lower-cased (None without one)."""
    m = _YES_NO.search(text)
    return m.group(1).lower() if m else None


def diagnosis_ok(answer: str, diagnosis: str) -> bool:
    """The answer names ``diagnosis`` and no other diagnosis."""
    low = answer.lower()
    names = DIAGNOSES.get(diagnosis, [diagnosis])
    others = [n for d, ns in DIAGNOSES.items() if d != diagnosis for n in ns]
    return any(n in low for n in names) and not any(
        n in low and not any(n in m for m in names) for n in others
    )


def grade_ok(answer: str, grade: str) -> bool:
    """The first ``G1``-``G3`` is ``grade``; without tumour, no grade and ``no tumour`` (or the like)."""
    m = _GRADE.search(answer)
    if grade in ("G1", "G2", "G3"):
        return m is not None and m.group(0) == grade
    low = answer.lower()
    return m is None and any(w in low for w in ("no tumour", "no tumor", "not applicable", "benign"))


def judge_region(answer: str, kind: str, cls: str, slide: Any) -> dict[str, bool | None]:
    """``tissue`` (the class rule, with the yes/no word where asked) and ``fact`` (diagnosis/grade)."""
    mentions = class_mentions(answer)
    tissue = bool(mentions) and mentions[0] == cls and set(mentions) == {cls}
    if kind in ("tumour?", "necrosis?"):
        want = "yes" if cls == kind[:-1] else "no"
        tissue = tissue and _yes_no(answer) == want
    fact: bool | None = None
    if cls == "tumour" and kind in ("diagnosis", "tissue+diagnosis"):
        fact = diagnosis_ok(answer, slide.diagnosis)
    elif cls == "tumour" and kind == "grade":
        fact = grade_ok(answer, slide.grade)
    return {"tissue": tissue, "fact": fact, "correct": tissue and fact is not False}


def judge_slide(answer: str, kind: str, slide: Any) -> dict[str, bool | None]:
    """``correct`` by the slide rule of ``kind``; ``tissue`` for the questions that ask for tissue."""
    truth = set(slide.tissue_types)
    tissue_ok = set(class_mentions(answer)) == truth
    if kind == "tissue":
        ok = tissue_ok
    elif kind == "tissue+diagnosis":
        ok = tissue_ok and diagnosis_ok(answer, slide.diagnosis)
    elif kind == "diagnosis":
        ok = diagnosis_ok(answer, slide.diagnosis)
    elif kind == "grade":
        ok = grade_ok(answer, slide.grade)
    else:
        present = slide.diagnosis != "no tumour" if kind == "tumour?" else slide.necrosis
        ok = _yes_no(answer) == ("yes" if present else "no")
    return {"tissue": tissue_ok if "tissue" in kind else None, "fact": None, "correct": ok}


def region_class(region: Any) -> str | None:
    """The synthetic class key of an annotation (by its QuPath classification), None if unknown."""
    from wsi_llava.synth.labels import TISSUE_CLASSES

    cls = region.properties.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else None
    by_name = {c.qupath_name: c.key for c in TISSUE_CLASSES.values()}
    return by_name.get(name)


# --- the run ---------------------------------------------------------------------------------------
def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scope, question and truth group: n, fraction correct (and of the tissue / fact rules)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["scope"], r["question"], r["group"])].append(r)
    table: dict[str, dict[str, dict[str, Any]]] = {"region": {}, "slide": {}}
    for (scope, q, g), sel in sorted(groups.items()):
        cell: dict[str, Any] = {"n": len(sel), "correct": round(sum(r["correct"] for r in sel) / len(sel), 4)}
        for key in ("tissue", "fact"):
            vals = [r[key] for r in sel if r[key] is not None]
            if vals and key == "fact":
                cell[key] = round(sum(vals) / len(vals), 4)
        table[scope].setdefault(q, {})[g] = cell
    cells = [c for per_q in table.values() for per_g in per_q.values() for c in per_g.values()]
    required = [c for per_g in table["region"].values() for g, c in per_g.items() if g in REQUIRED]
    seen = {g for per_g in table["region"].values() for g in per_g}
    region_min = min((c["correct"] for c in required), default=None)
    return {
        "acceptance": {
            "rule": f"every region question, each of {', '.join(REQUIRED)}: correct >= {THRESHOLD}",
            "region_min_correct": region_min,
            "missing_classes": [g for g in REQUIRED if g not in seen],
            "passed": region_min is not None and region_min >= THRESHOLD and seen >= set(REQUIRED),
        },
        "table": table,
        "min_correct": min((c["correct"] for c in cells), default=None),
        "cells": len(cells),
        "answers": len(rows),
    }


def main() -> None:
    from wsi_llava.settings import DTYPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, help="the LLM's dtype (default: as on wsi-llava ask)")
    ap.add_argument("--cache", type=Path, help="cache folder, as on wsi-llava ask")
    ap.add_argument("--cache-dir", dest="cache", type=Path, help=argparse.SUPPRESS)  # its old spelling
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's (as front ends)")
    ap.add_argument("--slides", type=int, default=None, help="only the first N slides")
    ap.add_argument(
        "--stems",
        default=None,
        help="only these slides, in this order, comma-separated (slide_011,slide_004)",
    )
    ap.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="start no slide after this many seconds (partial table)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from wsi_llava.errors import RegionError
    from wsi_llava.model import load_model
    from wsi_llava.session import SlideSession
    from wsi_llava.slide.geojson import read_geojson
    from wsi_llava.synth.world import load_manifest

    questions = front_end_questions()
    manifest = load_manifest(args.world)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"evidence": False}
    if args.max_new_tokens:
        kw["max_new_tokens"] = args.max_new_tokens
    stopped_at: str | None = None
    entries = manifest.slides[: args.slides]
    if args.stems:
        wanted = args.stems.split(",")
        unknown = sorted(set(wanted) - {e.stem for e in manifest.slides})
        if unknown:
            ap.error(f"--stems: {', '.join(unknown)} not in {args.world / 'manifest.json'}")
        by_stem = {e.stem: e for e in entries}
        entries = [by_stem[w] for w in dict.fromkeys(wanted) if w in by_stem]  # in the order asked
    for entry in entries:
        if args.time_limit is not None and time.perf_counter() - t0 > args.time_limit:
            stopped_at = entry.stem
            logger.warning("time limit %.0f s: stopping before %s", args.time_limit, entry.stem)
            break
        regions = read_geojson(args.world / entry.annotations)
        with SlideSession(args.world / entry.path, model, cache_dir=args.cache, device=args.device) as s:
            for q, _src in questions["slide"]:
                kind = question_kind(q)
                answer = s.ask(q, None, **kw).answer
                rows.append(
                    {
                        "slide": entry.stem,
                        "scope": "slide",
                        "group": entry.diagnosis,
                        "region": None,
                        "question": q,
                        "kind": kind,
                        "answer": answer,
                        **judge_slide(answer, kind, entry),
                    }
                )
            for region in regions:
                cls = region_class(region)
                if cls is None:
                    continue
                try:
                    s.tiles_for(region)
                except RegionError as e:
                    skipped.append(f"{entry.stem} {region.name}: {e}")
                    continue
                for q, _src in questions["region"]:
                    kind = question_kind(q)
                    answer = s.ask(q, region, **kw).answer
                    rows.append(
                        {
                            "slide": entry.stem,
                            "scope": "region",
                            "group": cls,
                            "region": region.name,
                            "question": q,
                            "kind": kind,
                            "answer": answer,
                            **judge_region(answer, kind, cls, entry),
                        }
                    )
        logger.info("%s done (%d answers, %.0f s)", entry.stem, len(rows), time.perf_counter() - t0)
    summary = summarise(rows)
    out = {
        "world": str(args.world),
        "model": str(args.model),
        "dtype": str(model.dtype).removeprefix("torch."),
        "questions": {
            scope: [{"question": q, "from": src} for q, src in qs] for scope, qs in questions.items()
        },
        "rules": __doc__.split("\n\n")[1].strip(),
        **summary,
        "skipped_regions": skipped,
        "stopped_before": stopped_at,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    acc = summary["acceptance"]
    logger.info(
        "region min correct %s (passed: %s); min over all %d cells %s; wrote %s",
        acc["region_min_correct"],
        acc["passed"],
        summary["cells"],
        summary["min_correct"],
        args.out,
    )


if __name__ == "__main__":
    main()
