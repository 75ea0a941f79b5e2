"""MT-CP in one file: multi-task dense prediction with coherence fusion, trace-back and loss prioritization.

Paper: M. Fontana, M. Spratling, M. Shi, "Optimizing Dense Visual Predictions Through Multi-Task Coherence
and Prioritization", WACV 2025 (arXiv 2412.03179). The method is reconstructed from the paper's abstract and
architecture figure and from the authors' released code; where that code contradicts the paper's stated
intent we follow the intent, and every deliberate difference is marked `# NOTE(repro):` (README lists them).

This file holds the whole method: a timm backbone with an FPN neck, one Swin decoder per task, the Coherence
Fusion Module (CFM) that lets each task attend to the others, the trace-back through Spatial Refinement
Modules (SRM), the task losses, the Loss Prioritization Scheme (LPS) with three baseline balancers, the
benchmark metrics, and the train / evaluate / predict / benchmark programs, with DDP through torchrun.
The data readers and the built-in toy dataset live in data.py.

Run it:
    python mtcp.py                                        # toy data (written on first use), CPU or 1 GPU
    python mtcp.py --dataset nyud                         # data/NYUD_MT, one GPU
    torchrun --standalone --nproc_per_node=4 mtcp.py --dataset pascal               # data/PASCAL_MT, 4 GPUs
    python mtcp.py --eval-only runs/toy/checkpoint.pt     # evaluate a checkpoint
    python mtcp.py --resume --out-dir runs/toy            # continue from runs/toy/checkpoint.pt
    python mtcp.py --predict my_photos/ --checkpoint runs/toy/checkpoint.pt    # your own images
    python mtcp.py --benchmark --dataset nyud             # speed and memory of one training step
    python mtcp.py --summarize runs/ablation/*/           # one table of several runs: mean +- std over seeds

Paper -> code:
    Fig. 2 backbone (Mask2Former Swin-S)      -> Backbone (timm features_only + FPN neck; SPEC 2.1)
    Fig. 2 task-specific decoders             -> TaskDecoder (3 Swin stages + FPN)
    coherence fusion (CFM)                    -> CoherenceFusion (global attention through SDPA)
    trace-back, spatial refinement (SRM)      -> TraceBack, SpatialRefinement
    initial / intermediate / final outputs    -> MTCP.forward returns (preds, aux)
    dynamic task balancing (LPS)              -> LossPrioritization; baselines Equal, Uncertainty, DWA
"""
import argparse
import contextlib
import datetime
import difflib
import json
import math
import os
import statistics
import sys
import time
import types
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from torch.distributed.elastic.multiprocessing.errors import record
from timm.models.swin_transformer import SwinTransformerBlock, SwinTransformerStage

import data

# ---------------------------------------------------------------------------------------------------------
# Dataset facts and paper defaults (SPEC 1 and 5)

DATASETS = {  # data_root: default folder, relative to the working directory; download: where its archive is
    # NYUD-v2, NYUD_MT archive: 795 train / 654 val images at 480x640. Recipe of the released code (SPEC 5).
    "nyud": dict(tasks={"semseg": 40, "depth": 1, "normals": 3}, img_size=(480, 640), lps_spread=7.5,
                 backbone="swin_small_patch4_window7_224.ms_in22k_ft_in1k", dim=256,
                 epochs=100, batch_size=2, lr=5e-5, data_root="data/NYUD_MT",
                 download="https://drive.google.com/file/d/14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw"),
    # PASCAL-Context, PASCAL_MT archive: 4998 train / 5105 val images, longest side <= 500.
    "pascal": dict(tasks={"semseg": 21, "human_parts": 7, "sal": 1}, img_size=(512, 512), lps_spread=1.6,
                   backbone="swin_small_patch4_window7_224.ms_in22k_ft_in1k", dim=256,
                   epochs=100, batch_size=2, lr=5e-5, data_root="data/PASCAL_MT",
                   download="https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz"),
    # The built-in toy rooms (data.make_toy, NYUD layout): small enough to train on a laptop CPU in minutes.
    "toy": dict(tasks={"semseg": len(data.TOY_CLASSES), "depth": 1, "normals": 3}, img_size=(96, 128),
                lps_spread=7.5, backbone="resnet18", dim=32, epochs=12, batch_size=16, lr=2e-3,
                toy_data=dict(n_train=320, n_val=80, size=(120, 160)), data_root="data/toy", download=None),
}


# ---------------------------------------------------------------------------------------------------------
# Building blocks: CBAM, FPN, prediction head

class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018), used inside the CFM and the SRM.

    A channel gate, then a spatial gate (SPEC 2.2):
        channel: x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), the MLP shared, hidden width C / reduction
        spatial: x * sigmoid(BN(conv7x7([max_c(x), mean_c(x)])))

    Args:
        channels: C, the input and output channels.
        reduction: channel reduction of the shared MLP.
        kernel_size: size of the spatial gate's convolution.

    Shapes: (B, C, H, W) -> (B, C, H, W)."""

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
    """Feature pyramid (Lin et al., CVPR 2017) merging several strides into the finest, as the released decoder
    builds it: 1x1 laterals, nearest top-down upsampling, one 3x3 conv with bias at the finest level, no norm and
    no activation (the output is signed). Used as the neck (-> R) and in every task decoder (-> X_t; SPEC 2).
    Top-down: y = lateral_i(f_i) + upsample(y), then a 3x3 conv.

    Args:
        in_channels: channels of each input level, finest first.
        dim: output channels D.

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
    """Prediction head (SPEC 2.4): 1x1 conv, BN, ReLU, 1x1 conv to the task's channels.

    Outputs are raw: logits for semseg / human_parts / sal, metres for depth, unnormalised 3-vectors for
    normals (normalised in the loss and the metric). Shapes: (B, D, h, w) -> (B, out_channels, h, w)."""

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
    windows = x.view(B, Hp // wh, wh, Wp // ww, ww, C).transpose(2, 3).reshape(-1, wh * ww, C)  # (B nW, N, C)
    out = block.attn(windows, mask=mask)  # (B nW, N, C)
    x = out.view(B, Hp // wh, Wp // ww, wh, ww, C).transpose(2, 3).reshape(B, Hp, Wp, C)
    if shifted:
        x = torch.roll(x, (sh, sw), (1, 2))
    return x[:, :H, :W]


def pad_before_shift(module: nn.Module) -> nn.Module:
    """Makes every timm SwinTransformerBlock in `module` pad before it shifts (_padded_window_attention); same
    weights. NOTE(repro): timm shifts the unpadded map, so on map sides that are not a multiple of the window
    shifted windows mix tokens across the image border; the released decoder and backbone pad first."""
    for m in module.modules():
        if isinstance(m, SwinTransformerBlock):
            m._attn = types.MethodType(_padded_window_attention, m)
    return module


# ---------------------------------------------------------------------------------------------------------
# Backbone and neck (SPEC 2.1)

def load_backbone_weights(body: nn.Module, path: str) -> None:
    """Copies a timm state dict of the same architecture (e.g. its hub repository's model.safetensors) into a
    `features_only` backbone, strictly: timm's own loading is not strict for features_only models, which is how
    pretrained weights get silently lost (SPEC 7). Keys the backbone lacks (classifier, final norm) are ignored;
    feature wrappers spell `layers.0` as `layers_0`, so both spellings are accepted."""
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
    """Any timm backbone with `features_only=True`, plus an FPN neck to a shared D-channel stride-4 map R.

    NOTE(repro): the paper uses a Mask2Former Swin-S (ADE20K) and modulates its pixel-decoder map by the
    query masks; this project uses a timm backbone and an FPN neck instead (SPEC 2.1, DECIDED).

    Args:
        name: timm model name; its stages are read from `feature_info`, never hard-coded.
        dim: D, channels of R.
        img_size: (H, W), a multiple of the backbone's stride (transformers fix their patch grid at build time).
        pretrained: load timm's pretrained weights (from its local cache: main() forbids downloads).
        weights: path of a local timm state dict to load instead, strictly.

    Shapes: (B, 3, H, W) -> (B, D, H/4, W/4)."""

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
            raise FileNotFoundError(f"could not load timm's pretrained weights for {name} ({type(e).__name__}): they are "
                               f"read from the local timm/Hugging Face cache, never downloaded at run time. On a "
                               f"machine with internet run: python -c \"import timm; timm.create_model('{name}', "
                               f"pretrained=True)\", or pass --weights FILE, or --no-pretrained") from e
        if weights:
            load_backbone_weights(self.body, weights)
        pad_before_shift(self.body)  # a no-op for CNNs
        reductions, channels = self.body.feature_info.reduction(), self.body.feature_info.channels()
        if 4 not in reductions:
            raise ValueError(f"backbone {name} has no stride-4 feature level (strides {reductions})")
        # Levels finer than stride 4 (a ResNet stem) are dropped: the neck starts at stride 4.
        self.levels = [i for i, r in enumerate(reductions) if r >= 4]
        self.stride = reductions[-1]
        self.nhwc = getattr(self.body, "output_fmt", "NCHW") == "NHWC"  # timm Swin features are NHWC
        self.neck = FPN(in_channels=[channels[i] for i in self.levels], dim=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        feats = [feats[i].permute(0, 3, 1, 2) if self.nhwc else feats[i] for i in self.levels]  # (B, C_i, H/s_i, W/s_i)
        return self.neck(feats)


# ---------------------------------------------------------------------------------------------------------
# Task decoder (SPEC 2, paper Fig. 2)

class TaskDecoder(nn.Module):
    """Task-specific decoder: three Swin stages (timm building blocks) over R, merged by an FPN.

    Widths D, 2D, 4D at strides 4, 8, 16, depths (1, 2, 1), 2 heads, window 7 (SPEC 2); stages 2 and 3 start with
    timm's patch merging. As in the released decoder, D1, D2, D3 (to the FPN and the trace-back) are LayerNorm-ed.

    Args:
        dim: D.
        feat_size: (H/4, W/4), the size of R; Swin blocks build their shifted-window masks for it.
        depths, num_heads, window_size: the Swin stages' shape.

    Shapes: R (B, D, H/4, W/4) -> ([D1 (B, D, H/4, W/4), D2 (B, 2D, H/8, W/8), D3 (B, 4D, H/16, W/16)],
        X (B, D, H/4, W/4))."""

    def __init__(self, *, dim: int, feat_size: tuple[int, int], depths: tuple[int, ...] = (1, 2, 1),
                 num_heads: int = 2, window_size: int = 7):
        super().__init__()
        widths = [dim * 2 ** i for i in range(len(depths))]
        self.stages = nn.ModuleList()
        size = feat_size
        for i, depth in enumerate(depths):
            # input_resolution is the stage's input; a downsampling stage halves it before its blocks.
            # always_partition: a 7x7 window with shift 3 on maps of 7 or less too, as released (timm shrinks it)
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
# Coherence Fusion Module (SPEC 2.2)

def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, naive: bool = False) -> torch.Tensor:
    """softmax(q k^T) v over all N positions, with NO 1/sqrt(d) scaling (as in the released code).

    The released code materialises the N x N matrix (N = 19,200 at 480x640: 1.5 GB per image and task in fp32);
    SDPA gives the same result in O(N) memory. On CPU its flash kernel needs v as wide as q, so v is zero-padded
    and the output sliced (SPEC 2.2: +0.31 GB instead of +4.35 GB). `naive=True`: the materialised reference.

    Shapes: q, k (B, N, Dq); v (B, N, Dv) -> (B, N, Dv)."""
    if naive:
        return torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v  # (B, N, N) @ (B, N, Dv)
    dv = v.shape[-1]
    if q.device.type == "cpu" and dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))  # (B, N, Dq)
    # the fused kernels need a contiguous last dimension, else SDPA silently falls back to the N x N math
    q, k, v = (t.contiguous()[:, None] for t in (q, k, v))  # (B, 1, N, D): one head
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, 1, N, D)
    return out[:, 0, :, :dv]


class CoherenceFusion(nn.Module):
    """Coherence Fusion Module (CFM): task t attends over all positions with queries and keys made from
    the other tasks' maps, so each prediction is informed by the others (paper: coherence fusion; SPEC 2.2).

        S = BN(CBAM(X_t))                                        values
        G_a = sigmoid(conv1x1(X_a)) * X_a;  U = ReLU(conv1x1(concat_a G_a))
        Q = ReLU(BN(CBAM_q(U)));  K = ReLU(BN(CBAM_k(U)))
        O = softmax(Q^T K) S^T;  C_t = BN(CBAM_o(O))

    As in the released code: no 1/sqrt(d) scaling, no residual. The attention runs through SDPA (O(N) memory).
    NOTE(repro): Q and K are D wide (qk_dim); the released code keeps the concatenation's width (T-1)*D, 512
    for three tasks. At equal widths SDPA's flash kernels apply on GPU (head dim <= 256); at 512 only a
    generic kernel does, measured at 46 TFLOP/s on an H200 (README: performance).

    Args:
        dim: D, channels of X_t.
        num_aux: number of other tasks (>= 1).
        qk_dim: width of Q and K (default D; (T-1)*D is the released code's).

    Shapes: x (B, D, h, w), others: num_aux x (B, D, h, w) -> (B, D, h, w)."""

    def __init__(self, *, dim: int, num_aux: int, qk_dim: int | None = None):
        super().__init__()
        qk_dim = qk_dim or dim
        self.value = nn.Sequential(CBAM(channels=dim), nn.BatchNorm2d(dim))
        self.gates = nn.ModuleList(nn.Conv2d(dim, dim, 1) for _ in range(num_aux))
        self.mix = nn.Sequential(nn.Conv2d(dim * num_aux, qk_dim, 1), nn.ReLU(inplace=True))
        self.query = nn.Sequential(CBAM(channels=qk_dim), nn.BatchNorm2d(qk_dim), nn.ReLU(inplace=True))
        self.key = nn.Sequential(CBAM(channels=qk_dim), nn.BatchNorm2d(qk_dim), nn.ReLU(inplace=True))
        self.out = nn.Sequential(CBAM(channels=dim), nn.BatchNorm2d(dim))
        self.naive_attention = False  # private switch for the memory benchmark: materialise the N x N matrix

    def forward(self, x: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
        B, D, h, w = x.shape
        u = self.mix(torch.cat([torch.sigmoid(gate(a)) * a for gate, a in zip(self.gates, others)], dim=1))  # (B, Dq, h, w)
        q = self.query(u).flatten(2).transpose(1, 2)  # (B, N, Dq), N = h*w
        k = self.key(u).flatten(2).transpose(1, 2)  # (B, N, Dq)
        v = self.value(x).flatten(2).transpose(1, 2)  # (B, N, D)
        o = global_attention(q, k, v, naive=self.naive_attention)  # (B, N, D)
        return self.out(o.transpose(1, 2).reshape(B, D, h, w))  # (B, D, h, w)


# ---------------------------------------------------------------------------------------------------------
# Spatial Refinement Module and trace-back (SPEC 2.3)

class SpatialRefinement(nn.Module):
    """Spatial Refinement Module (SRM): refines a coarse map p with a decoder feature b of another stride.

        p' = resize(CBAM(p), size of b);  Z = concat(p', CBAM(b))
        p_out = ReLU(BN(conv1x1(Z -> D)))          to a prediction head
        b_out = ReLU(BN(conv1x1(Z -> C_b)))        carried to the next SRM

    Args:
        p_channels: C_p, channels of p.
        b_channels: C_b, channels of b.
        dim: D, channels of p_out.
        carry: whether b_out is computed (the last SRM's is never used, and DDP wants no unused parameters).

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
    """Trace-back (paper: trace-back method; SPEC 2.3): the fused map C_t is traced back through the task's
    decoder stages, deep to shallow, so the final prediction agrees with every scale of its own decoder:

        (p1, b1) = SRM(C_t, D3);  (p2, b2) = SRM(b1, D2);  (p3, _) = SRM(b2, D1)

    Only b is carried on; C_t enters only the first (deepest) SRM.

    Args:
        dim: D; the decoder stages are D, 2D, 4D wide.

    Shapes: c (B, D, H/4, W/4), feats [D1, D2, D3] of TaskDecoder -> [p1 (B, D, H/16, W/16),
        p2 (B, D, H/8, W/8), p3 (B, D, H/4, W/4)]."""

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
# The MT-CP network (SPEC 2)

@contextlib.contextmanager
def _bn_stats_kept(module: nn.Module):
    """Around an activation checkpoint's recomputation: BatchNorm still normalises by the batch, as in the first
    forward, but its running statistics (already updated then) are left as they are."""
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
    """MT-CP: shared backbone, one decoder per task, coherence fusion, trace-back, heads (paper Fig. 2).

    Args:
        num_outputs: task -> output channels, e.g. {"semseg": 40, "depth": 1, "normals": 3}; any number >= 1
            of tasks (with one task there is no partner, so no CFM).
        backbone: timm model name (SPEC 2.1).
        pretrained: timm's pretrained weights, from its local cache.
        weights: a local timm state dict for the backbone, loaded strictly.
        dim: D, the width of the neck, decoders and heads.
        img_size: (H, W) of the inputs, any size: zero-padded inside to a multiple of the stride, outputs cropped.
        cfm: use the CFM (False: C_t = X_t; ablation).
        traceback: use the trace-back (False: the CFM head is the final output and aux is empty; ablation).
        cfm_qk_dim: width of the CFM's Q and K (default D; (T-1)*D is the released code's).

    Shapes: x (B, 3, H, W), ImageNet-normalised -> (preds, aux): preds[task] (B, C_task, H, W) the final
        prediction; aux[task] the list [initial, intermediate1, intermediate2], each (B, C_task, H, W)."""

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
        # heads: initial (from C_t), then with the trace-back intermediate 1, 2 (p1, p2) and final (p3)
        # NOTE(repro): the released code has no initial head (the paper's figure shows one; SPEC 2.4) and gives
        # each task its own kind of final head; here all four heads of every task are the same small Head.
        self.heads = nn.ModuleDict({t: nn.ModuleList(Head(dim=dim, out_channels=c) for _ in range(4 if traceback else 1))
                                    for t, c in num_outputs.items()})
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass, per block: each backbone stage (timm's own), task decoder,
        CFM and trace-back. Same gradients, less memory, more time (README: performance). Caveat: timm's
        checkpointing of a BatchNorm backbone (a ResNet) updates BN running statistics twice per step; ours once."""
        self.backbone.body.set_grad_checkpointing(enable)
        self.grad_checkpointing = enable

    def _block(self, module: nn.Module, *args):
        """module(*args), through activation checkpointing when it is on and gradients are being recorded."""
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
# Losses (SPEC 3)

IGNORE_INDEX = 255  # label value that is never trained on nor scored

def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the `valid` entries; exactly 0, still attached to the graph, if none is valid."""
    # where() rather than a product: a non-finite value at an invalid pixel must not leak in as NaN
    return torch.where(valid, values, 0.0).sum() / valid.sum().clamp(min=1)


def cross_entropy_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SPEC 3, semseg / human_parts. Shapes: pred (B, C, H, W) logits; target (B, H, W) int64, 255 = ignore."""
    ce = F.cross_entropy(pred.float(), target, ignore_index=IGNORE_INDEX, reduction="none")  # (B, H, W)
    return _masked_mean(ce, target != IGNORE_INDEX)


def depth_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SPEC 3, L1 in metres over pixels with GT. Shapes: pred, target (B, 1, H, W) metres, target 0 = invalid."""
    # NOTE(repro): the released loss also drops pixels with GT >= 6.5535 m (the uint16 PNG ceiling); we train on
    # every GT > 0.
    return _masked_mean((pred.float() - target).abs(), target > 0)


def normals_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SPEC 3, L1 between unit normals, mean over the 3 components of valid pixels.
    Shapes: pred (B, 3, H, W) raw 3-vectors; target (B, 3, H, W) unit vectors, zero vector = invalid."""
    # NOTE(repro): the released code uses MSE on raw outputs; SPEC 3 decides L1 on L2-normalised predictions.
    unit = F.normalize(pred.float(), dim=1)  # (B, 3, H, W)
    valid = (target != 0).any(dim=1, keepdim=True).expand_as(target)  # (B, 3, H, W)
    return _masked_mean((unit - target).abs(), valid)


def saliency_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SPEC 3, class-balanced binary cross-entropy with logits, mean over pixels.
    Shapes: pred (B, 1, H, W) logits; target (B, 1, H, W) float in {0, 1}."""
    # w = fraction of negatives in the batch weights the positives, 1 - w the negatives,
    # so the rare class (usually the salient object) is not drowned by the background
    w = (1 - target).mean()
    weight = target * w + (1 - target) * (1 - w)  # (B, 1, H, W)
    return F.binary_cross_entropy_with_logits(pred.float(), target, weight=weight)


TASK_LOSSES = {"semseg": cross_entropy_loss, "human_parts": cross_entropy_loss, "depth": depth_loss,
               "normals": normals_loss, "sal": saliency_loss}


def task_loss(task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of one task on one prediction, in fp32; both at the target resolution (see the per-task losses)."""
    if task not in TASK_LOSSES:
        raise ValueError(f"no loss for task {task!r}; known tasks: {sorted(TASK_LOSSES)}")
    if pred.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"{task}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in size")
    return TASK_LOSSES[task](pred, target)


def multi_task_losses(preds: Mapping[str, torch.Tensor], aux: Mapping[str, Sequence[torch.Tensor]],
                      targets: Mapping[str, torch.Tensor], aux_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """Per-task training loss with deep supervision of the trace-back outputs (SPEC 3); aux_weight 0.5 per
    auxiliary output, as the released code weights its intermediate outputs (it adds their sum / 2).

    Args:
        preds: task -> final prediction. aux: task -> auxiliary predictions (initial, intermediate 1 and 2;
            may be empty). targets: task -> ground truth. All at the target resolution."""
    losses = {}
    for task, pred in preds.items():
        # L_t = loss(final) + aux_weight * sum_i loss(aux_i)
        # NOTE(repro): the released code supervises the two intermediate outputs (no initial one), each at 0.5,
        # but scores its NYUD normals intermediates with the depth loss and adds only the last human-parts
        # intermediate on PASCAL; here every auxiliary output gets its own task's loss.
        losses[task] = task_loss(task, pred, targets[task]) + aux_weight * sum(
            task_loss(task, p, targets[task]) for p in aux.get(task, ()))
    return losses


# ---------------------------------------------------------------------------------------------------------
# Task balancers: Loss Prioritization Scheme and the baselines (SPEC 3)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` summed over the DDP ranks (just a copy in one process), on the backend's device."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor.clone()
    nccl = dist.get_backend() == "nccl"
    tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu", copy=True)
    dist.all_reduce(tensor)
    return tensor


class TaskBalancer(nn.Module):
    """Shared part of the balancers: `total = balancer(losses)` each step, `end_epoch()` after each epoch.

    A step returns sum_t w_t L_t and records L_t (detached, float64); end_epoch() all-reduces the epoch's sums and
    step count once, appends the epoch means to `history` and updates the weights, identical on every rank.
    `weights` and `history` are Python floats, saved by state_dict()."""

    def __init__(self, *, tasks: Sequence[str]):
        super().__init__()
        self.tasks = list(tasks)
        self.history: list[dict[str, float]] = []
        self._weights = {t: 1.0 for t in self.tasks}
        self._epoch_sums: torch.Tensor | None = None  # (T + 1,): per-task sums, then the step count

    @property
    def weights(self) -> dict[str, float]:
        """task -> weight that the current (or, after end_epoch, the next) epoch uses."""
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
        """Collective over the DDP ranks: every rank calls it once per epoch, after at least one step."""
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
    """Plain sum of the task losses (w = 1); what the released code actually optimises (SPEC 3)."""


class UncertaintyWeighting(TaskBalancer):
    """Homoscedastic uncertainty weighting, Kendall, Gal & Cipolla, CVPR 2018. Learns s_t = log sigma_t^2
    (init 0); give `parameters()` to the optimizer. `weights` reports exp(-s_t)."""

    def __init__(self, *, tasks: Sequence[str]):
        super().__init__(tasks=tasks)
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.tasks})

    @property
    def weights(self) -> dict[str, float]:
        return {t: math.exp(-s.item()) for t, s in self.log_vars.items()}

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self._record(losses)
        # total = sum_t exp(-s_t) L_t + s_t (SPEC 3's common form, without Kendall's 1/2 on regression tasks)
        return sum(torch.exp(-self.log_vars[t]) * losses[t] + self.log_vars[t] for t in self.tasks)


class DynamicWeightAverage(TaskBalancer):
    """Dynamic Weight Average, Liu, Johns & Davison, CVPR 2019 ("End-to-End Multi-Task Learning with Attention").

    Args:
        tasks: task names. temperature: softens the weights (2 in the paper)."""

    def __init__(self, *, tasks: Sequence[str], temperature: float = 2.0):
        super().__init__(tasks=tasks)
        self.temperature = temperature

    def _update_weights(self) -> None:
        if len(self.history) < 2:
            return  # w = 1 for the first two epochs
        prev, last = self.history[-2:]
        # w_t = T * softmax_t(r_t / temperature), r_t = m_t(e-1) / m_t(e-2), T tasks (weights average 1)
        exp_r = {t: math.exp(last[t] / prev[t] / self.temperature) for t in self.tasks}
        total = sum(exp_r.values())
        self._weights = {t: len(self.tasks) * exp_r[t] / total for t in self.tasks}


class LossPrioritization(TaskBalancer):
    """Loss Prioritization Scheme (LPS), MT-CP's dynamic task balancing (paper abstract: it projects the task
    losses onto a common logarithmic scale and prioritises the tasks that improve slowest).

    The paper's equations could not be read: this is the project's DECIDED reconstruction, SPEC 3 steps 1-5.
    Args:
        tasks: task names. spread: k, how far the weights are pushed from their mean (7.5 NYUD, 1.6 PASCAL).
        floor: smallest weight a task can get."""

    def __init__(self, *, tasks: Sequence[str], spread: float = 7.5, floor: float = 0.1):
        super().__init__(tasks=tasks)
        self.spread, self.floor = spread, floor

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # P_t = log(1 + L_t): every task on a common logarithmic scale
        # NOTE(repro): L_t here includes the deep-supervision terms (SPEC 3); the released code takes its LPS
        # statistics from the final outputs' losses only.
        projected = {t: torch.log1p(loss) for t, loss in losses.items()}
        self._record(projected)
        # NOTE(repro): the released code computes its weights but never applies them (the loss is overwritten
        # by the plain sum) and switches LPS off on PASCAL; here the weights are applied on every dataset.
        # objective = sum_t w_t P_t, w constant within an epoch (epoch 0: w = 1)
        return sum(self._weights[t] * projected[t] for t in self.tasks)

    def _update_weights(self) -> None:
        # NOTE(repro): the released code uses each rank's own statistics; these epoch means m_t of P_t are
        # all-reduced, so every rank has the same weights.
        m = self.history[-1]
        if len(self.history) == 1:
            # after epoch 0, inverse share: w_t proportional to (sum_s m_s) / m_t, rescaled to mean 1
            inverse = {t: sum(m.values()) / m[t] for t in self.tasks}
            mean = sum(inverse.values()) / len(self.tasks)
            self._weights = {t: inverse[t] / mean for t in self.tasks}
            return
        prev = self.history[-2]
        # r_t = (m_t(e) / m_t(e-1)) / (M(e) / M(e-1)), M = sum_t m_t: r_t > 1 if t improved less than the total
        total_ratio = sum(m.values()) / sum(prev.values())
        r = {t: m[t] / prev[t] / total_ratio for t in self.tasks}
        mean = sum(r.values()) / len(self.tasks)
        # w_t = max(mean(r) + k (r_t - mean(r)), floor)
        # NOTE(repro): the released code does not clamp, so its weights can go negative.
        self._weights = {t: max(mean + self.spread * (r[t] - mean), self.floor) for t in self.tasks}


BALANCERS = {"lps": LossPrioritization, "equal": EqualWeighting, "uw": UncertaintyWeighting,
             "dwa": DynamicWeightAverage}


def make_balancer(name: str, tasks: Sequence[str], *, spread: float = 7.5, floor: float = 0.1) -> TaskBalancer:
    """The balancer `name` (lps | equal | uw | dwa) over `tasks`; spread and floor are LPS's (SPEC 3), the
    other balancers have no option."""
    if name not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; choose from {sorted(BALANCERS)}")
    options = dict(spread=spread, floor=floor) if name == "lps" else {}
    return BALANCERS[name](tasks=tasks, **options)


# ---------------------------------------------------------------------------------------------------------
# Metrics and Delta_m (SPEC 4)

SAL_BETA2 = 0.3  # beta^2 of the pooled saliency F-measure (InvPT / TaskPrompter convention)
SAL_THRESHOLDS = (0.05, 0.95, 19)  # linspace of the pooled maxF's probability thresholds
SAL_THRESHOLDS_MTCP = (0.2, 0.9, 15)  # linspace of MT-CP's (MTL-PyTorch's) per-image thresholds: maxF_mtcp, mIoU
DEPTH_MIN = 1e-9  # m; predictions are clamped to this before every depth metric, as both reference evaluators do
ANGLE_BIN = 0.01  # deg; histogram resolution of the pooled normals median
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)  # deg


class Metrics:
    """Benchmark metrics over a whole split (SPEC 4), kept as sufficient statistics: a confusion matrix, sums,
    counts and histograms, int64 / float64, on the predictions' device. compute() sums them over the DDP ranks
    once, so ranks that update disjoint shards report exactly the single-process numbers (the normals median
    to within its 0.01 deg bin).

    Args:
        num_outputs: task -> channels as the dataset gives them (classes for semseg / human_parts).
    Shapes (update):
        preds[task]: (B, C, H, W) raw outputs at the targets' resolution: logits (semseg, human_parts, sal),
            metres (depth), 3-vectors of any length (normals).
        targets[task]: semseg / human_parts (B, H, W) int64, 255 = ignore; depth (B, 1, H, W) metres, 0 = invalid;
            normals (B, 3, H, W) unit vectors, zero vector = invalid; sal (B, 1, H, W) in {0, 1}.
    Units of compute(): percent for mIoU, pixel_acc, maxF, maxF_mtcp, delta1 and the angle thresholds; metres; degrees.
    """

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


# headline metric per task, the one Delta_m uses, and s_t: +1 if higher is better, -1 if lower (SPEC 4).
# Saliency by MT-CP's per-image mIoU, as MT-CP's code (and MTL-PyTorch's) computes Delta_m.
HEADLINE = {"semseg": ("mIoU", +1), "human_parts": ("mIoU", +1), "depth": ("rmse", -1),
            "normals": ("mean", -1), "sal": ("mIoU", +1)}


def delta_m(results: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]]) -> float:
    """Mean relative gain over the single-task baselines, in percent (SPEC 4); both in compute()'s format."""
    missing = [t for t in results if t not in HEADLINE or t not in baselines]
    if missing:
        raise ValueError(f"no headline metric or no baseline for {missing}")
    # Delta_m = (100 / T) sum_t s_t (M_t - B_t) / B_t
    gains = []
    for task, result in results.items():
        metric, sign = HEADLINE[task]
        gains.append(sign * (result[metric] - baselines[task][metric]) / baselines[task][metric])
    return 100 * sum(gains) / len(gains)


# ---------------------------------------------------------------------------------------------------------
# Distributed and precision helpers (torchrun; one code path for 1 or N processes)

def bf16_ready(device: torch.device) -> bool:
    """Whether bf16 is fast here: any CUDA GPU, or a CPU with native bf16 (AVX-512 BF16 or AMX). Without
    them, CPU bf16 is emulated and slower than fp32."""
    return device.type == "cuda" or device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported()
                                                              or torch.cpu._is_amx_tile_supported())


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast where bf16_ready(device), else fp32. Losses and metrics are computed in fp32 regardless.

    NOTE(repro): the released code trains and evaluates in fp32. bf16 on CPU was measured on this project's
    2-core Xeon with AMX (README: performance): NYUD 240x320 training step 13.44 s -> 3.75 s, toy 1.30x faster."""
    if enabled and bf16_ready(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup_distributed(device_name: str | None) -> tuple[bool, int, int, int, torch.device]:
    """Reads torchrun's environment (never a --local_rank flag, SPEC 7) and joins the process group:
    nccl on CUDA, gloo on CPU. Returns (ddp, rank, local_rank, world_size, device)."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    device = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if ddp:
        # torchrun's agent keeps one store for all attempts of a job (--max-restarts): a restarted worker would
        # find the dead workers' addresses there and time out connecting to them. One key prefix per attempt.
        store, _, _ = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                                world_size=world)
    return ddp, rank, local_rank, world, device


def broadcast_buffers(model: nn.Module) -> None:
    """Copies rank 0's buffers (BN running statistics) to every rank before evaluation: DDP broadcasts them
    at the start of each forward, but each rank then updates its own copy on its own batch."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Averages gradients of parameters that live outside the DDP module (the UW balancer's log-variances)."""
    if dist.is_initialized():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


# ---------------------------------------------------------------------------------------------------------
# Pictures of predictions (training visualisations and --predict)

def colorize(task: str, value: np.ndarray, *, depth_range: tuple[float, float] = (0.0, 10.0)) -> np.ndarray:
    """One task's map as an RGB picture, H x W x 3 uint8.

    Args:
        value: class ids (H, W), 255 = ignore, drawn grey; depth (1, H, W) metres, 0 = invalid, drawn black;
            normals (3, H, W) unit vectors, drawn as (n + 1) / 2; saliency (1, H, W) probability, grey."""
    if task in ("semseg", "human_parts"):
        rgb = data.voc_palette()[np.clip(value, 0, 255).astype(np.uint8)]
        rgb[value == 255] = 128
        return rgb
    if task == "depth":
        lo, hi = depth_range
        t = np.clip((value[0] - lo) / (hi - lo), 0, 1)
        # a blue -> green -> yellow -> red ramp, near is blue
        anchors = np.array([[48, 18, 59], [40, 120, 220], [30, 200, 140], [240, 200, 40], [180, 20, 10]], float)
        pos = t * (len(anchors) - 1)
        i = np.minimum(pos.astype(int), len(anchors) - 2)
        rgb = anchors[i] + (anchors[i + 1] - anchors[i]) * (pos - i)[..., None]
        rgb[value[0] <= 0] = 0
        return rgb.astype(np.uint8)
    if task == "normals":
        return ((np.transpose(value, (1, 2, 0)) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return np.repeat((value[0] * 255).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)


def to_numpy(task: str, pred: torch.Tensor) -> np.ndarray:
    """A raw prediction (C, H, W) as the values people use: class ids (H, W) int64, depth metres (1, H, W),
    unit normals (3, H, W), saliency probability (1, H, W); float32."""
    pred = pred.float()
    if task in ("semseg", "human_parts"):
        return pred.argmax(0).cpu().numpy()
    if task == "normals":
        return F.normalize(pred, dim=0).cpu().numpy()
    if task == "sal":
        return torch.sigmoid(pred).cpu().numpy()
    return pred.cpu().numpy()


# ---------------------------------------------------------------------------------------------------------
# Evaluation (SPEC 1.3 eval protocol, SPEC 4 metrics)

def resize_to(pred: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Raw outputs (B, C, h, w) -> (B, C, H, W) at a label's size, bilinear on logits / values, in fp32."""
    # NOTE(repro): class logits are resized before the argmax; the released code takes the argmax at the input
    # size and resizes the class map (nearest), which loses detail along class boundaries.
    return F.interpolate(pred.float(), size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, device: torch.device, batch_size: int, workers: int, amp: bool,
             rank: int = 0, world: int = 1) -> dict:
    """Metrics.compute() of `model` on the whole `dataset`, all-reduced over ranks. Each rank takes the images
    rank, rank + world, ... (no padding: DistributedSampler would repeat images). Predictions are resized to each
    label's ORIGINAL size and scored there (SPEC 1.3); no test-time augmentation."""
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=data.collate,
                                         pin_memory=device.type == "cuda")
    metrics = Metrics(dataset.num_outputs)
    for batch in loader:
        with autocast(device, amp):
            preds, _ = model(batch["image"].to(device, non_blocking=True))
        for t in preds:
            target = batch[t]
            if isinstance(target, torch.Tensor):  # one label size for the whole batch
                metrics.update({t: resize_to(preds[t], target.shape[-2:])}, {t: target.to(device)})
            else:  # labels of several sizes: one image at a time
                for pred, tgt in zip(preds[t], target):
                    metrics.update({t: resize_to(pred[None], tgt.shape[-2:])}, {t: tgt[None].to(device)})
    return metrics.compute()


@torch.no_grad()
def save_visuals(model: nn.Module, dataset, out_dir: Path, *, device: torch.device, amp: bool, count: int = 4) -> None:
    """One PNG per validation image: a row per task with the image, the ground truth and the prediction, each
    H x W x 3 with a 4 px white margin on the right and below."""
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
            pics = [image, colorize(t, target), colorize(t, to_numpy(t, resize_to(pred, target.shape[-2:])[0]))]
            rows.append(np.concatenate([np.pad(p, ((0, 4), (0, 4), (0, 0)), constant_values=255) for p in pics], 1))
        Image.fromarray(np.concatenate(rows)).save(out_dir / f"{sample['meta']['id']}.png")


def constant_predictions(train_set) -> dict[str, torch.Tensor]:
    """The best constant per task over the training labels, as the raw output (C,) a head would emit:
    one-hot logits of the most frequent class, the mean depth in metres, the mean normal, the mean saliency
    as a logit. Starts the depth heads at room scale, and is the toy run's reference floor."""
    counts, sums = {}, {}
    for i in range(len(train_set)):
        _, targets = train_set.load(i)  # decoded, not augmented
        for t, arr in targets.items():
            if t in ("semseg", "human_parts"):
                counts[t] = counts.get(t, 0) + np.bincount(arr[arr != 255].ravel(), minlength=train_set.num_outputs[t])
                continue
            if t == "depth":
                values = arr[arr > 0][:, None]  # (P, 1) metres, valid pixels
            elif t == "normals":
                values = arr.reshape(-1, 3)  # zero vectors (invalid) add nothing; the mean is normalised
            else:
                values = (arr > 127.5).reshape(-1, 1)  # saliency in {0, 1}
            total, n = sums.get(t, (0.0, 0))
            sums[t] = (total + values.sum(0, dtype=np.float64), n + len(values))
    constants = {t: F.one_hot(torch.tensor(int(n.argmax())), len(n)).float() for t, n in counts.items()}
    for t, (total, n) in sums.items():
        mean = torch.as_tensor(total / max(n, 1), dtype=torch.float32)
        constants[t] = {"depth": mean, "normals": F.normalize(mean, dim=0), "sal": torch.logit(mean, eps=1e-6)}[t]
    return constants


@torch.no_grad()
def constant_predictor_metrics(constants: dict[str, torch.Tensor], val_set, *, rank: int = 0, world: int = 1) -> dict:
    """Metrics of predicting `constants` (constant_predictions) everywhere on val_set; sharded as evaluate()."""
    metrics = Metrics(val_set.num_outputs)
    for i in range(rank, len(val_set), world):
        sample = val_set[i]
        preds = {t: v.view(1, -1, 1, 1).expand(1, -1, *sample[t].shape[-2:]) for t, v in constants.items()}  # (1, C, H, W)
        metrics.update(preds, {t: sample[t][None] for t in preds})
    return metrics.compute()


def format_metrics(results: dict) -> str:
    """The final table: one line per task, the headline metric first."""
    lines = []
    for t, values in results.items():
        key = HEADLINE[t][0]
        rest = "  ".join(f"{k} {v:.4g}" for k, v in values.items() if k != key)
        lines.append(f"  {t:<12} {key} {values[key]:.4g}  |  {rest}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Training (SPEC 5)

def get_lr(step: int, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    """Poly decay per iteration (SPEC 5): lr = base_lr * (1 - step / total_steps) ** power."""
    # NOTE(repro): the released code steps the poly decay once per epoch; per iteration is smoother, same end.
    return base_lr * (1 - min(step, total_steps) / total_steps) ** power


def non_finite(obj, name: str = "") -> list[str]:
    """Names of the inf / NaN floats and floating-point tensors in a nested dict / list (a checkpoint's state)."""
    if isinstance(obj, torch.Tensor):
        return [name] if obj.is_floating_point() and not torch.isfinite(obj).all() else []
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [name]
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [n for k, v in items for n in non_finite(v, f"{name}.{k}" if name else str(k))]


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes to a temporary file and renames it, so a crash or a full disk never leaves a broken checkpoint.
    A state with an inf / NaN (weights, BN statistics, Adam moments) is never written: the previous one stays."""
    bad = non_finite({k: state[k] for k in ("model", "optimizer", "balancer")})
    if bad:
        raise FloatingPointError(
            f"non-finite values after epoch {state['epoch']}/{state['args']['epochs']} in {len(bad)} tensors "
            f"({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}); stopping without saving them. The last good "
            f"checkpoint is {path}" + ("" if path.exists() else " (none yet)"))
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk: torch's "unexpected pos" RuntimeError or ENOSPC
        tmp.unlink(missing_ok=True)  # a partial file would keep the disk full
        raise UserError(f"cannot write the checkpoint {path} ({str(e).splitlines()[0]}); the previous checkpoint "
                        f"is kept. Free some space, then continue with --resume") from e


CHECKPOINT_KEYS = ("model", "optimizer", "balancer", "epoch", "step", "args", "num_outputs", "normalization")


def read_checkpoint(path, flag: str) -> dict:
    """The checkpoint at `path`; a UserError naming `flag` if it is missing, unreadable, cut short or lacks a key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag}: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a text file, a truncated zip, a pickle of something else
        why = (f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}" if zipfile.is_zipfile(path)
               else "not a complete file written by torch.save")
        raise UserError(f"{flag}: {path} is not a readable checkpoint ({why})") from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise UserError(f"{flag}: {path} is not an mtcp checkpoint (no {', '.join(missing)})")
    return checkpoint


def write_file(path: Path, text: str, mode: str = "w") -> None:
    """Writes (or with mode 'a' appends) text; a full disk is a UserError naming the file."""
    try:
        with open(path, mode) as f:
            f.write(text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl; a line cut short by a kill is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def build_model(args, num_outputs: dict[str, int]) -> MTCP:
    if not timm.is_model(args.backbone):
        close = difflib.get_close_matches(args.backbone.split(".")[0], timm.list_models(), n=5)
        raise UserError(f"--backbone {args.backbone} is not a timm model" + (f"; close names: {', '.join(close)}"
                        if close else "") + " (all: python -c \"import timm; print(timm.list_models('*resnet*'))\")")
    try:
        model = MTCP(num_outputs, backbone=args.backbone, pretrained=args.pretrained, weights=args.weights, dim=args.dim,
                     img_size=tuple(args.img_size), cfm=not args.no_cfm, traceback=not args.no_traceback,
                     cfm_qk_dim=(len(num_outputs) - 1) * args.dim if getattr(args, "cfm_released_width", False) else None)
    except FileNotFoundError as e:  # pretrained weights not in timm's cache (Backbone): the same on every rank
        raise UserError(str(e)) from None
    model.set_grad_checkpointing(getattr(args, "grad_checkpointing", False))  # absent from older checkpoints' args
    return model


def build_datasets(args, *, master: bool, training: bool = True):
    """The train and val datasets; every val file is decoded here, so a damaged one stops the program before
    training. Only a toy training run into the default data/toy writes the toy data (on first use). A missing or
    incomplete real dataset is a UserError that says where to download it and how to check it."""
    tasks, size = tuple(args.tasks), tuple(args.img_size)
    if (args.dataset == "toy" and training and master and Path(args.data_root) == Path(DATASETS["toy"]["data_root"])
            and not (Path(args.data_root) / "gt_sets" / "val.txt").exists()):
        print(f"writing the toy dataset to {args.data_root} ...", flush=True)
        data.make_toy(args.data_root, layout="nyud", **DATASETS["toy"]["toy_data"])
    if args.dataset == "toy" and dist.is_initialized():
        dist.barrier()  # the other ranks wait for rank 0's toy data
    try:
        extra = {} if args.dataset == "pascal" else dict(num_classes=DATASETS[args.dataset]["tasks"]["semseg"])
        reader = data.PASCALContext if args.dataset == "pascal" else data.NYUD
        sets = [reader(args.data_root, split, tasks=tasks, size=size, **extra) for split in ("train", "val")]
        data.verify(sets[1])
        return tuple(sets)
    except data.DataError as e:  # every rank gets here before any collective: each raises, rank 0 reports
        if args.dataset == "toy":
            raise
        check = f"python data.py check --dataset {args.dataset} {args.data_root}"
        if os.path.isdir(args.data_root):  # incomplete: e names the missing file, the layout and the download
            raise UserError(f"{e}\nCheck the folder with: {check}") from None
        url = DATASETS[args.dataset]["download"]
        raise UserError(f"no {args.dataset} dataset at {args.data_root}: download {url}, unpack it as "
                        f"{args.data_root} (or pass --data-root) and check it with: {check}") from None


def train(args, *, ddp: bool, rank: int, local_rank: int, world: int, device: torch.device) -> dict:
    """Trains on args.dataset, evaluates every --eval-every epochs and after the last, and returns the last
    epoch's validation metrics (never the best epoch: that would be selected on the test split, SPEC 5)."""
    # NOTE(repro): the released code reports the best of its periodic evaluations on the val (= test) split.
    master = rank == 0
    out_dir = Path(args.out_dir)
    checkpoint_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.jsonl"
    checkpoint, records = None, []
    if args.resume:  # log.jsonl keeps one record per epoch up to the checkpoint's; read by every rank
        checkpoint = read_checkpoint(checkpoint_path, "--resume")
        records = [r for r in read_log(log_path) if r["epoch"] <= checkpoint["epoch"]]
    elif checkpoint_path.exists() and not args.overwrite:
        raise UserError(f"{out_dir} holds the checkpoint of another run: pass --resume to continue it, another "
                        f"--out-dir, or --overwrite to replace it")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    train_set, val_set = build_datasets(args, master=master)
    if master:  # once the data is there: a run that cannot start leaves no output folder behind
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint_path.with_suffix(".tmp").unlink(missing_ok=True)  # left by a kill during a save
        for name in ("metrics.json", "log.jsonl", "checkpoint.pt") if not args.resume else ():  # --overwrite
            (out_dir / name).unlink(missing_ok=True)
        write_file(out_dir / "config.json", json.dumps(vars(args), indent=2))
    num_outputs, tasks = train_set.num_outputs, list(train_set.num_outputs)
    load_baselines(args.baselines, tasks)

    model = raw_model = build_model(args, num_outputs).to(device)
    constants = constant_predictions(train_set) if "depth" in tasks or args.dataset == "toy" else None
    if constants is None:  # constant_predictions reads every training file too: a damaged one stops us here
        data.verify(train_set)
    if "depth" in tasks and checkpoint is None:
        # NOTE(repro): the depth heads start at the mean training depth, not 0 m. Adam moves a bias by about
        # lr per step, so from 0 m the depth scale takes thousands of steps to learn (toy: RMSE 2.6 m vs 0.8 m
        # after 6 epochs).
        for head in raw_model.heads["depth"]:
            nn.init.constant_(head[-1].bias, constants["depth"].item())
    if device.type == "cuda" and args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    balancer = make_balancer(args.balancer, tasks, spread=args.lps_spread, floor=args.lps_floor).to(device)
    optimizer = torch.optim.AdamW([{"params": raw_model.parameters()},
                                   {"params": balancer.parameters(), "weight_decay": 0.0}],
                                  lr=args.lr, weight_decay=args.weight_decay, fused=True)  # one kernel: 3.4x faster on CPU
    start_epoch, step = 0, 0
    if checkpoint is not None:
        raw_model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        balancer.load_state_dict(checkpoint["balancer"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
    if args.compile:
        model = torch.compile(model)  # before the DDP wrap; checkpoints always hold raw_model
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

    # The same sampler for 1 or N processes: a seeded shuffle per epoch, so a resumed run sees the same order.
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         collate_fn=data.collate)
    if len(loader) == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size} x {world} processes")
    total_steps = args.epochs * len(loader)
    if master:
        counts = raw_model.param_counts()
        print(f"MTCP {args.backbone} dim {args.dim} img {args.img_size[0]}x{args.img_size[1]} | parameters "
              + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()) + f", total {sum(counts.values()) / 1e6:.2f}M")
        print(f"{len(train_set)} train / {len(val_set)} val images, global batch {args.batch_size * world} "
              f"({world} x {args.batch_size}), {len(loader)} steps per epoch, {args.epochs} epochs, device {device}"
              + (f", resuming at epoch {start_epoch}" if checkpoint is not None else ""), flush=True)

    def validate() -> dict:
        broadcast_buffers(raw_model)
        return evaluate(raw_model, val_set, device=device, batch_size=args.eval_batch_size, workers=args.workers,
                        amp=args.amp, rank=rank, world=world)

    def finish(record: dict) -> None:
        """After an epoch's checkpoint: validation when due, then the epoch's log.jsonl record."""
        nonlocal results
        if record["epoch"] % args.eval_every == 0 or record["epoch"] == args.epochs:
            record["metrics"] = results = validate()
            if master:
                print(f"epoch {record['epoch']} validation ({len(val_set)} images):\n{format_metrics(results)}",
                      flush=True)
        if master:
            write_file(log_path, json.dumps(record) + "\n", "a")

    results, run_start, run_start_step = None, time.perf_counter(), step
    if checkpoint is not None:  # log.jsonl: the records up to the checkpoint, then its epoch's if a kill lost it
        if ddp:
            dist.barrier()  # every rank has read log.jsonl before rank 0 rewrites it
        if master:
            write_file(log_path, "".join(json.dumps(r) + "\n" for r in records))
        if "log" in checkpoint and start_epoch not in [r["epoch"] for r in records]:
            finish(checkpoint["log"])
    for epoch in range(start_epoch, args.epochs):
        model.train()
        sampler.set_epoch(epoch)
        # Seeded per epoch and rank (augmentations and worker seeds draw from it): a resumed run repeats the
        # uninterrupted one exactly; the workers therefore restart each epoch (persistent_workers=False).
        torch.manual_seed(args.seed + epoch * world + rank)
        weights = dict(balancer.weights)  # constant within the epoch (LPS, DWA); UW's move every step
        sums = torch.zeros(len(tasks), dtype=torch.float64, device=device)
        epoch_start = time.perf_counter()
        for i, batch in enumerate(loader):
            lr = get_lr(step, total_steps, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = batch["image"].to(device, non_blocking=True)
            if device.type == "cuda" and args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = {t: batch[t].to(device, non_blocking=True) for t in tasks}
            with autocast(device, args.amp):
                preds, aux = model(images)
            losses = multi_task_losses(preds, aux, targets, aux_weight=args.aux_weight)  # fp32
            total = balancer(losses)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            all_reduce_grads(list(balancer.parameters()))
            if args.clip_grad > 0:
                # NOTE(repro): clipped before the step (SPEC 5); the released code does not clip on NYUD (commented
                # out) and clips after optimizer.step() on PASCAL, where it has no effect.
                nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
            optimizer.step()
            step += 1
            sums += torch.stack([losses[t].detach().double() for t in tasks])
            if (i + 1) % args.log_every == 0 or i + 1 == len(loader):
                mean = (sums / (i + 1)).tolist()  # one sync per log line, not per step
                if not all(math.isfinite(v) for v in mean):
                    raise FloatingPointError(
                        f"non-finite loss at epoch {epoch + 1}/{args.epochs} step {i + 1}: {dict(zip(tasks, mean))}; "
                        f"stopping. The last good checkpoint is {checkpoint_path}"
                        + ("" if checkpoint_path.exists() else " (none yet)"))
                if master:
                    elapsed = time.perf_counter() - run_start
                    per_step = elapsed / (step - run_start_step)
                    eta = per_step * (total_steps - step)
                    print(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{len(loader)} | loss "
                          + " ".join(f"{t} {v:.4f}" for t, v in zip(tasks, mean)) + " | w "
                          + " ".join(f"{v:.2f}" for v in balancer.weights.values())
                          + f" | lr {lr:.2e} | {args.batch_size * world / per_step:.1f} img/s"
                          f" | ETA {datetime.timedelta(seconds=round(eta))}", flush=True)
        epoch_time = time.perf_counter() - epoch_start
        if ddp:
            dist.all_reduce(sums)
        balancer.end_epoch()  # all-reduces its statistics: every rank gets the same weights
        record = dict(epoch=epoch + 1, step=step, lr=lr, losses=dict(zip(tasks, (sums / (len(loader) * world)).tolist())),
                      weights=weights, next_weights=dict(balancer.weights),
                      img_per_s=len(loader) * args.batch_size * world / epoch_time, epoch_time_s=epoch_time)
        if master:  # saved before validating: a failing validation keeps this epoch (a resume redoes finish)
            save_checkpoint(checkpoint_path, dict(
                model=raw_model.state_dict(), optimizer=optimizer.state_dict(), balancer=balancer.state_dict(),
                epoch=epoch + 1, step=step, args=vars(args), num_outputs=num_outputs, log=record,
                normalization=dict(mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD)),
                versions=dict(torch=str(torch.__version__), timm=timm.__version__)))
        finish(record)
    if results is None:  # resumed after the last epoch: just evaluate
        results = validate()
    reference = constant_predictor_metrics(constants, val_set, rank=rank, world=world) if args.dataset == "toy" else None
    if master:
        save_visuals(raw_model, val_set, out_dir / "vis", device=device, amp=args.amp)
        write_metrics(out_dir / "metrics.json", args, results, epoch=args.epochs, reference=reference)
    return results


def load_baselines(files: list[str] | None, tasks: list[str]) -> dict:
    """The single-task metrics.json files of --baselines, merged: task -> metrics. Checked before training,
    so a missing task or an unreadable file fails at once rather than after the last epoch."""
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
    """metrics.json: the last epoch's validation metrics, Delta_m against --baselines, and the constant
    predictors' metrics when given. A single-task run's file is itself a baseline file for --baselines."""
    baselines = load_baselines(args.baselines, list(results))
    dm = delta_m(results, baselines) if baselines else None
    write_file(path, json.dumps(dict(dataset=args.dataset, split="val", epoch=epoch, tasks=list(results),
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


def load_checkpoint_model(path: str, device: torch.device, flag: str) -> tuple[MTCP, dict]:
    """Rebuilds the model a checkpoint was trained with (its args) and loads its weights strictly."""
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


# ---------------------------------------------------------------------------------------------------------
# Predictions for one's own images (no ground truth, no dataset folder)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@torch.no_grad()
def predict(args, device: torch.device) -> None:
    """Writes per image and task a PNG picture and the raw values (.npy: class ids int64, depth metres, unit
    normals, saliency probability) at the image's own size, named after its stem (_1, _2, ... for a stem met
    before: a/x.png, b/x.png). Unreadable images are reported by name at the end; the others are still written."""
    paths = []
    for p in map(Path, args.predict):
        if not p.exists():
            raise UserError(f"--predict: {p} does not exist")
        paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    if not paths:
        raise UserError(f"--predict: no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(args.predict)}")
    stems, taken = {}, set()  # input path -> distinct output stem
    for path in dict.fromkeys(paths):
        stem, k = path.stem, 0
        while stem in taken:
            k += 1
            stem = f"{path.stem}_{k}"
        stems[path] = stem
        taken.add(stem)
        if k:
            print(f"{path} -> {stem}_*: its name is taken by another input", flush=True)
    paths = list(stems)
    model, checkpoint = load_checkpoint_model(args.checkpoint, device, "--checkpoint")
    mean, std = checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"]
    out_dir = Path(args.out_dir or "predictions")
    out_dir.mkdir(parents=True, exist_ok=True)
    failed, sizes = [], {}
    for path in paths:  # group by size, so a batch shares one output size
        try:
            with Image.open(path) as im:
                sizes.setdefault((im.height, im.width), []).append(path)
        except Exception as e:
            failed.append(f"{path}: {e}")
    n = args.batch_size or 8
    batches = [group[i:i + n] for group in sizes.values() for i in range(0, len(group), n)]
    done, start = 0, time.perf_counter()
    for batch in batches:
        images, names = [], []
        for path in batch:
            try:
                images.append(data.read_image(path))
                names.append(path)
            except Exception as e:
                failed.append(f"{path}: {e}")
        if not images:
            continue
        x = torch.stack([data.to_input(im, model.img_size, mean, std) for im in images]).to(device)  # (B, 3, H, W)
        with autocast(device, args.amp):
            preds, _ = model(x)
        for t, pred in preds.items():
            pred = resize_to(pred, images[0].shape[:2])  # (B, C, h, w) at the images' own size
            for path, p in zip(names, pred):
                value = to_numpy(t, p)
                np.save(out_dir / f"{stems[path]}_{t}.npy", value)
                Image.fromarray(colorize(t, value)).save(out_dir / f"{stems[path]}_{t}.png")
        done += len(names)
        print(f"predicted {done}/{len(paths)} images ({done / (time.perf_counter() - start):.1f} img/s) -> {out_dir}",
              flush=True)
    if failed:
        raise UserError("could not read " + str(len(failed)) + " image(s):\n  " + "\n  ".join(failed))


# ---------------------------------------------------------------------------------------------------------
# Benchmark: speed, memory and FLOP utilisation of one training step

# bf16 dense tensor-core peak in TFLOP/s, from the vendors' datasheets (for MFU).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def _cpu_attention_flops(q, k, v, *_, backward: bool = False) -> int:
    """FLOPs of SDPA's CPU flash kernel, which FlopCounterMode has no formula for (shapes (B, H, N, D)):
    forward Q K^T and P V; backward recomputes Q K^T and forms dV, dP, dQ, dK."""
    (b, h, n, d), m, dv = q, k[2], v[3]
    return 2 * b * h * n * m * ((3 * d + 2 * dv) if backward else (d + dv))


def benchmark(args, device: torch.device) -> dict:
    """Times training steps (forward, loss, backward, optimizer) and evaluation forwards on random data of the
    dataset's shapes, counts FLOPs with FlopCounterMode, and prints one table."""
    import resource
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(args.seed)
    cuda = device.type == "cuda"
    num_outputs = {t: DATASETS[args.dataset]["tasks"][t] for t in args.tasks}
    model = build_model(args, num_outputs).to(device)
    for m in model.modules():
        if isinstance(m, CoherenceFusion):
            m.naive_attention = args.naive_attention
    channels_last = cuda and args.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile else model
    balancer = make_balancer(args.balancer, list(num_outputs), spread=args.lps_spread, floor=args.lps_floor).to(device)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(balancer.parameters()), lr=args.lr, fused=True)
    B, (H, W) = args.batch_size, args.img_size
    images = torch.randn(B, 3, H, W, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = {t: torch.randint(0, c, (B, H, W), device=device) if t in ("semseg", "human_parts")
               else F.normalize(torch.randn(B, 3, H, W, device=device), dim=1) if t == "normals"
               else (torch.rand(B, 1, H, W, device=device) > 0.5).float() if t == "sal"
               else torch.rand(B, 1, H, W, device=device) * 9 + 0.5 for t, c in num_outputs.items()}

    def train_step(net: nn.Module = step_model, update: bool = True) -> float:
        with autocast(device, args.amp):
            preds, aux = net(images)
        total = balancer(multi_task_losses(preds, aux, targets, aux_weight=args.aux_weight))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if update:
            if args.clip_grad > 0:  # as train(): 0 turns clipping off (clip_grad_norm_ to 0 would zero the gradients)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
        return total.item()

    @torch.no_grad()
    def eval_step(net: nn.Module = step_model):
        with autocast(device, args.amp):
            net(images)

    def timed(fn, steps: int) -> float:
        for _ in range(args.benchmark_warmup):
            fn()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        return (time.perf_counter() - start) / steps

    cpu_attention = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: _cpu_attention_flops(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: _cpu_attention_flops(q, k, v, backward=True)}

    def flops_per_image(fn) -> float:  # of one eager step
        with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            fn(model)
        return counter.get_total_flops() / B

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    start = time.perf_counter()
    first_loss = train_step()  # same seed, same weights and data: compare eager with --compile, fp32 with bf16
    first_step_s = time.perf_counter() - start  # includes compilation with --compile
    train_time = timed(train_step, args.benchmark_steps)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # KiB -> GiB (Linux)
    model.eval()
    eval_time = timed(eval_step, args.benchmark_steps)
    model.train()
    train_flops = flops_per_image(lambda net: train_step(net, update=False))
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    eval_flops = flops_per_image(eval_step)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    achieved = train_flops * B / train_time / 1e12
    mfu = achieved / peak_tflops if cuda and peak_tflops else None
    result = dict(device=name, dataset=args.dataset, img_size=list(args.img_size), batch_size=B,
                  amp=bool(args.amp) and bf16_ready(device), compile=bool(args.compile), channels_last=channels_last,
                  naive_attention=bool(args.naive_attention), params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                  first_step_s=first_step_s, first_step_loss=first_loss,
                  train_img_per_s=B / train_time, eval_img_per_s=B / eval_time, peak_memory_gib=peak,
                  peak_memory_kind="CUDA max allocated" if cuda else "process peak RSS",
                  train_gflops_per_img=train_flops / 1e9, eval_gflops_per_img=eval_flops / 1e9,
                  achieved_tflops=achieved if cuda else None, mfu=mfu, peak_bf16_tflops=peak_tflops if cuda else None)
    rows = [("device", name), ("input", f"{B} x 3 x {H} x {W}, amp {result['amp']}, compile {result['compile']}"),
            ("parameters", f"{result['params_m']:.2f} M"),
            ("first step", f"{first_step_s:.1f} s" + (" (compilation included)" if args.compile else "")
             + f", loss {first_loss:.6f}"),
            ("train", f"{result['train_img_per_s']:.2f} img/s ({train_time * 1e3:.0f} ms/step)"),
            ("eval", f"{result['eval_img_per_s']:.2f} img/s"),
            ("peak memory", f"{peak:.2f} GiB ({result['peak_memory_kind']})"),
            ("GFLOPs / img", f"train step {train_flops / 1e9:.1f}, eval forward {eval_flops / 1e9:.1f}"),
            ("achieved", f"{achieved:.1f} TFLOP/s" if cuda else "n/a (CPU)"),
            ("MFU", f"{100 * mfu:.1f} % of {peak_tflops:.0f} TFLOP/s bf16 dense" if mfu else "n/a")]
    print("\n".join(f"{k:<14} {v}" for k, v in rows), flush=True)
    if args.benchmark_json:
        Path(args.benchmark_json).write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------------------
# Summaries of several runs: one Markdown table over seeds, with Delta_m (issue 14)

def _config_flags(config: dict, defaults: dict) -> tuple[str, ...]:
    """The flags that set what is trained to other than the defaults, as typed ('--no-cfm', '--balancer uw').
    How a run is run (RUNTIME_FLAGS), its seed and its --baselines do not count."""
    flags = []
    for key, default in defaults.items():
        value = config.get(key, default)  # a flag newer than the run: the run had its default
        if key in RUNTIME_FLAGS or key in ("seed", "baselines") or value == default:
            continue
        if isinstance(value, bool):
            flags.append(flag(key) if value else "--no-" + flag(key)[2:])
        else:
            flags.append(" ".join([flag(key), *map(str, value if isinstance(value, list) else [value])]))
    return tuple(flags)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"--summarize: {path.parent} has no {path.name} (not a run folder, or a run not finished)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--summarize: cannot read {path}: {e}") from e


def _mean_std(values: list[float], decimals: int, sign: str = "") -> str:
    """'mean ± sample std' (ddof 1); '–' for the std of one value."""
    std = f"{statistics.stdev(values):.{decimals}f}" if len(values) > 1 else "–"
    return f"{statistics.mean(values):{sign}.{decimals}f} ± {std}"


def summarize(folders: list[str]) -> str:
    """Prints one Markdown table of finished runs (config.json, metrics.json): a row per configuration (runs that
    differ only in --seed together), per task its HEADLINE metric as mean ± std over seeds, the seed count, and
    Delta_m (SPEC 4) per seed, then mean ± std, against the seed-means of the single-task runs among the folders.
    A configuration is named by its flags ('full' for none) less those every run shares (e.g. an ablation run at
    --no-amp), which the first line of the output lists."""
    runs_read, dataset, defaults = [], None, None  # (folder, seed, metrics, flags)
    for folder in folders:
        metrics, config = _read_json(Path(folder) / "metrics.json"), _read_json(Path(folder) / "config.json")
        try:
            run_dataset, seed, results = config["dataset"], config["seed"], metrics["metrics"]
        except KeyError as e:
            raise UserError(f"--summarize: {folder}: no {e} in its config.json or metrics.json") from e
        if dataset not in (None, run_dataset):
            raise UserError(f"--summarize: {folder} is a {run_dataset} run, the runs before it {dataset} runs: "
                            "summarize one dataset at a time")
        # what a configuration's name is relative to: the config.json of a run given no flag but --dataset
        dataset, defaults = run_dataset, defaults or vars(fill_defaults(get_args(["--dataset", run_dataset])[0]))
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
    tasks = [t for t in DATASETS[dataset]["tasks"] if any(t in r for rs in runs.values() for r in rs)]
    single = {f"--tasks {t}": t for t in tasks}  # name of each task's single-task configuration
    baselines = {t: {HEADLINE[t][0]: statistics.mean(r[t][HEADLINE[t][0]] for r in runs[name])}
                 for name, t in single.items() if name in runs}
    # full first, then in the order first seen, the baselines last (sorted() keeps that order within a key)
    names = sorted(runs, key=lambda name: 2 if name in single else int(name != "full"))
    lines = ["| configuration | " + " | ".join(f"{t} {HEADLINE[t][0]} {'↑' if HEADLINE[t][1] > 0 else '↓'}"
                                              for t in tasks) + " | seeds | Delta_m, % |", "|---" * (len(tasks) + 3) + "|"]
    lacking = set()
    for name in names:
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
# Command line

class UserError(Exception):
    """A problem the user can fix: a missing dataset, an unreadable file, a bad flag value. `cli()` reports it
    once (rank 0 only) as one message naming the file or flag and what to do, with no traceback, and exits
    with USER_ERROR_EXIT on every rank. data.DataError is reported the same way."""


USER_ERROR_EXIT = 2  # argparse's exit code for a bad command line; used for every UserError


class Interrupted(UserError):
    """Ctrl-C, reported in one line that says how to continue, with the shell's exit code for SIGINT."""
    exit_code = 130


def _number(kind: type, zero_ok: bool):
    """An argparse type: a finite number > 0 (>= 0 when zero_ok); argparse's error then names the flag."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < 0 or value == 0 and not zero_ok:
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if zero_ok else '> 0'}, not {text}")
        return value
    parse.__name__ = kind.__name__  # a ValueError reads "invalid int value: 'x'"
    return parse


positive_int, positive_float = _number(int, False), _number(float, False)
non_negative_int, non_negative_float = _number(int, True), _number(float, True)


def get_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The flags, and the names (dests) of those given on the command line. Flags left at None take their
    value from DATASETS[--dataset] (SPEC 5) or, when resuming, from the checkpoint."""
    p = argparse.ArgumentParser(description="MT-CP: multi-task dense prediction (WACV 2025), train / evaluate / "
                                "predict / benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DATASETS), default="toy",
                   help="toy: built-in rooms in the NYUD layout (written on first use); nyud: NYUD_MT; pascal: PASCAL_MT")
    g.add_argument("--data-root", help="dataset folder (default: DATASETS[dataset]['data_root']: data/toy, "
                   "data/NYUD_MT, data/PASCAL_MT, relative to the working directory)")
    g.add_argument("--tasks", nargs="+", help="subset of the dataset's tasks, e.g. one task for a single-task "
                   "baseline (default: all of DATASETS[dataset]['tasks'])")
    g.add_argument("--workers", type=non_negative_int, help="data-loading processes per rank (default: 8 on CUDA, "
                   "capped by the cores per rank; 0 on CPU, where workers slow training: 9.6 vs 12.6 img/s on 2 "
                   "cores, toy)")
    g = p.add_argument_group("model (SPEC 2)")
    g.add_argument("--backbone", help="timm model name (default: Swin-S in22k-ft-1k for nyud/pascal, SPEC 2.1; "
                   "resnet18 for toy)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, help="timm's pretrained backbone "
                   "weights, from its local cache, never downloaded at run time (default: on for nyud/pascal as in "
                   "the paper, off for toy)")
    g.add_argument("--weights", help="local timm state dict for the backbone, loaded strictly")
    g.add_argument("--dim", type=positive_int, help="D, width of neck, decoders and heads (default: 256 per SPEC 2; "
                   "toy 32)")
    g.add_argument("--img-size", type=positive_int, nargs=2, metavar=("H", "W"),
                   help="training / inference size (default: 480 640 nyud, 512 512 pascal per SPEC 1.3; toy 96 128)")
    g.add_argument("--no-cfm", action="store_true", help="ablation: no Coherence Fusion Module")
    g.add_argument("--no-traceback", action="store_true", help="ablation: no trace-back, the CFM head is final")
    g.add_argument("--cfm-released-width", action="store_true", help="CFM queries and keys (T-1)*D wide, as in "
                   "the released code (default: D wide)")
    g = p.add_argument_group("optimisation (SPEC 3, 5)")
    g.add_argument("--epochs", type=positive_int, help="default: 100 per SPEC 5 (released code); toy 12")
    g.add_argument("--batch-size", type=positive_int, help="per process (default: 2 per SPEC 5; toy 16)")
    g.add_argument("--eval-batch-size", type=positive_int, help="per process (default: --batch-size)")
    g.add_argument("--lr", type=positive_float, help="AdamW learning rate, poly decay 0.9 (default: 5e-5 per SPEC 5; "
                   "toy 2e-3)")
    g.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="AdamW weight decay (SPEC 5)")
    g.add_argument("--clip-grad", type=non_negative_float, default=10.0,
                   help="max gradient norm, 0 = off (SPEC 5 clips; the value is this project's choice)")
    g.add_argument("--balancer", choices=["lps", "equal", "uw", "dwa"], default="lps", help="lps: Loss "
                   "Prioritization Scheme (SPEC 3); equal: what the released code optimised; uw: Kendall et al.; "
                   "dwa: Liu et al.")
    g.add_argument("--lps-spread", type=positive_float, help="LPS spread k (default: 7.5 nyud/toy, 1.6 pascal, SPEC 3)")
    g.add_argument("--lps-floor", type=non_negative_float, default=0.1, help="LPS weight floor (SPEC 3)")
    g.add_argument("--aux-weight", type=non_negative_float, default=0.5,
                   help="weight of each auxiliary output's loss (initial and intermediate; SPEC 3, as released)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA "
                   "(SPEC 5) and on CPUs with native bf16 (AVX-512 BF16 / AMX: 1.30x faster toy step, 3.6x faster "
                   "NYUD step, README: performance); --no-amp for fp32 everywhere")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass "
                   "(backbone stages, decoders, CFMs, trace-backs): same gradients, less memory, slower (README: "
                   "performance)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format on CUDA")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (off: on a 2-core CPU the toy "
                   "compiled in 263 s, then trained 8 %% slower; with bf16 on CPU torch 2.14's inductor fails, use "
                   "--no-amp; README: performance)")
    g.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", help="where config.json, log.jsonl, metrics.json, checkpoint.pt and vis/ go "
                   "(default: runs/<dataset>; predictions/ for --predict)")
    g.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint.pt with its config "
                   "(a training flag given must equal the checkpoint's)")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out-dir (a new run into a folder "
                   "holding a checkpoint refuses without it)")
    g.add_argument("--eval-only", metavar="CKPT", help="evaluate a checkpoint on the val split and exit")
    g.add_argument("--eval-every", type=positive_int, default=10,
                   help="epochs between evaluations; the last is always evaluated (SPEC 5)")
    g.add_argument("--log-every", type=positive_int, default=20, help="steps between progress lines")
    g.add_argument("--baselines", nargs="+", metavar="JSON", help="single-task metrics.json files for Delta_m (SPEC 4)")
    g.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    g = p.add_argument_group("predict on your own images")
    g.add_argument("--predict", nargs="+", metavar="PATH", help="image files or folders; needs --checkpoint")
    g.add_argument("--checkpoint", help="checkpoint for --predict; it holds everything the model needs")
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", action="store_true", help="time training and evaluation steps on random data")
    g.add_argument("--benchmark-steps", type=positive_int, default=5, help="timed steps")
    g.add_argument("--benchmark-warmup", type=non_negative_int, default=2, help="untimed warm-up steps")
    g.add_argument("--benchmark-json", metavar="PATH", help="also write the numbers as JSON")
    g.add_argument("--peak-tflops", type=positive_float, help="device bf16 dense peak for MFU (default: from the GPU's "
                   "name)")
    g.add_argument("--naive-attention", action="store_true", help=argparse.SUPPRESS)  # memory comparison only
    g = p.add_argument_group("summaries of several runs")
    g.add_argument("--summarize", nargs="+", metavar="RUN_DIR", help="print one Markdown table of finished runs: "
                   "per configuration mean +- std over seeds and Delta_m against the single-task runs among them")
    args = p.parse_args(argv)
    if args.predict and not args.checkpoint:
        p.error("--predict needs --checkpoint")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out-dir, --overwrite replaces it: pass one of them")
    for action in p._actions:  # parsed again without defaults, only the flags given remain
        action.default = argparse.SUPPRESS
    return args, set(vars(p.parse_args(argv)))


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Flags left at None take the dataset's defaults (DATASETS)."""
    d = DATASETS[args.dataset]
    defaults = {k: d[k] for k in ("data_root", "backbone", "dim", "epochs", "batch_size", "lr", "lps_spread")}
    defaults.update(tasks=list(d["tasks"]), img_size=list(d["img_size"]), out_dir=f"runs/{args.dataset}",
                    pretrained=args.dataset != "toy" and not args.weights)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.eval_batch_size = args.eval_batch_size or args.batch_size  # > 0 when given
    unknown = set(args.tasks) - set(d["tasks"])
    if unknown:
        raise UserError(f"--tasks: {sorted(unknown)} are not tasks of {args.dataset} ({list(d['tasks'])})")
    return args


# Flags that describe how to run, not what is trained: a resumed run takes them from the command line.
RUNTIME_FLAGS = ("resume", "out_dir", "workers", "device", "log_every", "eval_every", "eval_batch_size", "data_root",
                 "grad_checkpointing", "launch")


def resume_after_restart(args: argparse.Namespace, path: Path) -> None:
    """Under `torchrun --max-restarts N`, a worker that dies makes torchrun restart every worker with the same
    command. A restarted worker (TORCHELASTIC_RESTART_COUNT > 0) continues from <out-dir>/checkpoint.pt, as
    --resume does, when that checkpoint was written by the same job (torchrun run id) and command line."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if not restart or args.resume or args.eval_only or args.predict or args.benchmark or not path.is_file():
        return
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: reads args, not weights
    if saved["args"].get("launch") == args.launch:
        args.resume = True
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"restart {restart}: resuming from epoch {saved['epoch']} of {path}", flush=True)


# The flags --eval-only uses; the dataset, tasks and model come from the checkpoint.
EVAL_FLAGS = ("eval_only", "data_root", "eval_batch_size", "workers", "device", "out_dir", "amp", "baselines")


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def main(argv: list[str] | None = None):
    args, given = get_args(argv)
    if args.summarize:  # reads finished runs' files: no torch.distributed, no data
        return summarize(args.summarize)
    # How this process was launched: torchrun's job id and the command line, so a restarted worker recognises
    # the checkpoint of its own job (resume_after_restart). Taken from the current launch when resuming.
    args.launch = dict(run_id=os.environ.get("TORCHELASTIC_RUN_ID"),
                       argv=[str(a) for a in (sys.argv[1:] if argv is None else argv)])
    # No network at run time: timm may read pretrained weights from its cache, never download them.
    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    path = Path(args.out_dir or f"runs/{args.dataset}") / "checkpoint.pt"
    resume_after_restart(args, path)
    if args.resume:
        saved = read_checkpoint(path, "--resume")["args"]
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
    ddp, rank, local_rank, world, device = setup_distributed(args.device)
    if args.workers is None:  # on CPU, worker processes compete with torch's threads for the same cores
        args.workers = min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))) if device.type == "cuda" else 0
    try:
        if args.predict:
            return predict(args, device)
        if args.eval_only:
            model, checkpoint = load_checkpoint_model(args.eval_only, device, "--eval-only")
            saved = checkpoint["args"]  # the data it was trained on; --data-root may point elsewhere
            out_dir = Path(args.out_dir or Path(args.eval_only).parent / "eval")
            args.dataset, args.tasks, args.img_size = saved["dataset"], saved["tasks"], saved["img_size"]
            args.data_root = args.data_root or saved["data_root"]
            _, val_set = build_datasets(fill_defaults(args), master=rank == 0, training=False)
            results = evaluate(model, val_set, device=device, batch_size=args.eval_batch_size, workers=args.workers,
                               amp=args.amp, rank=rank, world=world)
            if rank == 0:
                out_dir.mkdir(parents=True, exist_ok=True)
                write_metrics(out_dir / "metrics.json", args, results, epoch=checkpoint["epoch"])
            return results
        args = fill_defaults(args)
        if args.benchmark:
            return benchmark(args, device)
        return train(args, ddp=ddp, rank=rank, local_rank=local_rank, world=world, device=device)
    except KeyboardInterrupt:
        if args.predict or args.eval_only or args.benchmark:
            raise Interrupted("interrupted") from None
        path = Path(args.out_dir or ".") / "checkpoint.pt"
        if not args.out_dir or not path.is_file():
            raise Interrupted("interrupted before the first checkpoint: nothing to resume") from None
        epoch = read_checkpoint(path, "--resume")["epoch"]
        then = f"continues from epoch {epoch + 1}" if epoch < args.epochs else "evaluates its last epoch"
        raise Interrupted(f"interrupted; `python mtcp.py --resume --out-dir {args.out_dir}` {then}") from None


@record  # under torchrun, an unexpected error's traceback reaches torchrun's failure summary
def cli(argv: list[str] | None = None) -> int:
    """The program's entry point: main() with user errors reported once and without a traceback."""
    try:
        main(argv)
    except (UserError, data.DataError, FloatingPointError) as e:
        rank = int(os.environ.get("RANK", 0))
        if rank > 0:  # rank 0 nearly always has the same error, and torchrun stops this rank once rank 0 exits
            time.sleep(10)
        print(f"mtcp: error: {e}" + (f" (rank {rank})" if rank else ""), file=sys.stderr, flush=True)
        return getattr(e, "exit_code", USER_ERROR_EXIT)
    finally:  # only now: a rank that left the group early would break the collectives of the others
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
