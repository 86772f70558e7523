"""The prediction runner records a row it cannot answer (a region without tissue) and goes on."""

from __future__ import annotations

import json
from pathlib import Path

from wsi_llava.errors import RegionError
from wsi_llava.eval.bench import load_bench
from wsi_llava.eval.runner import read_predictions, run_predictions

MINI = Path(__file__).parent / "eval_data" / "mini_bench"


def test_region_error_is_recorded_and_the_rest_answered(tmp_path):
    items = load_bench(MINI).items[:4]
    bad = items[1].key

    def answer(item):
        if item.key == bad:
            raise RegionError("region 'Fat 1' contains no tissue tiles")
        return "A"

    out = tmp_path / "predictions.jsonl"
    got = run_predictions(items, out, answer, "test-model")
    assert got[bad] == "" and all(got[it.key] == "A" for it in items if it.key != bad)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] for r in rows if "error" in r] == ["region 'Fat 1' contains no tissue tiles"]
    assert len(read_predictions(out)) == 4  # a re-run does not ask again
