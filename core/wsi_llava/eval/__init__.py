"""Evaluation on WSI-Bench: loaders, close-ended accuracy, WSI-Precision / WSI-Relevance, NLU metrics, reports.

Importing this package is cheap (no torch, no nltk); heavy pieces load on first use.
"""

from wsi_llava.eval.bench import (
    Bench,
    BenchItem,
    PredictionSet,
    load_bench,
    load_predictions,
    load_train_slides,
)

__all__ = ["Bench", "BenchItem", "PredictionSet", "load_bench", "load_predictions", "load_train_slides"]
