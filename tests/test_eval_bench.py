"""WSI-Bench loaders and prediction matching, on the real released files and hand-written rows."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from kits.wsi_bench import BENCH, SKIP_REASON, needs_bench

from wsi_llava.errors import WsiLlavaError
from wsi_llava.eval.bench import (
    load_bench,
    load_predictions,
    load_train_slides,
    parse_options,
    task_from_filename,
)
from wsi_llava.eval.tasks import DIAG, MORPH, REGION, REPORT, SYNTH, TREAT


@pytest.fixture(scope="module")
def test_bench():
    if not BENCH.is_dir():
        pytest.skip(SKIP_REASON)
    return load_bench(BENCH / "test")


@needs_bench
def test_real_test_set_counts(test_bench):
    items = test_bench.items
    assert len(items) == 4174
    kinds = Counter(i.kind for i in items)
    assert kinds == {"open": 2838, "close": 1336}
    assert len({i.id for i in items}) == 1517  # ids repeat across tasks; (task, id) does not
    assert len({i.key for i in items}) == 4174
    per_task = Counter(i.task for i in items)
    assert per_task["Specific_Feature_Description"] == 950
    assert per_task["Morphology_choice"] == 682
    assert per_task["1_Report"] == 208
    caps = Counter(i.capability for i in items)
    assert caps == {
        MORPH: 208 + 208 + 593 + 950 + 682,
        DIAG: 208 + 128 + 48 + 191 + 413 + 48 + 145,
        TREAT: 144,
        REPORT: 208,
    }
    close = [i for i in items if i.close]
    assert all(len(i.options) == 4 for i in close if i.answer in "ABCD")
    assert Counter(i.answer for i in close if i.task == "Prognosis_TF_question") == {"No": 39, "Yes": 9}


@needs_bench
def test_jsonl_matches_per_task_files(test_bench):
    """The 2026 JSONL loads to the same (task, id), metadata and question_id as the per-task files."""
    jl = load_bench(BENCH / "WSI-Bench-test.jsonl")
    assert len(jl.items) == 2838
    by_key = test_bench.by_key()
    for it in jl.items:
        ref = by_key[it.key]
        assert (ref.question, ref.answer, ref.metadata, ref.question_id) == (
            it.question,
            it.answer,
            it.metadata,
            it.question_id,
        )
    regional = Counter(i.metadata for i in test_bench.items if i.task == "Regional_Structure_Description")
    assert regional == {"tissue": 204, "cellular": 207, "infiltration": 182}
    assert len(load_bench(BENCH / "WSI-Bench-Report-only.jsonl").items) == 208


@needs_bench
def test_official_predictions_formats(test_bench, tmp_path):
    """model_vqa.py JSONL (question_id + answer) and WSI-Metric CSV map to (task, id)."""
    jl = load_bench(BENCH / "WSI-Bench-test.jsonl")
    vqa = tmp_path / "answers.jsonl"
    with vqa.open("w") as fh:
        for it in jl.items[:50]:
            fh.write(
                json.dumps({"question_id": it.question_id, "image": it.image, "answer": "x " + it.id}) + "\n"
            )
    preds = load_predictions(vqa, test_bench)
    assert len(preds.answers) == 50 and not preds.unmatched
    first = jl.items[0]
    assert preds.answers[first.key] == "x " + first.id
    csv_path = tmp_path / "wsi_metric.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question_id", "model_output", "metadata"])
        for it in jl.items[-30:]:
            w.writerow([it.question_id, "y", it.metadata])
        w.writerow(["Caption_not-a-slide-9_1", "z", "Caption"])
    preds = load_predictions(csv_path, test_bench)
    assert len(preds.answers) == 30 and preds.unmatched == ["Caption_not-a-slide-9_1"]
    # close-ended rows use <task>_<id>_1
    mc = next(i for i in test_bench.items if i.task == "Morphology_choice")
    assert mc.question_id == f"Morphology_choice_{mc.id}_1"


@needs_bench
def test_predictions_matching_nothing_is_an_error(test_bench, tmp_path):
    p = tmp_path / "other.jsonl"
    p.write_text(json.dumps({"question_id": "Caption_elsewhere-1_1", "answer": "a"}) + "\n")
    with pytest.raises(WsiLlavaError, match="none of its 1 rows matches"):
        load_predictions(p, test_bench)
    q = tmp_path / "nokey.jsonl"
    q.write_text(json.dumps({"answer": "a"}) + "\n")
    with pytest.raises(WsiLlavaError, match=r"line 1: needs 'task' and 'id', or 'question_id'"):
        load_predictions(q, test_bench)


@needs_bench
def test_train_slides(test_bench):
    train = load_train_slides([BENCH / "train-partial"])
    assert len(train) > 1000
    staging = {i.slide for i in test_bench.items if i.task == "Staging"}
    assert (
        len(staging & train) >= 131
    )  # reference §4.4: 131 of 191 Staging test slides are in Staging_choice_train


def test_parse_options_and_file_names():
    q = "What is it? A) Adenocarcinoma B) Squamous cell carcinoma, keratinizing type C) T2 NX M0 D) Small cell"
    assert parse_options(q) == {
        "A": "Adenocarcinoma",
        "B": "Squamous cell carcinoma, keratinizing type",
        "C": "T2 NX M0",
        "D": "Small cell",
    }
    assert parse_options("Is the prognosis poor?") == {}
    assert task_from_filename(Path("1_Report_test.json")) == "1_Report"
    assert task_from_filename(Path("Staging_choice_train.json")) == "Staging_choice"
    assert task_from_filename(Path("Region_choice_val.json")) == "Region_choice"
    assert task_from_filename(Path("custom.json")) == "custom"


def _row(i, q, a, **extra):
    return {
        "id": f"slide_000-{i}",
        "image": "slides/slide_000.tif",
        "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
        **extra,
    }


def test_synthetic_world_bench(tmp_path):
    """Our synthetic world: bench/<Task>_<split>.json with metadata, region and annotation_id."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    region = {"region": {"x": 256, "y": 512, "w": 768, "h": 512}, "annotation_id": "ann-3"}
    files = {
        "Report_test.json": [_row(1, "Write a pathology report.", "A benign slide.", metadata="Report")],
        "Region_choice_test.json": [
            _row(
                1,
                "What tissue is in this region? A) Fat B) Stroma C) Tumour D) Necrosis",
                "B",
                metadata="Region",
                **region,
            )
        ],
        "Region_Description_test.json": [
            _row(
                1, "Describe the tissue in this region.", "Stroma: pink fibres.", metadata="Region", **region
            )
        ],
        "Morphology_TF_question_test.json": [_row(1, "Is adipose tissue present?", "Yes", metadata="TF")],
        "Odd_task_test.json": [_row(1, "Anything?", "Something long.", metadata="Whatever")],
    }
    for name, rows in files.items():
        (tmp_path / "bench" / name).write_text(json.dumps(rows))
    bench = load_bench(tmp_path)
    assert bench.root == tmp_path
    by_task = {i.task: i for i in bench.items}
    assert set(by_task) == {
        "1_Report",
        "Region_choice",
        "Region_Description",
        "Morphology_TF_question",
        "Odd_task",
    }
    rc = by_task["Region_choice"]
    assert (rc.kind, rc.capability, rc.answer, rc.options["B"]) == ("close", REGION, "B", "Stroma")
    assert rc.region is not None and (rc.region.x, rc.region.w) == (256, 768) and rc.annotation_id == "ann-3"
    assert by_task["Region_Description"].kind == "open"
    assert (by_task["Morphology_TF_question"].kind, by_task["Morphology_TF_question"].capability) == (
        "close",
        MORPH,
    )
    assert by_task["Odd_task"].capability == SYNTH
    assert by_task["1_Report"].capability == REPORT
    # our JSONL predictions key on (task, id); the synthetic "Report" alias maps to 1_Report
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"task": "Report", "id": "slide_000-1", "answer": "ok"}) + "\n")
    assert load_predictions(p, bench).answers == {("1_Report", "slide_000-1"): "ok"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": 1}', "expected a JSON list of conversation rows"),
        ("[1, 2]", "row 0: expected an object"),
        ('[{"id": "a", "image": "x"}]', "row 0: missing field(s) conversations"),
        (
            '[{"id": "a", "image": "x", "conversations": [{"from": "human", "value": "q"}]}]',
            "row 0: 'conversations' must",
        ),
        (
            '[{"id": "a", "image": "x", "conversations": [{"from": "gpt", "value": "q"}, {"from": "human", "value": "a"}]}]',
            "must start with a 'human'",
        ),
        ("[{", "not valid JSON"),
    ],
)
def test_wrong_shape_bench_file(tmp_path, content, message):
    f = tmp_path / "Grading_test.json"
    f.write_text(content)
    with pytest.raises(WsiLlavaError, match="Grading_test.json") as e:
        load_bench(f)
    assert message in str(e.value)


def test_bad_jsonl_and_duplicates(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"question_id": "Caption_a-1_1", "image": "x.pt", "question": "q"}) + "\n")
    with pytest.raises(WsiLlavaError, match=r"b.jsonl line 1: missing field\(s\) T-answer, metadata"):
        load_bench(f)
    d = tmp_path / "dup"
    d.mkdir()
    row = [_row(1, "q", "a")]
    (d / "Grading_test.json").write_text(json.dumps(row))
    (d / "Grading_train.json").write_text(json.dumps(row))
    with pytest.raises(WsiLlavaError, match="duplicate"):
        load_bench(d)
    assert len(load_bench(d, split="test").items) == 1
    with pytest.raises(WsiLlavaError, match="no such file"):
        load_bench(tmp_path / "missing")


def test_bench_folder_from_the_environment(monkeypatch, tmp_path):
    """A fresh clone without ``../shared`` beside it runs the WSI-Bench tests with $WSI_LLAVA_BENCH_DIR."""
    from kits.wsi_bench import bench_dir

    monkeypatch.setenv("WSI_LLAVA_BENCH_DIR", str(tmp_path / "bench"))
    assert bench_dir() == tmp_path / "bench"
    monkeypatch.delenv("WSI_LLAVA_BENCH_DIR")
    assert bench_dir() == Path(__file__).resolve().parents[2] / "shared/data/wsi-bench"
