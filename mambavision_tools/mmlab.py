"""NVIDIA's OpenMMLab checkpoints (mmsegmentation, mmdetection) under our names.

Their models hold the backbone under ``backbone.``: MambaVision's own names, without the classifier's final
``norm`` and ``head`` and with an ``outnorm{i}`` per returned stage map (``MambaVisionConfig(out_norm=True)``).
Ours hold it under ``model.``, so the backbone's keys only change prefix. Each task's heads rename their own keys.
"""

from .checkpoints import PREFIX

BACKBONE = "backbone."


def split_backbone(state_dict):
    """(backbone tensors under our names, the other tensors under theirs) of an mmseg/mmdet state dict."""
    backbone = {PREFIX + key.removeprefix(BACKBONE): tensor for key, tensor in state_dict.items()
                if key.startswith(BACKBONE)}
    rest = {key: tensor for key, tensor in state_dict.items() if not key.startswith(BACKBONE)}
    return backbone, rest
