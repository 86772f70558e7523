"""BLEU-1..4, ROUGE-L and METEOR with the semantics of the official ``NLP_Metric.py``, fully offline.

- Tokens: ``nltk.word_tokenize`` semantics (case kept) without the punkt download: sentences are split
  by an *untrained* ``PunktSentenceTokenizer`` (no abbreviation list, so a period after an
  abbreviation such as "approx." may split one token differently from the trained English model),
  then each sentence goes through ``NLTKWordTokenizer``, exactly as ``word_tokenize`` does.
- BLEU-n: cumulative sentence BLEU, weights ``(1/n,)*n``, smoothing method 4, averaged over samples.
- ROUGE-L: the ``rouge`` package's F score on the space-joined tokens.
- METEOR: ``nltk.translate.meteor_score.single_meteor_score`` (exact, Porter-stem and WordNet synonym
  stages). WordNet comes from nltk's data folder or the Debian/Ubuntu ``wordnet-base`` files
  (``/usr/share/wordnet``, or the folder in ``$WSI_LLAVA_WORDNET``); without one (or with
  ``WSI_LLAVA_WORDNET=none``) the synonym stage is skipped (exact + stem matching only) and
  ``meteor_variant`` says so in the scores.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from wsi_llava.errors import WsiLlavaError

logger = logging.getLogger(__name__)

#: WordNet 3.0 lexicographer file names (the ``lexnames`` file, which the Debian package lacks).
_LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]
_POS_NUM = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
_WN_FILES = (
    "data.noun",
    "index.noun",
    "data.verb",
    "index.verb",
    "data.adj",
    "index.adj",
    "data.adv",
    "index.adv",
)


def _require_nltk():
    try:
        import nltk  # noqa: F401
    except ImportError:
        raise WsiLlavaError("NLU metrics need nltk and rouge: pip install nltk rouge") from None


@functools.lru_cache(maxsize=1)
def _tokenizers():
    _require_nltk()
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(), NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` semantics without downloaded data (see the module docstring)."""
    sent, word = _tokenizers()
    return [tok for s in sent.tokenize(text) for tok in word.tokenize(s)]


class _NoWordNet:
    """Stands in for WordNet: no synonyms, so METEOR uses exact and stem matches only."""

    def synsets(self, *args: object, **kwargs: object) -> list:
        return []


NO_WORDNET = "nltk single_meteor_score (exact+stem only: no WordNet, synonym stage skipped)"


def _wordnet30_reader(base: type, root: Path):
    """A reader of plain WordNet 3.0 files (the version nltk's own ``wordnet`` corpus is)."""

    class WordNet30(base):
        def map_wn(self, version: str = "wordnet"):  # already 3.0: no mapping to another version
            return None

    return WordNet30(str(root), None)


def _wordnet_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("WSI_LLAVA_WORDNET"):
        dirs.append(Path(os.environ["WSI_LLAVA_WORDNET"]))
    dirs.append(Path("/usr/share/wordnet"))
    return dirs


@functools.lru_cache(maxsize=1)
def wordnet():
    """``(reader, variant)``: a WordNet reader for METEOR's synonym stage, or a stand-in without one."""
    _require_nltk()
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if os.environ.get("WSI_LLAVA_WORDNET", "").lower() == "none":
        return _NoWordNet(), NO_WORDNET
    try:
        found = nltk.data.find("corpora/wordnet")
        return WordNetCorpusReader(found, None), "nltk single_meteor_score (exact+stem+WordNet synonyms)"
    except LookupError:
        pass
    except Exception as e:  # a broken nltk data folder: try the system files
        logger.info("nltk WordNet unusable: %s", e)
    for d in _wordnet_dirs():
        if not all((d / f).is_file() for f in _WN_FILES):
            continue
        root = d
        if not (d / "lexnames").is_file():
            from wsi_llava.settings import cache_dir

            root = cache_dir() / "wordnet"
            root.mkdir(parents=True, exist_ok=True)
            for f in d.iterdir():  # a copy: nltk refuses symlinks that leave its data folder
                target = root / f.name
                if f.is_file() and not target.exists():
                    tmp = target.with_suffix(target.suffix + ".part")
                    shutil.copyfile(f, tmp)
                    tmp.replace(target)
            if not (root / "lexnames").exists():
                lines = [f"{i:02d}\t{n}\t{_POS_NUM[n.split('.')[0]]}" for i, n in enumerate(_LEXNAMES)]
                (root / "lexnames").write_text("\n".join(lines) + "\n")
        for trusted in (str(root), str(d.resolve())):  # nltk only reads data under its data paths
            if trusted not in nltk.data.path:
                nltk.data.path.append(trusted)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "multilingual functions not available"
                reader = _wordnet30_reader(WordNetCorpusReader, root)
            reader.synsets("tumour")
            return reader, f"nltk single_meteor_score (exact+stem+WordNet synonyms, {d})"
        except Exception as e:
            logger.warning("WordNet at %s unusable (%s)", d, e)
    logger.warning("no WordNet found: METEOR uses exact and stem matching only (apt install wordnet-base)")
    return _NoWordNet(), NO_WORDNET


def bleu(ref: Sequence[str], hyp: Sequence[str], n: int) -> float:
    """Cumulative sentence BLEU-n with smoothing method 4 (the official script's call)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return float(
        sentence_bleu(
            [list(ref)], list(hyp), weights=(1.0 / n,) * n, smoothing_function=SmoothingFunction().method4
        )
    )


def rouge_l(ref: Sequence[str], hyp: Sequence[str]) -> float:
    """ROUGE-L F of the ``rouge`` package on space-joined tokens (0 for an empty side)."""
    try:
        from rouge import Rouge
    except ImportError:
        raise WsiLlavaError("ROUGE-L needs the rouge package: pip install rouge") from None
    h, r = " ".join(hyp), " ".join(ref)
    if not h.strip() or not r.strip():
        return 0.0
    return float(Rouge(metrics=["rouge-l"]).get_scores(h, r)[0]["rouge-l"]["f"])


def meteor(ref: Sequence[str], hyp: Sequence[str]) -> float:
    """nltk METEOR (see :func:`wordnet` for the synonym stage)."""
    from nltk.translate.meteor_score import single_meteor_score

    wn, _ = wordnet()
    return float(single_meteor_score(list(ref), list(hyp), wordnet=wn))


class NluScores(BaseModel):
    """Mean sentence-level scores over ``n`` question/answer pairs."""

    n: int
    bleu1: float
    bleu2: float
    bleu3: float
    bleu4: float
    rouge_l: float
    meteor: float
    meteor_variant: str = Field("", description="which METEOR matching stages ran")


def nlu_scores(pairs: Sequence[tuple[str, str]]) -> NluScores | None:
    """Average BLEU-1..4 / ROUGE-L / METEOR over ``(reference, hypothesis)`` pairs; None when empty."""
    if not pairs:
        return None
    sums = dict.fromkeys(("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "meteor"), 0.0)
    for ref_text, hyp_text in pairs:
        ref, hyp = tokenize(ref_text), tokenize(hyp_text)
        for n in range(1, 5):
            sums[f"bleu{n}"] += bleu(ref, hyp, n) if hyp else 0.0
        sums["rouge_l"] += rouge_l(ref, hyp)
        sums["meteor"] += meteor(ref, hyp) if hyp else 0.0
    k = len(pairs)
    return NluScores(n=k, meteor_variant=wordnet()[1], **{m: v / k for m, v in sums.items()})
