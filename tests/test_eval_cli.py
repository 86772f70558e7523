"""The ``eval`` command end to end: reports, baselines, a judge over HTTP, bad input, resuming."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from kits.wsi_bench import BENCH, needs_bench

from wsi_llava.eval.command import eval_command
from wsi_llava.eval.runner import read_predictions, run_predictions

DATA = Path(__file__).parent / "eval_data"
MINI = DATA / "mini_bench"


@pytest.fixture(autouse=True)
def _no_wordnet(monkeypatch):
    from wsi_llava.eval import nlu

    monkeypatch.setenv(
        "WSI_LLAVA_WORDNET", "none"
    )  # keeps these tests fast; WordNet is tested in test_eval_metrics
    nlu.wordnet.cache_clear()
    yield
    nlu.wordnet.cache_clear()


def run(*args: str):
    return CliRunner().invoke(eval_command, [str(a) for a in args])


def scores(out: Path) -> dict:
    return json.loads((out / "scores.json").read_text())


def test_mini_bench_with_http_judge(server, tmp_path):
    out = tmp_path / "report"
    r = run(
        "--bench",
        MINI,
        "--predictions",
        DATA / "mini_predictions.jsonl",
        "--out",
        out,
        "--judge",
        "openai:rules#cli",
        "--judge-url",
        server,
        "--train",
        DATA / "mini_train.json",
    )
    assert r.exit_code == 0, r.output
    s = scores(out)
    assert s["status"] == "complete" and s["judge"]["name"] == "openai:rules#cli"
    assert s["judge"]["unsupported"] == "zero" and s["judge"]["prompts"] == "built-in"
    p, rr = s["wsi_precision"], s["wsi_relevance"]
    assert p["per_task"]["Global_Morphology_Description"]["mean"] == pytest.approx(0.65)
    assert rr["per_task"]["Global_Morphology_Description"]["mean"] == pytest.approx(0.6)
    assert p["per_metadata"]["Caption"]["mean"] == pytest.approx(0.65)
    assert (p["report"]["mean"], rr["report"]["mean"]) == (0.5, 1.0)
    t2 = s["table2"]
    assert t2["Morphological Analysis"]["wsi_p"] == pytest.approx(0.65)
    assert t2["Diagnosis"]["wsi_r"] == 1.0 and t2["Treatment Planning"]["wsi_p"] == 1.0
    assert t2["Morphological Analysis"]["acc"] == pytest.approx(2 / 3)
    assert t2["Treatment Planning"]["acc_majority"] == pytest.approx(2 / 3)
    assert t2["average"] == pytest.approx((0.65 + 0.6 + 2 / 3 + 0.5 + 1 + 1 + 1 + 1 + 2 / 3) / 9)
    t3 = s["table3"]
    assert (t3["n"], t3["wsi_precision"], t3["wsi_relevance"]) == (1, 0.5, 1.0)
    assert 0 < t3["bleu1"] < 1
    d = s["slide_disjoint"]
    assert (d["test_slides"], d["disjoint_slides"], d["n_items"]) == (3, 2, 9)
    assert d["accuracy"]["pooled"]["accuracy"] == pytest.approx(3 / 5)
    assert d["accuracy"]["pooled"]["majority"] == 1.0
    assert d["wsi_precision"]["overall"]["mean"] == pytest.approx((0.8 + 0.5 + 0.5 + 0.5) / 4)
    md = (out / "report.md").read_text()
    assert "| WSI-LLaVA (paper) | 0.488 | 0.610 | 0.951 |" in md
    assert "judge: openai:rules#cli" in md and "slide-disjoint" in md
    assert (out / "radar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read_predictions(out / "predictions.jsonl")) == 12
    lines = (out / "judgements.jsonl").read_text().splitlines()
    assert len(lines) == 10  # 5 open questions x 2 metrics
    # "ignore" changes only WSI-R
    out2 = tmp_path / "ignore"
    r = run(
        "--bench",
        MINI,
        "--predictions",
        DATA / "mini_predictions.jsonl",
        "--out",
        out2,
        "--judge",
        "openai:rules#cli",
        "--judge-url",
        server,
        "--unsupported",
        "ignore",
        "--nlu",
        "none",
    )
    assert r.exit_code == 0, r.output
    s2 = scores(out2)
    assert s2["wsi_relevance"]["per_task"]["Global_Morphology_Description"]["mean"] == 1.0
    assert s2["wsi_precision"]["per_task"] == s["wsi_precision"]["per_task"]


def test_judge_dies_then_resume(server, tmp_path):
    out = tmp_path / "r"
    name = "ok-then-500:6#resume"
    args = [
        "--bench",
        MINI,
        "--predictions",
        DATA / "mini_predictions.jsonl",
        "--out",
        out,
        "--nlu",
        "none",
        "--judge",
        f"openai:{name}",
        "--judge-url",
        server,
        "--judge-retries",
        "1",
        "--judge-backoff",
        "0.01",
        "--judge-concurrency",
        "1",
    ]
    r = run(*args)
    assert r.exit_code != 0
    assert "HTTP 500" in r.output and "finished and kept" in r.output
    s = scores(out)
    assert s["status"].startswith("incomplete")
    assert s["accuracy"]["pooled"]["n"] == 7  # the metrics that need no judge are there
    assert (out / "predictions.jsonl").is_file()
    urllib.request.urlopen(
        server.replace("/v1", "/heal/" + urllib.parse.quote(name, safe="")), timeout=5
    ).read()
    r = run(*args)
    assert r.exit_code == 0, r.output
    s = scores(out)
    assert s["status"] == "complete" and s["judge"]["cache_hits"] == 6
    assert s["wsi_precision"]["overall"]["n"] == 5


def test_unreachable_judge(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "u"
    r = run(
        "--bench",
        MINI,
        "--predictions",
        DATA / "mini_predictions.jsonl",
        "--out",
        out,
        "--nlu",
        "none",
        "--judge",
        "openai:x",
        "--judge-url",
        f"http://127.0.0.1:{port}/v1",
        "--judge-retries",
        "1",
        "--judge-backoff",
        "0.01",
    )
    assert r.exit_code == 1
    assert "cannot connect" in r.output and "Traceback" not in r.output
    assert scores(out)["status"].startswith("incomplete")


def test_bad_input_messages(tmp_path):
    bad = tmp_path / "bench"
    bad.mkdir()
    (bad / "Grading_test.json").write_text('{"not": "a list"}')
    r = run("--bench", bad, "--baseline", "majority", "--out", tmp_path / "o1")
    assert r.exit_code == 1 and "Grading_test.json: expected a JSON list" in r.output
    other = tmp_path / "p.jsonl"
    other.write_text(json.dumps({"question_id": "Caption_TCGA-nothing-1_1", "answer": "x"}) + "\n")
    r = run("--bench", MINI, "--predictions", other, "--out", tmp_path / "o2")
    assert r.exit_code == 1 and "none of its 1 rows matches a question" in r.output
    r = run("--bench", MINI, "--out", tmp_path / "o3")
    assert r.exit_code == 1 and "nothing to score" in r.output
    r = run("--bench", MINI, "--baseline", "text-only", "--out", tmp_path / "o4")
    assert r.exit_code == 1 and "give --model too" in r.output
    r = run("--bench", MINI, "--baseline", "majority", "--tasks", "Nope", "--out", tmp_path / "o5")
    assert r.exit_code == 1 and "Nope not in the bench" in r.output
    r = run(
        "--bench",
        MINI,
        "--baseline",
        "majority",
        "--judge",
        "openai:x",
        "--judge-url",
        "http://127.0.0.1:9/v1",
        "--prompts",
        tmp_path / "missing",
        "--out",
        tmp_path / "o6",
    )
    assert r.exit_code == 1 and "--prompts" in r.output and "no such folder" in r.output


@needs_bench
def test_real_bench_ground_truth_and_majority(tmp_path):
    gt = tmp_path / "gt.jsonl"
    rows = [json.loads(x) for x in (BENCH / "WSI-Bench-test.jsonl").read_text().splitlines()[:5]]
    # the official model_vqa.py format: question_id + answer
    gt.write_text(
        "".join(json.dumps({"question_id": r["question_id"], "answer": r["T-answer"]}) + "\n" for r in rows)
    )
    out = tmp_path / "gt"
    r = run("--bench", BENCH / "test", "--predictions", gt, "--out", out, "--nlu", "open")
    assert r.exit_code == 0, r.output
    s = scores(out)
    assert (
        s["bench"]["n_items"] == 4174 and s["predictions"]["n"] == 5 and s["predictions"]["missing"] == 4169
    )
    assert all(v["bleu4"] == pytest.approx(1.0) for v in s["nlu"].values())
    out = tmp_path / "maj"
    r = run(
        "--bench",
        BENCH / "test",
        "--baseline",
        "majority",
        "--out",
        out,
        "--nlu",
        "none",
        "--tasks",
        "Prognosis_TF_question,Morphology_choice,Diagnosis_choice",
        "--train",
        BENCH / "train-partial",
    )
    assert r.exit_code == 0, r.output
    acc = scores(out)["accuracy"]["per_task"]
    assert acc["Prognosis_TF_question"]["accuracy"] == 0.8125
    assert round(acc["Morphology_choice"]["accuracy"], 3) == 0.506
    assert round(acc["Diagnosis_choice"]["accuracy"], 3) == 0.513
    assert "majority class 0.510" not in r.output  # pooled over these three files only
    d = scores(out)["slide_disjoint"]
    assert 0 < d["n_items"] < 1143 and d["train_slides"] > 1000


def test_runner_resumes_after_interruption(tmp_path):
    from wsi_llava.eval.bench import load_bench

    bench = load_bench(MINI)
    calls: list[str] = []

    def flaky(item):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(item.id)
        return f"answer to {item.task}/{item.id}"

    out = tmp_path / "predictions.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_predictions(bench.items, out, flaky, "test-model")
    assert len(read_predictions(out)) == 5
    with out.open("a") as fh:
        fh.write('{"task": "Grading", "id": "SLI')  # a line cut by the interruption
    calls.clear()
    answers = run_predictions(
        bench.items, out, lambda it: calls.append(it.id) or f"answer to {it.task}/{it.id}", "test-model"
    )
    assert len(calls) == 7 and len(answers) == 12
    assert all(a == f"answer to {t}/{i}" for (t, i), a in answers.items())
    row = json.loads(out.read_text().splitlines()[0])
    assert {"task", "id", "question_id", "answer", "T-answer", "metadata", "model"} <= set(row)


@pytest.mark.integration
def test_features_and_text_only_with_demo_model(tmp_path):
    """The demo model answers from .pt visual tokens and from zeros (text-only baseline)."""
    import torch

    from wsi_llava.model import load_model

    model = load_model("demo")
    feats = tmp_path / "feats" / "TCGA-XX"
    feats.mkdir(parents=True)
    for slide in ("SLIDE-A", "SLIDE-B", "SLIDE-C"):
        torch.save(
            torch.randn(model.spec.n_visual_tokens, model.spec.projector.in_dim), feats / f"{slide}.pt"
        )
    out = tmp_path / "o"
    args = [
        "--bench",
        MINI,
        "--model",
        "demo",
        "--features",
        tmp_path / "feats",
        "--out",
        out,
        "--tasks",
        "Prognosis_TF_question,Grading",
        "--max-new-tokens",
        "4",
        "--nlu",
        "none",
        "--text-only-column",
    ]
    r = run(*args)
    assert r.exit_code == 0, r.output
    s = scores(out)
    assert s["decoding"]["temperature"] == 0.0 and s["decoding"]["max_new_tokens"] == 4
    assert len(read_predictions(out / "predictions.jsonl")) == 4
    assert s["accuracy"]["per_task"]["Prognosis_TF_question"]["text_only"] is not None
    # another run into the same folder does not reuse the model's answers as its own
    before = (out / "predictions.jsonl").read_bytes()
    for other in (
        ["--baseline", "text-only"],
        ["--temperature", "0.7", "--seed", "1"],
        ["--max-new-tokens", "5"],
    ):
        r = run(*args, *other)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "holds answers of another run (model demo, visual tokens from features" in r.output
        assert (out / "predictions.jsonl").read_bytes() == before
    shutil.rmtree(feats)
    r = run(*args)  # everything answered already: resumes without touching the (now missing) features
    assert r.exit_code == 0, r.output


def test_synthetic_world_bench_and_majority(world, tmp_path):
    """The synthetic world written by wsi_llava.synth loads (region rows keep their box) and scores."""
    from wsi_llava.eval.bench import load_bench

    bench = load_bench(world)
    assert bench.root == world
    regions = [it for it in bench.items if it.task == "Region_choice"]
    assert regions and all(it.region is not None and it.annotation_id for it in regions)
    assert all(it.close and it.capability == "Region" and len(it.options) == 4 for it in regions)
    assert all((world / it.image).is_file() for it in bench.items)
    out = tmp_path / "maj"
    r = run("--bench", world, "--baseline", "majority", "--out", out, "--nlu", "none")
    assert r.exit_code == 0, r.output
    s = scores(out)
    for cell in s["accuracy"]["per_task"].values():
        assert cell["accuracy"] == pytest.approx(cell["majority"])
    assert "Region" in s["accuracy"]["per_capability"]


@pytest.mark.integration
def test_model_on_synthetic_slides(world, tmp_path):
    """Our pipeline end to end: SlideSession per slide, region rows ask about their rectangle."""
    out = tmp_path / "o"
    r = run(
        "--bench",
        world,
        "--model",
        "demo",
        "--out",
        out,
        "--tasks",
        "Region_choice,Report",
        "--limit",
        "2",
        "--max-new-tokens",
        "3",
        "--nlu",
        "report",
        "--cache",
        tmp_path / "cache",
    )
    assert r.exit_code == 0, r.output
    preds = read_predictions(out / "predictions.jsonl")
    assert len(preds) == 4
    assert scores(out)["decoding"] == {"temperature": 0.0, "max_new_tokens": 3, "seed": None}


# --- one --out folder, one run ---------------------------------------------------------------------


def test_baselines_and_predictions_never_replace_another_runs_predictions(tmp_path):
    out = tmp_path / "o"
    r = run("--bench", MINI, "--baseline", "majority", "--out", out, "--nlu", "none")
    assert r.exit_code == 0, r.output
    majority = (out / "predictions.jsonl").read_bytes()
    r = run("--bench", MINI, "--baseline", "majority", "--out", out, "--nlu", "none")  # the same run again
    assert r.exit_code == 0, r.output
    r = run("--bench", MINI, "--predictions", DATA / "mini_predictions.jsonl", "--out", out, "--nlu", "none")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "holds answers of another run (majority baseline)" in r.output and "another --out" in r.output
    assert (out / "predictions.jsonl").read_bytes() == majority
    # the other way round: copied predictions are not replaced by the majority baseline
    other = tmp_path / "p"
    r = run(
        "--bench", MINI, "--predictions", DATA / "mini_predictions.jsonl", "--out", other, "--nlu", "none"
    )
    assert r.exit_code == 0, r.output
    copied = (other / "predictions.jsonl").read_bytes()
    r = run("--bench", MINI, "--baseline", "majority", "--out", other, "--nlu", "none")
    assert r.exit_code == 1 and "answers copied from --predictions" in r.output
    assert (other / "predictions.jsonl").read_bytes() == copied
    # scoring a run's own predictions file again into its folder is how a report is redone
    r = run("--bench", MINI, "--predictions", out / "predictions.jsonl", "--out", out, "--nlu", "none")
    assert r.exit_code == 0, r.output
    assert (out / "predictions.jsonl").read_bytes() == majority


def test_out_that_is_a_file(tmp_path):
    f = tmp_path / "report.txt"
    f.write_text("mine")
    r = run("--bench", MINI, "--baseline", "majority", "--out", f)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"--out {f}: is a file" in r.output and f.read_text() == "mine"
    r = run("--bench", MINI, "--baseline", "majority", "--out", f / "sub")
    assert r.exit_code == 1 and "cannot create the folder" in r.output and "Traceback" not in r.output


def test_duplicate_prediction_rows_are_counted(tmp_path, caplog):
    rows = (DATA / "mini_predictions.jsonl").read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join([*rows, rows[0], rows[2]]) + "\n")
    out = tmp_path / "o"
    with caplog.at_level("WARNING", logger="wsi_llava.eval.bench"):
        r = run("--bench", MINI, "--predictions", dup, "--out", out, "--nlu", "none")
    assert r.exit_code == 0, r.output
    warned = [x for x in caplog.records if "earlier row already answered" in x.getMessage()]
    assert len(warned) == 1 and ": 2 rows answer a question" in warned[0].getMessage()
    assert scores(out)["predictions"]["duplicates"] == 2
    assert "2 duplicate rows" in (out / "report.md").read_text()


@pytest.mark.parametrize("model", ["garbage#all", "bools#all"])
def test_a_judge_that_never_gives_a_score_fails_the_run(server, tmp_path, model):
    out = tmp_path / "o"
    r = run(
        "--bench",
        MINI,
        "--predictions",
        DATA / "mini_predictions.jsonl",
        "--out",
        out,
        "--nlu",
        "none",
        "--judge",
        f"openai:{model}",
        "--judge-url",
        server,
        "--parse-retries",
        "0",
    )
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"judge openai:{model} at {server}/chat/completions gave no usable reply for WSI-P" in r.output
    assert "all 5 questions failed; unparsable: 5" in r.output
    s = scores(out)
    assert s["status"].startswith("failed: ") and s["accuracy"]["pooled"]["n"] == 7


def test_majority_report_rows_radar_promise_and_template_note(server, tmp_path):
    out = tmp_path / "o"
    r = run("--bench", MINI, "--baseline", "majority", "--out", out)
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    table2 = md.split("## Table 2")[1].split("##")[0]
    rows = [line for line in table2.splitlines() if line.startswith("| ") and "Model" not in line]
    assert [row.split(" | ")[0] for row in rows] == ["| majority class", "| WSI-LLaVA (paper)"]
    assert "constant template answer" in md and "reward the template text" in md
    assert not (out / "radar.png").exists() and "(radar.png needs --judge)" in r.output
    helped = " ".join(CliRunner().invoke(eval_command, ["--help"]).output.split())
    assert "OUT/radar.png (with --judge: per-task WSI-P / WSI-R)" in helped
    # with a judge the radar is written; scored again without one, the stale chart goes
    judged = tmp_path / "j"
    args = ["--bench", MINI, "--predictions", DATA / "mini_predictions.jsonl", "--nlu", "none"]
    r = run(*args, "--out", judged, "--judge", "openai:rules#radar", "--judge-url", server)
    assert r.exit_code == 0, r.output
    assert (judged / "radar.png").is_file() and "radar.png" in r.output
    r = run("--bench", MINI, "--predictions", judged / "predictions.jsonl", "--out", judged, "--nlu", "none")
    assert r.exit_code == 0, r.output
    assert not (judged / "radar.png").exists()


@pytest.mark.parametrize("flag", ["--cache", "--cache-dir"])
def test_model_loads_under_the_cache(tmp_path, monkeypatch, flag):
    """``--cache`` (or its old spelling ``--cache-dir``) covers what loading the model writes, not only features."""
    import wsi_llava.model as model_pkg
    from wsi_llava.errors import WsiLlavaError
    from wsi_llava.settings import cache_dir

    seen = []

    def load_model(*_a, **_k):
        seen.append(cache_dir())
        raise WsiLlavaError("stop after recording where the model would cache")

    monkeypatch.setattr(model_pkg, "load_model", load_model)
    out, cache = tmp_path / "o", tmp_path / "cache"
    r = run("--bench", MINI, "--model", "demo", "--features", tmp_path, "--out", out, flag, cache)
    assert r.exit_code != 0 and "stop after recording" in r.output
    assert seen == [cache]


def test_cache_dir_is_hidden_and_conflicts_are_refused(tmp_path):
    """``eval --help`` shows ``--cache`` only; two different folders through both spellings are refused."""
    assert "--cache-dir" not in run("--help").output
    r = run(
        "--bench",
        MINI,
        "--model",
        "demo",
        "--out",
        tmp_path / "o",
        "--cache",
        tmp_path / "a",
        "--cache-dir",
        tmp_path / "b",
    )
    assert r.exit_code != 0 and "give --cache only" in r.output
