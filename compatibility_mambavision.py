"""What MambaVision's model code needs from transformers and torch on every supported release (transformers 4.40 to
5.x, torch >= 2.1): each name is imported where the installed version keeps it, else defined here as a small
equivalent. The compatibility matrix (tests/test_compat.py) runs them on each transformers release.
"""

from functools import partial

import torch
import torch.nn.functional as F
import transformers
from packaging import version
from torch import nn

try:  # torch >= 2.3
    from torch.compiler import is_compiling
except ImportError:
    from torch._dynamo import is_compiling


def is_exporting():
    """True while torch.export traces the model, False under torch.compile and in eager.

    Reads the flag torch.export sets rather than calling ``torch.compiler.is_exporting()``: TorchDynamo answers that
    call with True under every trace on torch 2.11, torch.compile's included (torch 2.14 reads the flag), which sent
    compiled models down the export-only code paths. A torch without the flag: False (its exports take the eager
    window partition, and specialise a one-window level).
    """
    return getattr(torch.compiler, "_is_exporting_flag", False)


try:  # transformers >= 5.1: the mixins moved, and the backbone mixin sets itself up in __init__
    from transformers.backbone_utils import BackboneConfigMixin, BackboneMixin

    def align_backbone_outputs(config, out_features, out_indices):
        """Set ``config``'s ``out_features``/``out_indices``, each filled in from the other (ValueError if invalid)."""
        config.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

except ImportError:  # earlier: MambaVisionBackbone calls its _init_backbone, and a function aligns the outputs
    from transformers.utils.backbone_utils import (
        BackboneConfigMixin,
        BackboneMixin,
        get_aligned_output_features_output_indices,
    )

    def align_backbone_outputs(config, out_features, out_indices):
        """Set ``config``'s ``out_features``/``out_indices``, each filled in from the other (ValueError if invalid)."""
        config._out_features, config._out_indices = get_aligned_output_features_output_indices(
            out_features=out_features, out_indices=out_indices, stage_names=config.stage_names
        )


try:  # transformers >= 5: init functions that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # 4.x initialises only the weights a checkpoint did not provide
    from torch.nn import init

try:  # transformers >= 4.52
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:

    class GradientCheckpointingLayer(nn.Module):
        """transformers' switch for versions without it: ``gradient_checkpointing_enable()`` sets the flag and the
        checkpoint function on every module that has the attribute; while training, calls run through it."""

        gradient_checkpointing = False

        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training:
                return self._gradient_checkpointing_func(partial(super().__call__, **kwargs), *args)
            return super().__call__(*args, **kwargs)


# transformers < 4.49 renames every checkpoint key that contains "gamma" to "weight" (and "beta" to "bias"), meant
# for TensorFlow-era LayerNorm names, inside its loading function: only its version tells. Layer scales are gamma.
class LegacyGammaLoading:
    """Loads gamma/beta parameters as they are on transformers < 4.49 (a mixin before ``PreTrainedModel``; nothing
    on later releases): transformers would report them missing (unexpected under the renamed key) and leave them at
    their initial value. While it loads, each is registered under the renamed key (and stays reachable under its
    own name for ``_init_weights``), and under its own name again afterwards."""

    if version.parse(transformers.__version__).release < (4, 49):

        @classmethod
        def _load_pretrained_model(cls, model, *args, **kwargs):
            renamed = [
                (module, name, name.replace("beta", "bias") if "beta" in name else name.replace("gamma", "weight"))
                for module in model.modules() for name in list(module._parameters) if "gamma" in name or "beta" in name
            ]
            for module, name, legacy in renamed:
                module._parameters[legacy] = module.__dict__[name] = module._parameters.pop(name)
            try:
                return super()._load_pretrained_model(model, *args, **kwargs)
            finally:
                for module, name, legacy in renamed:
                    del module.__dict__[name]
                    module._parameters[name] = module._parameters.pop(legacy)  # the loaded tensor


try:  # transformers >= 4.53 maps image classifiers to this loss (single-label, multi-label or regression)
    from transformers.loss.loss_utils import LOSS_MAPPING

    image_classification_loss = LOSS_MAPPING["ForImageClassification"]
except (ImportError, KeyError):  # earlier versions have none, or pick a causal-LM loss for this class name

    def image_classification_loss(labels, pooled_logits, config, num_items_in_batch=None, **kwargs):
        """transformers' ``ForSequenceClassificationLoss``: the loss of ``config.problem_type``, inferred from
        the labels when unset; cross-entropy summed over ``num_items_in_batch`` when the Trainer gives it."""
        num_labels = config.num_labels
        if config.problem_type is None:
            if num_labels == 1:
                config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        labels = labels.to(pooled_logits.device)
        if config.problem_type == "regression":
            if num_labels == 1:
                return F.mse_loss(pooled_logits.squeeze(), labels.squeeze())
            return F.mse_loss(pooled_logits, labels)
        if config.problem_type == "single_label_classification":
            reduction = "sum" if num_items_in_batch is not None else "mean"
            loss = F.cross_entropy(pooled_logits.view(-1, num_labels), labels.view(-1), reduction=reduction)
            return loss if num_items_in_batch is None else loss / torch.as_tensor(num_items_in_batch).to(loss.device)
        if config.problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(pooled_logits, labels)
        raise RuntimeError(f"Invalid problem type: {config.problem_type}")
