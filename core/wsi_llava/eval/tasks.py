"""The WSI-Bench task table: file names, paper task names, capabilities and ``metadata`` types.

Facts from the released files (reference §4.2): 16 per-task test files, 11 paper tasks (10 open VQA
tasks plus report generation) and 5 close-ended files, grouped into three capabilities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MORPH = "Morphological Analysis"
DIAG = "Diagnosis"
TREAT = "Treatment Planning"
REPORT = "Report"
REGION = "Region"
SYNTH = "Synthetic"

#: Capabilities of the paper's Table 2, in column order.
CAPABILITIES = (MORPH, DIAG, TREAT)


@dataclass(frozen=True)
class TaskInfo:
    """One bench file type: the name used in tables, its capability and open/close kind."""

    task: str  # file stem without the split suffix, e.g. "Grading", "Morphology_choice"
    title: str  # the paper's task name
    capability: str
    close: bool
    metadata: str | None  # the 2026-format ``metadata`` type (None for close-ended or mixed files)
    prefix: str | None = None  # the 2026-format ``question_id`` prefix


KNOWN_TASKS: dict[str, TaskInfo] = {
    t.task: t
    for t in (
        TaskInfo("1_Report", "Report Generation", REPORT, False, "Report", "Report"),
        TaskInfo(
            "Global_Morphology_Description",
            "Global Morphology Description",
            MORPH,
            False,
            "Caption",
            "Caption",
        ),
        TaskInfo(
            "Key_Diagnostic_Description", "Key Diagnostic Description", MORPH, False, "Feature", "Feature"
        ),
        TaskInfo("Regional_Structure_Description", "Regional Structure Description", MORPH, False, None),
        TaskInfo(
            "Specific_Feature_Description",
            "Specific Feature Description",
            MORPH,
            False,
            "Morphology",
            "Morphology",
        ),
        TaskInfo("Morphology_choice", "Morphology (close-ended)", MORPH, True, None),
        TaskInfo(
            "Histological_Typing", "Histological Typing", DIAG, False, "Classification", "Classification"
        ),
        TaskInfo("Grading", "Grading", DIAG, False, "Grade", "Grade"),
        TaskInfo("Molecular_Subtyping", "Molecular Subtyping", DIAG, False, "Subtype", "Subtype"),
        TaskInfo("Staging", "Staging", DIAG, False, "Stage", "Stage"),
        TaskInfo("Diagnosis_choice", "Diagnosis (close-ended)", DIAG, True, None),
        TaskInfo("Molecular_Subtyping_choice", "Molecular Subtyping (close-ended)", DIAG, True, None),
        TaskInfo("Staging_choice", "Staging (close-ended)", DIAG, True, None),
        TaskInfo("Prognosis", "Prognosis", TREAT, False, "Prognosis", "Prognosis"),
        TaskInfo("Treatment_Planing", "Treatment Recommendations", TREAT, False, "Treatment", "Treatment"),
        TaskInfo("Prognosis_TF_question", "Prognosis (yes/no)", TREAT, True, None),
    )
}

#: Other spellings of the same task (our synthetic world writes ``Report``).
TASK_ALIASES = {"Report": "1_Report"}

#: Regional Structure Description: the three ``metadata`` types and their question_id prefixes.
REGIONAL_TYPES = {"tissue": "Tissue", "cellular": "Cellular", "infiltration": "Infiltration"}

#: 2026-format ``metadata`` value -> task file stem.
METADATA_TASK: dict[str, str] = {t.metadata: t.task for t in KNOWN_TASKS.values() if t.metadata}
METADATA_TASK.update({m: "Regional_Structure_Description" for m in REGIONAL_TYPES})

#: ``metadata`` value -> capability (used for unknown task names, e.g. synthetic benches).
METADATA_CAPABILITY: dict[str, str] = {m: KNOWN_TASKS[t].capability for m, t in METADATA_TASK.items()}
METADATA_CAPABILITY["Region"] = REGION

_CAPABILITY_WORDS = (
    ("region", REGION),
    ("report", REPORT),
    ("morpholog", MORPH),
    ("feature", MORPH),
    ("caption", MORPH),
    ("diagnos", DIAG),
    ("histolog", DIAG),
    ("grad", DIAG),
    ("stag", DIAG),
    ("subtyp", DIAG),
    ("prognos", TREAT),
    ("treat", TREAT),
)


def canonical_task(task: str) -> str:
    """The task stem used as key (aliases such as ``Report`` map to ``1_Report``)."""
    return TASK_ALIASES.get(task, task)


def task_info(task: str, metadata: str | None = None, close: bool | None = None) -> TaskInfo:
    """Known tasks from the table; unknown ones get a capability from ``metadata`` or the name."""
    task = canonical_task(task)
    if task in KNOWN_TASKS:
        return KNOWN_TASKS[task]
    capability = METADATA_CAPABILITY.get(metadata or "")
    if capability is None:
        low = task.lower()
        capability = next((cap for word, cap in _CAPABILITY_WORDS if word in low), SYNTH)
    return TaskInfo(task, task.replace("_", " "), capability, bool(close), metadata)


def regional_type(question: str) -> str:
    """``tissue`` / ``cellular`` / ``infiltration`` for a Regional Structure question (by its wording).

    The per-task JSON does not carry the type; the wording does (checked against the 2026 JSONL).
    """
    q = question.lower()
    if "infiltrat" in q:
        return "infiltration"
    if "cellular" in q or "cell" in q or "nuclei" in q:
        return "cellular"
    return "tissue"


_CLOSE_ANSWER = re.compile(r"^\s*(?:[A-D]|yes|no)\s*\.?\s*$", re.IGNORECASE)


def looks_close_ended(answer: str) -> bool:
    """True when the ground-truth answer is a single option letter A-D or Yes/No."""
    return bool(_CLOSE_ANSWER.match(answer))
