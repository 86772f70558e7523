"""Tissue classes and slide-level labels of the synthetic world, and how labels are assigned.

The rules (also in the package docstring): diagnosis decides the tumour pattern (glands or sheets with
keratin pearls), grade decides architecture and nuclei, necrosis is drawn only in G3 tumours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

#: tissue class ids used in label maps; 0 is background (glass)
BACKGROUND, TUMOUR, STROMA, NECROSIS, LYMPHOCYTES, FAT = range(6)


@dataclass(frozen=True)
class TissueClass:
    """One drawable tissue class with its QuPath classification name and colour."""

    id: int
    key: str
    qupath_name: str
    color: tuple[int, int, int]
    phrase: str


TISSUE_CLASSES: dict[int, TissueClass] = {
    TUMOUR: TissueClass(TUMOUR, "tumour", "Tumor", (200, 0, 0), "tumour epithelium"),
    STROMA: TissueClass(STROMA, "stroma", "Stroma", (150, 200, 150), "fibrous stroma"),
    NECROSIS: TissueClass(NECROSIS, "necrosis", "Necrosis", (50, 50, 50), "necrosis"),
    LYMPHOCYTES: TissueClass(
        LYMPHOCYTES, "lymphocytes", "Immune cells", (160, 90, 160), "lymphocytic infiltrate"
    ),
    FAT: TissueClass(FAT, "fat", "Fat", (255, 220, 120), "adipose tissue"),
}
CLASS_BY_KEY: dict[str, TissueClass] = {c.key: c for c in TISSUE_CLASSES.values()}

Diagnosis = Literal["adenocarcinoma", "squamous cell carcinoma", "no tumour"]
Grade = Literal["G1", "G2", "G3", "not applicable"]

DIAGNOSES: tuple[str, ...] = ("adenocarcinoma", "squamous cell carcinoma", "no tumour")
GRADES: tuple[str, ...] = ("G1", "G2", "G3")
GRADE_WORDS = {"G1": "well differentiated", "G2": "moderately differentiated", "G3": "poorly differentiated"}


class SlideLabels(BaseModel):
    """What a slide shows; every field is visible in its pixels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    diagnosis: Diagnosis
    grade: Grade
    lymphocytes: bool
    fat: bool

    @property
    def tumour(self) -> bool:
        return self.diagnosis != "no tumour"

    @property
    def necrosis(self) -> bool:
        return self.grade == "G3"

    @property
    def pattern(self) -> str:
        """``glands``, ``sheets`` or ``none``."""
        return {"adenocarcinoma": "glands", "squamous cell carcinoma": "sheets"}.get(self.diagnosis, "none")

    @property
    def classes(self) -> list[int]:
        """Tissue class ids drawn on this slide (stroma always)."""
        out = [STROMA]
        if self.tumour:
            out.insert(0, TUMOUR)
        if self.necrosis:
            out.append(NECROSIS)
        if self.lymphocytes:
            out.append(LYMPHOCYTES)
        if self.fat:
            out.append(FAT)
        return out

    @property
    def grade_text(self) -> str:
        """E.g. ``moderately differentiated (G2)``; ``not applicable`` without tumour."""
        if self.grade == "not applicable":
            return "not applicable"
        return f"{GRADE_WORDS[self.grade]} ({self.grade})"


def _cycled(rng: np.random.Generator, values: list, n: int) -> list:
    """``n`` values that cycle through ``values``, each block of ``len(values)`` in a seeded order."""
    out: list = []
    while len(out) < n:
        block = list(values)
        order = rng.permutation(len(block))
        out.extend(block[i] for i in order)
    return out[:n]


def assign_labels(n_slides: int, seed: int) -> list[SlideLabels]:
    """Balanced labels: diagnoses cycle in seeded blocks of 3, grades cycle within each tumour type.

    Each attribute has its own random stream, so slide ``i`` gets the same labels whatever ``n_slides``.
    """

    def stream(k: int) -> np.random.Generator:
        return np.random.default_rng([int(seed), 0x5EED, k])

    diagnoses = _cycled(stream(1), list(DIAGNOSES), n_slides)
    grades = {d: iter(_cycled(stream(2 + j), list(GRADES), n_slides)) for j, d in enumerate(DIAGNOSES[:2])}
    lymph = _cycled(stream(4), [True, False], n_slides)
    fat = _cycled(stream(5), [True, False], n_slides)
    out = []
    for i, d in enumerate(diagnoses):
        grade = next(grades[d]) if d in grades else "not applicable"
        out.append(SlideLabels(diagnosis=d, grade=grade, lymphocytes=lymph[i], fat=fat[i]))
    return out
