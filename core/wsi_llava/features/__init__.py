"""Slide tiles → tile features: the tile encoders, extraction (plain and fast pipeline), the feature cache,
the cohort runner and the feature statistics.

This is the first half of the WSI encoder; :mod:`wsi_llava.slide_encoder` turns these features into
visual tokens. Importing this package does not import torch or timm; the submodules that need them do so
themselves.
"""
