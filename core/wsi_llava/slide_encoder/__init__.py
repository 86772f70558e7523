"""Tile features → visual tokens: the LongNet slide encoder, its config and the 576-token pooling.

The second half of the WSI encoder, after :mod:`wsi_llava.features`; its tokens go to the projector and
the LLM (:mod:`wsi_llava.model`). Importing this package does not import torch; ``config`` and ``pooling``
stay torch-free at import, ``longnet`` and ``slide_encoder`` need it.
"""
