"""Tile encoders, the LongNet slide encoder, the 576-token pooling, the feature cache and extraction.

Importing this package does not import torch or timm; the submodules that need them do so themselves.
"""
