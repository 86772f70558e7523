"""Open-ended and region checks of a trained demo model on a held-out synthetic world.

For every held-out slide: do the Histological_Typing / Grading answers name the right diagnosis and
grade, and do Region_Description answers about tumour and stroma regions name the right tissue?
Usage: python training/check_demo.py WORLD_DIR OUT.json [--model demo] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

DIAGNOSES = {
    "adenocarcinoma": ["adenocarcinoma"],
    "squamous cell carcinoma": ["squamous cell carcinoma"],
    "small cell carcinoma": ["small cell carcinoma"],
    "no tumour": ["no tumour", "benign"],
}
TISSUES = {"tumour": "tumour epithelium", "stroma": "fibrous stroma"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("world", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--cache", type=Path, help="cache folder, as on wsi-llava ask")
    ap.add_argument("--cache-dir", dest="cache", type=Path, help=argparse.SUPPRESS)  # its old spelling
    ap.add_argument("--zero-visual", action="store_true", help="blind run: visual tokens zeroed")
    args = ap.parse_args()

    import torch

    from wsi_llava.errors import RegionError
    from wsi_llava.eval.bench import load_bench
    from wsi_llava.model import load_model
    from wsi_llava.session import SlideSession
    from wsi_llava.slide.region import Region
    from wsi_llava.synth.world import load_manifest

    manifest = load_manifest(args.world)
    truth = {Path(s.path).stem: s for s in manifest.slides}
    bench = load_bench(args.world)
    model = load_model(args.model, device="cpu")
    by_slide: dict[str, list] = defaultdict(list)
    for it in bench.items:
        if it.task in ("Histological_Typing", "Grading", "Region_Description"):
            by_slide[it.image].append(it)
    rows = []
    for image, items in sorted(by_slide.items()):
        sess = SlideSession(args.world / image, model, cache_dir=args.cache, device="cpu")
        t = truth[Path(image).stem]
        for it in items:
            region = None
            if it.region is not None:
                r = it.region
                region = Region.rectangle(r.x, r.y, r.w, r.h, id=it.annotation_id)
                gt = it.answer.split(":")[0].strip().lower()
                if gt not in TISSUES.values():
                    continue
            try:
                sess.tiles_for(region)
            except RegionError:
                continue  # a region without tissue tiles cannot be asked about
            if args.zero_visual:
                idx = sess.tiles_for(region)
                vis = torch.zeros_like(sess.visual_tokens(idx))
                answer = model.generate_text(it.question, vis, max_new_tokens=24)
            else:
                answer = sess.ask(it.question, region, max_new_tokens=24, evidence=False).answer
            low = answer.lower()
            if it.task == "Region_Description":
                ok = low.startswith(gt) or (
                    gt in low and not any(o in low for o in TISSUES.values() if o != gt)
                )
                kind = "tumour" if gt.startswith("tumour") else "stroma"
            elif it.task == "Histological_Typing":
                kind = "diagnosis"
                names = DIAGNOSES.get(t.diagnosis, [t.diagnosis])
                others = [n for d, ns in DIAGNOSES.items() if d != t.diagnosis for n in ns]
                ok = any(n in low for n in names) and not any(
                    n in low and not any(n in m for m in names) for n in others
                )
            else:
                kind = "grade"
                m = re.search(r"\bG[1-3]\b", answer)
                ok = m is not None and m.group(0) == t.grade
            rows.append(
                {
                    "slide": image,
                    "task": it.task,
                    "kind": kind,
                    "question": it.question,
                    "answer": answer,
                    "truth": it.answer,
                    "correct": bool(ok),
                }
            )
        sess.close()
    summary = {}
    for kind in ("diagnosis", "grade", "tumour", "stroma"):
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            summary[kind] = {"n": len(sel), "accuracy": round(sum(r["correct"] for r in sel) / len(sel), 4)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
