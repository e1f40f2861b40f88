"""MambaVision (arXiv 2407.08083) for transformers: a hybrid Mamba-Transformer vision backbone.

Reproduces NVIDIA's original computation exactly (quirks included) and keeps its parameter names under
the attribute ``model``, so the published checkpoints load as they are. Runs anywhere PyTorch runs; the
selective scan picks a fast kernel when one works (see ``selective_scan.py``).
"""

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from transformers import AutoBackbone, PreTrainedModel
from transformers.modeling_outputs import BackboneOutput, ImageClassifierOutput
from transformers.utils import ModelOutput

from .compatibility_mambavision import (
    BackboneMixin,
    GradientCheckpointingLayer,
    LegacyGammaLoading,
    image_classification_loss,
    init,
    is_compiling,
    is_exporting,
)
from .configuration_mambavision import HYBRID_LEVELS, MambaVisionConfig
from .selective_scan import selective_scan

# Files travel with this one: for a local folder, transformers < 5.10 copies into its module cache only the
# relative imports written in the file it loads (a Hub repo's are followed file by file). The scan dispatcher
# imports the Triton kernels on first use, so they are named here too, or they would be missing on those versions.
try:
    from .selective_scan_triton import selective_scan_triton  # noqa: F401
except ImportError:  # no triton, or a torch without custom ops: the dispatcher falls back with one warning
    pass


@dataclass
class MambaVisionModelOutput(ModelOutput):
    """Pooled features and the four stage maps of ``MambaVisionModel``; unpacks like NVIDIA's tuple.

    NVIDIA's model returns the tuple ``(pooled, stage_maps)`` and its card reads ``out_avg_pool, features =
    model(inputs)``; transformers' users read ``out.pooler_output`` or ``out["pooler_output"]``. So this output
    is transformers' ``ModelOutput`` (a mapping: ``keys()``, ``items()``, ``values()``, ``out["name"]``,
    ``out[0]``, ``to_tuple()``) except that iterating over it yields its values, in order, as iterating over
    ``to_tuple()`` does. What reads it as a mapping goes through ``keys()``/``items()``/``values()``, never
    ``iter()``: ``dict(out)`` and ``**out``, transformers' pytree flattening (torch.export, torch.compile, DDP),
    accelerate's ``recursively_apply``/``send_to_device``, the Trainer's ``prediction_step`` and ``nested_*``
    helpers, the pipelines, ``copy`` and ``pickle`` (tests/compat_worker.py's ``output_contract`` checks each on the
    compatibility matrix, every supported transformers release). With ``output_hidden_states`` (or
    ``output_attentions``) it unpacks to more values, as ``to_tuple()`` does.

    Args:
        pooler_output: (batch, channels) features after the final BatchNorm and global average pooling.
        stage_maps: each level's output before its downsample, (batch, C_i, H_i, W_i) for i = 1..4;
            always returned: they are the model's multi-scale features.
        hidden_states: with ``output_hidden_states``, the stem's output followed by the four stage maps
            (the maps named by ``config.stage_names``), as the classifier and backbone return them.
        attentions: with ``output_attentions``, each attention block's softmax weights, one tensor per block:
            (batch * windows, heads, window**2, window**2) (see ``MambaVisionEncoder.forward``).
    """

    pooler_output: Optional[torch.FloatTensor] = None
    stage_maps: Optional[tuple] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None

    def __iter__(self):
        return iter(self.to_tuple())

    @property
    def last_hidden_state(self):
        """The last stage map (before the final norm), as transformers' vision models name it."""
        return self.stage_maps[-1]


def window_count(size, window):
    """Windows along a side of ``size`` pixels, the last one zero-padded: ceil(size / window), written so that
    under dynamic shapes it stays one small expression per size."""
    return (size + window - 1) // window


def window_partition(x, window):
    """(B, C, H, W) -> (B * windows, window * window, C) token sequences, the map zero-padded right and bottom to
    whole windows (padded tokens take part, as in the original).

    Tokens are row-major inside a window, windows row-major over the map, batch outermost. Sizes are spelled
    out (no -1 to infer), which keeps the shape arithmetic small under export with dynamic height and width.
    """
    b, c, h, w = x.shape
    rows, cols = window_count(h, window), window_count(w, window)
    x = F.pad(x, (0, cols * window - w, 0, rows * window - h))
    if is_exporting():
        return export_window_partition(x, window)
    x = x.view(b, c, rows, window, cols, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b * rows * cols, window * window, c)  # (B, rows, cols, ws, ws, C)


def window_reverse(windows, window, batch, height, width):
    """Inverse of ``window_partition``: (B * windows, window * window, C) -> (B, C, height, width), the padding
    cut off."""
    c = windows.shape[-1]
    if is_exporting():
        return export_window_reverse(windows, window, batch, height, width)
    rows, cols = window_count(height, window), window_count(width, window)
    x = windows.view(batch, rows, cols, window, window, c)
    x = x.permute(0, 5, 1, 3, 2, 4).reshape(batch, c, rows * window, cols * window)  # (B, C, rows, ws, cols, ws)
    return x[:, :, :height, :width]


# torch.export traces with symbolic sizes but settles each size comparison on the example input, and PyTorch's
# shape checks compare every dimension with 1: a tensor with a dimension of window rows or columns (one window per
# level: MambaVision-T at 224) specialises the program to that count (a guard such as height <= 224). Under export
# the windows are gathered by a computed index instead, so that no tensor has such a dimension: the same values,
# one gather in place of the permuting copy.


def export_window_partition(x, window):
    """``window_partition`` of a padded (B, C, H, W) map with an index gather from its (B * H * W, C) pixels."""
    b, c, h, w = x.shape
    cols = w // window
    token = torch.arange(b * h * w, device=x.device)  # token = (window_index * window + i) * window + j
    window_index, i, j = token // window**2, token // window % window, token % window
    row = window_index // cols  # the row of windows counted over the batch: b * rows + r
    col = window_index - row * cols  # (not % cols: ONNX's exporter takes no symbolic divisor there)
    pixel = (row * window + i) * w + col * window + j
    pixels = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # (B, H, W, C) -> (B * H * W, C)
    return pixels.index_select(0, pixel).view(b * h * w // window**2, window * window, c)


def export_window_reverse(windows, window, batch, height, width):
    """``window_reverse`` with an index gather of each pixel of the unpadded map from the (tokens, C) windows."""
    c = windows.shape[-1]
    rows, cols = window_count(height, window), window_count(width, window)
    pixel = torch.arange(batch * height * width, device=windows.device)  # pixel = (b * height + y) * width + x
    line = pixel // width  # b * height + y; remainders as differences, as in export_window_partition
    b = line // height
    y, x = line - b * height, pixel - line * width
    window_index = (b * rows + y // window) * cols + x // window
    token = (window_index * window + y % window) * window + x % window
    x = windows.flatten(0, 1).index_select(0, token)  # (B * height * width, C)
    # (B, H, W, C) -> (B, C, H, W), contiguous as in eager: a channels-last map would have the next convolution's
    # backend choice guard the batch size
    return x.view(batch, height, width, c).permute(0, 3, 1, 2).contiguous()


def crop_window(tokens, window, height, width):
    """(..., window * window, D) tokens of one window -> (..., height * width, D): its top-left height x width
    tokens, which are the map's when the map fits in one window (the rest is padding)."""
    tokens = tokens.unflatten(-2, (window, window))[..., :height, :width, :]  # (..., ws, ws, D) -> crop
    return tokens.flatten(-3, -2)


class MambaVisionStem(nn.Module):
    """Two stride-2 3x3 convolutions with BatchNorm (eps 1e-4) and ReLU: (B, 3, H, W) -> (B, dim, H/4, W/4)."""

    def __init__(self, config):
        super().__init__()
        self.conv_down = nn.Sequential(
            nn.Conv2d(config.num_channels, config.in_dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(config.in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(config.in_dim, config.dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(config.dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, pixel_values):
        return self.conv_down(pixel_values)


# On CUDA, in eval mode, a conv level whose width is not a multiple of this (196 in the L variants) runs on
# zero-padded channels, which stay zero (exact): cuDNN's tensor-core kernels would otherwise copy every conv's
# input into a padded buffer (H100, bf16, the L2-512 architecture at batch 32: 45.1 -> 41.7 ms per batch).
CONV_CHANNEL_MULTIPLE = 8


def conv_channel_padding(level, x):
    """The zero channels a conv level adds to ``x`` (B, C, H, W) for the fast kernels (CONV_CHANNEL_MULTIPLE).
    None for an offloaded level (weights on the meta device): padding reads the weights outside the convolutions'
    own forward, where accelerate's hooks have not loaded them."""
    if not x.is_cuda or level.training or any(p.is_meta for p in level.parameters()):
        return 0
    return -x.shape[1] % CONV_CHANNEL_MULTIPLE


def padded_conv(conv, x, in_pad, out_pad):
    """``conv(x)`` where ``x`` has ``in_pad`` zero channels more and the output gets ``out_pad`` more."""
    if not in_pad and not out_pad:
        return conv(x)
    weight = F.pad(conv.weight, (0, 0, 0, 0, 0, in_pad, 0, out_pad))  # (out + out_pad, in + in_pad, k, k)
    bias = F.pad(conv.bias, (0, out_pad)) if conv.bias is not None else None
    return F.conv2d(x, weight, bias, conv.stride, conv.padding)


def padded_batchnorm(norm, x, pad):
    """Eval-mode ``norm(x)`` on ``pad`` zero channels more, which it keeps zero (an Identity once folded)."""
    if not pad or isinstance(norm, nn.Identity):
        return norm(x)
    stats = F.pad(norm.running_mean, (0, pad)), F.pad(norm.running_var, (0, pad), value=1.0)
    return F.batch_norm(x, *stats, F.pad(norm.weight, (0, pad)), F.pad(norm.bias, (0, pad)), False, 0.0, norm.eps)


class MambaVisionConvBlock(nn.Module):
    """Residual conv block of levels 0-1: conv-BN-GELU(tanh)-conv-BN, optional layer scale, drop path.

    ``channel_padding``: ``x`` carries that many zero channels more (see CONV_CHANNEL_MULTIPLE).
    """

    def __init__(self, dim, layer_scale, drop_path):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, channel_padding=0):
        pad = channel_padding
        residual = x
        x = self.act1(padded_batchnorm(self.norm1, padded_conv(self.conv1, x, pad, pad), pad))
        x = padded_batchnorm(self.norm2, padded_conv(self.conv2, x, pad, pad), pad)
        if self.gamma is not None:
            x = x * F.pad(self.gamma, (0, pad)).view(1, -1, 1, 1)
        return residual + self.drop_path(x)


class MambaVisionDeltaProjection(nn.Linear):
    """The mixer's ``dt_proj``: returns the projection with its bias, and the bias (float32), which the scan adds
    a second time (``delta_bias``) as the original does. Both are read here, inside this module's own forward:
    where accelerate offloads weights (``device_map`` with CPU or disk offload), its hooks load them only then."""

    def forward(self, x):
        return super().forward(x), self.bias.float()


class MambaVisionMixer(nn.Module):
    """The MambaVision token mixer: a selective scan on one half of the channels, a plain conv path on the other.

    Unlike Mamba, the z half gates nothing: it is concatenated to the scan output (the "symmetric path").
    ``dt_proj`` applies its bias and the scan adds it again (``delta_bias``), as the original does.
    """

    def __init__(self, config, dim):
        super().__init__()
        inner = config.expand * dim
        self.half = inner // 2
        self.d_state = config.d_state
        self.dt_rank = math.ceil(dim / 16)
        self.scan_backend = config.scan_backend
        self.in_proj = nn.Linear(dim, inner, bias=False)
        self.x_proj = nn.Linear(self.half, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = MambaVisionDeltaProjection(self.dt_rank, self.half, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.half, self.d_state))
        self.D = nn.Parameter(torch.empty(self.half))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        conv = dict(kernel_size=config.d_conv, padding="same", groups=self.half, bias=False)
        self.conv1d_x = nn.Conv1d(self.half, self.half, **conv)
        self.conv1d_z = nn.Conv1d(self.half, self.half, **conv)

    @staticmethod
    def _depthwise(conv, x):
        """The depthwise 'same' conv along L of tokens (B, L, C). Eager runs the conv kernel on a (B, C, L)
        view; compiled, it is a sum of shifted taps that the compiler fuses with its neighbours into one
        element-wise kernel reading and writing the tokens in place."""
        if not is_compiling():
            return conv(x.transpose(1, 2)).transpose(1, 2)
        width = conv.kernel_size[0]
        padded = F.pad(x, (0, 0, (width - 1) // 2, width // 2))  # pad along L
        return sum(padded[:, tap : tap + x.shape[1]] * conv.weight[:, 0, tap] for tap in range(width))

    def forward(self, hidden_states):
        # tokens stay (B, L, C); the scan reads (B, C, L) views of them
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        x = F.silu(self._depthwise(self.conv1d_x, x))
        z = F.silu(self._depthwise(self.conv1d_z, z))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta, delta_bias = self.dt_proj(dt)
        y = selective_scan(
            x.transpose(1, 2),  # (B, L, C/2) -> (B, C/2, L)
            delta.transpose(1, 2),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2),  # (B, L, N) -> (B, N, L)
            C.transpose(1, 2),
            self.D.float(),
            delta_bias=delta_bias,
            backend=self.scan_backend,
        )
        return self.out_proj(torch.cat([y.transpose(1, 2), z], dim=-1))  # (B, C/2, L) -> (B, L, C/2)


# On CUDA a head size that is not a multiple of 8 (49 in the L variants) is zero-padded up to a multiple of this:
# zero dims change neither q.k nor the softmax, and the fused kernels would pad it anyway, to a slower kernel
# (H100, bf16, 1,024 tokens: 886 us at head size 49, 319 us at 64).
ATTENTION_HEAD_PADDING = 64


def eager_attention_forward(query, key, value, scale):
    """Softmax attention written out: (output, weights), weights (B, heads, N, N) with rows summing to 1."""
    weights = torch.matmul(query, key.transpose(-1, -2)) * scale
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value), weights


def sdpa_attention_forward(query, key, value, scale):
    """PyTorch's fused attention (which picks its flash, memory-efficient or math kernel): (output, None)."""
    return F.scaled_dot_product_attention(query, key, value, scale=scale), None


# config._attn_implementation -> the function; transformers sets it from from_pretrained(attn_implementation=...)
# ("sdpa" by default, as _supports_sdpa allows) on every supported release
ATTENTION_FUNCTIONS = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward}


class MambaVisionAttention(nn.Module):
    """Multi-head self-attention inside a window (qkv and output projections with bias, no mask).

    Runs ``config._attn_implementation``; returning the weights (``output_attentions``) runs the eager path.
    """

    def __init__(self, config, dim, num_heads):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states, output_attentions=False, keep=None):
        """``keep`` (optional) selects the tokens whose outputs are wanted, from (..., tokens, D): only their
        queries are computed; keys and values come from every token."""
        b, n, c = hidden_states.shape
        head_dim = c // self.num_heads
        implementation = "eager" if output_attentions else self.config._attn_implementation or "sdpa"
        qkv = self.qkv(hidden_states).view(b, n, 3, self.num_heads, head_dim)
        pad = -head_dim % ATTENTION_HEAD_PADDING if implementation == "sdpa" and qkv.is_cuda and head_dim % 8 else 0
        if pad:
            qkv = F.pad(qkv, (0, pad))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim + pad)
        if keep is not None:
            q = keep(q)  # (B, heads, M, head_dim + pad)
        x, weights = ATTENTION_FUNCTIONS[implementation](q, k, v, 1 / math.sqrt(head_dim))
        return self.proj(x[..., :head_dim].transpose(1, 2).reshape(b, q.shape[2], c)), weights


class MambaVisionMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MambaVisionBlock(nn.Module):
    """Pre-norm residual block of levels 2-3 with a mixer or attention, then an MLP; optional layer scale.

    Returns the tokens and the attention weights (None for a mixer block, or without ``output_attentions``).
    With ``keep`` (a function of (..., tokens, D)), only the kept tokens come out: every token still feeds the
    mixer (keys and values, the scan), and the rest of the block is per token.
    """

    def __init__(self, config, dim, num_heads, use_attention, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.mixer = MambaVisionAttention(config, dim, num_heads) if use_attention else MambaVisionMixer(config, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MambaVisionMLP(dim, int(dim * config.mlp_ratio))
        scale = config.layer_scale
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(scale))) if scale is not None else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(scale))) if scale is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, output_attentions=False, keep=None):
        weights = None
        if isinstance(self.mixer, MambaVisionAttention):
            mixed, weights = self.mixer(self.norm1(x), output_attentions, keep)
        else:
            mixed = self.mixer(self.norm1(x))
            mixed = keep(mixed) if keep is not None else mixed
        if keep is not None:
            x = keep(x)
        if self.gamma_1 is not None:
            mixed = self.gamma_1 * mixed
        x = x + self.drop_path(mixed)
        mlp_out = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            mlp_out = self.gamma_2 * mlp_out
        return x + self.drop_path(mlp_out), weights


def attention_block_indices(depth):
    """Blocks of a level that use attention: the last half (the middle block of an odd level is a mixer)."""
    return range(depth // 2 + 1, depth) if depth % 2 else range(depth // 2, depth)


class MambaVisionDownsample(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1, bias=False))

    def forward(self, x, channel_padding=0):
        return padded_conv(self.reduction[0], x, channel_padding, 0)  # the padding ends here


class MambaVisionStage(GradientCheckpointingLayer):
    """One level: its blocks (windowed for levels 2-3) and the downsample that follows (levels 0-2).

    Returns ``(next_level_input, stage_map, attentions)``; the stage map is taken before the downsample;
    ``attentions``: with ``output_attentions``, each attention block's weights (see ``MambaVisionEncoder``).
    """

    def __init__(self, config, level, drop_paths):
        super().__init__()
        dim = config.dim * 2**level
        self.windowed = level in HYBRID_LEVELS
        self.window = config.window_size[level]
        if self.windowed:
            attention = set(attention_block_indices(config.depths[level]))
            self.blocks = nn.ModuleList(
                MambaVisionBlock(config, dim, config.num_heads[level], i in attention, rate)
                for i, rate in enumerate(drop_paths)
            )
        else:
            self.blocks = nn.ModuleList(
                MambaVisionConvBlock(dim, config.layer_scale_conv, rate) for rate in drop_paths
            )
        self.downsample = MambaVisionDownsample(dim) if level < 3 else None

    def padding_crop(self, height, width, output_attentions):
        """The last block's token selection when the map fits in one window with padding (NVIDIA's dense windows:
        64 for a 32x32 map at 512, 112 for 50x84 at 800x1344), else None.

        Padded tokens take part in every block as in the original, but nothing reads their outputs of the level's
        last block, so it computes only the map's tokens (queries, residual, MLP): the same values at a fraction
        of its work (1/4 of the queries at 512, 1/3 at 800x1344). Not under export (the test would fix the map's
        size), nor with attention weights requested (their documented shape is the whole window's).
        """
        if output_attentions or is_exporting() or max(height, width) > self.window or height == width == self.window:
            return None
        return functools.partial(crop_window, window=self.window, height=height, width=width)

    def forward(self, x, output_attentions=False):
        pad, attentions = 0, ()
        if self.windowed:
            batch, channels, height, width = x.shape
            keep = self.padding_crop(height, width, output_attentions)
            x = window_partition(x, self.window)
            for index, block in enumerate(self.blocks):
                x, weights = block(x, output_attentions, keep if index == len(self.blocks) - 1 else None)
                attentions += (weights,) if weights is not None else ()
            if keep is None:
                x = stage_map = window_reverse(x, self.window, batch, height, width)
            else:  # (B, H * W, C) -> (B, C, H, W), contiguous as window_reverse's
                x = stage_map = x.transpose(1, 2).reshape(batch, channels, height, width)
        else:
            channels = x.shape[1]
            pad = conv_channel_padding(self, x)
            if pad:
                x = F.pad(x, (0, 0, 0, 0, 0, pad))  # (B, C + pad, H, W)
            for block in self.blocks:
                x = block(x, pad)
            stage_map = x[:, :channels]
        if self.downsample is not None:
            x = self.downsample(x, pad)
        return x, stage_map, attentions


class MambaVisionEncoder(nn.Module):
    """The stem and the four levels: what the backbone needs. Parameter names are the original's."""

    def __init__(self, config):
        super().__init__()
        self.patch_embed = MambaVisionStem(config)
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear 0 -> rate
        starts = [sum(config.depths[:level]) for level in range(len(config.depths))]
        self.levels = nn.ModuleList(
            MambaVisionStage(config, level, rates[start : start + depth])
            for level, (start, depth) in enumerate(zip(starts, config.depths))
        )
        self.out_norms = config.out_norm
        if config.out_norm:  # NVIDIA's dense-prediction backbones: their names, their eps (not timm's 1e-6)
            for level, width in enumerate(config.hidden_sizes):
                self.add_module(f"outnorm{level}", LayerNorm2d(width, eps=1e-5))

    def forward(self, pixel_values, output_attentions=False):
        """The stem's output and each level's output before its downsample (the last level has none), through
        its ``outnorm`` when ``config.out_norm``; and with ``output_attentions`` the softmax weights of every
        attention block in order, one tensor per block: (batch * windows, heads, window**2, window**2), windows
        row-major over the map padded to whole windows, batch outermost, tokens row-major inside a window (as
        ``window_partition`` orders them). Else ()."""
        x = self.patch_embed(pixel_values)
        maps, attentions = [x], ()
        for index, level in enumerate(self.levels):
            x, stage_map, level_attentions = level(x, output_attentions=output_attentions)
            maps.append(getattr(self, f"outnorm{index}")(stage_map) if self.out_norms else stage_map)
            attentions += level_attentions
        return tuple(maps), attentions


class MambaVisionPooledEncoder(MambaVisionEncoder):
    """The encoder with the original's final BatchNorm, which the pooled features go through."""

    def __init__(self, config):
        super().__init__(config)
        self.norm = nn.BatchNorm2d(config.num_features, eps=1e-5)

    def pool(self, last_map):
        """(B, C, H, W) -> (B, C): final BatchNorm, then global average pooling."""
        return self.norm(last_map).mean(dim=(2, 3))


class MambaVisionClassifierEncoder(MambaVisionPooledEncoder):
    """The pooled encoder with the linear classifier, which the original keeps in the same module."""

    def __init__(self, config):
        super().__init__(config)
        self.head = nn.Linear(config.num_features, config.num_labels) if config.num_labels > 0 else nn.Identity()


class MambaVisionPreTrainedModel(LegacyGammaLoading, PreTrainedModel):
    config_class = MambaVisionConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # config._attn_implementation picks MambaVisionAttention's function: "sdpa" or "eager"
    batchnorm_folded = False  # set by fold_batchnorm()
    _no_split_modules = ["MambaVisionConvBlock", "MambaVisionBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Training-from-scratch init of the original; the init functions skip weights already loaded."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):  # PyTorch's default conv init, as the original keeps
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, MambaVisionMixer):
            init.ones_(module.D)
            if not getattr(module.A_log, "_is_hf_initialized", False):
                states = torch.arange(1, module.d_state + 1, dtype=torch.float32, device=module.A_log.device)
                module.A_log.copy_(torch.log(states).expand_as(module.A_log))
        elif isinstance(module, MambaVisionConvBlock) and module.gamma is not None:
            init.constant_(module.gamma, self.config.layer_scale_conv)
        elif isinstance(module, MambaVisionBlock) and module.gamma_1 is not None:
            init.constant_(module.gamma_1, self.config.layer_scale)
            init.constant_(module.gamma_2, self.config.layer_scale)

    @torch.no_grad()
    def fold_batchnorm(self):
        """Fold each BatchNorm that follows a convolution (stem, conv blocks) into that convolution.

        For inference only: the folded model computes the same function up to rounding with fewer kernels,
        but its BatchNorm keys are gone, so afterwards it refuses ``train()`` and ``save_pretrained``
        (reload the checkpoint for those). Calling it again changes nothing. Returns the model.
        """
        if self.training:
            raise RuntimeError("fold_batchnorm() needs an eval-mode model: call model.eval() first")
        stem = self.model.patch_embed.conv_down
        pairs = [(stem, "0", "1"), (stem, "3", "4")]
        pairs += [(block, conv, norm) for block in self.modules() if isinstance(block, MambaVisionConvBlock)
                  for conv, norm in (("conv1", "norm1"), ("conv2", "norm2"))]
        for parent, conv, norm in pairs:
            if isinstance(getattr(parent, norm), nn.BatchNorm2d):
                fused = fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, norm))
                setattr(parent, conv, fused)
                setattr(parent, norm, nn.Identity())
        self.batchnorm_folded = True
        return self

    def get_input_embeddings(self):
        """The stem: it turns pixels into the first feature map (what accelerate's FSDP and
        ``enable_input_require_grads`` ask for)."""
        return self.model.patch_embed

    def train(self, mode=True):
        if mode and self.batchnorm_folded:
            raise RuntimeError(_FOLDED.format(action="train"))
        return super().train(mode)

    def save_pretrained(self, *args, **kwargs):
        if self.batchnorm_folded:
            raise RuntimeError(_FOLDED.format(action="save"))
        return super().save_pretrained(*args, **kwargs)

    def _output_flags(self, output_hidden_states, output_attentions, return_dict):
        """The call's output switches, each defaulting to the config's."""
        config = self.config
        return (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states,
            output_attentions if output_attentions is not None else config.output_attentions,
            return_dict if return_dict is not None else config.return_dict,
        )

    def _prepare_pixel_values(self, pixel_values):
        """Check the shape and dtype; floating-point inputs are cast to the model's dtype, as transformers'
        vision models do (a float32 image batch into a bf16 model)."""
        channels = self.config.num_channels
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"MambaVision expects pixel_values of shape (batch, {channels}, height, width), got {shape}")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"MambaVision expects floating-point pixel_values (normalised images, as its image processor "
                f"returns), got {pixel_values.dtype}"
            )
        return pixel_values.to(self.dtype)


_FOLDED = (
    "cannot {action} a model whose BatchNorms were folded into its convolutions by fold_batchnorm() "
    "(an inference-only form without the BatchNorm weights); reload it with from_pretrained to {action} it"
)


class MambaVisionModel(MambaVisionPreTrainedModel):
    """The backbone with pooling: pooled features and the four stage maps (no classifier)."""

    # checkpoints of the classifier hold the head too; the backbone ignores it
    _keys_to_ignore_on_load_unexpected = [r"^model\.head\."]

    def __init__(self, config):
        super().__init__(config)
        self.model = MambaVisionPooledEncoder(self.config)  # the config transformers set attn_implementation on
        self.post_init()

    def forward(self, pixel_values, output_hidden_states=None, output_attentions=None, return_dict=None):
        pixel_values = self._prepare_pixel_values(pixel_values)
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        maps, attentions = self.model(pixel_values, output_attentions=output_attentions)
        output = MambaVisionModelOutput(
            pooler_output=self.model.pool(maps[-1]), stage_maps=maps[1:],
            hidden_states=maps if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class MambaVisionModelForImageClassification(MambaVisionPreTrainedModel):
    """The backbone with its linear classifier; ``labels`` give a loss following ``config.problem_type``."""

    def __init__(self, config):
        super().__init__(config)
        self.model = MambaVisionClassifierEncoder(self.config)
        self.post_init()

    def forward(self, pixel_values, labels=None, output_hidden_states=None, output_attentions=None, return_dict=None):
        pixel_values = self._prepare_pixel_values(pixel_values)
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        maps, attentions = self.model(pixel_values, output_attentions=output_attentions)
        logits = self.model.head(self.model.pool(maps[-1]))
        loss = image_classification_loss(labels, logits, self.config) if labels is not None else None
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=maps if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class MambaVisionBackbone(BackboneMixin, MambaVisionPreTrainedModel):
    """The stem and stage maps that ``config.out_features`` selects, for detection and segmentation heads.

    Maps are those of ``MambaVisionModel`` (each level's output before its downsample); ``stem`` is the
    stem's output. Parameter names are the classifier's, so its checkpoints load; the classifier's final
    norm and head are not built.
    """

    _keys_to_ignore_on_load_unexpected = [r"^model\.norm\.", r"^model\.head\."]

    def __init__(self, config):
        super().__init__(config)
        if hasattr(self, "_init_backbone"):  # transformers < 5.1 sets the mixin up explicitly
            self._init_backbone(config)
        self.model = MambaVisionEncoder(self.config)
        self.num_features = [config.dim, *config.hidden_sizes]  # channels per name in stage_names
        self.post_init()

    def forward(self, pixel_values, output_hidden_states=None, output_attentions=None, return_dict=None):
        pixel_values = self._prepare_pixel_values(pixel_values)
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict
        )
        maps, attentions = self.model(pixel_values, output_attentions=output_attentions)
        feature_maps = tuple(m for name, m in zip(self.stage_names, maps) if name in self.out_features)
        output = BackboneOutput(
            feature_maps=feature_maps, hidden_states=maps if output_hidden_states else None,
            attentions=attentions if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()


class HeadOnMambaVisionBackbone:
    """For a transformers head that builds its backbone with ``load_backbone`` from ``config.backbone_config`` (a
    mixin before the head's class; the detection and instance-segmentation models).

    ``load_backbone`` knows only transformers' own model types: this registers ``MambaVisionBackbone`` for
    ``MambaVisionConfig`` (the key is the class object, so nothing global is renamed) before the head is built, so
    a saved model reloads in a fresh process. The head's result is then replaced by a ``MambaVisionBackbone`` as
    MambaVision builds and initialises it (heads swap BatchNorms for frozen ones with eps 1e-5, the stem's is 1e-4,
    or re-initialise them), so it computes exactly what ``MambaVisionBackbone`` does. In training its BatchNorms
    stay in eval mode (statistics frozen, as detection fine-tuning does with small batches).
    """

    backbone_out_features = None  # the stage maps the head reads (set by each model class)

    def __init__(self, config):
        AutoBackbone.register(MambaVisionConfig, MambaVisionBackbone, exist_ok=True)
        super().__init__(config)
        parent, name = next((parent, name) for parent in self.modules() for name, child in parent.named_children()
                            if isinstance(child, MambaVisionBackbone))
        setattr(parent, name, MambaVisionBackbone(config.backbone_config))

    def tie_weights(self, *args, **kwargs):
        """transformers >= 5 ties a head's repeated modules (Deformable DETR's ``class_embed`` and ``bbox_embed``) as
        distinct modules sharing parameters; inductor's ``freezing_discard_parameters`` then erases each module's
        copy separately and TorchDynamo's aliasing guard fails in the compiling call. Each list entry whose parameters
        are all the first entry's becomes the first entry, as transformers 4.x builds them: one object, same numbers."""
        tied = super().tie_weights(*args, **kwargs)
        for modules in [m for m in self.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]:
            first = list(modules[0].parameters())
            for index in range(1, len(modules)):
                entry = modules[index]
                shared = list(entry.parameters())
                if (entry is not modules[0] and type(entry) is type(modules[0]) and first and len(shared) == len(first)
                        and all(a is b for a, b in zip(shared, first)) and not list(entry.buffers())):
                    modules[index] = modules[0]
        return tied

    @classmethod
    def from_backbone(cls, pretrained, **config_kwargs):
        """A new model on the weights of a MambaVision folder or Hub id (a converted classifier or COCO backbone,
        whose final norm and classifier are left out), the head initialised at random: ``config_kwargs`` are the
        head's configuration (``id2label``, sizes)."""
        backbone = MambaVisionBackbone.from_pretrained(pretrained, out_features=cls.backbone_out_features)
        model = cls(cls.config_class(backbone_config=backbone.config, **config_kwargs))
        model.backbone.load_state_dict(backbone.state_dict())
        return model

    @property
    def backbone(self):
        """The ``MambaVisionBackbone`` (its place in the head differs between heads and transformers releases)."""
        return next(module for module in self.modules() if isinstance(module, MambaVisionBackbone))

    def train(self, mode=True):
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self


# The Hub folder's recipe: the classes each Auto* entry point loads with trust_remote_code (config.json holds
# the config and model entries, preprocessor_config.json the image processor's), and the code files a folder
# holds beside its weights: every model file and each file they import.
AUTO_MAP = {
    "AutoConfig": "configuration_mambavision.MambaVisionConfig",
    "AutoModel": "modeling_mambavision.MambaVisionModel",
    "AutoModelForImageClassification": "modeling_mambavision.MambaVisionModelForImageClassification",
    "AutoBackbone": "modeling_mambavision.MambaVisionBackbone",
    "AutoModelForSemanticSegmentation": "modeling_mambavision_segmentation.MambaVisionForSemanticSegmentation",
    "AutoImageProcessor": "image_processing_mambavision.MambaVisionImageProcessor",
}
HUB_FILES = ("configuration_mambavision.py", "modeling_mambavision.py", "compatibility_mambavision.py",
             "selective_scan.py", "selective_scan_triton.py", "image_processing_mambavision.py",
             "modeling_mambavision_segmentation.py", "image_processing_mambavision_segmentation.py",
             "modeling_mambavision_detection.py", "modeling_mambavision_instance_segmentation.py")
# The folders of a transformers head on MambaVisionBackbone, by model class: each has a config class of its own (the
# head's, with a MambaVision backbone_config) and the head's own image processor in preprocessor_config.json (no code
# of ours there): Deformable DETR's for the detector, Mask2Former's for instance segmentation.
HEAD_AUTO_MAPS = {
    "MambaVisionForObjectDetection": {
        "AutoConfig": "modeling_mambavision_detection.MambaVisionDetectionConfig",
        "AutoModelForObjectDetection": "modeling_mambavision_detection.MambaVisionForObjectDetection",
    },
    "MambaVisionForUniversalSegmentation": {
        "AutoConfig": "modeling_mambavision_instance_segmentation.MambaVisionMask2FormerConfig",
        "AutoModelForUniversalSegmentation":
            "modeling_mambavision_instance_segmentation.MambaVisionForUniversalSegmentation",
    },
}

# transformers 4.46 to 4.52 do not register a remote-code class loaded through an Auto class, so its save_pretrained
# would leave this code out of the folder; registering here is what the other versions do when loading.
MambaVisionModel.register_for_auto_class("AutoModel")
MambaVisionModelForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MambaVisionBackbone.register_for_auto_class("AutoBackbone")
