"""MT-CP in one file: multi-task dense prediction with coherence fusion, trace-back and loss prioritization.

M. Fontana, M. Spratling, M. Shi, "Optimizing Dense Visual Predictions Through Multi-Task Coherence and
Prioritization", WACV 2025 (arXiv 2412.03179). Reconstructed from the paper and the authors' released code;
every deliberate difference from that code is marked where it happens and listed in the README.

The file has two halves. The method (building blocks, MTCP, losses, balancers, metrics) imports only the
standard library, torch, timm and numpy: copy a definition and what it uses above it. The program (train,
evaluate, predict, benchmark, summarize; DDP through torchrun) follows it and reads data.py.

    python mtcp.py                                      # the toy (written on first use), CPU or one GPU
    torchrun --nproc_per_node=4 mtcp.py --dataset pascal   # data/PASCAL_MT on 4 GPUs
    python mtcp.py --help                               # evaluate, resume, predict, benchmark, summarize
"""
import contextlib
import math
import types
from collections.abc import Mapping, Sequence

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.swin_transformer import SwinTransformerBlock, SwinTransformerStage, window_partition, window_reverse

# ---------------------------------------------------------------------------------------------------------
# Building blocks: CBAM, FPN, prediction head, Swin attention

class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018), in the CFM and the SRMs; (B, C, H, W) -> same:
        channel: x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), one MLP of hidden width C / reduction
        spatial: x * sigmoid(BN(conv7x7([max_c(x), mean_c(x)])))"""

    def __init__(self, *, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False),
                                     nn.BatchNorm2d(1, momentum=0.01))  # the released gate's momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))  # (B, C, 1, 1)
        x = x * torch.sigmoid(gate)
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return x * torch.sigmoid(self.spatial(pooled))


class FPN(nn.Module):
    """Feature pyramid (Lin et al., CVPR 2017) into the finest level, as the released decoder builds it:
    y = lateral_i(f_i) + upsample_nearest(y), deep to shallow, then one 3x3 conv; no norm, no activation.
    Shapes: list of (B, C_i, H_i, W_i), finest first -> (B, D, H_0, W_0)."""

    def __init__(self, *, in_channels: list[int], dim: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.smooth = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = self.lateral[-1](feats[-1])
        for lateral, f in zip(self.lateral[-2::-1], feats[-2::-1]):
            y = lateral(f) + F.interpolate(y, size=f.shape[-2:], mode="nearest")  # (B, D, H_i, W_i)
        return self.smooth(y)


class Head(nn.Sequential):
    """Prediction head: 1x1 conv, BN, ReLU, 1x1 conv. Raw outputs: logits, metres, or unnormalised normals.
    Shapes: (B, D, h, w) -> (B, out_channels, h, w)."""

    def __init__(self, *, dim: int, out_channels: int):
        super().__init__(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
                         nn.Conv2d(dim, out_channels, 1))


def _padded_window_attention(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """(Shifted) window attention of a timm Swin block as the original Swin computes it: zero-pad the map to a
    multiple of the window, then shift, with the shifted-window mask of the padded map. Shapes: (B, H, W, C)."""
    B, H, W, C = x.shape
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    x = F.pad(x, (0, 0, 0, -W % ww, 0, -H % wh))  # (B, Hp, Wp, C), zeros right and below
    Hp, Wp = x.shape[1:3]
    shifted = sh > 0 or sw > 0
    if shifted:
        x = torch.roll(x, (-sh, -sw), (1, 2))
    mask = block.get_attn_mask(x) if getattr(block, "dynamic_mask", False) else block.attn_mask  # (nW, N, N) or None
    windows = window_partition(x, (wh, ww)).view(-1, wh * ww, C)  # (B nW, N, C), timm's window order
    x = window_reverse(block.attn(windows, mask=mask).view(-1, wh, ww, C), (wh, ww), Hp, Wp)  # (B, Hp, Wp, C)
    if shifted:
        x = torch.roll(x, (sh, sw), (1, 2))
    return x[:, :H, :W]


def pad_before_shift(module: nn.Module) -> nn.Module:
    """Makes every timm SwinTransformerBlock in `module` pad before it shifts, as the original Swin and the released
    code do; the weights stay timm's. timm rolls the unpadded map, so on a side that is not a multiple of the window
    its shifted windows mix tokens from opposite image borders."""
    for m in module.modules():
        if isinstance(m, SwinTransformerBlock):
            m._attn = types.MethodType(_padded_window_attention, m)
    return module


# ---------------------------------------------------------------------------------------------------------
# Backbone, neck and task decoder (paper Fig. 2)

def load_backbone_weights(body: nn.Module, path: str) -> None:
    """Copies a timm state dict (e.g. a hub model.safetensors) into a `features_only` backbone strictly, which
    timm's own loading is not. Extra keys (classifier, final norm) are ignored; `layers.0` matches `layers_0`."""
    try:
        state = timm.models.load_state_dict(path)
    except Exception as e:
        raise RuntimeError(f"could not read backbone weights from {path}: {e}") from e
    own = body.state_dict()
    missing, mismatched = [], []
    for key, value in own.items():
        head, _, rest = key.partition(".")
        source = key if key in state else head.replace("_", ".", 1) + "." + rest
        if source not in state:
            missing.append(key)
        elif state[source].shape != value.shape:
            mismatched.append(f"{key}: file {tuple(state[source].shape)} vs model {tuple(value.shape)}")
        else:
            own[key] = state[source]
    if missing or mismatched:
        raise RuntimeError(f"backbone weights in {path} do not match the model: {len(missing)} missing "
                           f"(first: {missing[:5]}), {len(mismatched)} with another shape (first: {mismatched[:3]})")
    body.load_state_dict(own)


class Backbone(nn.Module):
    """Any timm backbone (`features_only`) and an FPN neck to one D-channel stride-4 map R.
    NOTE(repro): the paper uses a Mask2Former Swin-S (ADE20K) and modulates its pixel-decoder map by the query
    masks; here a timm backbone and an FPN neck. Shapes: (B, 3, H, W) -> (B, D, H/4, W/4)."""

    def __init__(self, *, name: str, dim: int, img_size: tuple[int, int], pretrained: bool = False,
                 weights: str | None = None):
        super().__init__()
        try:
            try:  # transformers take the input size at build time; CNNs reject the keyword
                self.body = timm.create_model(name, features_only=True, pretrained=pretrained, img_size=img_size)
            except TypeError:
                self.body = timm.create_model(name, features_only=True, pretrained=pretrained)
        except (OSError, ValueError) as e:  # the hub's "not in the cache" errors are OSErrors
            if not pretrained:
                raise
            raise FileNotFoundError(f"could not load timm's pretrained weights for {name} ({type(e).__name__}): they "
                                    f"are read from the local timm/Hugging Face cache, never downloaded at run time. "
                                    f"On a machine with internet run: python -c \"import timm; timm.create_model("
                                    f"'{name}', pretrained=True)\", or pass --weights FILE, or --no-pretrained") from e
        if weights:
            load_backbone_weights(self.body, weights)
        pad_before_shift(self.body)  # a no-op for CNNs
        reductions, channels = self.body.feature_info.reduction(), self.body.feature_info.channels()
        if 4 not in reductions:
            raise ValueError(f"backbone {name} has no stride-4 feature level (strides {reductions})")
        self.levels = [i for i, r in enumerate(reductions) if r >= 4]  # a ResNet's stride-2 stem is dropped
        self.stride = reductions[-1]
        self.nhwc = getattr(self.body, "output_fmt", "NCHW") == "NHWC"  # timm Swin features are NHWC
        self.neck = FPN(in_channels=[channels[i] for i in self.levels], dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        feats = [feats[i].permute(0, 3, 1, 2) if self.nhwc else feats[i] for i in self.levels]  # (B, C_i, H/s_i, W/s_i)
        return self.neck(feats)


class TaskDecoder(nn.Module):
    """One task's decoder, as released: three Swin stages over R (widths D, 2D, 4D at strides 4, 8, 16, depths
    1, 2, 1, 2 heads, 7x7 windows), each output LayerNorm-ed, merged by an FPN. feat_size is R's (H/4, W/4).
    Shapes: R (B, D, H/4, W/4) -> ([D1 (B, D, H/4, W/4), D2 (B, 2D, H/8, W/8), D3 (B, 4D, H/16, W/16)], X like R)."""

    def __init__(self, *, dim: int, feat_size: tuple[int, int], depths: tuple[int, ...] = (1, 2, 1),
                 num_heads: int = 2, window_size: int = 7):
        super().__init__()
        widths = [dim * 2 ** i for i in range(len(depths))]
        self.stages = nn.ModuleList()
        size = feat_size
        for i, depth in enumerate(depths):
            # always_partition: 7x7 windows, shift 3, on maps of 7 or less too, as released (timm shrinks them)
            self.stages.append(SwinTransformerStage(dim=widths[max(i - 1, 0)], out_dim=widths[i], input_resolution=size,
                                                    depth=depth, downsample=i > 0, num_heads=num_heads,
                                                    window_size=window_size, always_partition=True))
            size = self.stages[-1].output_resolution
        pad_before_shift(self.stages)
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in widths)
        self.fpn = FPN(in_channels=widths, dim=dim)

    def forward(self, r: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = r.permute(0, 2, 3, 1)  # (B, H/4, W/4, D): timm's Swin blocks are channels-last
        feats = []
        for stage, norm in zip(self.stages, self.norms):
            x = stage(x)  # (B, H/s, W/s, C_s), un-normalised: the next stage continues from it
            feats.append(norm(x).permute(0, 3, 1, 2))  # (B, C_s, H/s, W/s)
        return feats, self.fpn(feats)


# ---------------------------------------------------------------------------------------------------------
# Coherence Fusion Module

def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, naive: bool = False) -> torch.Tensor:
    """softmax(q k^T) v over all N positions, without 1/sqrt(d) scaling (as released), through SDPA in O(N)
    memory; `naive=True` materialises the N x N matrix as the released code does.
    Shapes: q, k (B, N, Dq); v (B, N, Dv) -> (B, N, Dv)."""
    if naive:
        return torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v  # (B, N, N) @ (B, N, Dv)
    dv = v.shape[-1]
    if q.device.type == "cpu" and dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))  # (B, N, Dq): the CPU flash kernel needs v as wide as q
    # the fused kernels need a contiguous last dimension, else SDPA silently falls back to the N x N math
    q, k, v = (t.contiguous()[:, None] for t in (q, k, v))  # (B, 1, N, D): one head
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, 1, N, D)
    return out[:, 0, :, :dv]


class CoherenceFusion(nn.Module):
    """Coherence Fusion Module (CFM): task t attends over all positions with queries and keys made from the
    other tasks' maps X_a, so each prediction is informed by the others. As released, no scaling, no residual:
        S = BN(CBAM(X_t))                                        values
        G_a = sigmoid(conv1x1(X_a)) * X_a;  U = ReLU(conv1x1(concat_a G_a))
        Q = ReLU(BN(CBAM_q(U)));  K = ReLU(BN(CBAM_k(U)))
        O = softmax(Q^T K) S^T;  C_t = BN(CBAM_o(O))
    Shapes: x (B, D, h, w), others: num_aux x (B, D, h, w) -> (B, D, h, w)."""

    def __init__(self, *, dim: int, num_aux: int, qk_dim: int | None = None):
        super().__init__()
        # NOTE(repro): Q and K are D wide by default, (T-1)*D as released (512 for three tasks; qk_dim), so that
        # SDPA's fused GPU kernels (head dim <= 256) apply.
        qk_dim = qk_dim or dim
        self.value = nn.Sequential(CBAM(channels=dim), nn.BatchNorm2d(dim))
        self.gates = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in range(num_aux))
        self.mix = nn.Sequential(nn.Conv2d(dim * num_aux, qk_dim, 1), nn.ReLU(inplace=True))
        self.query = nn.Sequential(CBAM(channels=qk_dim), nn.BatchNorm2d(qk_dim), nn.ReLU(inplace=True))
        self.key = nn.Sequential(CBAM(channels=qk_dim), nn.BatchNorm2d(qk_dim), nn.ReLU(inplace=True))
        self.out = nn.Sequential(CBAM(channels=dim), nn.BatchNorm2d(dim))
        self.naive_attention = False  # for the memory benchmark: materialise the N x N matrix

    def forward(self, x: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
        B, D, h, w = x.shape
        u = self.mix(torch.cat([torch.sigmoid(gate(a)) * a for gate, a in zip(self.gates, others)], dim=1))  # (B, Dq, h, w)
        q = self.query(u).flatten(2).transpose(1, 2)  # (B, N, Dq), N = h*w
        k = self.key(u).flatten(2).transpose(1, 2)  # (B, N, Dq)
        v = self.value(x).flatten(2).transpose(1, 2)  # (B, N, D)
        o = global_attention(q, k, v, naive=self.naive_attention)  # (B, N, D)
        return self.out(o.transpose(1, 2).reshape(B, D, h, w))  # (B, D, h, w)


# ---------------------------------------------------------------------------------------------------------
# Spatial Refinement Module and trace-back

class SpatialRefinement(nn.Module):
    """Spatial Refinement Module (SRM): refines a coarse map p with a decoder feature b of another stride.
        p' = resize(CBAM(p), size of b);  Z = concat(p', CBAM(b))
        p_out = ReLU(BN(conv1x1(Z -> D)))          to a prediction head
        b_out = ReLU(BN(conv1x1(Z -> C_b)))        to the next SRM (not built when carry=False)
    Shapes: p (B, C_p, h_p, w_p), b (B, C_b, h_b, w_b) -> p_out (B, D, h_b, w_b), b_out (B, C_b, h_b, w_b) or None."""

    def __init__(self, *, p_channels: int, b_channels: int, dim: int, carry: bool = True):
        super().__init__()
        self.cbam_p = CBAM(channels=p_channels)
        self.cbam_b = CBAM(channels=b_channels)
        z = p_channels + b_channels
        self.to_p = nn.Sequential(nn.Conv2d(z, dim, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
        self.to_b = nn.Sequential(nn.Conv2d(z, b_channels, 1, bias=False), nn.BatchNorm2d(b_channels),
                                  nn.ReLU(inplace=True)) if carry else None

    def forward(self, p: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = F.interpolate(self.cbam_p(p), size=b.shape[-2:], mode="bilinear", align_corners=False)  # (B, C_p, h_b, w_b)
        z = torch.cat([p, self.cbam_b(b)], dim=1)  # (B, C_p + C_b, h_b, w_b)
        return self.to_p(z), (self.to_b(z) if self.to_b is not None else None)


class TraceBack(nn.Module):
    """Trace-back: the fused map C_t goes back through the task's own decoder stages, deep to shallow, so the
    final prediction agrees with every scale of its decoder; only b is carried on:
        (p1, b1) = SRM(C_t, D3);  (p2, b2) = SRM(b1, D2);  (p3, _) = SRM(b2, D1)
    Shapes: c (B, D, H/4, W/4), feats [D1, D2, D3] -> [p1 (B, D, H/16, W/16), p2 (B, D, H/8, W/8), p3 (B, D, H/4, W/4)]."""

    def __init__(self, *, dim: int):
        super().__init__()
        self.srms = nn.ModuleList([
            SpatialRefinement(p_channels=dim, b_channels=4 * dim, dim=dim),
            SpatialRefinement(p_channels=4 * dim, b_channels=2 * dim, dim=dim),
            SpatialRefinement(p_channels=2 * dim, b_channels=dim, dim=dim, carry=False),
        ])

    def forward(self, c: torch.Tensor, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        carried, outs = c, []
        for srm, b in zip(self.srms, reversed(feats)):
            p, carried = srm(carried, b)
            outs.append(p)
        return outs


# ---------------------------------------------------------------------------------------------------------
# The MT-CP network

@contextlib.contextmanager
def _bn_stats_kept(module: nn.Module):
    """During an activation checkpoint's recomputation BatchNorm normalises by the batch, as in the first
    forward, but leaves its running statistics (updated then) as they are."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
           and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class MTCP(nn.Module):
    """MT-CP (paper Fig. 2): shared backbone, one decoder per task, CFM, trace-back, four heads per task.

    Args:
        num_outputs: task -> output channels, e.g. {"semseg": 40, "depth": 1, "normals": 3}; one task has no CFM.
        img_size: (H, W) of the inputs; zero-padded inside to a multiple of 32, outputs cropped back.
        cfm, traceback: False removes the part (ablations; without the trace-back aux is empty).
        cfm_qk_dim: width of the CFM's Q and K (default D; (T-1)*D is the released code's).
    Shapes: x (B, 3, H, W), ImageNet-normalised -> (preds, aux): preds[task] (B, C_task, H, W), the final
        prediction; aux[task] [initial, intermediate 1, intermediate 2], each (B, C_task, H, W)."""

    def __init__(self, num_outputs: dict[str, int], *, backbone: str = "swin_small_patch4_window7_224.ms_in22k_ft_in1k",
                 pretrained: bool = False, weights: str | None = None, dim: int = 256,
                 img_size: tuple[int, int] = (480, 640), cfm: bool = True, traceback: bool = True,
                 cfm_qk_dim: int | None = None):
        super().__init__()
        self.tasks = list(num_outputs)
        self.img_size = tuple(img_size)
        self.stride = 32  # every timm hierarchy ends at stride 32; checked below
        self.padded_size = tuple(math.ceil(s / self.stride) * self.stride for s in self.img_size)
        self.backbone = Backbone(name=backbone, dim=dim, img_size=self.padded_size, pretrained=pretrained,
                                 weights=weights)
        if self.backbone.stride != self.stride:
            raise ValueError(f"backbone {backbone} ends at stride {self.backbone.stride}, expected {self.stride}")
        feat_size = (self.padded_size[0] // 4, self.padded_size[1] // 4)
        self.decoders = nn.ModuleDict({t: TaskDecoder(dim=dim, feat_size=feat_size) for t in self.tasks})
        use_cfm = cfm and len(self.tasks) > 1
        self.cfm = nn.ModuleDict({t: CoherenceFusion(dim=dim, num_aux=len(self.tasks) - 1, qk_dim=cfm_qk_dim)
                                  for t in self.tasks}) if use_cfm else None
        self.traceback = nn.ModuleDict({t: TraceBack(dim=dim) for t in self.tasks}) if traceback else None
        # heads: initial (on C_t), then with the trace-back intermediate 1, 2 (on p1, p2) and final (on p3)
        # NOTE(repro): the released code has no initial head (the paper's figure has one) and its own kind of
        # final head per task; here all four heads of a task are the same small Head.
        self.heads = nn.ModuleDict({t: nn.ModuleList(Head(dim=dim, out_channels=c) for _ in range(4 if traceback else 1))
                                    for t, c in num_outputs.items()})
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass per block (backbone stages, decoders, CFMs, trace-backs).
        timm's checkpointing of a BatchNorm backbone (a ResNet) updates its running statistics twice a step."""
        self.backbone.body.set_grad_checkpointing(enable)
        self.grad_checkpointing = enable

    def _block(self, module: nn.Module, *args):
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return module(*args)
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), _bn_stats_kept(module)))

    def param_counts(self) -> dict[str, int]:
        parts = dict(backbone=self.backbone, decoders=self.decoders, cfm=self.cfm, traceback=self.traceback,
                     heads=self.heads)
        return {k: sum(p.numel() for p in m.parameters()) if m is not None else 0 for k, m in parts.items()}

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        H, W = x.shape[-2:]
        if (H, W) != self.img_size:
            raise ValueError(f"MTCP was built for inputs of {self.img_size}, got {(H, W)}: resize the images "
                             f"(the data readers and --predict do) or build the model with img_size={(H, W)}")
        Hp, Wp = self.padded_size
        x = F.pad(x, (0, Wp - W, 0, Hp - H))  # (B, 3, Hp, Wp), zeros = the mean colour after normalisation
        r = self.backbone(x)  # (B, D, Hp/4, Wp/4)
        feats, maps = {}, {}
        for t in self.tasks:
            feats[t], maps[t] = self._block(self.decoders[t], r)
        preds, aux = {}, {}
        for t in self.tasks:
            c = self._block(self.cfm[t], maps[t], [maps[a] for a in self.tasks if a != t]) if self.cfm is not None else maps[t]
            levels = [c] + (self._block(self.traceback[t], c, feats[t]) if self.traceback is not None else [])
            outs = [F.interpolate(head(z), size=(Hp, Wp), mode="bilinear", align_corners=False)[..., :H, :W]  # (B, C_t, H, W)
                    for head, z in zip(self.heads[t], levels)]
            preds[t], aux[t] = outs[-1], outs[:-1]
        return preds, aux


# ---------------------------------------------------------------------------------------------------------
# Losses

IGNORE_INDEX = 255  # label value that is never trained on nor scored


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid entries; exactly 0, still attached to the graph, if none is valid."""
    # where() rather than a product: a non-finite value at an invalid pixel must not leak in as NaN
    return torch.where(valid, values, 0.0).sum() / valid.sum().clamp(min=1)


def cross_entropy_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Semseg, human parts. Shapes: pred (B, C, H, W) logits; target (B, H, W) int64, 255 = ignore."""
    ce = F.cross_entropy(pred.float(), target, ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W)
    return _masked_mean(ce, target != IGNORE_INDEX)


def depth_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 in metres over pixels with GT. Shapes: pred, target (B, 1, H, W), target 0 = invalid."""
    # NOTE(repro): the released loss also drops GT >= 6.5535 m (the uint16 PNG ceiling); we use every GT > 0.
    return _masked_mean((pred.float() - target).abs(), target > 0)


def normals_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between unit normals, mean over the components of valid pixels.
    Shapes: pred (B, 3, H, W) raw 3-vectors; target (B, 3, H, W) unit vectors, zero vector = invalid."""
    # NOTE(repro): the released code uses MSE on the raw outputs; here L1 on L2-normalised predictions.
    unit = F.normalize(pred.float(), dim=1)  # (B, 3, H, W)
    valid = (target != 0).any(dim=1, keepdim=True).expand_as(target)  # (B, 3, H, W)
    return _masked_mean((unit - target).abs(), valid)


def saliency_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy: positives weighted by the batch's fraction of negatives w,
    negatives by 1 - w. Shapes: pred (B, 1, H, W) logits; target (B, 1, H, W) in {0, 1}."""
    w = (1 - target).mean()
    weight = target * w + (1 - target) * (1 - w)  # (B, 1, H, W)
    return F.binary_cross_entropy_with_logits(pred.float(), target, weight=weight)

TASK_LOSSES = {"semseg": cross_entropy_loss, "human_parts": cross_entropy_loss, "depth": depth_loss,
               "normals": normals_loss, "sal": saliency_loss}


def task_loss(task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss of one task on one prediction at the target's resolution, in fp32."""
    if task not in TASK_LOSSES:
        raise ValueError(f"no loss for task {task!r}; known tasks: {sorted(TASK_LOSSES)}")
    if pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"{task}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
    return TASK_LOSSES[task](pred, target)


def multi_task_losses(preds: Mapping[str, torch.Tensor], aux: Mapping[str, Sequence[torch.Tensor]],
                      targets: Mapping[str, torch.Tensor], aux_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """task -> L_t = loss(final) + aux_weight * sum_i loss(aux_i): deep supervision of the initial and
    intermediate outputs at 0.5 each, as the released code weights its intermediates."""
    # NOTE(repro): the released code supervises only the intermediates, scores NYUD's normals intermediates with
    # the depth loss and adds only the last human-parts one; here every aux output gets its own task's loss.
    return {task: task_loss(task, pred, targets[task]) + aux_weight * sum(
        task_loss(task, p, targets[task]) for p in aux.get(task, ())) for task, pred in preds.items()}


# ---------------------------------------------------------------------------------------------------------
# Task balancers: the Loss Prioritization Scheme and three baselines

def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` summed over the DDP ranks (a plain copy without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.clone()
    nccl = dist.get_backend() == "nccl"
    tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu", copy=True)
    dist.all_reduce(tensor)
    return tensor


class TaskBalancer(nn.Module):
    """Base balancer: `total = balancer(losses)` each step returns sum_t w_t L_t and records L_t; `end_epoch()`
    all-reduces the epoch's means into `history` and updates `weights`, the same on every rank."""

    def __init__(self, *, tasks: Sequence[str]):
        super().__init__()
        self.tasks = list(tasks)
        self.history: list[dict[str, float]] = []
        self._weights = {t: 1.0 for t in self.tasks}
        self._epoch_sums: torch.Tensor | None = None  # (T + 1,): per-task sums, then the step count

    @property
    def weights(self) -> dict[str, float]:
        """task -> weight of the current (after end_epoch: the next) epoch."""
        return dict(self._weights)

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self._record(losses)
        return sum(self._weights[t] * losses[t] for t in self.tasks)

    def _record(self, values: Mapping[str, torch.Tensor]) -> None:
        if set(values) != set(self.tasks):
            raise ValueError(f"balancer expects losses for {self.tasks}, got {sorted(values)}")
        step = torch.stack([values[t].detach().double() for t in self.tasks])  # (T,)
        step = torch.cat([step, step.new_ones(1)])  # (T + 1,); stays on the losses' device: no host sync
        self._epoch_sums = step if self._epoch_sums is None else self._epoch_sums + step

    def end_epoch(self) -> dict[str, float]:
        """Collective: every rank calls it once per epoch, after at least one step."""
        if self._epoch_sums is None:
            raise RuntimeError("end_epoch() called before any step of the epoch")
        *sums, steps = _all_reduce_sum(self._epoch_sums).tolist()
        self._epoch_sums = None
        self.history.append({t: s / steps for t, s in zip(self.tasks, sums)})
        self._update_weights()
        return self.weights

    def _update_weights(self) -> None:
        pass  # equal weights

    def get_extra_state(self) -> dict:
        return {"tasks": self.tasks, "weights": dict(self._weights), "history": [dict(h) for h in self.history]}

    def set_extra_state(self, state: dict) -> None:
        if state["tasks"] != self.tasks:
            raise ValueError(f"balancer state is for tasks {state['tasks']}, this run has {self.tasks}")
        self._weights = dict(state["weights"])
        self.history = [dict(h) for h in state["history"]]


class EqualWeighting(TaskBalancer):
    """The plain sum of the task losses, what the released code actually optimises."""


class UncertaintyWeighting(TaskBalancer):
    """Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): total = sum_t exp(-s_t) L_t + s_t with learned
    s_t = log sigma_t^2 (init 0; give `parameters()` to the optimizer). `weights` reports exp(-s_t)."""

    def __init__(self, *, tasks: Sequence[str]):
        super().__init__(tasks=tasks)
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.tasks})

    @property
    def weights(self) -> dict[str, float]:
        return {t: math.exp(-s.item()) for t, s in self.log_vars.items()}

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self._record(losses)
        return sum(torch.exp(-self.log_vars[t]) * losses[t] + self.log_vars[t] for t in self.tasks)


class DynamicWeightAverage(TaskBalancer):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): w_t = T softmax_t(r_t / temperature),
    r_t = m_t(e-1) / m_t(e-2) of the epoch means m; w = 1 for the first two epochs."""

    def __init__(self, *, tasks: Sequence[str], temperature: float = 2.0):
        super().__init__(tasks=tasks)
        self.temperature = temperature

    def _update_weights(self) -> None:
        if len(self.history) < 2:
            return
        prev, last = self.history[-2:]
        exp_r = {t: math.exp(last[t] / prev[t] / self.temperature) for t in self.tasks}
        total = sum(exp_r.values())
        self._weights = {t: len(self.tasks) * exp_r[t] / total for t in self.tasks}


class LossPrioritization(TaskBalancer):
    """Loss Prioritization Scheme (LPS), MT-CP's task balancing: the losses on a common logarithmic scale,
    P_t = log(1 + L_t); the slowest-improving tasks weighted up once per epoch from the epoch means m_t of P_t:

        epoch 0:  w = 1;  after it  w_t = (sum_s m_s / m_t) / mean_u(sum_s m_s / m_u)
        then      r_t = (m_t(e) / m_t(e-1)) / (M(e) / M(e-1)),  M = sum_t m_t
                  w_t = max(mean(r) + spread * (r_t - mean(r)), floor)

    The paper's equations are not legible; this reconstruction is explained in docs/method.md."""

    def __init__(self, *, tasks: Sequence[str], spread: float = 7.5, floor: float = 0.1):
        super().__init__(tasks=tasks)
        self.spread, self.floor = spread, floor

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # NOTE(repro): L_t includes the deep supervision; the released code takes the final outputs' losses only.
        projected = {t: torch.log1p(loss) for t, loss in losses.items()}
        self._record(projected)
        # NOTE(repro): the released code computes the weights but optimises the plain sum (and has LPS off on
        # PASCAL); here the weights are applied on every dataset.
        return sum(self._weights[t] * projected[t] for t in self.tasks)

    def _update_weights(self) -> None:
        # NOTE(repro): the released code uses each rank's own statistics; here they are all-reduced.
        m = self.history[-1]
        if len(self.history) == 1:
            inverse = {t: sum(m.values()) / m[t] for t in self.tasks}
            mean = sum(inverse.values()) / len(self.tasks)
            self._weights = {t: inverse[t] / mean for t in self.tasks}
            return
        prev = self.history[-2]
        total_ratio = sum(m.values()) / sum(prev.values())
        r = {t: m[t] / prev[t] / total_ratio for t in self.tasks}  # > 1: t improved less than the total
        mean = sum(r.values()) / len(self.tasks)
        # NOTE(repro): the released code does not clamp, so its weights can go negative.
        self._weights = {t: max(mean + self.spread * (r[t] - mean), self.floor) for t in self.tasks}

BALANCERS = {"lps": LossPrioritization, "equal": EqualWeighting, "uw": UncertaintyWeighting,
             "dwa": DynamicWeightAverage}


def make_balancer(name: str, tasks: Sequence[str], *, spread: float = 7.5, floor: float = 0.1) -> TaskBalancer:
    """The balancer `name` over `tasks`; spread and floor are LPS's."""
    if name not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; choose from {sorted(BALANCERS)}")
    return BALANCERS[name](tasks=tasks, **(dict(spread=spread, floor=floor) if name == "lps" else {}))


# ---------------------------------------------------------------------------------------------------------
# Metrics and Delta_m

SAL_BETA2 = 0.3  # beta^2 of the pooled saliency F-measure (InvPT / TaskPrompter convention)
SAL_THRESHOLDS = (0.05, 0.95, 19)  # linspace of the pooled maxF's probability thresholds
SAL_THRESHOLDS_MTCP = (0.2, 0.9, 15)  # linspace of MT-CP's (MTL-PyTorch's) per-image thresholds: maxF_mtcp, mIoU
DEPTH_MIN = 1e-9  # m; predictions are clamped to this before every depth metric, as both reference evaluators do
ANGLE_BIN = 0.01  # deg; histogram resolution of the pooled normals median
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)  # deg


class Metrics:
    """The benchmarks' metrics over a split, kept as sufficient statistics (confusion matrix, sums, counts,
    histograms; int64 / float64) and summed over the DDP ranks once in compute(), so sharded ranks report the
    single-process numbers (the normals median to within its 0.01 deg bin).

    Shapes (update): preds[task] (B, C, H, W) raw outputs at the targets' resolution: logits, metres, or
        3-vectors of any length; targets as the data readers give them: semseg / human_parts (B, H, W) int64,
        255 = ignore; depth (B, 1, H, W) metres, 0 = invalid; normals (B, 3, H, W) unit, 0 = invalid; sal
        (B, 1, H, W) in {0, 1}. compute(): percent (mIoU, pixel_acc, maxF, delta1, angle thresholds), m, deg."""

    def __init__(self, num_outputs: Mapping[str, int]):
        def zeros(shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype)

        f64 = torch.float64
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        for task, channels in num_outputs.items():
            if task in ("semseg", "human_parts"):
                self.stats[task] = {"confusion": zeros(channels * channels)}  # (gt * C + pred,)
            elif task == "depth":
                self.stats[task] = {"sq_err": zeros((), f64), "log_sq_err": zeros((), f64),
                                    "abs_rel": zeros((), f64), "delta1": zeros(()), "pixels": zeros(())}
            elif task == "normals":
                self.stats[task] = {"sum": zeros((), f64), "sq_sum": zeros((), f64), "pixels": zeros(()),
                                    "below": zeros(len(ANGLE_THRESHOLDS)), "hist": zeros(round(180 / ANGLE_BIN))}
            elif task == "sal":
                n, m = SAL_THRESHOLDS[2], SAL_THRESHOLDS_MTCP[2]
                self.stats[task] = {"tp": zeros(n), "fp": zeros(n), "fn": zeros(n), "iou_sum": zeros(m, f64),
                                    "precision_sum": zeros(m, f64), "recall_sum": zeros(m, f64), "images": zeros(())}
            else:
                raise ValueError(f"no metric for task {task!r}")
        self.num_outputs = dict(num_outputs)

    def _add(self, task: str, **values: torch.Tensor) -> None:
        stats = self.stats[task]
        for name, value in values.items():  # the statistics follow the predictions' device
            stats[name] = stats[name].to(value.device) + value.to(stats[name].dtype)

    @torch.no_grad()
    def update(self, preds: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> None:
        for task in preds:  # every task of the Metrics, or a subset of them
            pred, target = preds[task].float(), targets[task]
            if pred.shape[-2:] != target.shape[-2:]:
                raise ValueError(f"{task}: score predictions at the target size, got {tuple(pred.shape)} "
                                 f"for a target of {tuple(target.shape)}")
            if task in ("semseg", "human_parts"):
                # confusion over labelled pixels only: an all-255 image (no parts) contributes nothing
                c, valid = self.num_outputs[task], target != IGNORE_INDEX  # (B, H, W)
                if task == "human_parts":
                    # an image with no part pixel (only 0 and 255) is skipped, as both reference evaluators do
                    valid &= ((target > 0) & valid).flatten(1).any(1)[:, None, None]
                confusion = torch.bincount(target[valid] * c + pred.argmax(1)[valid], minlength=c * c)
                if confusion.numel() != c * c:
                    raise ValueError(f"{task}: labels outside 0..{c - 1} (and 255 = ignore)")
                self._add(task, confusion=confusion)
            elif task == "depth":
                # NOTE(repro): the released evaluation also drops pixels with GT >= 6.5535 m (as its loss does);
                # we score every GT > 0.
                valid = target > 0  # (B, 1, H, W)
                # a negative depth is never scored as is: clamped first, RMSE included (both reference evaluators)
                p, g = pred[valid].double().clamp(min=DEPTH_MIN), target[valid].double()  # (P,) metres
                self._add(task, sq_err=((p - g) ** 2).sum(), log_sq_err=((p.log() - g.log()) ** 2).sum(),
                          abs_rel=((p - g).abs() / g).sum(), delta1=(torch.maximum(p / g, g / p) < 1.25).sum(),
                          pixels=valid.sum())
            elif task == "normals":
                # NOTE(repro): scored on the float predictions; the released code scores normals saved as 8-bit
                # PNGs ((n + 1) * 255 / 2, rounded): about 0.17 deg of quantisation per pixel on average, 0.38 at most.
                valid = (target != 0).any(dim=1)  # (B, H, W)
                # per-pixel maths in float64: fp32 sums over the 3 components vary with the batch layout (~1e-7),
                # which would make sharded and single-process results differ
                n = F.normalize(pred.permute(0, 2, 3, 1)[valid].double(), dim=1)  # (P, 3)
                g = F.normalize(target.permute(0, 2, 3, 1)[valid].double(), dim=1)  # (P, 3)
                # angle = atan2(|n x g|, n . g), accurate near 0 deg where acos(n . g) is not
                angle = torch.rad2deg(torch.atan2(torch.linalg.cross(n, g).norm(dim=1), (n * g).sum(1)))  # (P,)
                hist = self.stats[task]["hist"]
                bins = (angle / ANGLE_BIN).long().clamp(max=hist.numel() - 1)
                self._add(task, sum=angle.sum(), sq_sum=(angle ** 2).sum(), pixels=valid.sum(),
                          below=(angle[:, None] < angle.new_tensor(ANGLE_THRESHOLDS)).sum(0),
                          hist=torch.bincount(bins, minlength=hist.numel()))
            elif task == "sal":
                prob, gt = torch.sigmoid(pred).flatten(1), (target > 0.5).flatten(1)[..., None]  # (B, HW), (B, HW, 1)
                # maxF: tp / fp / fn pooled over the split at thresholds 0.05, 0.10, ..., 0.95
                pos = prob[..., None] > torch.linspace(*SAL_THRESHOLDS, device=prob.device)  # (B, HW, 19)
                tp = (pos & gt).sum((0, 1))
                self._add(task, tp=tp, fp=(pos & ~gt).sum((0, 1)), fn=gt.sum() - tp)
                # MT-CP's evaluation: per image, at thresholds linspace(0.2, 0.9, 15),
                # IoU (1 when GT and prediction are both empty), precision tp / (tp + fp + 1e-12) and
                # recall tp / (tp + fn + 1e-12); each averaged over the images in compute().
                # NOTE(repro): thresholds apply to the float probability; the released code thresholds the
                # probability saved as an 8-bit PNG (multiples of 1/255).
                pos = prob[..., None] > torch.linspace(*SAL_THRESHOLDS_MTCP, device=prob.device)  # (B, HW, 15)
                tp, pos_count, gt_count = ((pos & gt).sum(1).double(), pos.sum(1).double(),
                                            gt.sum(1).double())  # (B, 15), (B, 15), (B, 1)
                union = pos_count + gt_count - tp  # (B, 15)
                iou = torch.where(union > 0, tp / union.clamp(min=1), 1.0)  # (B, 15)
                self._add(task, iou_sum=iou.sum(0), precision_sum=(tp / (pos_count + 1e-12)).sum(0),
                          recall_sum=(tp / (gt_count + 1e-12)).sum(0), images=torch.tensor(len(iou), device=prob.device))

    def compute(self) -> dict[str, dict[str, float]]:
        """task -> metric -> value. Collective over the DDP ranks: every rank calls it; it can be called again."""
        results = {}
        for task, local in self.stats.items():
            s = {name: _all_reduce_sum(value) for name, value in local.items()}
            if task in ("semseg", "human_parts"):
                c = self.num_outputs[task]
                confusion = s["confusion"].view(c, c)  # (gt, pred)
                tp = confusion.diag()
                # IoU_c = tp / (tp + fp + fn); a class absent from GT and prediction counts 0 (benchmark code)
                iou = tp / (confusion.sum(0) + confusion.sum(1) - tp).clamp(min=1)
                results[task] = {"mIoU": 100 * iou.mean().item(),
                                 "pixel_acc": 100 * tp.sum().item() / max(confusion.sum().item(), 1)}
            elif task == "depth":
                n = max(s["pixels"].item(), 1)
                results[task] = {"rmse": math.sqrt(s["sq_err"].item() / n),
                                 "log_rmse": math.sqrt(s["log_sq_err"].item() / n),
                                 "abs_rel": s["abs_rel"].item() / n, "delta1": 100 * s["delta1"].item() / n}
            elif task == "normals":
                n = max(s["pixels"].item(), 1)
                # pooled median from the histogram, interpolated linearly within the bin holding rank n / 2
                hist, cum = s["hist"], s["hist"].cumsum(0)
                b = min(int((cum < n / 2).sum()), len(hist) - 1)  # first bin with cum >= n / 2
                median = (b + (n / 2 - (cum[b] - hist[b]).item()) / max(hist[b].item(), 1)) * ANGLE_BIN
                below = (100 * s["below"].double() / n).tolist()
                results[task] = {"mean": s["sum"].item() / n, "median": median,
                                 "rmse": math.sqrt(s["sq_sum"].item() / n),
                                 **{f"{t:g}": v for t, v in zip(ANGLE_THRESHOLDS, below)}}
            elif task == "sal":
                # maxF (pooled): F = (1 + b2) P R / (b2 P + R), b2 = 0.3, at each threshold; the best threshold
                precision = s["tp"] / (s["tp"] + s["fp"]).clamp(min=1)
                recall = s["tp"] / (s["tp"] + s["fn"]).clamp(min=1)
                f = (1 + SAL_BETA2) * precision * recall / (SAL_BETA2 * precision + recall).clamp(min=1e-12)
                # maxF_mtcp: P, R averaged over images, F = 2 P R / (P + R + 1e-12), the best threshold; mIoU the same
                images = s["images"].clamp(min=1)
                p_mean, r_mean = s["precision_sum"] / images, s["recall_sum"] / images
                f_mtcp = 2 * p_mean * r_mean / (p_mean + r_mean + 1e-12)
                results[task] = {"maxF": 100 * f.max().item(), "maxF_mtcp": 100 * f_mtcp.max().item(),
                                 "mIoU": 100 * (s["iou_sum"] / images).max().item()}
        return results

# the headline metric per task, the one Delta_m uses, and s_t: +1 if higher is better, -1 if lower.
# Saliency by MT-CP's per-image mIoU, as MT-CP's code (and MTL-PyTorch's) computes Delta_m.
HEADLINE = {"semseg": ("mIoU", +1), "human_parts": ("mIoU", +1), "depth": ("rmse", -1),
            "normals": ("mean", -1), "sal": ("mIoU", +1)}


def delta_m(results: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]]) -> float:
    """Mean relative gain over the single-task baselines, in percent; both in compute()'s format."""
    missing = [t for t in results if t not in HEADLINE or t not in baselines]
    if missing:
        raise ValueError(f"no headline metric or no baseline for {missing}")
    # Delta_m = (100 / T) sum_t s_t (M_t - B_t) / B_t
    gains = []
    for task, result in results.items():
        metric, sign = HEADLINE[task]
        gains.append(sign * (result[metric] - baselines[task][metric]) / baselines[task][metric])
    return 100 * sum(gains) / len(gains)


# =========================================================================================================
# The program: train / evaluate / predict / benchmark / summarize. Everything below may read the command
# line and data.py; nothing above does.


import argparse
import dataclasses
import datetime
import difflib
import fcntl
import json
import os
import signal
import statistics
import sys
import time
import zipfile
from pathlib import Path

from PIL import Image
from torch.distributed.elastic.multiprocessing.errors import record

import data

SWIN_S = "swin_small_patch4_window7_224.ms_in22k_ft_in1k"  # Swin-S, ImageNet-22k, fine-tuned on 1k
RECIPES = {  # the defaults per --dataset: the released code's recipe for NYUD and PASCAL, a small one for the toy
    "nyud": dict(img_size=(480, 640), backbone=SWIN_S, dim=256, epochs=100, batch_size=2, lr=5e-5, lps_spread=7.5),
    "pascal": dict(img_size=(512, 512), backbone=SWIN_S, dim=256, epochs=100, batch_size=2, lr=5e-5, lps_spread=1.6),
    "toy": dict(img_size=(96, 128), backbone="resnet18", dim=32, epochs=12, batch_size=16, lr=2e-3, lps_spread=7.5),
}
USER_ERROR_EXIT = 2  # argparse's exit code for a bad command line


class UserError(Exception):
    """A problem the user can fix (a missing dataset, an unreadable file, a bad flag): cli() reports it once,
    without a traceback, and exits with USER_ERROR_EXIT on every rank. data.DataError is reported the same way."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers send before they kill a job: raised where the program is, handled as Ctrl-C."""


class Interrupted(UserError):
    """Ctrl-C or SIGTERM, reported with how to continue, and the shell's exit code for that signal."""
    def __init__(self, message: str, *, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------------------
# Command line and the run's state (flags, defaults, a torchrun restart, the checkpoint), resolved once

def _number(kind: type, zero_ok: bool):
    """An argparse type: a finite number > 0 (>= 0 when zero_ok); argparse's error then names the flag."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < 0 or value == 0 and not zero_ok:
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero_ok else '> 0'}, not {text}")
        return value
    parse.__name__ = kind.__name__  # a ValueError reads "invalid int value: 'x'"
    return parse


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" would hide the dataset's default named in the help
        return action.help if action.default is None else super()._get_help_string(action)


def get_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The flags, and the names of those given. Flags left at None take the dataset's defaults (fill_defaults)
    or, when resuming, the checkpoint's."""
    p = argparse.ArgumentParser(description="MT-CP: multi-task dense prediction (WACV 2025): train / evaluate / "
                                "predict / benchmark / summarize", formatter_class=_Help)
    num, count, pos, nonneg = (dict(type=_number(int, False)), dict(type=_number(int, True)),
                               dict(type=_number(float, False)), dict(type=_number(float, True)))
    add = p.add_argument_group("data").add_argument
    add("--dataset", choices=list(RECIPES), default="toy", help="toy: built-in rooms in the NYUD layout, written on "
        "first use; nyud: NYUD_MT; pascal: PASCAL_MT")
    add("--data-root", help="dataset folder (default: data/toy, data/NYUD_MT or data/PASCAL_MT)")
    add("--tasks", nargs="+", help="subset of the dataset's tasks, e.g. one for a single-task baseline (default: all)")
    add("--workers", **count, help="loader processes per rank (default: 8 on CUDA, at most the cores per rank; 0 on CPU)")
    add = p.add_argument_group("model").add_argument
    add("--backbone", help=f"timm model name (default: {SWIN_S}; toy resnet18)")
    add("--pretrained", action=argparse.BooleanOptionalAction, help="timm's pretrained weights, from its local cache, "
        "never downloaded (default: on as in the paper; off for the toy and with --weights)")
    add("--weights", help="local timm state dict for the backbone, loaded strictly")
    add("--dim", **num, help="D, width of neck, decoders and heads (default: 256; toy 32)")
    add("--img-size", **num, nargs=2, metavar=("H", "W"), help="input size (default: nyud 480 640, pascal 512 512, "
        "toy 96 128)")
    add("--no-cfm", action="store_true", help="ablation: no Coherence Fusion Module")
    add("--no-traceback", action="store_true", help="ablation: no trace-back, the CFM head is final")
    add("--cfm-released-width", action="store_true", help="CFM queries and keys (T-1)*D wide as released, not D")
    add = p.add_argument_group("optimisation").add_argument
    add("--epochs", **num, help="default: 100 as released; toy 12")
    add("--batch-size", **num, help="per process (default: 2 as released; toy 16)")
    add("--eval-batch-size", **num, help="per process (default: --batch-size)")
    add("--lr", **pos, help="AdamW learning rate, poly decay 0.9 (default: 5e-5 as released; toy 2e-3)")
    add("--weight-decay", **nonneg, default=1e-4, help="AdamW weight decay")
    add("--clip-grad", **nonneg, default=10.0, help="max gradient norm, 0 = off")
    add("--balancer", choices=list(BALANCERS), default="lps", help="lps: Loss Prioritization Scheme; equal: what "
        "the released code optimised; uw: Kendall et al.; dwa: Liu et al.")
    add("--lps-spread", **pos, help="LPS spread k (default: 7.5; pascal 1.6)")
    add("--lps-floor", **nonneg, default=0.1, help="LPS weight floor")
    add("--aux-weight", **nonneg, default=0.5, help="loss weight of each auxiliary (initial, intermediate) output")
    add("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA and on CPUs with "
        "native bf16 (AVX-512 BF16 / AMX)")
    add("--grad-checkpointing", action="store_true", help="recompute activations in the backward: less memory, slower")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels-last on CUDA")
    add("--compile", action="store_true", help="torch.compile the model (slower on a small CPU; on CPU use --no-amp)")
    add("--seed", type=int, default=0, help="initial weights and data order")
    add = p.add_argument_group("run").add_argument
    add("--out-dir", help="for config.json, log.jsonl, metrics.json, checkpoint.pt, vis/ (default: runs/<dataset>; "
        "predictions for --predict)")
    add("--resume", action="store_true", help="continue <out-dir>/checkpoint.pt with its flags")
    add("--overwrite", action="store_true", help="replace the run in --out-dir")
    add("--eval-only", metavar="CKPT", help="evaluate a checkpoint on the val split and exit")
    add("--eval-every", **num, default=10, help="epochs between evaluations; the last is always evaluated")
    add("--log-every", **num, default=20, help="steps between progress lines")
    add("--baselines", nargs="+", metavar="JSON", help="single-task metrics.json files for Delta_m")
    add("--device", help="cuda or cpu (default: cuda if available)")
    add = p.add_argument_group("predict on your own images").add_argument
    add("--predict", nargs="+", metavar="PATH", help="image files or folders to predict on; needs --checkpoint")
    add("--checkpoint", help="checkpoint for --predict; it holds everything the model needs")
    add = p.add_argument_group("benchmark").add_argument
    add("--benchmark", action="store_true", help="time training and evaluation steps on random data")
    add("--benchmark-steps", **num, default=5, help="timed steps")
    add("--benchmark-warmup", **count, default=2, help="untimed warm-up steps")
    add("--benchmark-json", metavar="PATH", help="also write the numbers as JSON")
    add("--peak-tflops", **pos, help="device bf16 dense peak for MFU (default: from the GPU's name)")
    add("--naive-attention", action="store_true", help=argparse.SUPPRESS)  # memory comparison only
    add("--summarize", nargs="+", metavar="RUN_DIR", help="one Markdown table of finished runs: mean +- std over "
        "seeds per configuration, Delta_m against the single-task runs among them")
    args = p.parse_args(argv)
    if args.predict and not args.checkpoint:
        p.error("--predict needs --checkpoint")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out-dir, --overwrite replaces it: pass one of them")
    for action in p._actions:  # parsed again without defaults, only the flags given remain
        action.default = argparse.SUPPRESS
    return args, set(vars(p.parse_args(argv)))


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Flags left at None take the dataset's defaults (RECIPES, data.DATASETS)."""
    recipe, dataset = RECIPES[args.dataset], data.DATASETS[args.dataset]
    defaults = dict(recipe, img_size=list(recipe["img_size"]), data_root=dataset["root"], tasks=list(dataset["tasks"]),
                    out_dir=f"runs/{args.dataset}", pretrained=args.dataset != "toy" and not args.weights)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    if set(args.tasks) - set(dataset["tasks"]):
        raise UserError(f"--tasks: {sorted(set(args.tasks) - set(dataset['tasks']))} are not tasks of {args.dataset} "
                        f"({list(dataset['tasks'])})")
    return args


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# Flags that say how to run, not what is trained: a resumed run takes them from the command line.
RUNTIME_FLAGS = ("resume", "out_dir", "workers", "device", "log_every", "eval_every", "eval_batch_size", "data_root",
                 "grad_checkpointing", "launch")
# The flags --eval-only uses; the dataset, tasks and model come from the checkpoint.
EVAL_FLAGS = ("eval_only", "data_root", "eval_batch_size", "workers", "device", "out_dir", "amp", "baselines")
CHECKPOINT_KEYS = ("model", "optimizer", "balancer", "epoch", "step", "args", "num_outputs", "normalization")


# ---------------------------------------------------------------------------------------------------------
# Files: every output written atomically, the output folder held by one run, checkpoints checked when read

def write_atomic(path: Path, write, hint: str = "") -> None:
    """Writes `path` through a temporary file in the same folder and a rename: the file is complete or absent
    (a kill, a full disk), and a symlink at `path` is replaced, never followed. write(f) fills the binary file f.
    A failed write is a UserError naming the file, with `hint` appended."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover, or a planted link: O_EXCL below never follows one
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()  # a partial file would keep a full disk full
        if isinstance(e, (OSError, RuntimeError)):  # ENOSPC, EROFS, ENAMETOOLONG; torch.save's "unexpected pos"
            raise UserError(f"cannot write {path} ({(str(e).splitlines() or [type(e).__name__])[0]}){hint}") from e
        raise


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl; a line cut short (by a file system that lost it) is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def _lock_holder(folder: Path) -> str:
    """' (pid N)' of the process holding the flock on `folder`, from /proc/locks where it can be read."""
    st = os.stat(folder)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError):
        for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines()):
            if fields[1:2] == ["FLOCK"] and fields[5:6] == [inode]:
                return f" (pid {fields[4]})"
    return ""


@contextlib.contextmanager
def hold_folder(folder: Path, flag: str):
    """`folder` for this process alone, checked before any work: created if absent (and removed again, with the
    parents it needed, if the run leaves it empty), refused if it is a file, cannot be written, or is held by another
    process. The lock is an flock on the folder itself, which the kernel releases when the holder exits, killed too."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder")
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # the folders this run makes, deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag}: cannot create {folder} ({e.strerror or e})") from None
    fd = os.open(folder, os.O_RDONLY)
    try:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {folder} is not writable")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{flag} {folder} is in use by another mtcp run{_lock_holder(folder)}: wait for it to "
                            f"finish or choose another folder") from None
        except OSError as e:  # a file system without flock (some Lustre or NFS mounts)
            print(f"warning: cannot lock {folder} ({e.strerror}): make sure no other run writes into it", flush=True)
        yield folder
    finally:
        os.close(fd)  # releases the lock
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if the run wrote nothing there


def non_finite(obj, name: str = "") -> list[str]:
    """Names of the inf / NaN floats and floating-point tensors in a nested dict / list (a checkpoint's state)."""
    if isinstance(obj, torch.Tensor):
        return [name] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [name]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [n for k, v in items for n in non_finite(v, f"{name}.{k}" if name else str(k))]


def non_finite_tensors(state: dict) -> str:
    """'' if a checkpoint's state (weights, BN statistics, Adam moments) is finite, else which tensors are not."""
    bad = non_finite({k: state[k] for k in ("model", "optimizer", "balancer")})
    return f"{len(bad)} tensors ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})" if bad else ""


def read_checkpoint(path, flag: str) -> dict:
    """The checkpoint at `path`, checked once: a UserError naming `flag` and the file if it is missing, unreadable,
    cut short, lacks a key (its args included) or holds an inf / NaN."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors read on use
    except Exception as e:  # a text file, a truncated zip, a pickle of something else
        why = (f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}" if zipfile.is_zipfile(path)
               else "not a complete file written by torch.save")
        raise UserError(f"{flag}: {path} is not a readable checkpoint ({why})") from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    missing += [f"args.{k}" for k in vars(get_args([])[0]) if not missing and k not in checkpoint["args"]]
    if missing:
        raise UserError(f"{flag}: {path} is not a checkpoint of this mtcp (no {', '.join(missing[:5])})")
    bad = non_finite_tensors(checkpoint)
    if bad:
        raise UserError(f"{flag}: {path} holds non-finite values in {bad}; it cannot be used")
    return checkpoint


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes the checkpoint atomically; a state with an inf / NaN (weights, BN statistics, Adam moments) is never
    written, and on a full disk the previous checkpoint stays."""
    bad = non_finite_tensors(state)
    if bad:
        raise FloatingPointError(
            f"non-finite values after epoch {state['epoch']}/{state['args']['epochs']} in {bad}; stopping without "
            f"saving them. The last good checkpoint is {path}" + ("" if path.exists() else " (none yet)"))
    write_atomic(path, lambda f: torch.save(state, f), hint="; the previous checkpoint is kept. Free some space, "
                 "then continue with --resume")


@dataclasses.dataclass
class Run:
    """A run's state, resolved once: its flags, this process's place among torchrun's, the checkpoint it resumes."""
    args: argparse.Namespace
    rank: int  # as torchrun numbers the processes; 0 of 1 without torchrun
    world: int
    device: torch.device
    checkpoint: dict | None = None

    def path(self, name: str) -> Path:  # a file in --out-dir
        return Path(self.args.out_dir) / name


def setup_distributed(device_name: str | None) -> tuple[int, int, torch.device]:
    """Reads torchrun's environment (never a --local_rank flag) and joins the process group, nccl on CUDA and
    gloo on CPU. Returns (rank, world size, device)."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        # torchrun's agent keeps one store for every attempt of a job (--max-restarts): a restarted worker would
        # find the dead workers' addresses there and time out connecting to them. One key prefix per attempt.
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world)
    return rank, world, device


def resolve_run(args: argparse.Namespace, given: set[str], argv: list[str] | None) -> Run:
    """The Run of these flags. Resuming (--resume, or a worker that torchrun restarted after a failure and that
    finds its own job's checkpoint) takes every training flag from the checkpoint."""
    # How this process was launched, so that a restarted worker knows the checkpoint of its own job.
    args.launch = dict(run_id=os.environ.get("TORCHELASTIC_RUN_ID"),
                       argv=[str(a) for a in (sys.argv[1:] if argv is None else argv)])
    path = Path(args.out_dir or f"runs/{args.dataset}") / "checkpoint.pt"
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    training = not (args.eval_only or args.predict or args.benchmark)
    checkpoint = read_checkpoint(path, "--resume") if args.resume or restart and training and path.is_file() else None
    if checkpoint is not None and not args.resume:  # a restarted worker resumes only its own job's checkpoint
        if checkpoint["args"].get("launch") != args.launch:
            checkpoint = None
        else:
            args.resume = True
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"restart {restart}: resuming from epoch {checkpoint['epoch']} of {path}", flush=True)
    if args.resume:
        saved = checkpoint["args"]
        changed = sorted(k for k in given - set(RUNTIME_FLAGS) if getattr(args, k) != saved.get(k))
        if changed:  # a repeated command is fine, a different value would be silently ignored
            raise UserError(f"--resume continues {path} with the flags it was started with; "
                            + ", ".join(f"{flag(k)} {getattr(args, k)} (it has {saved.get(k)})" for k in changed)
                            + ". Drop them, or start a new run with another --out-dir")
        runtime = {k: getattr(args, k) for k in RUNTIME_FLAGS if k in given}  # the rest as saved
        args = argparse.Namespace(**{**saved, **runtime, "launch": args.launch, "resume": True, "out_dir": str(path.parent)})
    if args.eval_only and given - set(EVAL_FLAGS):
        raise UserError(f"--eval-only takes the dataset, tasks and model from {args.eval_only}; it does not use "
                        + ", ".join(map(flag, sorted(given - set(EVAL_FLAGS)))))
    if args.eval_only:  # where the modes write: --out-dir, by default next to the checkpoint / predictions/
        args.out_dir = args.out_dir or str(Path(args.eval_only).parent / "eval")
    elif args.predict:
        args.out_dir = args.out_dir or "predictions"
    run = Run(args, *setup_distributed(args.device), checkpoint=checkpoint)
    if args.workers is None:  # on CPU, worker processes compete with torch's threads for the same cores
        cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        args.workers = min(8, cores) if run.device.type == "cuda" else 0
    if training or args.benchmark:
        fill_defaults(args)
    return run


# ---------------------------------------------------------------------------------------------------------
# Distribution and precision (one code path for 1 or N processes)

def bf16_ready(device: torch.device) -> bool:
    """Whether bf16 is fast here: any CUDA GPU, or a CPU with native bf16 (AVX-512 BF16 or AMX)."""
    return device.type == "cuda" or device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported()
                                                              or torch.cpu._is_amx_tile_supported())


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where bf16_ready(device), else fp32; losses and metrics are fp32 regardless."""
    # NOTE(repro): the released code trains and evaluates in fp32 (--no-amp here).
    if enabled and bf16_ready(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BN statistics) to every rank before an evaluation: each rank updated its own copy."""
    for buffer in model.buffers() if dist.is_initialized() else ():
        dist.broadcast(buffer, src=0)


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Averages the gradients of parameters outside the DDP module (the UW balancer's log-variances)."""
    for p in params if dist.is_initialized() else ():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


# ---------------------------------------------------------------------------------------------------------
# Model, optimizer and the training step (shared by train and --benchmark)

def build_model(args, num_outputs: dict[str, int]) -> MTCP:
    if not timm.is_model(args.backbone):
        close = difflib.get_close_matches(args.backbone.split(".")[0], timm.list_models(), n=5)
        raise UserError(f"--backbone {args.backbone} is not a timm model" + (f"; close names: {', '.join(close)}"
                        if close else "") + " (all: python -c \"import timm; print(timm.list_models('*resnet*'))\")")
    qk_dim = (len(num_outputs) - 1) * args.dim if args.cfm_released_width else None
    try:
        model = MTCP(num_outputs, backbone=args.backbone, pretrained=args.pretrained, weights=args.weights, dim=args.dim,
                     img_size=tuple(args.img_size), cfm=not args.no_cfm, traceback=not args.no_traceback,
                     cfm_qk_dim=qk_dim)
    except FileNotFoundError as e:  # pretrained weights not in timm's cache (Backbone): the same on every rank
        raise UserError(str(e)) from None
    model.set_grad_checkpointing(args.grad_checkpointing)
    return model


def make_optimizer(model: nn.Module, balancer: TaskBalancer, args) -> torch.optim.Optimizer:
    """AdamW, --weight-decay on the network and none on the balancer's parameters (UW's log-variances)."""
    return torch.optim.AdamW([{"params": list(model.parameters())},
                              {"params": list(balancer.parameters()), "weight_decay": 0.0}],
                             lr=args.lr, weight_decay=args.weight_decay, fused=True)  # one fused kernel, CPU too


def get_lr(step: int, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    """Poly decay per iteration: base_lr * (1 - step / total_steps) ** power."""
    # NOTE(repro): the released code steps the poly decay once per epoch; per iteration is smoother, same end.
    return base_lr * (1 - min(step, total_steps) / total_steps) ** power


def train_step(model: nn.Module, balancer: TaskBalancer, optimizer: torch.optim.Optimizer, batch: dict, *, args,
               device: torch.device, lr: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step: forward under autocast, the task losses (fp32), the balancer, backward, gradient
    clipping, AdamW at `lr`. Returns the balanced total and the task losses."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    images = batch["image"].to(device, non_blocking=True)
    if device.type == "cuda" and args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = {t: batch[t].to(device, non_blocking=True) for t in balancer.tasks}
    with autocast(device, args.amp):
        preds, aux = model(images)
    losses = multi_task_losses(preds, aux, targets, aux_weight=args.aux_weight)
    total = balancer(losses)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    all_reduce_grads(list(balancer.parameters()))
    if args.clip_grad > 0:  # the network's parameters, group 0 of make_optimizer
        # NOTE(repro): clipped before the step; the released code does not clip on NYUD (commented out) and
        # clips after optimizer.step() on PASCAL, where it changes nothing.
        nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], args.clip_grad)
    optimizer.step()
    return total, losses


# ---------------------------------------------------------------------------------------------------------
# Evaluation, pictures and the metrics file

def save_png(path: Path, rgb: np.ndarray) -> None:
    write_atomic(path, lambda f: Image.fromarray(rgb).save(f, format="PNG"))


def resize_to(pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Raw outputs (B, C, h, w) -> (B, C, H, W) at a label's size, bilinear on logits / values, in fp32."""
    # NOTE(repro): logits are resized before the argmax; the released code resizes the class map (nearest),
    # which loses detail along class boundaries.
    return F.interpolate(pred.float(), size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, device: torch.device, batch_size: int, workers: int, amp: bool,
             rank: int = 0, world: int = 1) -> dict:
    """Metrics.compute() of `model` on `dataset`, scored at each label's original size, no test-time
    augmentation. Rank r takes the images r, r + world, ... (no padding: each image is scored once)."""
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=data.collate,
                                         pin_memory=device.type == "cuda")
    metrics = Metrics(dataset.num_outputs)
    for batch in loader:
        with autocast(device, amp):
            preds, _ = model(batch["image"].to(device, non_blocking=True))
        for t in preds:
            # labels of one size arrive as one tensor, labels of several sizes as a list: one image at a time
            pairs = [(preds[t], batch[t])] if isinstance(batch[t], torch.Tensor) else [
                (p[None], g[None]) for p, g in zip(preds[t], batch[t])]
            for pred, target in pairs:
                metrics.update({t: resize_to(pred, target.shape[-2:])}, {t: target.to(device)})
    return metrics.compute()


def to_numpy(task: str, pred: torch.Tensor) -> np.ndarray:
    """A raw prediction (C, H, W) as the values people use: class ids (H, W) int64, depth in metres (1, H, W),
    unit normals (3, H, W), saliency probability (1, H, W); float32."""
    pred = pred.float()
    if task in ("semseg", "human_parts"):
        return pred.argmax(0).cpu().numpy()
    return {"normals": F.normalize(pred, dim=0), "sal": torch.sigmoid(pred)}.get(task, pred).cpu().numpy()


@torch.no_grad()
def save_visuals(model: nn.Module, dataset, out_dir: Path, *, device: torch.device, amp: bool, count: int = 4) -> None:
    """One PNG per validation image: a row per task with the image, the ground truth and the prediction."""
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    for i in range(min(count, len(dataset))):
        sample = dataset[i]
        with autocast(device, amp):
            preds, _ = model(sample["image"][None].to(device))
        rows = []
        for t, pred in preds.items():
            target = sample[t].numpy()
            image = resize_to(sample["image"][None], target.shape[-2:])[0].cpu() * std + mean  # (3, H, W) in [0, 1]
            image = (image.permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(np.uint8)  # (H, W, 3)
            pics = [image, data.colorize(t, target), data.colorize(t, to_numpy(t, resize_to(pred, target.shape[-2:])[0]))]
            rows.append(np.concatenate([np.pad(p, ((0, 4), (0, 4), (0, 0)), constant_values=255) for p in pics], 1))
        save_png(out_dir / f"{sample['meta']['id']}.png", np.concatenate(rows))


@torch.no_grad()
def constant_predictor_metrics(constants: dict[str, torch.Tensor], val_set, *, rank: int = 0, world: int = 1) -> dict:
    """Metrics of predicting `constants` (data.label_means) everywhere on val_set, sharded as evaluate()."""
    metrics = Metrics(val_set.num_outputs)
    for i in range(rank, len(val_set), world):
        sample = val_set[i]
        preds = {t: v.view(1, -1, 1, 1).expand(1, -1, *sample[t].shape[-2:]) for t, v in constants.items()}  # (1, C, H, W)
        metrics.update(preds, {t: sample[t][None] for t in preds})
    return metrics.compute()


def format_metrics(results: dict) -> str:
    """One line per task, the headline metric first."""
    return "\n".join(f"  {t:<12} {HEADLINE[t][0]} {values[HEADLINE[t][0]]:.4g}  |  " + "  ".join(
        f"{k} {v:.4g}" for k, v in values.items() if k != HEADLINE[t][0]) for t, values in results.items())


def load_baselines(files: list[str] | None, tasks: list[str]) -> dict:
    """The single-task metrics.json files of --baselines, merged: task -> metrics."""
    baselines = {}
    for file in files or []:
        try:
            baselines.update(json.loads(Path(file).read_text())["metrics"])
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--baselines: cannot read metrics from {file}: {e!r}") from e
    missing = [t for t in tasks if t not in baselines]
    if files and missing:
        raise UserError(f"--baselines: no single-task metrics for {missing} in {files}; Delta_m needs one per task")
    return baselines


def write_metrics(path: Path, args, results: dict, *, epoch: int, reference: dict | None = None) -> None:
    """metrics.json: the last epoch's validation metrics, Delta_m against --baselines and the constant
    predictors' metrics when given. A single-task run's file is itself a baseline for --baselines."""
    baselines = load_baselines(args.baselines, list(results))
    dm = delta_m(results, baselines) if baselines else None
    write_text(path, json.dumps(dict(dataset=args.dataset, split="val", epoch=epoch, tasks=list(results),
                                     metrics=results, delta_m=dm, baselines=args.baselines,
                                     constant_predictors=reference), indent=2))
    print(f"final metrics (epoch {epoch}, val):\n{format_metrics(results)}", flush=True)
    if dm is not None:
        print(f"  Delta_m {dm:+.2f} % against {', '.join(args.baselines)}")
    if reference is not None:
        print("constant predictors (majority class, mean depth, mean normal) on the same images:")
        for t, values in reference.items():
            key = HEADLINE[t][0]
            print(f"  {t:<12} {key} {values[key]:.4g}  (model / constant = {results[t][key] / values[key]:.2f})")


# ---------------------------------------------------------------------------------------------------------
# Training

def start_out_dir(run: Run) -> bool:
    """Prepares --out-dir once the data and the model are there (a run that cannot start writes nothing).
    Returns whether the resumed checkpoint's epoch record is missing from log.jsonl (a kill after the save)."""
    records = []
    if run.checkpoint is not None:  # read by every rank before rank 0 rewrites the log
        records = [r for r in read_log(run.path("log.jsonl")) if r["epoch"] <= run.checkpoint["epoch"]]
        if dist.is_initialized():
            dist.barrier()
    if run.rank == 0:
        for tmp in Path(run.args.out_dir).glob("*.tmp"):  # left by a kill during a write
            tmp.unlink()
        for name in ("metrics.json", "log.jsonl", "checkpoint.pt") if run.checkpoint is None else ():  # --overwrite
            run.path(name).unlink(missing_ok=True)
        write_text(run.path("config.json"), json.dumps(vars(run.args), indent=2))
        if run.checkpoint is not None:  # one record per epoch up to the checkpoint's
            write_text(run.path("log.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return run.checkpoint is not None and "log" in run.checkpoint and run.checkpoint["epoch"] not in [
        r["epoch"] for r in records]


def validate(run: Run, model: nn.Module, val_set) -> dict:
    broadcast_buffers(model)
    return evaluate(model, val_set, device=run.device, batch_size=run.args.eval_batch_size, workers=run.args.workers,
                    amp=run.args.amp, rank=run.rank, world=run.world)


def finish_epoch(run: Run, record: dict, model: nn.Module, val_set) -> dict | None:
    """After an epoch's checkpoint: the validation when due (its metrics returned), then the log.jsonl record."""
    results = None
    if record["epoch"] % run.args.eval_every == 0 or record["epoch"] == run.args.epochs:
        record["metrics"] = results = validate(run, model, val_set)
        if run.rank == 0:
            print(f"epoch {record['epoch']} validation ({len(val_set)} images):\n{format_metrics(results)}", flush=True)
    if run.rank == 0:
        log = run.path("log.jsonl")  # rewritten whole, as every output: complete or not there
        write_text(log, (log.read_text() if log.is_file() else "") + json.dumps(record) + "\n")
    return results


def train(run: Run) -> dict:
    """Trains, evaluates every --eval-every epochs and after the last, and returns the last epoch's metrics
    (never the best epoch's, which would be selected on the test split)."""
    # NOTE(repro): the released code reports the best of its periodic evaluations on the val (= test) split.
    args, device, checkpoint = run.args, run.device, run.checkpoint
    if checkpoint is None and run.path("checkpoint.pt").exists() and not args.overwrite:
        raise UserError(f"{args.out_dir} holds the checkpoint of another run: pass --resume to continue it, another "
                        f"--out-dir, or --overwrite to replace it")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    train_set, val_set = data.build_datasets(args.dataset, args.data_root, tasks=args.tasks, size=args.img_size,
                                             master=run.rank == 0)
    num_outputs, tasks = train_set.num_outputs, list(train_set.num_outputs)
    load_baselines(args.baselines, tasks)  # a bad file fails now, not after the last epoch

    model = raw_model = build_model(args, num_outputs).to(device)
    constants = data.label_means(train_set) if "depth" in tasks or args.dataset == "toy" else None
    if "depth" in tasks and checkpoint is None:
        # NOTE(repro): the depth heads start at the mean training depth, not 0 m: from 0 m, Adam (about lr per
        # step) takes thousands of steps to reach room scale.
        for head in raw_model.heads["depth"]:
            nn.init.constant_(head[-1].bias, constants["depth"].item())
    if device.type == "cuda" and args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    balancer = make_balancer(args.balancer, tasks, spread=args.lps_spread, floor=args.lps_floor).to(device)
    optimizer = make_optimizer(raw_model, balancer, args)
    start_epoch, step = 0, 0
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        balancer.load_state_dict(checkpoint["balancer"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
    model = torch.compile(model) if args.compile else model  # before the DDP wrap; checkpoints hold raw_model
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # The same sampler for 1 or N processes: a seeded shuffle per epoch, so a resumed run sees the same order.
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=run.world, rank=run.rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         collate_fn=data.collate)
    if len(loader) == 0:
        raise UserError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size} x "
                        f"{run.world} processes")
    total_steps, global_batch = args.epochs * len(loader), args.batch_size * run.world
    lost_record = start_out_dir(run)
    if run.rank == 0:
        counts = raw_model.param_counts()
        print(f"MTCP {args.backbone} dim {args.dim} img {args.img_size[0]}x{args.img_size[1]} | parameters "
              + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()) + f", total {sum(counts.values()) / 1e6:.2f}M")
        print(f"{len(train_set)} train / {len(val_set)} val images, global batch {global_batch} ({run.world} x "
              f"{args.batch_size}), {len(loader)} steps per epoch, {args.epochs} epochs, device {device}"
              + (f", resuming at epoch {start_epoch}" if checkpoint is not None else ""), flush=True)

    results = finish_epoch(run, checkpoint["log"], raw_model, val_set) if lost_record else None
    run_start, run_start_step = time.perf_counter(), step
    for epoch in range(start_epoch, args.epochs):
        model.train()
        sampler.set_epoch(epoch)
        # Seeded per epoch and rank (augmentations and worker seeds draw from it): a resumed run repeats the
        # uninterrupted one exactly; the workers therefore restart each epoch (persistent_workers=False).
        torch.manual_seed(args.seed + epoch * run.world + run.rank)
        weights = balancer.weights  # constant within the epoch (LPS, DWA); UW's move every step
        sums = torch.zeros(len(tasks), dtype=torch.float64, device=device)
        epoch_start = time.perf_counter()
        for i, batch in enumerate(loader):
            lr = get_lr(step, total_steps, args.lr)
            _, losses = train_step(model, balancer, optimizer, batch, args=args, device=device, lr=lr)
            step += 1
            sums += torch.stack([losses[t].detach().double() for t in tasks])
            if (i + 1) % args.log_every == 0 or i + 1 == len(loader):
                mean = (sums / (i + 1)).tolist()  # one host sync per progress line, not per step
                if not all(math.isfinite(v) for v in mean):
                    raise FloatingPointError(
                        f"non-finite loss at epoch {epoch + 1}/{args.epochs} step {i + 1}: {dict(zip(tasks, mean))}; "
                        f"stopping. The last good checkpoint is {run.path('checkpoint.pt')}"
                        + ("" if run.path("checkpoint.pt").exists() else " (none yet)"))
                if run.rank == 0:
                    per_step = (time.perf_counter() - run_start) / (step - run_start_step)
                    print(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{len(loader)} | loss "
                          + " ".join(f"{t} {v:.4f}" for t, v in zip(tasks, mean)) + " | w "
                          + " ".join(f"{v:.2f}" for v in balancer.weights.values())
                          + f" | lr {lr:.2e} | {global_batch / per_step:.1f} img/s"
                          f" | ETA {datetime.timedelta(seconds=round(per_step * (total_steps - step)))}", flush=True)
        epoch_time = time.perf_counter() - epoch_start
        if dist.is_initialized():
            dist.all_reduce(sums)
        balancer.end_epoch()  # all-reduces its statistics: every rank gets the same weights
        record = dict(epoch=epoch + 1, step=step, lr=lr, losses=dict(zip(tasks, (sums / (len(loader) * run.world)).tolist())),
                      weights=weights, next_weights=balancer.weights,
                      img_per_s=len(loader) * global_batch / epoch_time, epoch_time_s=epoch_time)
        if run.rank == 0:  # saved before validating: a failing validation keeps this epoch (a resume redoes it)
            save_checkpoint(run.path("checkpoint.pt"), dict(
                model=raw_model.state_dict(), optimizer=optimizer.state_dict(), balancer=balancer.state_dict(),
                epoch=epoch + 1, step=step, args=vars(args), num_outputs=num_outputs, log=record,
                normalization=dict(mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD)),
                versions=dict(torch=str(torch.__version__), timm=timm.__version__)))
        results = finish_epoch(run, record, raw_model, val_set) or results
    if results is None:  # resumed after the last epoch: just evaluate
        results = validate(run, raw_model, val_set)
    toy = args.dataset == "toy"
    reference = constant_predictor_metrics(constants, val_set, rank=run.rank, world=run.world) if toy else None
    if run.rank == 0:
        save_visuals(raw_model, val_set, run.path("vis"), device=device, amp=args.amp)
        write_metrics(run.path("metrics.json"), args, results, epoch=args.epochs, reference=reference)
    return results


# ---------------------------------------------------------------------------------------------------------
# Evaluating a checkpoint, and predictions for one's own images

def load_checkpoint_model(path: str, device: torch.device, flag: str) -> tuple[MTCP, dict]:
    """The model a checkpoint was trained with (built from its args), its weights loaded strictly."""
    checkpoint = read_checkpoint(path, flag)
    saved = argparse.Namespace(**checkpoint["args"])
    saved.pretrained, saved.weights = False, None  # the checkpoint holds every weight
    model = build_model(saved, checkpoint["num_outputs"])
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as e:
        raise UserError(f"{flag}: the weights in {path} do not fit the model of its own args "
                        f"({str(e).splitlines()[0]})") from e
    return model.to(device).eval(), checkpoint


def evaluate_checkpoint(run: Run) -> dict:
    """--eval-only: the checkpoint's metrics on the val split of the data it was trained on (or --data-root)."""
    args = run.args
    model, checkpoint = load_checkpoint_model(args.eval_only, run.device, "--eval-only")
    saved = checkpoint["args"]
    args.dataset, args.tasks, args.img_size = saved["dataset"], saved["tasks"], saved["img_size"]
    args.data_root = args.data_root or saved["data_root"]
    fill_defaults(args)
    _, val_set = data.build_datasets(args.dataset, args.data_root, tasks=args.tasks, size=args.img_size,
                                     training=False, master=run.rank == 0)
    results = evaluate(model, val_set, device=run.device, batch_size=args.eval_batch_size, workers=args.workers,
                       amp=args.amp, rank=run.rank, world=run.world)
    if run.rank == 0:
        write_metrics(run.path("metrics.json"), args, results, epoch=checkpoint["epoch"])
    return results


def image_batches(paths, batch_size: int, failed: list[str]):
    """Lists of up to batch_size (path, decoded image) of one size, in order; unreadable files go to `failed`."""
    batch = []
    for path in paths:
        try:
            image = data.read_image(path)
        except Exception as e:
            failed.append(f"{path}: {e}")
            continue
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            yield batch
            batch = []
        batch.append((path, image))
    if batch:
        yield batch


@torch.no_grad()
def predict(run: Run) -> None:
    """Writes per image and task a PNG picture and the raw values (.npy: class ids int64, depth metres, unit
    normals, saliency probability) at the image's own size. Images that cannot be read or written are reported
    at the end, after the others. A folder holding files is refused, as training refuses, unless --overwrite
    (which first removes the predictions in it)."""
    args, device, out_dir = run.args, run.device, Path(run.args.out_dir)
    old = list(out_dir.iterdir())
    if old and not args.overwrite:
        raise UserError(f"--out-dir {out_dir} already holds files (predictions of another checkpoint?): choose "
                        f"another --out-dir, or --overwrite to replace its predictions")
    tasks = {t for d in data.DATASETS.values() for t in d["tasks"]}
    for path in old:  # --overwrite: the previous predictions go, so the folder never mixes two models
        if path.suffix in (".npy", ".png") and path.stem.rpartition("_")[2] in tasks:
            path.unlink()
    try:
        stems = data.list_images(args.predict)  # input path -> distinct output stem
    except data.DataError as e:
        raise UserError(f"--predict: {e}") from None
    for path, stem in stems.items():
        if stem != path.stem:
            print(f"{path} -> {stem}_*: its name is taken by another input", flush=True)
    model, checkpoint = load_checkpoint_model(args.checkpoint, device, "--checkpoint")
    mean, std = checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"]
    failed, done, start = [], 0, time.perf_counter()
    for batch in image_batches(stems, args.batch_size or 8, failed):
        x = torch.stack([data.to_input(image, model.img_size, mean, std) for _, image in batch]).to(device)
        with autocast(device, args.amp):
            preds, _ = model(x)  # (B, C, H, W) at the model's input size
        for t, pred in preds.items():
            for (path, _), p in zip(batch, resize_to(pred, batch[0][1].shape[:2])):  # at the images' own size
                value, name = to_numpy(t, p), out_dir / f"{stems[path]}_{t}"
                try:
                    write_atomic(name.with_suffix(".npy"), lambda f: np.save(f, value))
                    save_png(name.with_suffix(".png"), data.colorize(t, value))
                except UserError as e:  # e.g. a name too long for the file system
                    failed.append(f"{path}: {e}")
        done += len(batch)
        print(f"predicted {done}/{len(stems)} images ({done / (time.perf_counter() - start):.1f} img/s) -> {out_dir}",
              flush=True)
    if failed:
        raise UserError(f"{len(failed)} image(s) could not be read or written:\n  " + "\n  ".join(failed))


# ---------------------------------------------------------------------------------------------------------
# Benchmark: speed, memory and FLOP utilisation of the training step

# bf16 dense tensor-core peak in TFLOP/s, from the vendors' datasheets (for MFU).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def _cpu_attention_flops(q, k, v, *_, backward: bool = False) -> int:
    """FLOPs of SDPA's CPU flash kernel (shapes (B, H, N, D)), which FlopCounterMode has no formula for:
    forward Q K^T and P V; backward recomputes Q K^T and forms dV, dP, dQ, dK."""
    (b, h, n, d), m, dv = q, k[2], v[3]
    return 2 * b * h * n * m * ((3 * d + 2 * dv) if backward else (d + dv))


def benchmark(run: Run) -> dict:
    """Times train_step() and evaluation forwards on random data of the dataset's shapes, counts their FLOPs,
    and prints them (--benchmark-json: also as JSON)."""
    import resource
    from torch.utils.flop_counter import FlopCounterMode
    args, device, cuda = run.args, run.device, run.device.type == "cuda"
    torch.manual_seed(args.seed)
    num_outputs = {t: data.DATASETS[args.dataset]["tasks"][t] for t in args.tasks}
    model = build_model(args, num_outputs).to(device)
    if cuda and args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, CoherenceFusion):
            m.naive_attention = args.naive_attention
    step_model = torch.compile(model) if args.compile else model
    balancer = make_balancer(args.balancer, list(num_outputs), spread=args.lps_spread, floor=args.lps_floor).to(device)
    optimizer = make_optimizer(model, balancer, args)
    B, (H, W) = args.batch_size, args.img_size
    batch = {"image": torch.randn(B, 3, H, W, device=device)}
    for t, c in num_outputs.items():
        batch[t] = (torch.randint(0, c, (B, H, W), device=device) if t in ("semseg", "human_parts")
                    else F.normalize(torch.randn(B, 3, H, W, device=device), dim=1) if t == "normals"
                    else (torch.rand(B, 1, H, W, device=device) > 0.5).float() if t == "sal"
                    else torch.rand(B, 1, H, W, device=device) * 9 + 0.5)

    def step(net: nn.Module = step_model) -> float:
        model.train()
        return train_step(net, balancer, optimizer, batch, args=args, device=device, lr=args.lr)[0].item()

    @torch.no_grad()
    def forward(net: nn.Module = step_model) -> None:
        model.eval()
        with autocast(device, args.amp):
            net(batch["image"])

    def seconds(fn) -> float:  # per call, after --benchmark-warmup calls
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(args.benchmark_warmup):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(args.benchmark_steps):
            fn()
        sync()
        return (time.perf_counter() - start) / args.benchmark_steps

    def gflops_per_image(fn) -> float:  # of one eager call
        aten = torch.ops.aten
        with FlopCounterMode(display=False, custom_mapping={
                aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: _cpu_attention_flops(q, k, v),
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                    lambda g, q, k, v, *a, **kw: _cpu_attention_flops(q, k, v, backward=True)}) as counter:
            fn(model)
        return counter.get_total_flops() / B / 1e9

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    first_loss = step()  # same seed, weights and data: compares eager with --compile, fp32 with bf16
    first_step_s = time.perf_counter() - start  # includes the compilation with --compile
    train_s = seconds(step)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # KiB -> GiB (Linux)
    eval_s = seconds(forward)
    train_gflops, eval_gflops = gflops_per_image(step), gflops_per_image(forward)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak_tflops = (args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)) if cuda else None
    achieved = train_gflops * B / train_s / 1e3 if cuda else None
    r = dict(device=name, dataset=args.dataset, img_size=[H, W], batch_size=B,
             amp=args.amp and bf16_ready(device), compile=args.compile, channels_last=cuda and args.channels_last,
             naive_attention=args.naive_attention, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
             first_step_s=first_step_s, first_step_loss=first_loss, train_img_per_s=B / train_s,
             train_ms_per_step=1e3 * train_s, eval_img_per_s=B / eval_s, peak_memory_gib=peak,
             peak_memory_kind="CUDA max allocated" if cuda else "process peak RSS", train_gflops_per_img=train_gflops,
             eval_gflops_per_img=eval_gflops, achieved_tflops=achieved, peak_bf16_tflops=peak_tflops,
             mfu=achieved / peak_tflops if achieved and peak_tflops else None)
    print("\n".join(f"{k:<21} {v:.6g}" if isinstance(v, float) else f"{k:<21} {v}" for k, v in r.items()), flush=True)
    if args.benchmark_json:
        write_text(Path(args.benchmark_json), json.dumps(r, indent=2))
    return r


# ---------------------------------------------------------------------------------------------------------
# Summaries of several runs: one Markdown table over seeds, with Delta_m

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"--summarize: {path.parent} has no {path.name} (not a run folder, or a run not finished)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--summarize: cannot read {path}: {e}") from e


def _config_flags(config: dict, defaults: dict) -> list[str]:
    """The flags that set what is trained to other than the defaults, as typed ('--no-cfm', '--balancer uw');
    how a run is run (RUNTIME_FLAGS), its seed and its --baselines do not count."""
    flags = []
    for key, default in defaults.items():
        value = config.get(key, default)  # a flag newer than the run: the run had its default
        if key in RUNTIME_FLAGS or key in ("seed", "baselines") or value == default:
            continue
        if isinstance(value, bool):
            flags.append(flag(key) if value else "--no-" + flag(key)[2:])
        else:
            flags.append(" ".join([flag(key), *map(str, value if isinstance(value, list) else [value])]))
    return flags


def _mean_std(values: list[float], decimals: int, sign: str = "") -> str:
    """'mean ± sample std' (ddof 1); '–' for the std of one value."""
    std = f"{statistics.stdev(values):.{decimals}f}" if len(values) > 1 else "–"
    return f"{statistics.mean(values):{sign}.{decimals}f} ± {std}"


def summarize(folders: list[str]) -> str:
    """Prints one Markdown table of finished runs: a row per configuration (runs that differ only in --seed),
    per task its headline metric as mean ± std over seeds, and Delta_m per seed, then mean ± std, against the
    seed-means of the single-task runs among the folders. Flags shared by every run are listed once, first."""
    runs_read, dataset = [], None  # (folder, seed, metrics, flags)
    for folder in folders:
        metrics, config = _read_json(Path(folder) / "metrics.json"), _read_json(Path(folder) / "config.json")
        try:
            run_dataset, seed, results = config["dataset"], config["seed"], metrics["metrics"]
        except KeyError as e:
            raise UserError(f"--summarize: {folder}: no {e} in its config.json or metrics.json") from e
        if dataset not in (None, run_dataset):
            raise UserError(f"--summarize: {folder} is a {run_dataset} run, the runs before it {dataset} runs: "
                            "summarize one dataset at a time")
        # a configuration is named relative to the config of a run given no flag but --dataset
        dataset, defaults = run_dataset, vars(fill_defaults(get_args(["--dataset", run_dataset])[0]))
        runs_read.append((folder, seed, results, _config_flags(config, defaults)))
    # the flags of every run, but --tasks: the single-task runs keep their names
    shared = {f for f in set.intersection(*(set(flags) for *_, flags in runs_read)) if not f.startswith("--tasks")}
    groups = {}  # configuration name -> seed -> (folder, metrics)
    for folder, seed, results, flags in runs_read:
        seeds = groups.setdefault(" ".join(f for f in flags if f not in shared) or "full", {})
        if seed in seeds:
            raise UserError(f"--summarize: {seeds[seed][0]} and {folder} are the same configuration with the "
                            f"same seed {seed}; give one of them")
        seeds[seed] = (folder, results)
    runs = {name: [results for _, results in seeds.values()] for name, seeds in groups.items()}
    tasks = [t for t in data.DATASETS[dataset]["tasks"] if any(t in r for rs in runs.values() for r in rs)]
    single = {f"--tasks {t}": t for t in tasks}  # name of each task's single-task configuration
    baselines = {t: {HEADLINE[t][0]: statistics.mean(r[t][HEADLINE[t][0]] for r in runs[name])}
                 for name, t in single.items() if name in runs}
    lines = ["| configuration | " + " | ".join(f"{t} {HEADLINE[t][0]} {'↑' if HEADLINE[t][1] > 0 else '↓'}"
                                              for t in tasks) + " | seeds | Delta_m, % |", "|---" * (len(tasks) + 3) + "|"]
    lacking = set()
    # full first, then in the order first seen, the baselines last (sorted() keeps that order within a key)
    for name in sorted(runs, key=lambda name: 2 if name in single else int(name != "full")):
        # depth RMSE in metres to 4 decimals, as the papers' tables; mIoU in % and angles in degrees to 2
        cells = [_mean_std([r[t][HEADLINE[t][0]] for r in runs[name]], 4 if t == "depth" else 2)
                 if t in runs[name][0] else "" for t in tasks]
        missing = [t for t in runs[name][0] if t not in baselines]
        lacking.update(missing if name not in single else [])
        dm = "–" if name in single or missing else _mean_std([delta_m(r, baselines) for r in runs[name]], 2, "+")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs[name])} | {dm} |")
    lines.append("\nMean ± sample std over seeds; Delta_m per seed against the seed-means of the single-task rows.")
    if lacking:
        lines.append(f"Delta_m –: no single-task run of {', '.join(sorted(lacking))} among these folders.")
    common = f"; every run with {' '.join(sorted(shared))}" if shared else ""
    text = f"Read {len(folders)} runs ({dataset}{common}): {', '.join(map(str, folders))}\n\n" + "\n".join(lines)
    print(text, flush=True)
    return text


# ---------------------------------------------------------------------------------------------------------
# Entry point

def _raise_terminated(signum, frame):
    raise Terminated


def _lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of the torchrun job has stopped."""
    return (isinstance(e, RuntimeError) and dist.is_initialized() and dist.get_world_size() > 1
            and (isinstance(e, dist.DistError) or "closed by peer" in str(e) or "reset by peer" in str(e)))


def main(argv: list[str] | None = None):
    args, given = get_args(argv)
    if args.summarize:  # reads finished runs' files: no torch.distributed, no data
        return summarize(args.summarize)
    import huggingface_hub.constants  # no network at run time: timm reads its cache, never downloads
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    run = resolve_run(args, given, argv)
    mode = predict if args.predict else evaluate_checkpoint if args.eval_only else benchmark if args.benchmark else train
    holds = mode is not benchmark and run.rank == 0  # rank 0 writes, into a folder it holds from before any work
    try:
        with hold_folder(run.path(""), "--out-dir") if holds else contextlib.nullcontext():
            return mode(run)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM under cli()
        what, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        if mode is not train:
            raise Interrupted(what, exit_code=code) from None
        if not run.path("checkpoint.pt").is_file():
            raise Interrupted(f"{what} before the first checkpoint: nothing to resume", exit_code=code) from None
        epoch = torch.load(run.path("checkpoint.pt"), weights_only=True, mmap=True)["epoch"]  # as saved, atomically
        then = f"continues from epoch {epoch + 1}" if epoch < run.args.epochs else "evaluates its last epoch"
        raise Interrupted(f"{what}; `python mtcp.py --resume --out-dir {run.args.out_dir}` {then}",
                          exit_code=code) from None


@record  # under torchrun, an unexpected error's traceback reaches torchrun's failure summary
def cli(argv: list[str] | None = None) -> int:
    """main() with user errors reported once, without a traceback, and SIGTERM handled as Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    rank = int(os.environ.get("RANK", 0))
    try:
        main(argv)
    except (UserError, data.DataError, FloatingPointError) as e:
        if rank > 0 and isinstance(e, Interrupted):  # every rank got the signal: rank 0 says how to continue
            return e.exit_code
        if rank > 0:  # rank 0 nearly always has the same error, and torchrun stops this rank once rank 0 exits
            try:
                time.sleep(10)
            except KeyboardInterrupt:  # torchrun's SIGTERM: rank 0 has reported and exited
                return USER_ERROR_EXIT
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's SIGTERM must not cut the message short
        print(f"mtcp: error: {e}" + (f" (rank {rank})" if rank else ""), file=sys.stderr, flush=True)
        return getattr(e, "exit_code", USER_ERROR_EXIT)
    except RuntimeError as e:
        if not _lost_peer(e):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        why = (str(e).splitlines() or [""])[0].split("] ", 1)[-1].split(". ")[0]  # gloo's "Connection closed by peer .."
        print(f"mtcp: error: rank {rank} stops: another process of this job has stopped, and its own message says "
              f"why ({why})", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    finally:  # only now: a rank that left the group early would break the collectives of the others
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # leaving anyway: a late SIGTERM must not add a traceback
        if dist.is_initialized():
            dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
