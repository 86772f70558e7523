"""The prediction runner: rows it cannot answer are recorded; resuming keeps one run per file, whole rows only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from wsi_llava.errors import RegionError, WsiLlavaError
from wsi_llava.eval.bench import load_bench
from wsi_llava.eval.runner import Decoding, RunInfo, read_predictions, run_predictions

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


# --- resuming: one file, one run ---------------------------------------------------------------------

RUN = RunInfo(source="model", model="demo", visual="features", decoding=Decoding())


def _answer(item) -> str:
    return f"answer to {item.task}/{item.id}"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_resume_refuses_the_rows_of_another_run(tmp_path):
    items = load_bench(MINI).items
    out = tmp_path / "predictions.jsonl"
    run_predictions(items[:5], out, _answer, "demo", run=RUN)
    before = out.read_bytes()
    assert all(r["run"] == RUN.model_dump(mode="json") for r in _rows(out))
    others = [
        RunInfo(source="model", model="demo", visual="zero", baseline="text-only", decoding=Decoding()),
        RunInfo(source="model", model="demo", visual="features", decoding=Decoding(temperature=0.7, seed=1)),
        RunInfo(source="model", model="/models/other", visual="features", decoding=Decoding()),
    ]
    calls: list[str] = []
    for other in others:
        with pytest.raises(WsiLlavaError) as e:
            run_predictions(items, out, lambda it: calls.append(it.id) or "x", "demo", run=other)
        msg = str(e.value)
        assert f"{out}: holds answers of another run (model demo, visual tokens from features" in msg
        assert other.describe() in msg and "another --out" in msg
        assert calls == [] and out.read_bytes() == before  # nothing asked, nothing written
    # the same run resumes
    got = run_predictions(items, out, lambda it: calls.append(it.id) or _answer(it), "demo", run=RUN)
    assert len(calls) == len(items) - 5 and len(got) == len(items)


def test_resume_refuses_answers_to_other_questions_and_foreign_rows(tmp_path):
    items = load_bench(MINI).items
    out = tmp_path / "predictions.jsonl"
    run_predictions(items[:3], out, _answer, "demo", run=RUN)
    rows = _rows(out)
    rows[1]["question"] = "Another bench's question?"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(WsiLlavaError, match=r"is to another question than the bench's"):
        run_predictions(items, out, _answer, "demo", run=RUN)
    official = tmp_path / "official.jsonl"  # model_vqa.py rows: no task/id of ours
    official.write_text(json.dumps({"question_id": "Caption_X_1", "text": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(WsiLlavaError, match=r"holds rows that are not wsi-llava predictions \(line 1"):
        run_predictions(items, official, _answer, "demo", run=RUN)
    assert len(official.read_text().splitlines()) == 1


def test_truncated_last_line_is_dropped_and_reported(tmp_path, caplog):
    items = load_bench(MINI).items
    out = tmp_path / "predictions.jsonl"
    run_predictions(items[:5], out, _answer, "demo", run=RUN)
    with out.open("a", encoding="utf-8") as fh:
        fh.write('{"task": "Grading", "id": "SLI')  # the row being written when the run was killed
    with caplog.at_level(logging.WARNING, logger="wsi_llava.eval.runner"):
        got = run_predictions(items, out, _answer, "demo", run=RUN)
    assert "dropped a truncated last line (30 bytes" in caplog.text
    rows = _rows(out)  # every line is a whole row: nothing glued onto the fragment
    assert len(rows) == len(items) == len(got) and len(read_predictions(out)) == len(items)
    # a complete last row that only lacks its newline is kept
    short = tmp_path / "short.jsonl"
    run_predictions(items[:2], short, _answer, "demo", run=RUN)
    short.write_bytes(short.read_bytes().rstrip(b"\n"))
    calls: list[str] = []
    run_predictions(items[:4], short, lambda it: calls.append(it.id) or _answer(it), "demo", run=RUN)
    assert len(calls) == 2 and len(_rows(short)) == 4


def test_duplicate_rows_are_reported_once_with_their_count(tmp_path, caplog):
    items = load_bench(MINI).items
    out = tmp_path / "predictions.jsonl"
    run_predictions(items[:4], out, _answer, "demo", run=RUN)
    rows = _rows(out)
    out.write_text(
        "".join(json.dumps(r) + "\n" for r in [*rows, rows[0], rows[1], rows[1]]), encoding="utf-8"
    )
    with caplog.at_level(logging.WARNING, logger="wsi_llava.eval.runner"):
        run_predictions(items[:4], out, _answer, "demo", run=RUN)
    found = [r for r in caplog.records if "repeat a question" in r.getMessage()]
    assert len(found) == 1 and "3 rows repeat a question" in found[0].getMessage()
