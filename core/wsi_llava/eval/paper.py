"""The paper's WSI-LLaVA numbers (reference §6.1-§6.3) for side-by-side tables and the radar plot."""

from __future__ import annotations

from wsi_llava.eval.tasks import DIAG, MORPH, TREAT

#: Table 2, WSI-LLaVA row: capability -> (WSI-P, WSI-R, Acc); Average = mean of the 9 cells.
TABLE2 = {
    MORPH: (0.488, 0.610, 0.951),
    DIAG: (0.610, 0.612, 0.863),
    TREAT: (0.810, 0.845, 1.000),
}
TABLE2_AVERAGE = 0.754

#: Table 3, WSI-LLaVA row (report generation, 208 reports).
TABLE3 = {
    "bleu1": 0.3531,
    "bleu2": 0.1859,
    "bleu3": 0.1058,
    "bleu4": 0.0665,
    "rouge_l": 0.2626,
    "meteor": 0.3072,
    "wsi_precision": 0.3800,
    "wsi_relevance": 0.4290,
}

#: Per-task WSI-P / WSI-R read off the paper's radar chart (digitised, +-0.03; orientation only).
RADAR = {
    "Global_Morphology_Description": (0.40, 0.33),
    "Key_Diagnostic_Description": (0.36, 0.37),
    "Regional_Structure_Description": (0.46, 0.45),
    "Specific_Feature_Description": (0.76, 0.73),
    "Histological_Typing": (0.42, 0.37),
    "Grading": (0.59, 0.50),
    "Molecular_Subtyping": (0.64, 0.65),
    "Staging": (0.84, 0.85),
    "Prognosis": (0.85, 0.78),
    "Treatment_Planing": (0.79, 0.84),
}
