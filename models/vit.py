"""Integer-only adapter for timm's VisionTransformer (ViT, DeiT) and VisionTransformerDistilled.

ViT: Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, arXiv 2010.11929.
DeiT: Touvron et al., "Training data-efficient image transformers", ICML 2021, arXiv 2012.12877.
Reference code: timm (huggingface/pytorch-image-models), `timm/models/vision_transformer.py`.

`QuantViT` mirrors `VisionTransformer.forward` step by step, sharing the timm model's
parameters. The model input is the uint8 pixel tensor [N, C, H, W]; the normalization
(x / 255 - mean) / std is folded into the patch embedding, so the graph starts on integers.
A distilled DeiT carries a class and a distillation token and two heads, whose eval-mode
logits (head(cls) + head_dist(dist)) / 2 are averaged in integers by `QuantLinearAverage`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from hnq.intops import round_shift
from hnq.nn import (
    GeluSite,
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
from hnq.quant import ActQuantizer, QTensor, fake_quantize, fake_quantize_weight, safe_dyadic, weight_scales

from .classifier import QuantClassifier

# Options of timm's VisionTransformer that QuantViT does not mirror, with the reason.
UNSUPPORTED_VIT_OPTIONS: dict[str, str] = {
    "global_pool": "only the class-token head ('token') is lowered; average pooling needs an integer mean",
    "reg_tokens": "register tokens are not lowered",
    "no_embed_class": "position embeddings that skip the class token are not lowered",
    "pre_norm": "a norm before the blocks is not lowered",
    "fc_norm": "a norm after pooling is not lowered",
    "qk_norm": "normalized queries and keys add LayerNorms that are not sites yet",
    "init_values": "LayerScale (per-channel gains on each branch) is not lowered",
    "dynamic_img_size": "the integer graph is exported for one input size",
    "distilled_training": "separate class and distillation logits in training are not mirrored: "
                          "the adapter always returns their average",
}


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths of one quantized model."""

    act_bits: int = 8
    weight_bits: int = 8
    residual_bits: int = 16
    softmax_bits: int = 8
    logits_bits: int = 16

    def __post_init__(self) -> None:
        if self.act_bits not in (4, 5, 6, 7, 8):
            raise ValueError(f"activation bits must be between 4 and 8, got {self.act_bits}")
        if self.weight_bits not in (4, 5, 6, 7, 8):
            raise ValueError(f"weight bits must be between 4 and 8, got {self.weight_bits}")
        if self.softmax_bits not in (8, 16):
            raise ValueError(f"softmax output bits must be 8 or 16, got {self.softmax_bits}")
        if not 8 <= self.residual_bits <= 24:
            raise ValueError(f"residual bits must be between 8 and 24, got {self.residual_bits}")

    def to_dict(self) -> dict:
        return asdict(self)


def disable_fused_attention(model: nn.Module) -> int:
    """Turn off timm's fused attention so the softmax is an explicit step; returns the count."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention) or hasattr(module, "fused_attn"):
            module.fused_attn = False
            count += 1
    return count


def check_supported(vit: VisionTransformer) -> None:
    problems = []
    if vit.global_pool != "token":
        problems.append(("global_pool", vit.global_pool))
    if getattr(vit, "num_reg_tokens", 0):
        problems.append(("reg_tokens", vit.num_reg_tokens))
    if getattr(vit, "no_embed_class", False):
        problems.append(("no_embed_class", True))
    if not isinstance(vit.norm_pre, nn.Identity):
        problems.append(("pre_norm", True))
    if not isinstance(vit.fc_norm, nn.Identity):
        problems.append(("fc_norm", True))
    if vit.cls_token is None:
        problems.append(("global_pool", "no class token"))
    for i, block in enumerate(vit.blocks):
        if not isinstance(block.attn.q_norm, nn.Identity):
            problems.append(("qk_norm", f"blocks.{i}"))
        if not isinstance(block.ls1, nn.Identity) or not isinstance(block.ls2, nn.Identity):
            problems.append(("init_values", f"blocks.{i}"))
    if getattr(vit, "dynamic_img_size", False):
        problems.append(("dynamic_img_size", True))
    if getattr(vit, "distilled_training", False):
        problems.append(("distilled_training", True))
    if problems:
        lines = [f"{option}={value!r}: {UNSUPPORTED_VIT_OPTIONS[option]}" for option, value in problems]
        raise NotImplementedError("this VisionTransformer uses options HNQ cannot quantize:\n  " + "\n  ".join(lines))


class QuantPatchEmbed(QuantLinear):
    """Patch embedding as a linear layer over flattened patches, normalization folded in.

    conv((x/255 - mean)/std) = conv'(x) with W'[o,c] = W[o,c] / (255 std_c) and
    b'_o = b_o - sum W[o,c] mean_c / std_c, so the input codes are the raw pixels (scale 1).
    """

    def __init__(self, conv: nn.Conv2d, mean, std, weight_bits: int, out_bits: int):
        super().__init__(None, weight_bits, out_bits)
        self.conv = conv
        self.patch_size = conv.kernel_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def effective_weight(self) -> torch.Tensor:
        w = self.conv.weight / (255.0 * self.std)
        return w.flatten(1)

    def effective_bias(self) -> torch.Tensor:
        shift = (self.conv.weight * (self.mean / self.std)).flatten(1).sum(dim=1)
        bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(shift)
        return bias - shift

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ph, pw = self.patch_size
        x = x.reshape(n, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // ph) * (w // pw), c * ph * pw)

    def forward(self, x: QTensor) -> QTensor:
        return super().forward(QTensor(self.patches(x.value), x.scale, x.bits, x.signed))

    def to_onnx(self, b: GraphBuilder, x: QTensor, image_shape: tuple[int, int, int]) -> QTensor:
        c, h, w = image_shape
        ph, pw = self.patch_size
        split = b.node("Reshape", [x.value, b.const([0, c, h // ph, ph, w // pw, pw])])
        moved = b.node("Transpose", [split], perm=[0, 2, 4, 1, 3, 5])
        flat = b.node("Reshape", [moved, b.const([0, (h // ph) * (w // pw), c * ph * pw])], name="patches")
        return super().to_onnx(b, QTensor(flat, x.scale, x.bits, x.signed))


class QuantEmbed(nn.Module):
    """Prefix tokens (class, and distillation if present) and position embedding, on the residual grid."""

    def __init__(self, cls_token: nn.Parameter, pos_embed: nn.Parameter, residual_bits: int,
                 dist_token: nn.Parameter | None = None):
        super().__init__()
        self.cls_token = cls_token
        self.dist_token = dist_token
        self.pos_embed = pos_embed
        self.out_quant = ActQuantizer(residual_bits)

    def prefix_tokens(self) -> torch.Tensor:
        """Return the prefix tokens in model order, [P, D]."""
        tokens = [self.cls_token[0]]
        if self.dist_token is not None:
            tokens.append(self.dist_token[0])
        return torch.cat(tokens, dim=0)

    def integer_params(self, patches: QTensor) -> tuple[int, int, np.ndarray, np.ndarray]:
        """m, s for the patch codes, the pos offsets pre-scaled by 2^s, and the prefix-token codes [P, D]."""
        q = self.out_quant
        pos = self.pos_embed.detach().double()[0]  # [P + L, D]
        prefix = self.prefix_tokens().detach().double()
        n_prefix = prefix.shape[0]
        bound = max(abs(patches.code_min), patches.code_max)
        offset_cap = 2 ** (q.bits + 1)  # past the clamp either way
        d = safe_dyadic(patches.scale / q.scale, bound, offset_bound=offset_cap)
        pos_codes = (pos[n_prefix:] / q.scale).clamp(-offset_cap, offset_cap)
        offsets = torch.floor(pos_codes * 2.0**d.shift + 0.5).to(torch.int64).numpy()
        head = torch.round((prefix + pos[:n_prefix]) / q.scale).clamp(q.code_min, q.code_max)
        return d.multiplier, d.shift, offsets, head.to(torch.int64).numpy()

    def forward(self, patches: QTensor) -> QTensor:
        q = self.out_quant
        n = patches.value.shape[0]
        if self.training:
            prefix = self.prefix_tokens().unsqueeze(0).expand(n, -1, -1)
            tokens = torch.cat([prefix, patches.value], dim=1) + self.pos_embed
            return q(tokens)
        m, s, offsets, prefix = self.integer_params(patches)
        body = round_shift(patches.value * m + torch.from_numpy(offsets), s).clamp(q.code_min, q.code_max)
        head = torch.from_numpy(prefix).unsqueeze(0).expand(n, -1, -1)
        return QTensor(torch.cat([head, body], dim=1), q.scale, q.bits, q.signed)

    def to_onnx(self, b: GraphBuilder, patches: QTensor) -> QTensor:
        q = self.out_quant
        m, s, offsets, prefix = self.integer_params(patches)
        body = b.requantize(patches.value, m, s, q.code_min, q.code_max, offset=offsets)
        batch = b.node("Slice", [b.node("Shape", [patches.value]), b.const([0]), b.const([1])])
        target = b.node("Concat", [batch, b.const(list(prefix.shape))], axis=0)
        head = b.node("Expand", [b.const(prefix[np.newaxis], name="prefix_tokens"), target])
        return QTensor(b.node("Concat", [head, body], axis=1, name="tokens"), q.scale, q.bits, q.signed)


def linear_preactivation(linear: QuantLinear, x: QTensor) -> torch.Tensor:
    """QAT or float mode: the real output of `linear` before its output quantizer."""
    weight = linear.effective_weight()
    bias = linear.effective_bias()
    if not linear.quant_enabled:
        return F.linear(x.value, weight, bias)
    if bias is not None:
        acc_scales = (weight_scales(weight, linear.weight_bits) * x.scale).to(bias.dtype)
        bias = fake_quantize(bias, acc_scales, -(2**31) + 1, 2**31 - 1)
    return F.linear(x.value, fake_quantize_weight(weight, linear.weight_bits), bias)


class QuantLinearAverage(nn.Module):
    """(first(x) + second(y)) / 2 of two linear layers, both onto one grid with one rounding.

    Integer mode: out_c = round((acc1_c * m1_c + acc2_c * m2_c) / 2^s_c), one shift per
    output channel, with m1_c / 2^s_c ~ S_x * w1_c / (2 S_out) and likewise for m2_c. This is
    the per-channel form of QuantAdd; the two layers' own output quantizers are not used.
    """

    def __init__(self, out_bits: int):
        super().__init__()
        self.out_quant = ActQuantizer(out_bits)

    def integer_params(self, scales_1: np.ndarray, scales_2: np.ndarray,
                       bound_1: int, bound_2: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out_scale = 2.0 * self.out_quant.scale
        multipliers_1, multipliers_2, shifts = [], [], []
        for scale_1, scale_2 in zip(np.atleast_1d(scales_1), np.atleast_1d(scales_2)):
            ratio_1, ratio_2 = float(scale_1) / out_scale, float(scale_2) / out_scale
            # One more unit of headroom: the rounded multipliers below can exceed the reference by 1.
            reference = safe_dyadic(max(ratio_1, ratio_2), bound_1 + bound_2 + 1)
            m_1 = round(ratio_1 * 2**reference.shift)
            m_2 = round(ratio_2 * 2**reference.shift)
            if bound_1 * m_1 + bound_2 * m_2 >= 2**62:
                raise OverflowError(f"averaging two heads with multipliers {m_1}, {m_2} overflows int64")
            multipliers_1.append(m_1)
            multipliers_2.append(m_2)
            shifts.append(reference.shift)
        return (np.array(multipliers_1, dtype=np.int64), np.array(multipliers_2, dtype=np.int64),
                np.array(shifts, dtype=np.int64))

    def forward(self, first: QuantLinear, second: QuantLinear, x: QTensor, y: QTensor) -> QTensor:
        if self.training:
            return self.out_quant((linear_preactivation(first, x) + linear_preactivation(second, y)) / 2)
        acc_1, scales_1, bound_1 = first.accumulate(x)
        acc_2, scales_2, bound_2 = second.accumulate(y)
        m_1, m_2, s = (torch.from_numpy(a) for a in self.integer_params(scales_1, scales_2, bound_1, bound_2))
        q = self.out_quant
        codes = round_shift(acc_1 * m_1 + acc_2 * m_2, s).clamp(q.code_min, q.code_max)
        return QTensor(codes, q.scale, q.bits, q.signed)

    def to_onnx(self, b: GraphBuilder, first: QuantLinear, second: QuantLinear, x: QTensor, y: QTensor) -> QTensor:
        with b.scope("head"):
            acc_1, scales_1, bound_1 = first.accumulate_onnx(b, x)
        with b.scope("head_dist"):
            acc_2, scales_2, bound_2 = second.accumulate_onnx(b, y)
        m_1, m_2, s = self.integer_params(scales_1, scales_2, bound_1, bound_2)
        q = self.out_quant
        summed = b.node("Add", [b.node("Mul", [acc_1, b.const(m_1)]), b.node("Mul", [acc_2, b.const(m_2)])])
        out = b.requantize(summed, 1, s, q.code_min, q.code_max)
        return QTensor(out, q.scale, q.bits, q.signed)


class QuantAttention(nn.Module):
    def __init__(self, attn: Attention, tokens: int, cfg: QuantConfig):
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale_factor = attn.scale
        self.qkv = QuantLinear(attn.qkv, cfg.weight_bits, cfg.act_bits)
        self.softmax = SoftmaxSite(cfg.act_bits, cfg.softmax_bits, length=tokens)
        self.out_quant = ActQuantizer(cfg.act_bits)
        self.proj = QuantLinear(attn.proj, cfg.weight_bits, cfg.residual_bits)

    def _split(self, qkv: torch.Tensor):
        n_batch, n_tokens, _ = qkv.shape
        return qkv.reshape(n_batch, n_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: QTensor) -> QTensor:
        qkv = self.qkv(x)
        q, k, v = self._split(qkv.value)
        n_batch, n_tokens = x.value.shape[:2]
        if self.training:
            probs = self.softmax(scores=(q * self.scale_factor) @ k.transpose(-2, -1))
            context = (probs.value @ v).transpose(1, 2).reshape(n_batch, n_tokens, -1)
            return self.proj(self.out_quant(context))
        score_bound = self.head_dim * qkv.code_min**2
        scores = exact_int_matmul(q, k.transpose(-2, -1), score_bound)
        probs = self.softmax(acc=scores, acc_scale=qkv.scale**2 * self.scale_factor, acc_bound=score_bound)
        context_bound = n_tokens * probs.code_max * abs(qkv.code_min)
        context = exact_int_matmul(probs.value, v, context_bound).transpose(1, 2).reshape(n_batch, n_tokens, -1)
        context = quantizer_requantize(self.out_quant, context, probs.scale * qkv.scale, context_bound)
        return self.proj(context)

    def to_onnx(self, b: GraphBuilder, x: QTensor, n_tokens: int) -> QTensor:
        qkv = self.qkv.to_onnx(b, x)
        split = b.node("Reshape", [qkv.value, b.const([0, 0, 3, self.num_heads, self.head_dim])])
        heads = b.node("Transpose", [split], perm=[2, 0, 3, 1, 4])
        q, k, v = (b.node("Gather", [heads, b.const(i)], axis=0, name=name) for i, name in enumerate("qkv"))
        k_t = b.node("Transpose", [k], perm=[0, 1, 3, 2])
        score_bound = self.head_dim * qkv.code_min**2
        scores = b.mark(matmul_integer_onnx(b, QTensor(q, qkv.scale, qkv.bits, qkv.signed), b_tensor=k_t,
                                            out_type=TensorProto.INT32), TensorProto.INT32, 0)
        probs = self.softmax.to_onnx(b, scores, qkv.scale**2 * self.scale_factor, score_bound)
        context = b.mark(matmul_integer_onnx(b, probs, b_tensor=v, out_type=TensorProto.INT32), TensorProto.INT32, 0)
        context = b.node("Reshape", [b.node("Transpose", [context], perm=[0, 2, 1, 3]),
                                     b.const([0, 0, self.num_heads * self.head_dim])])
        context_bound = n_tokens * probs.code_max * abs(qkv.code_min)
        context = quantizer_requantize_onnx(b, self.out_quant, context, probs.scale * qkv.scale, context_bound)
        return self.proj.to_onnx(b, context)


class MlpHalf:
    """The second half of a ViT or Swin block: norm2, fc1, GELU, fc2 and the residual add.

    A mixin for the block modules, so the parameter names stay those of the block.
    """

    def init_mlp_half(self, block, cfg: QuantConfig) -> None:
        self.norm2 = LayerNormSite(block.norm2, cfg.act_bits)
        self.fc1 = QuantLinear(block.mlp.fc1, cfg.weight_bits, cfg.act_bits)
        self.gelu = GeluSite(cfg.act_bits, length=block.mlp.fc1.out_features)
        self.gelu.attach_input_quantizer(self.fc1.out_quant)
        self.fc2 = QuantLinear(block.mlp.fc2, cfg.weight_bits, cfg.residual_bits)
        self.add2 = QuantAdd(cfg.residual_bits)

    def mlp_half(self, x: QTensor) -> QTensor:
        # The GELU scheme may want wider inputs than the activations (I-BERT: 16 bits).
        self.fc1.out_quant.bits = self.gelu.input_bits()
        return self.add2(x, self.fc2(self.gelu(self.fc1(self.norm2(x)))))

    def mlp_half_onnx(self, b: GraphBuilder, x: QTensor) -> QTensor:
        with b.scope("norm2"):
            h = self.norm2.to_onnx(b, x)
        self.fc1.out_quant.bits = self.gelu.input_bits()
        with b.scope("mlp"):
            h = self.fc2.to_onnx(b, self.gelu.to_onnx(b, self.fc1.to_onnx(b, h)))
        with b.scope("add2"):
            return self.add2.to_onnx(b, x, h)


class QuantBlock(MlpHalf, nn.Module):
    def __init__(self, block, tokens: int, cfg: QuantConfig):
        super().__init__()
        self.norm1 = LayerNormSite(block.norm1, cfg.act_bits)
        self.attn = QuantAttention(block.attn, tokens, cfg)
        self.add1 = QuantAdd(cfg.residual_bits)
        self.init_mlp_half(block, cfg)

    def forward(self, x: QTensor) -> QTensor:
        return self.mlp_half(self.add1(x, self.attn(self.norm1(x))))

    def to_onnx(self, b: GraphBuilder, x: QTensor, n_tokens: int) -> QTensor:
        with b.scope("norm1"):
            h = self.norm1.to_onnx(b, x)
        with b.scope("attn"):
            h = self.attn.to_onnx(b, h, n_tokens)
        with b.scope("add1"):
            x = self.add1.to_onnx(b, x, h)
        return self.mlp_half_onnx(b, x)


class QuantViT(QuantClassifier):
    """Integer-only VisionTransformer: QAT in training mode, the integer reference in eval mode.

    A VisionTransformerDistilled gets a second prefix token and a second head (`head_dist`).
    Its logits are the integer average of both heads, which is what timm returns in eval mode.
    """

    def __init__(self, vit: VisionTransformer, mean, std, cfg: QuantConfig):
        super().__init__()
        check_supported(vit)
        disable_fused_attention(vit)
        self.cfg = cfg
        self.distilled = isinstance(vit, VisionTransformerDistilled)
        self.image_shape = (vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)
        self.n_prefix = 2 if self.distilled else 1
        tokens = vit.patch_embed.num_patches + self.n_prefix
        self.n_tokens = tokens
        self.num_classes = vit.num_classes
        self.patch_embed = QuantPatchEmbed(vit.patch_embed.proj, mean, std, cfg.weight_bits, cfg.residual_bits)
        self.embed = QuantEmbed(vit.cls_token, vit.pos_embed, cfg.residual_bits,
                                dist_token=vit.dist_token if self.distilled else None)
        self.blocks = nn.ModuleList(QuantBlock(block, tokens, cfg) for block in vit.blocks)
        self.norm = LayerNormSite(vit.norm, cfg.act_bits)
        self.head = QuantLinear(vit.head, cfg.weight_bits, cfg.logits_bits)
        if self.distilled:
            self.head_dist = QuantLinear(vit.head_dist, cfg.weight_bits, cfg.logits_bits)
            self.head_average = QuantLinearAverage(cfg.logits_bits)
        self.name_sites()

    def sites(self) -> "OrderedDict[str, nn.Module]":
        """List every non-linear site in model order, named as in the timm model."""
        sites: OrderedDict[str, nn.Module] = OrderedDict()
        for i, block in enumerate(self.blocks):
            sites[f"blocks.{i}.norm1"] = block.norm1
            sites[f"blocks.{i}.attn.softmax"] = block.attn.softmax
            sites[f"blocks.{i}.norm2"] = block.norm2
            sites[f"blocks.{i}.mlp.act"] = block.gelu
        sites["norm"] = self.norm
        return sites

    def forward_codes(self, images: torch.Tensor) -> QTensor:
        x = self.embed(self.patch_embed(self.pixels(images)))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        cls = QTensor(x.value[:, 0], x.scale, x.bits, x.signed)
        if not self.distilled:
            return self.head(cls)
        dist = QTensor(x.value[:, 1], x.scale, x.bits, x.signed)
        return self.head_average(self.head, self.head_dist, cls, dist)

    def to_onnx(self, b: GraphBuilder) -> tuple[str, float]:
        """Emit the integer graph; returns the logits tensor name and its scale."""
        with b.scope("patch_embed"):
            x = self.patch_embed.to_onnx(b, self.onnx_pixels(b), self.image_shape)
        with b.scope("embed"):
            x = self.embed.to_onnx(b, x)
        for i, block in enumerate(self.blocks):
            with b.scope(f"blocks.{i}"):
                x = block.to_onnx(b, x, self.n_tokens)
        with b.scope("norm"):
            x = self.norm.to_onnx(b, x)
        if self.distilled:
            cls = b.node("Gather", [x.value, b.const(0)], axis=1, name="cls")
            dist = b.node("Gather", [x.value, b.const(1)], axis=1, name="dist")
            logits = self.head_average.to_onnx(b, self.head, self.head_dist, QTensor(cls, x.scale, x.bits, x.signed),
                                               QTensor(dist, x.scale, x.bits, x.signed))
        else:
            with b.scope("head"):
                cls = b.node("Gather", [x.value, b.const(0)], axis=1, name="cls")
                logits = self.head.to_onnx(b, QTensor(cls, x.scale, x.bits, x.signed))
        return self.onnx_logits(b, logits)
