"""Integer-only adapter for timm's SwinTransformer (Swin v1).

Swin: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
ICCV 2021, arXiv 2103.14030. Reference code: timm (huggingface/pytorch-image-models),
`timm/models/swin_transformer.py` (timm 1.0: stage 0 has no downsampling, stages 1-3
start with a PatchMerging).

`QuantSwin` mirrors `SwinTransformer.forward` and shares the timm model's parameters.
Tokens travel as [N, L, C] in row-major (h, w) order. In each block, the cyclic shift and
the window partition together are one fixed permutation of the token axis. It is built
from `torch.roll` and timm's `window_partition` on an index grid, so the torch path gathers
with it and the ONNX graph emits one `Gather` with the same constant index (and the inverse
permutation on the way back). The relative position bias is quantized onto the score
accumulator grid and added as an integer. The shifted-window mask is applied around the
softmax scheme (see WindowSoftmaxSite).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
from onnx import TensorProto
from timm.models.swin_transformer import PatchMerging, SwinTransformer, WindowAttention, window_partition

from hnq.intops import round_shift
from hnq.nn import (
    TABLE_SOFTMAX_SCHEMES,
    LayerNormSite,
    QuantAdd,
    QuantLinear,
    SoftmaxSite,
    exact_int_matmul,
    matmul_integer_onnx,
    quantizer_requantize,
    quantizer_requantize_onnx,
)
from hnq.onnx_builder import GraphBuilder
from hnq.quant import ActQuantizer, QTensor, fake_quantize, safe_dyadic

from .classifier import QuantClassifier
from .vit import MlpHalf, QuantConfig, QuantPatchEmbed, disable_fused_attention

# Options of timm's SwinTransformer that QuantSwin does not mirror, with the reason.
UNSUPPORTED_SWIN_OPTIONS: dict[str, str] = {
    "global_pool": "only the average over tokens ('avg') is lowered",
    "dynamic_img_size": "the integer graph is exported for one input size (strict_img_size=False "
                        "builds the attention masks per input)",
    "norm_layer": "only nn.LayerNorm norms are lowered as LayerNorm sites",
    "act_layer": "only the exact nn.GELU MLP activation is lowered as a GELU site",
    "num_classes": "a model without a classifier head (num_classes=0) has no logits to export",
}

# timm adds this to the scores of masked pairs in the float model (SwinTransformerBlock.get_attn_mask).
TIMM_MASK_VALUE = -100.0


class WindowSizeError(ValueError):
    """An input size whose patch grid the attention windows do not tile."""


def check_swin_supported(swin: SwinTransformer) -> None:
    problems = []
    if swin.global_pool != "avg":
        problems.append(("global_pool", swin.global_pool))
    if getattr(swin, "dynamic_img_size", False):
        problems.append(("dynamic_img_size", True))
    if swin.num_classes == 0 or not isinstance(swin.head.fc, nn.Linear):
        problems.append(("num_classes", swin.num_classes))
    norms = [("norm", swin.norm)]
    if not isinstance(swin.patch_embed.norm, nn.Identity):
        norms.append(("patch_embed.norm", swin.patch_embed.norm))
    for i, stage in enumerate(swin.layers):
        if isinstance(stage.downsample, PatchMerging):
            norms.append((f"layers.{i}.downsample.norm", stage.downsample.norm))
        for j, block in enumerate(stage.blocks):
            prefix = f"layers.{i}.blocks.{j}"
            norms += [(f"{prefix}.norm1", block.norm1), (f"{prefix}.norm2", block.norm2)]
            act = block.mlp.act
            if not isinstance(act, nn.GELU) or act.approximate != "none" or not isinstance(block.mlp.norm, nn.Identity):
                problems.append(("act_layer", f"{prefix}.mlp: {type(act).__name__}"))
    for name, norm in norms:
        if type(norm) is not nn.LayerNorm:
            problems.append(("norm_layer", f"{name}: {type(norm).__name__}"))
    if problems:
        lines = [f"{option}={value!r}: {UNSUPPORTED_SWIN_OPTIONS[option]}" for option, value in problems]
        raise NotImplementedError("this SwinTransformer uses options HNQ cannot quantize:\n  " + "\n  ".join(lines))


def check_window_fit(swin: SwinTransformer) -> None:
    """Reject an input size that timm would pad.

    Every stage's token grid must be a multiple of its window size, and every patch
    merging must see an even grid.
    """
    img_h, img_w = swin.patch_embed.img_size
    patch_h, patch_w = swin.patch_embed.patch_size
    grid_h, grid_w = swin.patch_embed.grid_size
    if img_h % patch_h or img_w % patch_w:
        raise WindowSizeError(f"input size {img_h}x{img_w} is not a multiple of the patch size {patch_h}x{patch_w}; "
                              "choose an input size divisible by the patch size")
    for i, stage in enumerate(swin.layers):
        in_h, in_w = stage.input_resolution
        if isinstance(stage.downsample, PatchMerging) and (in_h % 2 or in_w % 2):
            raise WindowSizeError(
                f"input size {img_h}x{img_w} gives a {grid_h}x{grid_w} patch grid and an odd {in_h}x{in_w} "
                f"token grid at the patch merging of layers.{i}, which timm pads; choose an input size whose "
                "patch grid halves evenly at every stage (for example 224 with patch 4)")
        for j, block in enumerate(stage.blocks):
            (res_h, res_w), (win_h, win_w) = block.input_resolution, block.window_size
            if res_h % win_h or res_w % win_w:
                raise WindowSizeError(
                    f"window size {win_h}x{win_w} does not divide the {res_h}x{res_w} token grid of "
                    f"layers.{i}.blocks.{j}: input size {img_h}x{img_w} gives a {grid_h}x{grid_w} patch grid, "
                    "and timm would pad the windows, which HNQ does not lower; choose an input size whose patch "
                    f"grid at every stage is a multiple of the window size (for example 224 with window 7)")


def window_permutation(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """Token index of each windowed position: cyclic shift by -shift, then timm's window partition.

    Gathering tokens [N, H*W, C] with it gives the windows of `SwinTransformerBlock._attn`
    flattened as [N, nW * window area, C]; its argsort undoes the partition and the shift.
    """
    height, width = grid
    index = torch.arange(height * width).view(1, height, width, 1)
    if any(shift):
        index = torch.roll(index, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    return window_partition(index, window).reshape(-1)


def apply_window_mask(x: torch.Tensor, mask: torch.Tensor, fill) -> torch.Tensor:
    """Set the masked pairs of scores or probabilities [N * nW, heads, A, A] to `fill`."""
    n_windows, area = mask.shape[0], mask.shape[-1]
    per_image = x.reshape(-1, n_windows, x.shape[1], area, area)
    return per_image.masked_fill(mask[None, :, None], fill).reshape(x.shape)


class WindowSoftmaxSite(SoftmaxSite):
    """Softmax site of window attention, with the shifted-window mask applied around the scheme.

    The schemes take no mask, so masked scores are set to the lowest input code before the
    scheme and masked probabilities to 0 after it. Masked pairs thus get exactly zero
    probability, but they still enter each row's sum. Every scheme subtracts the row's max
    code m first, and m is the max over unmasked scores because the diagonal pair is never
    masked. So each masked entry adds the scheme's approximation of exp(S * (code_min - m))
    to the row sum, for input scale S. When m >= 0 that is at most the scheme's exp at
    the lowest code, about exp(-max |score|) relative to the row's largest term (max |score|
    being the calibrated input range). It approaches that largest term only when every
    unmasked score of the row sits near code_min. The unmasked probabilities shrink by the
    masked entries' share of the row sum.
    NOTE: the leak disappears only once the schemes take a mask input and leave masked
    entries out of the row sum.
    """

    def forward(self, scores: torch.Tensor | None = None, acc: torch.Tensor | None = None,
                acc_scale: float = 0.0, acc_bound: int = 0, mask: torch.Tensor | None = None) -> QTensor:
        if mask is None:
            return super().forward(scores=scores, acc=acc, acc_scale=acc_scale, acc_bound=acc_bound)
        self.in_quant.bits = self.input_bits()
        if not self.training:
            return self.integer_forward_masked(quantizer_requantize(self.in_quant, acc, acc_scale, acc_bound), mask)
        x = self.in_quant(scores)
        if not self.quant_enabled:
            # Float mode mirrors timm, which adds -100 to masked scores before the softmax.
            probs = self.float_op(x.value + mask_bias(x.value, mask))
            return self._record(x, QTensor(probs, 1.0, 16, signed=False))
        c = self.constants(x, output_bits=self.output_bits)
        low = apply_window_mask(x.value, mask, float(x.code_min * x.scale))
        y = apply_window_mask(self.scheme.qat_forward(low, c, self.float_op), mask, 0.0)
        return self._record(x, QTensor(y, c.output_scale, self.probability_bits(c), signed=False))

    def integer_forward_masked(self, x: QTensor, mask: torch.Tensor) -> QTensor:
        c = self.constants(x, output_bits=self.output_bits)
        codes = self.scheme.fast_reference(apply_window_mask(x.value, mask, x.code_min), c)
        y = QTensor(apply_window_mask(codes, mask, 0), c.output_scale, self.probability_bits(c), signed=False)
        return self._record(x, y)

    def to_onnx(self, b: GraphBuilder, acc: str, acc_scale: float, acc_bound: int,
                mask: torch.Tensor | None = None, heads: int = 0) -> QTensor:
        if mask is None:
            return super().to_onnx(b, acc, acc_scale, acc_bound)
        self.in_quant.bits = self.input_bits()
        x = quantizer_requantize_onnx(b, self.in_quant, acc, acc_scale, acc_bound)
        c = self.constants(x, output_bits=self.output_bits)
        n_windows, area = mask.shape[0], mask.shape[-1]
        mask_const = b.const(mask.numpy()[None, :, None], dtype=np.bool_, name="window_mask")
        per_image = b.const([-1, n_windows, heads, area, area])
        flat = b.const([-1, heads, area, area])
        by_image = QTensor(b.node("Reshape", [x.value, per_image]), x.scale, x.bits, x.signed)
        table_probs = None
        if self.scheme_name in TABLE_SOFTMAX_SCHEMES:
            table_probs = self.table_onnx(b, by_image, c, mask=mask_const)
        if table_probs is not None:
            probs = b.node("Reshape", [table_probs, flat])
            # int64 copy under the name tests and the mismatch search look up; the graph
            # computes on the uint8 tensor.
            b.node("Cast", [probs], to=TensorProto.INT64, name="masked_probs")
            return self.record_onnx_output(b, QTensor(probs, c.output_scale, self.probability_bits(c), signed=False))
        low = b.node("Where", [mask_const, b.const(x.code_min), b.codes(by_image.value)])
        codes = self.run_scheme_onnx(b, QTensor(b.node("Reshape", [low, flat]), x.scale, x.bits, x.signed), c)
        zeroed = b.node("Where", [mask_const, b.const(0), b.node("Reshape", [codes, per_image])])
        probs = b.node("Reshape", [zeroed, flat], name="masked_probs")
        return QTensor(probs, c.output_scale, self.probability_bits(c), signed=False)


def mask_bias(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """timm's additive mask (0 or -100) broadcast to the scores [N * nW, heads, A, A]."""
    n_windows = mask.shape[0]
    additive = mask.to(x.dtype) * TIMM_MASK_VALUE
    return additive[None, :, None].expand(x.shape[0] // n_windows, -1, x.shape[1], -1, -1).reshape(x.shape)


class QuantWindowAttention(nn.Module):
    """Window attention with relative position bias and an optional shifted-window mask."""

    def __init__(self, attn: WindowAttention, mask: torch.Tensor | None, cfg: QuantConfig):
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        self.scale_factor = attn.scale
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index.clone(), persistent=False)
        self.register_buffer("mask", mask, persistent=False)  # bool [nW, A, A], True where timm adds -100
        self.qkv = QuantLinear(attn.qkv, cfg.weight_bits, cfg.act_bits)
        self.softmax = WindowSoftmaxSite(cfg.act_bits, cfg.softmax_bits, length=self.window_area)
        self.out_quant = ActQuantizer(cfg.act_bits)
        self.proj = QuantLinear(attn.proj, cfg.weight_bits, cfg.residual_bits)
        self.quant_enabled = True

    def relative_bias(self) -> torch.Tensor:
        """The relative position bias [heads, A, A] as timm's `_get_rel_pos_bias` builds it."""
        area = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        return bias.permute(2, 0, 1)

    def bias_codes(self, acc_scale: float) -> torch.Tensor:
        """The bias on the score accumulator grid (scale `acc_scale`), as int64 codes."""
        return torch.round(self.relative_bias().detach().double() / acc_scale).to(torch.int64)

    def _split(self, qkv: torch.Tensor):
        n_windows, area, _ = qkv.shape
        return qkv.reshape(n_windows, area, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: QTensor) -> QTensor:
        qkv = self.qkv(x)
        q, k, v = self._split(qkv.value)
        n_windows, area = x.value.shape[:2]
        acc_scale = qkv.scale**2 * self.scale_factor
        if self.training:
            bias = self.relative_bias()
            if self.quant_enabled:
                bias = fake_quantize(bias, acc_scale, -(2**31) + 1, 2**31 - 1)
            probs = self.softmax(scores=(q * self.scale_factor) @ k.transpose(-2, -1) + bias, mask=self.mask)
            context = (probs.value @ v).transpose(1, 2).reshape(n_windows, area, -1)
            return self.proj(self.out_quant(context))
        bias = self.bias_codes(acc_scale)
        product_bound = self.head_dim * qkv.code_min**2
        scores = exact_int_matmul(q, k.transpose(-2, -1), product_bound) + bias
        score_bound = product_bound + int(bias.abs().max())
        probs = self.softmax(acc=scores, acc_scale=acc_scale, acc_bound=score_bound, mask=self.mask)
        context_bound = area * probs.code_max * abs(qkv.code_min)
        context = exact_int_matmul(probs.value, v, context_bound).transpose(1, 2).reshape(n_windows, area, -1)
        context = quantizer_requantize(self.out_quant, context, probs.scale * qkv.scale, context_bound)
        return self.proj(context)

    def to_onnx(self, b: GraphBuilder, x: QTensor) -> QTensor:
        qkv = self.qkv.to_onnx(b, x)
        area = self.window_area
        split = b.node("Reshape", [qkv.value, b.const([0, 0, 3, self.num_heads, self.head_dim])])
        heads = b.node("Transpose", [split], perm=[2, 0, 3, 1, 4])
        q, k, v = (b.node("Gather", [heads, b.const(i)], axis=0, name=name) for i, name in enumerate("qkv"))
        k_t = b.node("Transpose", [k], perm=[0, 1, 3, 2])
        acc_scale = qkv.scale**2 * self.scale_factor
        bias = self.bias_codes(acc_scale)
        product = matmul_integer_onnx(b, QTensor(q, qkv.scale, qkv.bits, qkv.signed), b_tensor=k_t)
        scores = b.node("Add", [product, b.const(bias.numpy(), name="relative_position_bias")], name="scores")
        score_bound = self.head_dim * qkv.code_min**2 + int(bias.abs().max())
        probs = self.softmax.to_onnx(b, scores, acc_scale, score_bound, mask=self.mask, heads=self.num_heads)
        context = b.mark(matmul_integer_onnx(b, probs, b_tensor=v, out_type=TensorProto.INT32), TensorProto.INT32, 0)
        context = b.node("Reshape", [b.node("Transpose", [context], perm=[0, 2, 1, 3]),
                                     b.const([0, 0, self.num_heads * self.head_dim])])
        context_bound = area * probs.code_max * abs(qkv.code_min)
        context = quantizer_requantize_onnx(b, self.out_quant, context, probs.scale * qkv.scale, context_bound)
        return self.proj.to_onnx(b, context)


class QuantSwinBlock(MlpHalf, nn.Module):
    """Shifted-window block: x + attn(norm1(x)) over windows, then x + mlp(norm2(x))."""

    def __init__(self, block, cfg: QuantConfig):
        super().__init__()
        self.grid = tuple(block.input_resolution)
        self.window_area = block.window_area
        permutation = window_permutation(self.grid, block.window_size, block.shift_size)
        self.register_buffer("partition_index", permutation, persistent=False)
        self.register_buffer("reverse_index", torch.argsort(permutation), persistent=False)
        mask = None if block.attn_mask is None else block.attn_mask != 0
        self.norm1 = LayerNormSite(block.norm1, cfg.act_bits)
        self.attn = QuantWindowAttention(block.attn, mask, cfg)
        self.add1 = QuantAdd(cfg.residual_bits)
        self.init_mlp_half(block, cfg)

    def forward(self, x: QTensor) -> QTensor:
        n_batch, n_tokens, channels = x.value.shape
        h = self.norm1(x)
        windows = h.value[:, self.partition_index].reshape(-1, self.window_area, channels)
        a = self.attn(QTensor(windows, h.scale, h.bits, h.signed))
        merged = a.value.reshape(n_batch, n_tokens, channels)[:, self.reverse_index]
        return self.mlp_half(self.add1(x, QTensor(merged, a.scale, a.bits, a.signed)))

    def to_onnx(self, b: GraphBuilder, x: QTensor, channels: int) -> QTensor:
        n_tokens = self.grid[0] * self.grid[1]
        with b.scope("norm1"):
            h = self.norm1.to_onnx(b, x)
        with b.scope("attn"):
            gathered = b.node("Gather", [h.value, b.const(self.partition_index.numpy(), name="window_index")],
                              axis=1, name="shift_and_partition")
            windows = b.node("Reshape", [gathered, b.const([-1, self.window_area, channels])], name="windows")
            a = self.attn.to_onnx(b, QTensor(windows, h.scale, h.bits, h.signed))
            per_image = b.node("Reshape", [a.value, b.const([-1, n_tokens, channels])])
            merged = b.node("Gather", [per_image, b.const(self.reverse_index.numpy(), name="token_index")],
                            axis=1, name="merge_and_unshift")
        with b.scope("add1"):
            x = self.add1.to_onnx(b, x, QTensor(merged, a.scale, a.bits, a.signed))
        return self.mlp_half_onnx(b, x)


class QuantPatchMerging(nn.Module):
    """2x2 neighbour concatenation (timm's channel order), LayerNorm site, then the reduction linear."""

    def __init__(self, merging: PatchMerging, grid: tuple[int, int], cfg: QuantConfig):
        super().__init__()
        self.grid = tuple(grid)
        self.norm = LayerNormSite(merging.norm, cfg.act_bits)
        self.reduction = QuantLinear(merging.reduction, cfg.weight_bits, cfg.residual_bits)

    def forward(self, x: QTensor) -> QTensor:
        n_batch, _, channels = x.value.shape
        height, width = self.grid
        merged = x.value.reshape(n_batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
        merged = merged.reshape(n_batch, (height // 2) * (width // 2), 4 * channels)
        return self.reduction(self.norm(QTensor(merged, x.scale, x.bits, x.signed)))

    def to_onnx(self, b: GraphBuilder, x: QTensor, channels: int) -> QTensor:
        height, width = self.grid
        split = b.node("Reshape", [x.value, b.const([-1, height // 2, 2, width // 2, 2, channels])])
        moved = b.node("Transpose", [split], perm=[0, 1, 3, 4, 2, 5])
        merged = b.node("Reshape", [moved, b.const([-1, (height // 2) * (width // 2), 4 * channels])], name="merged")
        with b.scope("norm"):
            h = self.norm.to_onnx(b, QTensor(merged, x.scale, x.bits, x.signed))
        with b.scope("reduction"):
            return self.reduction.to_onnx(b, h)


class QuantTokenMean(nn.Module):
    """Average over the token axis [N, L, C] -> [N, C], kept on the input's grid.

    Integer mode: the int64 sum of L codes (|sum| <= L * 2^(bits-1)), then a dyadic
    requantization by 1/L with one half-up rounding.
    """

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.quant_enabled = True

    def integer_params(self, x: QTensor) -> tuple[int, int, int]:
        bound = self.tokens * max(abs(x.code_min), x.code_max)
        d = safe_dyadic(1.0 / self.tokens, bound)
        return d.multiplier, d.shift, bound

    def forward(self, x: QTensor) -> QTensor:
        if self.training:
            mean = x.value.mean(dim=1)
            if self.quant_enabled:
                mean = fake_quantize(mean, x.scale, x.code_min, x.code_max)
            return QTensor(mean, x.scale, x.bits, x.signed)
        m, s, _ = self.integer_params(x)
        codes = round_shift(x.value.sum(dim=1) * m, s).clamp(x.code_min, x.code_max)
        return QTensor(codes, x.scale, x.bits, x.signed)

    def to_onnx(self, b: GraphBuilder, x: QTensor) -> QTensor:
        m, s, bound = self.integer_params(x)
        # ORT's CPU ReduceSum on integers accumulates in double: exact while |sum| < 2^53.
        if bound >= 2**53:
            raise OverflowError(f"token sum bound {bound} reaches 2^53, where ReduceSum would round")
        total = b.node("ReduceSum", [b.codes(x.value), b.const([1])], keepdims=0, name="token_sum")
        return QTensor(b.requantize(total, m, s, x.code_min, x.code_max), x.scale, x.bits, x.signed)


class QuantSwinStage(nn.Module):
    def __init__(self, stage, cfg: QuantConfig):
        super().__init__()
        self.downsample = None
        if isinstance(stage.downsample, PatchMerging):
            self.downsample = QuantPatchMerging(stage.downsample, stage.input_resolution, cfg)
        self.blocks = nn.ModuleList(QuantSwinBlock(block, cfg) for block in stage.blocks)
        self.in_channels = stage.dim
        self.channels = stage.blocks[0].dim if len(stage.blocks) else stage.dim


class QuantSwin(QuantClassifier):
    """Integer-only SwinTransformer: QAT in training mode, the integer reference in eval mode."""

    def __init__(self, swin: SwinTransformer, mean, std, cfg: QuantConfig):
        super().__init__()
        check_swin_supported(swin)
        check_window_fit(swin)
        disable_fused_attention(swin)
        self.cfg = cfg
        self.image_shape = (swin.patch_embed.proj.in_channels, *swin.patch_embed.img_size)
        self.num_classes = swin.num_classes
        self.embed_dim = swin.patch_embed.proj.out_channels
        self.patch_embed = QuantPatchEmbed(swin.patch_embed.proj, mean, std, cfg.weight_bits, cfg.residual_bits)
        # The patch norm's output starts the residual stream, so it gets the residual width.
        self.patch_norm = None
        if not isinstance(swin.patch_embed.norm, nn.Identity):
            self.patch_norm = LayerNormSite(swin.patch_embed.norm, cfg.residual_bits)
        self.layers = nn.ModuleList(QuantSwinStage(stage, cfg) for stage in swin.layers)
        self.norm = LayerNormSite(swin.norm, cfg.act_bits)
        final_grid = swin.layers[-1].output_resolution
        self.pool = QuantTokenMean(final_grid[0] * final_grid[1])
        self.head = QuantLinear(swin.head.fc, cfg.weight_bits, cfg.logits_bits)
        self.name_sites()

    def sites(self) -> "OrderedDict[str, nn.Module]":
        """List every non-linear site in model order, named as in the timm model."""
        sites: OrderedDict[str, nn.Module] = OrderedDict()
        if self.patch_norm is not None:
            sites["patch_embed.norm"] = self.patch_norm
        for i, stage in enumerate(self.layers):
            if stage.downsample is not None:
                sites[f"layers.{i}.downsample.norm"] = stage.downsample.norm
            for j, block in enumerate(stage.blocks):
                prefix = f"layers.{i}.blocks.{j}"
                sites[f"{prefix}.norm1"] = block.norm1
                sites[f"{prefix}.attn.softmax"] = block.attn.softmax
                sites[f"{prefix}.norm2"] = block.norm2
                sites[f"{prefix}.mlp.act"] = block.gelu
        sites["norm"] = self.norm
        return sites

    def forward_codes(self, images: torch.Tensor) -> QTensor:
        x = self.patch_embed(self.pixels(images))
        if self.patch_norm is not None:
            x = self.patch_norm(x)
        for stage in self.layers:
            if stage.downsample is not None:
                x = stage.downsample(x)
            for block in stage.blocks:
                x = block(x)
        return self.head(self.pool(self.norm(x)))

    def to_onnx(self, b: GraphBuilder) -> tuple[str, float]:
        """Emit the integer graph; returns the logits tensor name and its scale."""
        with b.scope("patch_embed"):
            x = self.patch_embed.to_onnx(b, self.onnx_pixels(b), self.image_shape)
            if self.patch_norm is not None:
                with b.scope("norm"):
                    x = self.patch_norm.to_onnx(b, x)
        for i, stage in enumerate(self.layers):
            if stage.downsample is not None:
                with b.scope(f"layers.{i}.downsample"):
                    x = stage.downsample.to_onnx(b, x, stage.in_channels)
            for j, block in enumerate(stage.blocks):
                with b.scope(f"layers.{i}.blocks.{j}"):
                    x = block.to_onnx(b, x, stage.channels)
        with b.scope("norm"):
            x = self.norm.to_onnx(b, x)
        with b.scope("head"):
            pooled = self.pool.to_onnx(b, x)
            logits = self.head.to_onnx(b, pooled)
        return self.onnx_logits(b, logits)
