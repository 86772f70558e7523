"""Close-ended accuracy (messy outputs, majority baselines) and the offline NLU metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from kits.wsi_bench import BENCH, SKIP_REASON

from wsi_llava.eval import nlu
from wsi_llava.eval.accuracy import close_accuracy, majority_answers, parse_choice
from wsi_llava.eval.bench import load_bench


@pytest.fixture(scope="module")
def test_bench():
    if not BENCH.is_dir():
        pytest.skip(SKIP_REASON)
    return load_bench(BENCH / "test")


@pytest.fixture
def no_wordnet(monkeypatch):
    monkeypatch.setenv("WSI_LLAVA_WORDNET", "none")
    nlu.wordnet.cache_clear()
    yield
    nlu.wordnet.cache_clear()


OPTS = {
    "A": "Adenocarcinoma",
    "B": "Squamous cell carcinoma, keratinizing type",
    "C": "Squamous cell carcinoma, non-keratinizing type",
    "D": "Small cell lung carcinoma",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("C", "C"),
        ("c.", "C"),
        ("(B)", "B"),
        ("The answer is (C) squamous cell carcinoma, non-keratinizing type.", "C"),
        ("Answer: D", "D"),
        ("B) Squamous cell carcinoma, keratinizing type", "B"),
        ("A. Adenocarcinoma", "A"),
        ("I would pick option B because of the keratin pearls.", "B"),
        ("A tumour with glands; the correct choice is A", "A"),
        ("It is a squamous cell carcinoma, non-keratinizing type.", "C"),
        ("Adenocarcinoma", "A"),
        ("I cannot tell from this image.", None),
        ("", None),
    ],
)
def test_parse_choice_messy(text, expected):
    assert parse_choice(text, OPTS) == expected


def test_parse_yes_no():
    assert parse_choice("No, the prognosis is favourable.", yes_no=True) == "No"
    assert parse_choice("yes", yes_no=True) == "Yes"
    assert parse_choice("Given the stage, YES: poor.", yes_no=True) == "Yes"
    assert parse_choice("Nobody knows", yes_no=True) is None


def test_ground_truth_accuracy_and_majority(test_bench):
    answers = {it.key: it.answer for it in test_bench.items}
    rep = close_accuracy(test_bench.items, answers)
    assert rep.pooled.n == 1336 and rep.pooled.accuracy == 1.0 and rep.pooled.unparsed == 0
    assert rep.per_task["Prognosis_TF_question"].majority == pytest.approx(0.8125)
    assert rep.per_task["Morphology_choice"].majority == pytest.approx(345 / 682)  # 0.506
    assert round(rep.per_task["Morphology_choice"].majority, 3) == 0.506
    assert round(rep.per_task["Diagnosis_choice"].majority, 3) == 0.513
    maj = majority_answers([i for i in test_bench.items if i.close])
    assert (maj["Prognosis_TF_question"], maj["Morphology_choice"], maj["Diagnosis_choice"]) == (
        "No",
        "B",
        "C",
    )
    # the majority answers scored as predictions give exactly the majority baseline
    as_preds = {it.key: maj[it.task] for it in test_bench.items if it.close}
    rep2 = close_accuracy(test_bench.items, as_preds)
    for _task, cell in rep2.per_task.items():
        assert cell.accuracy == pytest.approx(cell.majority)
    # messy wrappers around the right letter are still right; a missing answer leaves the row out
    messy = {k: f"The answer is ({v})." for k, v in answers.items()}
    first = next(i for i in test_bench.items if i.task == "Staging_choice")
    messy.pop(first.key)
    rep3 = close_accuracy(test_bench.items, messy)
    assert rep3.per_task["Staging_choice"].n == 144 and rep3.per_task["Staging_choice"].accuracy == 1.0
    assert rep3.per_task["Prognosis_TF_question"].accuracy == 1.0  # yes/no rows read "(No)" as No
    wrong = {k: "I am not sure." for k in answers}
    rep4 = close_accuracy(test_bench.items, wrong)
    assert rep4.pooled.accuracy == 0.0 and rep4.pooled.unparsed == 1336


def test_text_only_column(test_bench):
    close = [i for i in test_bench.items if i.task == "Prognosis_TF_question"]
    answers = {i.key: i.answer for i in close}
    text_only = {i.key: "Yes" for i in close}
    rep = close_accuracy(close, answers, text_only_answers=text_only)
    assert rep.per_task["Prognosis_TF_question"].text_only == pytest.approx(9 / 48)


def test_tokenizer_matches_word_tokenize_semantics():
    toks = nlu.tokenize('The tumour (grade III) is 4 cm. It\'s "poorly" differentiated.')
    assert toks == [
        "The",
        "tumour",
        "(",
        "grade",
        "III",
        ")",
        "is",
        "4",
        "cm",
        ".",
        "It",
        "'s",
        "``",
        "poorly",
        "''",
        "differentiated",
        ".",
    ]


def test_ground_truth_bleu_is_one(test_bench, no_wordnet):
    reports = [(i.answer, i.answer) for i in test_bench.items if i.task == "1_Report"][:60]
    s = nlu.nlu_scores(reports)
    assert s.n == 60
    for v in (s.bleu1, s.bleu2, s.bleu3, s.bleu4, s.rouge_l):
        assert v == pytest.approx(1.0, abs=1e-6)
    assert s.meteor > 0.999
    assert "exact+stem only" in s.meteor_variant
    # every open task's ground truth is its own perfect BLEU-4
    firsts = {}
    for it in test_bench.items:
        if not it.close:
            firsts.setdefault(it.task, it)
    for it in firsts.values():
        tok = nlu.tokenize(it.answer)
        assert nlu.bleu(tok, tok, 4) == pytest.approx(1.0)


def test_bleu_rouge_meteor_hand_values(no_wordnet):
    ref = ["a", "cat", "sat", "on", "the", "mat"]
    hyp = ["a", "cat", "sat", "on", "one", "mat"]
    # BLEU-1: 5 of 6 unigrams match, no brevity penalty
    assert nlu.bleu(ref, hyp, 1) == pytest.approx(5 / 6)
    # BLEU-2: bigrams 3/5 match -> sqrt(5/6 * 3/5)
    assert nlu.bleu(ref, hyp, 2) == pytest.approx((5 / 6 * 3 / 5) ** 0.5)
    # ROUGE-L: LCS 5 over 6 and 6 -> F = 5/6
    assert nlu.rouge_l(ref, hyp) == pytest.approx(5 / 6, abs=1e-6)
    assert nlu.rouge_l(ref, []) == 0.0
    # METEOR with exact matches only: P = R = 5/6, 2 chunks over 5 matches
    p = r = 5 / 6
    fmean = p * r / (0.9 * p + 0.1 * r)
    penalty = 0.5 * (2 / 5) ** 3
    assert nlu.meteor(ref, hyp) == pytest.approx(fmean * (1 - penalty), abs=1e-4)
    # stems match without WordNet ("sitting" ~ "sit" fails, "cats" ~ "cat" matches)
    assert nlu.meteor(["cats"], ["cat"]) > 0.4


@pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").is_file(), reason="WordNet files (apt wordnet-base) absent"
)
def test_meteor_uses_wordnet_synonyms(monkeypatch, tmp_path):
    monkeypatch.delenv("WSI_LLAVA_WORDNET", raising=False)
    monkeypatch.setenv("WSI_LLAVA_CACHE", str(tmp_path))
    nlu.wordnet.cache_clear()
    try:
        _, variant = nlu.wordnet()
        assert "WordNet synonyms" in variant
        # nltk matches synonyms of the *stemmed* leftovers: "tumor" -> lemma "tumour" (stem "tumour")
        with_syn = nlu.meteor(["the", "tumour", "is", "large"], ["the", "tumor", "is", "large"])
    finally:
        nlu.wordnet.cache_clear()
    monkeypatch.setenv("WSI_LLAVA_WORDNET", "none")
    without = nlu.meteor(["the", "tumour", "is", "large"], ["the", "tumor", "is", "large"])
    nlu.wordnet.cache_clear()
    assert with_syn > without
