"""Three-stage training of WSI-LLaVA models: WSI-text alignment, projector alignment, instruction tuning.

``wsi-llava train stage1|stage2|stage3 --config FILE`` (see ``configs/``); ``prepare`` makes feature packs.
Importing this package does not import torch.
"""
