"""Reports and WSI-Bench-format questions generated from a slide's labels and regions.

Every sentence states something drawn in the slide; templates vary wording, never facts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_llava.synth.labels import (
    FAT,
    LYMPHOCYTES,
    NECROSIS,
    STROMA,
    TISSUE_CLASSES,
    TUMOUR,
    SlideLabels,
)

LETTERS = "ABCD"

# --- morphology phrases -------------------------------------------------------------------------

_ARCH = {
    (
        "glands",
        "G1",
    ): "regular, well-formed round glands lined by a single layer of cuboidal cells around open lumens",
    ("glands", "G2"): "irregular, angulated glands of varying size and shape with distorted lumens",
    ("glands", "G3"): "predominantly solid sheets of tumour cells with only a few residual glands",
    (
        "sheets",
        "G1",
    ): "nests of squamous cells with abundant eosinophilic cytoplasm, distinct cell borders and numerous keratin pearls",
    (
        "sheets",
        "G2",
    ): "sheets and nests of squamous cells with distinct cell borders and occasional keratin pearls",
    ("sheets", "G3"): "solid sheets of squamous cells with few keratin pearls",
}
_NUCLEI = {
    "G1": "small, uniform nuclei with mild pleomorphism",
    "G2": "enlarged nuclei with moderate pleomorphism",
    "G3": "large, hyperchromatic nuclei with marked pleomorphism",
}
_CLASS_MORPH = {
    TUMOUR: "",
    STROMA: "pink eosinophilic collagen fibres with sparse, elongated spindle-shaped nuclei",
    NECROSIS: "pale pink amorphous debris with scattered karyorrhectic nuclear fragments",
    LYMPHOCYTES: "densely packed small, round, dark lymphocyte nuclei",
    FAT: "large empty polygonal adipocytes with thin pink membranes",
}
_DIAG_TEXT = {
    "adenocarcinoma": "adenocarcinoma",
    "squamous cell carcinoma": "squamous cell carcinoma",
    "no tumour": "benign tissue with no tumour identified",
}


def tumour_morphology(lab: SlideLabels) -> str:
    return f"{_ARCH[(lab.pattern, lab.grade)]}, with {_NUCLEI[lab.grade]}"


def class_morphology(lab: SlideLabels, c: int) -> str:
    return tumour_morphology(lab) if c == TUMOUR else _CLASS_MORPH[c]


def diagnosis_text(lab: SlideLabels) -> str:
    """E.g. ``adenocarcinoma, moderately differentiated (G2)``."""
    if not lab.tumour:
        return _DIAG_TEXT["no tumour"]
    return f"{lab.diagnosis}, {lab.grade_text}"


def _findings(lab: SlideLabels) -> list[str]:
    out = []
    if lab.tumour:
        word = "glandular" if lab.pattern == "glands" else "squamous"
        out.append(f"an infiltrating {word} tumour composed of {tumour_morphology(lab)}")
    out.append(f"fibrous stroma of {_CLASS_MORPH[STROMA]}")
    if lab.necrosis:
        out.append(f"areas of tumour necrosis showing {_CLASS_MORPH[NECROSIS]}")
    if lab.lymphocytes:
        out.append(f"a lymphocytic infiltrate of {_CLASS_MORPH[LYMPHOCYTES]}")
    if lab.fat:
        out.append(f"adipose tissue with {_CLASS_MORPH[FAT]}")
    return out


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _absences(lab: SlideLabels) -> str:
    missing = []
    if not lab.tumour:
        missing.append("no tumour epithelium")
    if not lab.necrosis:
        missing.append("no necrosis")
    if not lab.lymphocytes:
        missing.append("no significant lymphocytic infiltrate")
    return ("There is " + _join(missing) + ". ") if missing else ""


_REPORT_OPENINGS = (
    "Microscopic observation of the pathology slide reveals {f}.",
    "Microscopic observation reveals {f}.",
    "The whole slide image shows {f}.",
    "Examination of the section demonstrates {f}.",
)
_REPORT_CLOSINGS = (
    "Based on these observations, the diagnosis is {d}.",
    "These findings are consistent with {d}.",
    "Based on these observations, the final diagnosis is {d}.",
)


def make_report(lab: SlideLabels, rng: np.random.Generator) -> str:
    """A pathology-style report: findings, absences, then the diagnosis with grade."""
    f = _join(_findings(lab))
    opening = _REPORT_OPENINGS[int(rng.integers(len(_REPORT_OPENINGS)))].format(f=f)
    closing = _REPORT_CLOSINGS[int(rng.integers(len(_REPORT_CLOSINGS)))].format(d=diagnosis_text(lab))
    return f"{opening} {_absences(lab)}{closing}"


# --- questions ----------------------------------------------------------------------------------


@dataclass
class RegionInfo:
    """A rectangle (level-0 px) wholly inside one annotation of class ``cls``."""

    annotation_id: str
    cls: int
    rect: tuple[int, int, int, int]


class LetterCycle:
    """Balanced answer letters: cycles A-D in seeded blocks of four (one per task file)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.queue: list[int] = []

    def next(self) -> int:
        if not self.queue:
            self.queue = [int(i) for i in self.rng.permutation(4)]
        return self.queue.pop()


def mcq(
    question: str, correct: str, distractors: list[str], letters: LetterCycle, rng: np.random.Generator
) -> tuple[str, str]:
    """Inline ``A) .. B) .. C) .. D) ..`` options; returns (question text, answer letter)."""
    pos = letters.next()
    others = [distractors[int(i)] for i in rng.permutation(len(distractors))[:3]]
    options = others[:pos] + [correct] + others[pos:]
    text = question + " " + " ".join(f"{LETTERS[i]}) {o}" for i, o in enumerate(options))
    return text, LETTERS[pos]


def pick(rng: np.random.Generator, items: tuple[str, ...] | list[str]) -> str:
    return items[int(rng.integers(len(items)))]


_NAMES = {
    TUMOUR: "Tumour epithelium",
    STROMA: "Fibrous stroma",
    NECROSIS: "Necrosis",
    LYMPHOCYTES: "Lymphocytic infiltrate",
    FAT: "Adipose tissue (fat)",
}
_FEATURES = {
    "gland formation": lambda lab: lab.pattern == "glands",
    "keratin pearls": lambda lab: lab.pattern == "sheets",
    "tumour necrosis": lambda lab: lab.necrosis,
    "lymphocytic infiltrate": lambda lab: lab.lymphocytes,
    "adipose tissue": lambda lab: lab.fat,
    "tumour epithelium": lambda lab: lab.tumour,
}
_DIAG_OPTIONS = {
    "adenocarcinoma": "Adenocarcinoma",
    "squamous cell carcinoma": "Squamous cell carcinoma",
    "no tumour": "No tumour (benign tissue)",
}
_GRADE_OPTIONS = {
    "G1": "Well differentiated (G1)",
    "G2": "Moderately differentiated (G2)",
    "G3": "Poorly differentiated (G3)",
    "not applicable": "Not applicable (no tumour)",
}

Row = dict[str, Any]
Emit = Callable[[str, str, str, str, dict[str, Any] | None], None]


def slide_questions(
    lab: SlideLabels,
    report: str,
    regions: list[RegionInfo],
    rng: np.random.Generator,
    letters: dict[str, LetterCycle],
    emit: Emit,
) -> None:
    """Call ``emit(task, metadata, question, answer, extra)`` for every question about one slide."""
    tissue = [TISSUE_CLASSES[c].phrase for c in lab.classes]
    # Report
    emit(
        "Report",
        "Report",
        pick(
            rng,
            (
                "What are the main observations in the whole slide histopathology image, and what is the likely diagnosis?",
                "Please describe the main features of the whole slide histopathology image and provide a diagnosis.",
                "Write a pathology report for this whole slide image.",
            ),
        ),
        report,
        None,
    )
    # Global description (Caption)
    desc = "The slide shows a tissue section containing " + _join(tissue) + ". "
    desc += " ".join(f"The {TISSUE_CLASSES[c].phrase} shows {class_morphology(lab, c)}." for c in lab.classes)
    emit(
        "Global_Morphology_Description",
        "Caption",
        pick(
            rng,
            (
                "Can you provide an overall description of the whole slide image?",
                "Describe the tissue seen in this whole slide image.",
            ),
        ),
        desc,
        None,
    )
    emit(
        "Regional_Structure_Description",
        "tissue",
        pick(
            rng,
            (
                "Which tissue types are present on this slide?",
                "What kinds of tissue can be seen in this slide?",
            ),
        ),
        "The tissue types present are " + _join(tissue) + ". " + _absences(lab).strip(),
        None,
    )
    if lab.tumour:
        emit(
            "Regional_Structure_Description",
            "cellular",
            pick(
                rng,
                (
                    "What are the notable features of the cellular morphology of the tumour?",
                    "Describe the tumour cells and their nuclei.",
                ),
            ),
            f"The tumour is composed of {tumour_morphology(lab)}.",
            None,
        )
    # Key diagnostic features
    if lab.tumour:
        key = f"The key features are {tumour_morphology(lab)}"
        key += ", together with tumour necrosis." if lab.necrosis else "; no necrosis is seen."
    else:
        key = (
            "No tumour epithelium, atypical glands or keratinising nests are present; the tissue consists of "
        )
        key += _join(tissue) + " only, which supports a benign diagnosis."
    emit(
        "Key_Diagnostic_Description",
        "Feature",
        "Which features are most significant for the diagnosis?",
        key,
        None,
    )
    # Histological typing (open)
    if lab.tumour:
        why = (
            "gland formation"
            if lab.pattern == "glands"
            else "sheets and nests of squamous cells with keratin pearls"
        )
        typing = f"The histological classification is {lab.diagnosis}, supported by {why}."
    else:
        typing = "No tumour is present: the slide shows benign " + _join(tissue) + "."
    emit(
        "Histological_Typing",
        "Classification",
        pick(
            rng,
            (
                "What is the histological classification based on your examination of the slide?",
                "What is the diagnosis for this slide?",
            ),
        ),
        typing,
        None,
    )
    # Grading (open, tumours only)
    if lab.tumour:
        grading = (
            f"The tumour is graded as {lab.grade_text}, based on {_ARCH[(lab.pattern, lab.grade)]} "
            f"and {_NUCLEI[lab.grade]}" + (", with necrosis." if lab.necrosis else ".")
        )
        emit(
            "Grading",
            "Grade",
            "What is the grade of this tumour based on the observed features?",
            grading,
            None,
        )
    # Diagnosis MCQ: typing and grading
    distract = [v for k, v in _DIAG_OPTIONS.items() if k != lab.diagnosis] + ["Small cell carcinoma"]
    q, a = mcq(
        "Based on the observed features, what is the correct diagnosis of this slide?",
        _DIAG_OPTIONS[lab.diagnosis],
        distract,
        letters["Diagnosis_choice"],
        rng,
    )
    emit("Diagnosis_choice", "Diagnosis_choice", q, a, None)
    q, a = mcq(
        "What is the grade of differentiation of the tumour on this slide?",
        _GRADE_OPTIONS[lab.grade],
        [v for k, v in _GRADE_OPTIONS.items() if k != lab.grade],
        letters["Diagnosis_choice"],
        rng,
    )
    emit("Diagnosis_choice", "Diagnosis_choice", q, a, None)
    # Morphology MCQ: which feature is present / absent
    present = [f for f, fn in _FEATURES.items() if fn(lab)]
    absent = [f for f, fn in _FEATURES.items() if not fn(lab)]
    for question, right, wrong in (
        ("Which of the following is present on this slide?", present, absent),
        ("Which of the following is absent from this slide?", absent, present),
    ):
        if len(wrong) >= 3 and right:
            q, a = mcq(question, pick(rng, right), wrong, letters["Morphology_choice"], rng)
            emit("Morphology_choice", "Morphology_choice", q, a, None)
    # Yes/No
    yn = [
        ("Is tumour necrosis present on this slide?", lab.necrosis),
        ("Is there tumour on this slide?", lab.tumour),
        ("Is there a lymphocytic infiltrate on this slide?", lab.lymphocytes),
        ("Is adipose tissue present on this slide?", lab.fat),
    ]
    if lab.tumour:
        yn.append(("Does the tumour form glands?", lab.pattern == "glands"))
    for q, v in yn:
        emit("Morphology_TF_question", "TF", q, "Yes" if v else "No", None)
    # Region questions
    for info in regions:
        extra = {
            "region": {"x": info.rect[0], "y": info.rect[1], "w": info.rect[2], "h": info.rect[3]},
            "annotation_id": info.annotation_id,
        }
        name = _NAMES[info.cls]
        morph = class_morphology(lab, info.cls)
        emit(
            "Region_Description",
            "Region",
            pick(rng, ("What tissue is in this region?", "Describe the tissue in this region.")),
            f"{name}: this region shows {morph}.",
            extra,
        )
        q, a = mcq(
            "What tissue is in this region?",
            name,
            [v for k, v in _NAMES.items() if k != info.cls],
            letters["Region_choice"],
            rng,
        )
        emit("Region_choice", "Region", q, a, extra)


# --- the questions the front ends ask ------------------------------------------------------------

#: The questions of the napari presets, the QuPath scripts, ``wsi-llava describe`` / ``demo`` and the
#: README tour, with paraphrases, by what they ask for. ``annotation_questions`` asks them about whole
#: annotations (every tile of the polygon, as the front ends select them) and about the whole slide.
FRONT_END_QUESTIONS: dict[str, tuple[str, ...]] = {
    "describe": (
        "Describe the tissue in this region.",
        "Describe this region.",
        "What is in this region?",
        "What does this region show?",
        "Describe the selected region.",
        "Describe the annotated region.",
        "Describe what you see.",
        "What can be seen here?",
        "Describe the morphology of this region.",
        "Please describe the tissue.",
    ),
    "tissue": (
        "What tissue is in this region?",
        "What tissue is this?",
        "Which tissue types are present?",
        "What tissue types are present?",
        "What type of tissue is this?",
        "What kind of tissue is in this region?",
        "Identify the tissue in this region.",
        "Which tissue is shown here?",
    ),
    "diagnosis": (
        "What is the most likely diagnosis?",
        "What is the diagnosis?",
        "What is your diagnosis?",
        "What is the diagnosis of this region?",
        "What diagnosis does this suggest?",
    ),
    "grade": (
        "What is the histological grade of the tumour?",
        "What is the grade?",
        "What grade is the tumour?",
        "What is the histological grade?",
        "What grade is this tumour?",
    ),
    "tumour?": (
        "Is there tumour in this region?",
        "Is there tumour?",
        "Is there tumor in this region?",
        "Is this tumour?",
        "Does this region contain tumour?",
    ),
    "necrosis?": (
        "Is there necrosis?",
        "Is there necrosis in this region?",
        "Is this necrosis?",
        "Does this region contain necrosis?",
    ),
    "tissue+diagnosis": (
        "What tissue types are present, and what is the diagnosis?",
        "Which tissues are present and what is the diagnosis?",
        "Describe the tissue and give the diagnosis.",
    ),
}
#: how many phrasings of each kind are asked per annotation (distinct, drawn at random)
_PER_KIND = {"describe": 2, "tissue": 1, "diagnosis": 1, "grade": 1, "tumour?": 1, "necrosis?": 1}
#: annotations of a rare class are asked this many times as often (necrosis is the smallest class: the
#: first preset retrain answered its regions right 0.5-0.83 of the time, every other class >= 0.85)
_CLASS_REPEAT = {NECROSIS: 3}
#: phrasings of each kind asked about the whole slide (distinct, drawn at random)
_PER_SLIDE = 2
_SLIDE_METADATA = {
    "describe": "Caption",
    "tissue": "tissue",
    "diagnosis": "Classification",
    "grade": "Grade",
    "tumour?": "TF",
    "necrosis?": "TF",
    "tissue+diagnosis": "Classification",
}


def region_answer(lab: SlideLabels, c: int, kind: str) -> str:
    """The answer to a ``kind`` question about a whole annotation of class ``c``: its class first."""
    name = _NAMES[c]
    seen = f"{name}: this region shows {class_morphology(lab, c)}."
    if kind in ("describe", "tissue"):
        return seen
    if kind in ("tumour?", "necrosis?"):
        yes = c == (TUMOUR if kind == "tumour?" else NECROSIS)
        return f"{'Yes' if yes else 'No'}. This region shows {TISSUE_CLASSES[c].phrase}: {class_morphology(lab, c)}."
    if c != TUMOUR:
        tail = (
            " There is no tumour in this region to grade."
            if kind == "grade"
            else " There is no tumour in this region."
        )
        return seen + tail
    if kind == "grade":
        return (
            f"The tumour in this region is graded as {lab.grade_text}, based on "
            f"{_ARCH[(lab.pattern, lab.grade)]} and {_NUCLEI[lab.grade]}."
        )
    return f"{seen} The most likely diagnosis is {diagnosis_text(lab)}."


def slide_answer(lab: SlideLabels, kind: str) -> str:
    """The answer to a ``kind`` question about the whole slide."""
    tissue = _join([TISSUE_CLASSES[c].phrase for c in lab.classes])
    if kind == "describe":
        desc = f"The slide shows a tissue section containing {tissue}. "
        return desc + " ".join(
            f"The {TISSUE_CLASSES[c].phrase} shows {class_morphology(lab, c)}." for c in lab.classes
        )
    if kind == "tissue":
        return f"The tissue types present are {tissue}. {_absences(lab).strip()}".strip()
    if kind == "diagnosis":
        return f"The most likely diagnosis is {diagnosis_text(lab)}."
    if kind == "grade":
        if not lab.tumour:
            return "Not applicable: there is no tumour on this slide."
        return (
            f"The tumour is graded as {lab.grade_text}, based on {_ARCH[(lab.pattern, lab.grade)]} "
            f"and {_NUCLEI[lab.grade]}."
        )
    if kind == "tumour?":
        return (
            "Yes: the slide shows tumour epithelium."
            if lab.tumour
            else "No: there is no tumour on this slide."
        )
    if kind == "necrosis?":
        return (
            "Yes: the slide shows tumour necrosis."
            if lab.necrosis
            else "No: there is no necrosis on this slide."
        )
    return f"The tissue types present are {tissue}. The diagnosis is {diagnosis_text(lab)}."


def annotation_questions(
    lab: SlideLabels, annotations: list[tuple[str, int]], rng: np.random.Generator, emit: Emit
) -> None:
    """Front-end questions about each annotation ``(id, class)`` as a whole, then about the slide."""
    for annotation_id, c in annotations:
        extra = {"region": None, "annotation_id": annotation_id}
        for kind, n in _PER_KIND.items():
            phrasings = FRONT_END_QUESTIONS[kind]
            order = rng.permutation(len(phrasings))
            for k in range(n * _CLASS_REPEAT.get(c, 1)):
                q = phrasings[int(order[k % len(order)])]
                emit("Preset_Questions", "Region", q, region_answer(lab, c, kind), extra)
    for kind, phrasings in FRONT_END_QUESTIONS.items():
        for i in rng.permutation(len(phrasings))[:_PER_SLIDE]:
            emit("Preset_Questions", _SLIDE_METADATA[kind], phrasings[int(i)], slide_answer(lab, kind), None)


TASKS = (
    "Report",
    "Global_Morphology_Description",
    "Regional_Structure_Description",
    "Key_Diagnostic_Description",
    "Histological_Typing",
    "Grading",
    "Diagnosis_choice",
    "Morphology_choice",
    "Morphology_TF_question",
    "Region_Description",
    "Region_choice",
    "Preset_Questions",
)
CLOSE_ENDED = ("Diagnosis_choice", "Morphology_choice", "Morphology_TF_question", "Region_choice")
