"""Convert NVIDIA's original MambaVision checkpoints into Hugging Face model folders."""

import re
import shutil
from pathlib import Path

import mambavision_code

MambaVisionConfig = mambavision_code.load("configuration_mambavision").MambaVisionConfig

# Original state-dict key -> transformers key, applied in order (the dinov3 converter's style).
KEY_RENAMES = [
    (r"^module\.", ""),  # DistributedDataParallel wrapper
    (r"^", "model."),  # the backbone lives under `model` in both transformers classes
]

# Original constructor arguments -> config fields (same names except the class count).
ARGUMENT_RENAMES = {"num_classes": "num_labels"}
ARCHITECTURE_FIELDS = ("depths", "num_heads", "window_size", "dim", "in_dim", "mlp_ratio", "drop_path_rate",
                       "layer_scale", "layer_scale_conv")


def rename_key(key):
    for pattern, replacement in KEY_RENAMES:
        key = re.sub(pattern, replacement, key, count=1)
    return key


def convert_state_dict(state_dict):
    """Original tensors under transformers names."""
    return {rename_key(key): tensor for key, tensor in state_dict.items()}


def config_from_architecture(architecture, **extra):
    """A ``MambaVisionConfig`` from the original constructor arguments (as in variants.json)."""
    fields = {ARGUMENT_RENAMES.get(k, k): v for k, v in architecture.items()
              if k in ARCHITECTURE_FIELDS or k in ARGUMENT_RENAMES}
    fields["num_heads"] = [h if h is not None else 1 for h in fields.get("num_heads", [])] or None
    return MambaVisionConfig(**{k: v for k, v in fields.items() if v is not None or k.startswith("layer_scale")},
                             **extra)


AUTO_MAP = {
    "AutoConfig": "configuration_mambavision.MambaVisionConfig",
    "AutoModel": "modeling_mambavision.MambaVisionModel",
    "AutoModelForImageClassification": "modeling_mambavision.MambaVisionModelForImageClassification",
}


def save_model_folder(model, folder, max_shard_size="2GB"):
    """``save_pretrained`` plus the model code and an ``auto_map``, so the folder loads with trust_remote_code."""
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    for name in mambavision_code.MODEL_FILES:
        shutil.copy2(mambavision_code.ROOT / name, Path(folder) / name)
