"""Tests for mtcp (pytest, CPU, a few minutes): data.py, losses, balancers and metrics, the model, and the
program: train, resume, eval-only, torchrun on gloo, predict, benchmark, and the failure cases.

Every fixture is written in the real file formats inside tmp_path; nothing is downloaded.
"""
import copy
import errno
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import mtcp
from mtcp import HEADLINE, Metrics, delta_m, make_balancer, multi_task_losses, task_loss

# ---------------------------------------------------------------------------------------------------------
# Helpers: tiny datasets in the NYUD_MT and PASCAL_MT layouts

def write_image(path, hw, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)


def unit_normals(hw, seed=0):
    n = np.random.default_rng(seed).normal(size=(*hw, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n[0, 0] = 0  # one invalid pixel
    return n


def make_nyud(root, ids=("a", "b"), hw=(6, 8), variant="npy"):
    """NYUD_MT ('npy': .jpg images, .npy normals) or InvPT ('png': .png images and normals)."""
    for folder in ("gt_sets", "images", "segmentation", "depth", "normals"):
        os.makedirs(root / folder, exist_ok=True)
    for split in ("train", "val"):
        (root / "gt_sets" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    h, w = hw
    for k, id in enumerate(ids):
        write_image(root / "images" / (id + (".png" if variant == "png" else ".jpg")), hw, k)
        Image.fromarray((np.arange(h * w) % 41).reshape(hw).astype(np.uint8)).save(root / "segmentation" / f"{id}.png")
        np.save(root / "depth" / f"{id}.npy", np.linspace(0, 5, h * w, dtype=np.float32).reshape(hw))
        n = unit_normals(hw, k)
        if variant == "png":
            Image.fromarray(np.round((n + 1) * 255 / 2).astype(np.uint8)).save(root / "normals" / f"{id}.png")
        else:
            np.save(root / "normals" / f"{id}.npy", n)
    return root


def write_parts(path, objects):
    """PASCAL-Part struct: objects = [(class name, class index, mask, [(part name, mask)])]."""
    objs = np.zeros((1, len(objects)), [("class", "O"), ("classIndex", "O"), ("mask", "O"), ("parts", "O")])
    for j, (name, index, mask, parts) in enumerate(objects):
        pa = np.zeros((1, len(parts)), [("part_name", "O"), ("mask", "O")]) if parts else np.zeros((0, 0))
        for k, (part, pmask) in enumerate(parts):
            pa[0, k] = (part, pmask.astype(np.uint8))
        objs[0, j] = (name, np.array([[index]], np.uint8), mask.astype(np.uint8), pa)
    anno = np.zeros((1, 1), [("imname", "O"), ("objects", "O")])
    anno[0, 0] = ("x", objs)
    scipy.io.savemat(path, {"anno": anno})


def make_pascal(root, ids=("a", "b"), hw=(6, 8), semseg=7, sal=255, parts=None):
    """PASCAL_MT with constant semseg (in semseg/pascal-context) and saliency; parts: {id: objects}."""
    for folder in ("ImageSets/Context", "JPEGImages", "semseg/pascal-context", "semseg/VOC12", "human_parts",
                   "sal_distill"):
        os.makedirs(root / folder, exist_ok=True)
    for split in ("train", "val"):
        (root / "ImageSets/Context" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    for k, id in enumerate(ids):
        write_image(root / "JPEGImages" / f"{id}.jpg", hw, k)
        Image.fromarray(np.full(hw, semseg, np.uint8)).save(root / "semseg/pascal-context" / f"{id}.png")
        Image.fromarray(np.full(hw, sal, np.uint8)).save(root / "sal_distill" / f"{id}.png")
        write_parts(root / "human_parts" / f"{id}.mat", (parts or {}).get(id, [("chair", 9, np.ones(hw), [])]))
    return root


def force(ds, monkeypatch, flip=False, angle=0.0, scale=1.0):
    """Fix the augmentation parameters of a training dataset."""
    monkeypatch.setattr(ds, "draw", lambda rng: dict(flip=flip, angle=angle, scale=scale))
    return ds


# ---------------------------------------------------------------------------------------------------------
# Decoding

def test_nyud_decoding_and_eval_resolution(tmp_path):
    root = make_nyud(tmp_path)
    ds = data.NYUD(root, "val", size=(12, 16))
    assert not ds.train and len(ds) == 2 and ds.num_outputs == {"semseg": 40, "depth": 1, "normals": 3}
    s = ds[0]
    assert s["image"].shape == (3, 12, 16) and s["image"].dtype == torch.float32
    assert s["meta"] == {"id": "a", "size": (6, 8)}
    raw = np.array(Image.open(root / "segmentation/a.png"))
    assert s["semseg"].dtype == torch.int64 and s["semseg"].shape == (6, 8)  # eval: original resolution
    assert (s["semseg"].numpy() == np.where(raw == 0, 255, raw - 1)).all()  # 0 -> 255, k -> k - 1
    assert {0, 1, 40} <= set(raw.ravel()) and s["semseg"].max() == 255 and s["semseg"][raw == 40].eq(39).all()
    assert torch.equal(s["depth"][0], torch.from_numpy(np.load(root / "depth/a.npy")))
    assert torch.allclose(s["normals"].permute(1, 2, 0), torch.from_numpy(unit_normals((6, 8), 0)), atol=1e-6)
    assert s["normals"][:, 0, 0].eq(0).all()  # the zero vector stays invalid


def test_nyud_image_normalisation(tmp_path):
    root = make_nyud(tmp_path, variant="png")
    s = data.NYUD(root, "val", size=(6, 8))[0]
    rgb = np.array(Image.open(root / "images/a.png")) / 255
    expect = (rgb - data.IMAGENET_MEAN) / data.IMAGENET_STD
    assert np.allclose(s["image"].permute(1, 2, 0).numpy(), expect, atol=1e-5)


def test_nyud_png_variant_normals(tmp_path):
    root = make_nyud(tmp_path, variant="png")
    s = data.NYUD(root, "val", size=(6, 8))[1]
    v = np.array(Image.open(root / "normals/b.png")).astype(np.float32) * 2 / 255 - 1
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    assert np.allclose(s["normals"].permute(1, 2, 0).numpy(), v, atol=1e-6)
    assert np.allclose(s["normals"].norm(dim=0).numpy(), 1, atol=1e-5)


def test_pascal_semseg_voc12_preferred(tmp_path):
    root = make_pascal(tmp_path)
    Image.fromarray(np.full((6, 8), 5, np.uint8)).save(root / "semseg/VOC12/a.png")
    ds = data.PASCALContext(root, "val", tasks=("semseg",), size=(8, 8))
    assert ds.num_outputs == {"semseg": 21}
    assert ds[0]["semseg"].unique().tolist() == [5] and ds[1]["semseg"].unique().tolist() == [7]


def test_pascal_human_parts_from_mat(tmp_path):
    hw = (6, 8)

    def mask(r0, r1, c0, c1):
        out = np.zeros(hw, bool)
        out[r0:r1, c0:c1] = True
        return out
    person = [("torso", mask(0, 4, 0, 8)), ("lhand", mask(2, 4, 0, 2)),  # later wins: lhand over torso
              ("hair", mask(5, 6, 0, 2)), ("luleg", mask(4, 5, 0, 8)), ("rfoot", mask(5, 6, 2, 4)),
              ("tail", mask(5, 6, 6, 8))]  # not in the table: stays 0
    parts = {"a": [("chair", 9, mask(0, 6, 0, 8), [("head", mask(0, 6, 0, 8))]),  # not a person: ignored
                   ("person", 15, mask(0, 6, 0, 8), person), ("person", 15, mask(0, 1, 0, 1), [])],
             "b": [("chair", 9, mask(0, 6, 0, 8), [("head", mask(0, 6, 0, 8))])],  # no person
             "c": [("person", 15, mask(0, 6, 0, 8), [])],  # a person without a part list
             "d": [("person", 15, mask(0, 6, 0, 8), [("tail", mask(0, 6, 0, 8)), ("head", mask(0, 0, 0, 0))])]}
    root = make_pascal(tmp_path, ids=("a", "b", "c", "d"), parts=parts)  # d: parts, but none painted
    ds = data.PASCALContext(root, "val", tasks=("human_parts",), size=(8, 8))
    expect = np.zeros(hw, np.int64)
    expect[0:4], expect[2:4, 0:2], expect[5, 0:2], expect[4], expect[5, 2:4] = 2, 4, 1, 5, 6
    assert (ds[0]["human_parts"].numpy() == expect).all()
    assert all(ds[i]["human_parts"].eq(255).all() for i in (1, 2, 3))  # no painted part -> all 255
    assert data.PART_ID["llarm"] == 4 and data.PART_ID["neck"] == 2 and len(set(data.PART_ID.values())) == 6


def test_pascal_saliency_threshold(tmp_path):
    root = make_pascal(tmp_path)
    Image.fromarray(np.array([[0, 127, 128, 255]] * 6, np.uint8).repeat(2, 1)).save(root / "sal_distill/a.png")
    s = data.PASCALContext(root, "val", tasks=("sal",), size=(8, 8))[0]
    assert s["sal"].shape == (1, 6, 8) and s["sal"][0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------------
# Augmentation

def test_flip_mirrors_everything_and_negates_normals_x(tmp_path, monkeypatch):
    root = make_nyud(tmp_path, variant="png")
    plain = force(data.NYUD(root, "train", size=(6, 8)), monkeypatch)[0]
    ref = data.NYUD(root, "val", size=(6, 8))[0]
    for key in ("image", "semseg", "depth", "normals"):  # identity augmentation == eval at the same size
        assert torch.allclose(plain[key].float(), ref[key].float(), atol=1e-5), key
    flipped = force(data.NYUD(root, "train", size=(6, 8)), monkeypatch, flip=True)[0]
    for key in ("image", "semseg", "depth"):
        assert torch.allclose(flipped[key].float(), ref[key].flip(-1).float(), atol=1e-5), key
    assert torch.allclose(flipped["normals"], ref["normals"].flip(-1) * torch.tensor([-1., 1, 1]).view(3, 1, 1))


def test_nyud_zoom_divides_depth(tmp_path, monkeypatch):
    hw, zoom = (12, 24), 1.5
    root = make_nyud(tmp_path, hw=hw)
    depth = np.load(root / "depth/a.npy")
    s = force(data.NYUD(root, "train", size=hw), monkeypatch, scale=zoom)[0]
    # centred zoom: output pixel centre q maps to the input point c + (q - c) / zoom, nearest pixel
    y, x = [(c + (np.arange(n) + 0.5 - c) / zoom) for n, c in zip(hw, (6, 12))]
    safe = np.outer((y % 1 > .01) & (y % 1 < .99), (x % 1 > .01) & (x % 1 < .99))  # off pixel borders
    expect = depth[np.ix_(y.astype(int), x.astype(int))] / zoom
    assert np.allclose(s["depth"][0].numpy()[safe], expect[safe]) and safe.mean() > 0.4


def test_pascal_rotation_borders_and_unsupervised_parts(tmp_path, monkeypatch):
    hw = (12, 16)
    root = make_pascal(tmp_path, hw=hw, parts={"a": [("person", 15, np.ones(hw), [("torso", np.ones(hw, bool))])]})
    ds = force(data.PASCALContext(root, "train", size=(16, 16)), monkeypatch, angle=20.0, scale=0.75)
    s = ds[0]
    corners = (slice(0, 1), slice(0, 1))
    assert s["semseg"][corners].eq(0).all() and s["semseg"][8, 8] == 7  # border 0, inside unchanged
    assert s["human_parts"][corners].eq(0).all() and s["human_parts"][8, 8] == 2
    assert s["sal"][0][corners].eq(0).all() and s["sal"][0, 8, 8] == 1
    black = -torch.tensor(data.IMAGENET_MEAN) / torch.tensor(data.IMAGENET_STD)  # the released code's border
    assert torch.allclose(s["image"][:, 0, 0], black, atol=0.02)
    assert s["semseg"].shape == s["human_parts"].shape == (16, 16) and s["sal"].shape == (1, 16, 16)
    assert ds[1]["human_parts"].eq(255).all()  # no parts: stays unsupervised everywhere


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("angle", [90.0, -30.0])
def test_rotation_turns_normals_with_the_image(flip, angle):
    # one marked pixel right of the centre, normals everywhere pointing right (+x, along the columns):
    # after the warp the normal must point from the centre to where the marked pixel went
    label = np.zeros((21, 21), np.uint8)
    label[10, 18] = 1
    normals = np.tile(np.float32([1, 0, 0.5]), (21, 21, 1))
    _, out = data.augment(np.zeros((21, 21, 3), np.uint8), {"semseg": label, "normals": normals}, (21, 21),
                          flip=flip, angle=angle, scale=1.0)
    (r,), (c,) = np.nonzero(out["semseg"])
    direction = np.array([c - 10, r - 10], float) / np.hypot(c - 10, r - 10)
    n = out["normals"][r, c]
    assert np.allclose(n[:2] / np.hypot(*n[:2]), direction, atol=0.03)
    assert n[2] == 0.5 and np.isclose(np.hypot(*n[:2]), 1)  # z and the length are kept
    # by hand: PIL's affine with this matrix turns the content clockwise on screen for a positive angle
    # (y grows downwards), so +x becomes (cos a, sin a); the flip mirrors x first, -x becomes -(cos a, sin a)
    a = np.deg2rad(angle)
    assert np.allclose(n[:2], (-1 if flip else 1) * np.array([np.cos(a), np.sin(a)]), atol=1e-6)


def test_augmentation_randomness_follows_torch_seed(tmp_path):
    ds = data.PASCALContext(make_pascal(tmp_path, hw=(12, 16)), "train", size=(16, 16))
    torch.manual_seed(0)
    a = [ds[0]["image"] for _ in range(4)]
    torch.manual_seed(0)
    b = [ds[0]["image"] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], a[1])


def test_collate_mixed_label_sizes(tmp_path):
    root = make_pascal(tmp_path)
    make_pascal(tmp_path, ids=("c",), hw=(8, 6))
    for split in ("train", "val"):
        (tmp_path / f"ImageSets/Context/{split}.txt").write_text("a\nc\n")
    batch = data.collate([data.PASCALContext(root, "val", size=(8, 8))[i] for i in range(2)])
    assert batch["image"].shape == (2, 3, 8, 8) and isinstance(batch["semseg"], list)
    assert [t.shape for t in batch["semseg"]] == [(6, 8), (8, 6)] and [m["id"] for m in batch["meta"]] == ["a", "c"]
    train = data.collate([data.PASCALContext(root, "train", size=(8, 8))[i] for i in range(2)])
    assert train["semseg"].shape == (2, 8, 8) and train["sal"].shape == (2, 1, 8, 8)


# ---------------------------------------------------------------------------------------------------------
# Toy generator

def test_toy_nyud_loads_and_is_geometrically_coherent(tmp_path):
    h, w = 48, 64
    root = data.make_toy(tmp_path, "nyud", n_train=8, n_val=2, size=(h, w))
    ds = data.NYUD(root, "train", train=False, num_classes=len(data.TOY_CLASSES), size=(h, w))
    assert len(ds) == 8 and len(data.NYUD(root, "val", num_classes=6)) == 2 and len(data.TOY_CLASSES) >= 6
    classes = set()
    f = data.TOY_FOCAL * w
    v, u = np.mgrid[:h, :w] + 0.5
    for s in ds:
        depth, normals, seg = s["depth"][0].numpy(), s["normals"].permute(1, 2, 0).numpy(), s["semseg"].numpy()
        classes |= set(seg.ravel()) - {255}
        valid = depth > 0
        assert 0.5 < depth[valid].min() and depth.max() < 12 and 0.02 < 1 - valid.mean() < 0.08  # holes ~5 %
        assert np.allclose(np.linalg.norm(normals[valid], axis=-1), 1, atol=1e-5) and (normals[~valid] == 0).all()
        floor = (seg == data.TOY_CLASSES.index("floor")) & valid
        n = normals[floor]  # a flat floor: one normal, and every back-projected point on the same plane
        assert np.abs(n - n.mean(0)).max() < 1e-4 and n.mean(0)[1] < -0.9  # camera y is down: floor faces up
        rays = np.stack([(u[floor] - w / 2) / f, (v[floor] - h / 2) / f, np.ones(floor.sum())], -1)  # z = 1
        points = depth[floor, None] * rays  # back-projected with the toy intrinsics (metres)
        height = -(points @ n.mean(0))
        assert np.ptp(height) < 1e-3 and 1.2 <= height.mean() <= 1.6  # the camera height
    assert classes == set(range(len(data.TOY_CLASSES)))


def test_toy_pascal_loads(tmp_path):
    root = data.make_toy(tmp_path, "pascal", n_train=10, n_val=2, size=(48, 64))
    ds = data.PASCALContext(root, "train", train=False, size=(64, 64))
    samples = list(ds)
    assert len({s["meta"]["size"] for s in samples}) > 2  # sizes vary, some portrait
    assert any(s["meta"]["size"][0] > s["meta"]["size"][1] for s in samples)
    parts = [s["human_parts"] for s in samples]
    assert any(p.eq(255).all() for p in parts)  # some images without a figure
    assert set(torch.cat([p.ravel() for p in parts if not p.eq(255).all()]).tolist()) == set(range(7))
    assert set(torch.cat([s["semseg"].ravel() for s in samples]).tolist()) <= {0, 5, 9, 15, 16}
    for s in samples:
        assert ((s["semseg"] > 0).float() == s["sal"][0]).all()  # foreground objects are salient
        assert (s["human_parts"][s["semseg"] != 15] <= 0).all() or s["human_parts"].eq(255).all()
    assert data.PASCALContext(root, "train")[0]["image"].shape == (3, 512, 512)


def test_toy_is_deterministic_and_reused(tmp_path):
    a = data.make_toy(tmp_path / "a", "pascal", n_train=3, n_val=1, size=(32, 40), seed=1)
    b = data.make_toy(tmp_path / "b", "pascal", n_train=3, n_val=1, size=(32, 40), seed=1)
    c = data.make_toy(tmp_path / "c", "pascal", n_train=3, n_val=1, size=(32, 40), seed=2)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert len(files) == 4 * 4 + 2
    read = lambda root, f: open(os.path.join(root, f), "rb").read()
    assert all(read(a, f) == read(b, f) for f in files if not f.endswith(".mat"))  # .mat headers hold a date
    for x, y in zip(data.PASCALContext(a, train=False), data.PASCALContext(b, train=False)):
        assert torch.equal(x["human_parts"], y["human_parts"])
    assert read(a, "JPEGImages/2008_000000.jpg") != read(c, "JPEGImages/2008_000000.jpg")
    stamp = os.path.getmtime(os.path.join(a, "JPEGImages/2008_000000.jpg"))
    data.make_toy(tmp_path / "a", "pascal", n_train=3, n_val=1, size=(32, 40), seed=1)  # complete: not rewritten
    assert os.path.getmtime(os.path.join(a, "JPEGImages/2008_000000.jpg")) == stamp


# ---------------------------------------------------------------------------------------------------------
# Errors name the file

def test_missing_root_and_split_file(tmp_path):
    with pytest.raises(data.DataError, match="dataset root not found.*gt_sets.*14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw"):
        data.NYUD(tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="split file not found.*Context.train.txt.*PASCAL_MT.tgz"):
        data.PASCALContext(tmp_path)


@pytest.mark.parametrize("name, payload", [("images/a.jpg", None), ("depth/a.npy", None),
                                           ("images/a.jpg", b"not a jpeg"), ("segmentation/a.png", b"\x89PNG junk"),
                                           ("normals/a.npy", b"garbage"), ("depth/a.npy", b"\x93NUMPY")])
def test_missing_or_corrupt_nyud_file(tmp_path, name, payload):
    root = make_nyud(tmp_path)
    os.remove(root / name) if payload is None else (root / name).write_bytes(payload)
    with pytest.raises(data.DataError, match=("missing file" if payload is None else "cannot read") + ".*" + name):
        data.NYUD(root)[0]


def test_corrupt_mat_and_truncated_jpg(tmp_path):
    root = make_pascal(tmp_path)
    (root / "human_parts/a.mat").write_bytes(b"MATLAB 5.0 MAT-file, broken")
    with pytest.raises(data.DataError, match="human_parts/a.mat"):
        data.PASCALContext(root)[0]
    jpg = (root / "JPEGImages/b.jpg").read_bytes()
    (root / "JPEGImages/b.jpg").write_bytes(jpg[:len(jpg) // 2])
    with pytest.raises(data.DataError, match="JPEGImages/b.jpg"):
        data.PASCALContext(root)[1]


def test_label_size_mismatch_and_out_of_range(tmp_path):
    root = make_nyud(tmp_path)
    np.save(root / "depth/a.npy", np.ones((5, 8), np.float32))
    with pytest.raises(data.DataError, match=r"depth/a.npy: label size 5x8 does not match image size 6x8"):
        data.NYUD(root)[0]
    with pytest.raises(data.DataError, match=r"segmentation/b.png: semseg value 40 out of range 0..6"):
        data.NYUD(root, num_classes=6)[1]
    root = make_pascal(tmp_path / "p", semseg=30)
    with pytest.raises(data.DataError, match=r"pascal-context/a.png: semseg values \[30\] out of range"):
        data.PASCALContext(root)[0]


# ---------------------------------------------------------------------------------------------------------
# python data.py check

def test_check_passes_on_toys(tmp_path, capsys):
    data.make_toy(tmp_path / "n", "nyud", n_train=4, n_val=2, size=(32, 40))
    data.make_toy(tmp_path / "p", "pascal", n_train=4, n_val=2, size=(32, 40))
    assert data.main(["check", "--dataset", "nyud", str(tmp_path / "n"), "--any-split-size"]) == 0
    assert data.main(["check", "--dataset", "pascal", str(tmp_path / "p"), "--any-split-size"]) == 0
    out = capsys.readouterr().out
    assert "NYUD_MT" in out and "human parts:" in out and "NOT usable" not in out


@pytest.mark.parametrize("damage, name", [("missing", "depth/0001.npy"), ("corrupt", "segmentation/0002.png"),
                                          ("range", "segmentation/0003.png"), ("split", "gt_sets/train.txt")])
def test_check_reports_problems(tmp_path, capsys, damage, name):
    root = data.make_toy(tmp_path, "nyud", n_train=4, n_val=2, size=(32, 40))
    if damage == "missing":
        os.remove(root / name)
    elif damage == "corrupt":
        (root / name).write_bytes(b"\x89PNG broken")
    elif damage == "range":
        Image.fromarray(np.full((32, 40), 41, np.uint8)).save(root / name)
    argv = ["check", "--dataset", "nyud", str(root)] + ([] if damage == "split" else ["--any-split-size"])
    assert data.main(argv) != 0
    out = capsys.readouterr().out
    assert "NOT usable" in out and name in out


# ---------------------------------------------------------------------------------------------------------
# Losses, balancers, metrics


def test_semseg_loss_equals_cross_entropy():
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 3, 5, requires_grad=True)
    target = torch.randint(0, 4, (2, 3, 5))
    target[0, 0] = 255
    loss = task_loss("semseg", pred, target)
    assert torch.allclose(loss, F.cross_entropy(pred, target, ignore_index=255))


@pytest.mark.parametrize("task, pred, target", [
    ("semseg", torch.randn(2, 3, 4, 4), torch.full((2, 4, 4), 255)),
    ("human_parts", torch.randn(1, 7, 4, 4), torch.full((1, 4, 4), 255)),
    ("depth", torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)),
    ("normals", torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)),
])
def test_loss_without_valid_pixel_is_zero_and_backpropagates(task, pred, target):
    pred = pred.clone().requires_grad_()
    loss = task_loss(task, pred, target)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_depth_and_normals_losses_by_hand():
    pred = torch.tensor([[1.5, 9.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    target = torch.tensor([[1.0, 0.0], [2.0, 4.0]]).view(1, 1, 2, 2)
    assert task_loss("depth", pred, target).item() == pytest.approx((0.5 + 0 + 1) / 3)
    assert task_loss("depth", pred.bfloat16(), target).dtype == torch.float32
    # pixel 0: (2,0,0) vs (1,0,0) -> 0; pixel 1: (0,0,3) vs (0,1,0) -> |0|+|-1|+|1| = 2; pixel 2 invalid
    pred = torch.tensor([[2.0, 0, 0], [0, 0, 3], [5, 5, 5]]).T.reshape(1, 3, 1, 3)
    target = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0]]).T.reshape(1, 3, 1, 3)
    assert task_loss("normals", pred, target).item() == pytest.approx(2 / 6)


def test_balanced_bce_by_hand():
    pred = torch.tensor([2.0, -1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    w = 3 / 4  # fraction of negatives, weighting the one positive
    expected = (w * math.log1p(math.exp(-2)) + (1 - w) * (math.log1p(math.exp(-1)) + math.log(2)
                                                          + math.log1p(math.exp(1)))) / 4
    assert task_loss("sal", pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_multi_task_losses_aux_weighting():
    target = torch.tensor([[1.0, 2.0]]).view(1, 1, 1, 2)
    final = torch.tensor([[1.5, 2.0]]).view(1, 1, 1, 2)  # L1 = 0.25
    aux = [torch.tensor([[2.0, 3.0]]).view(1, 1, 1, 2), torch.tensor([[3.0, 4.0]]).view(1, 1, 1, 2)]  # 1, 2
    losses = multi_task_losses({"depth": final}, {"depth": aux}, {"depth": target})
    assert losses["depth"].item() == pytest.approx(0.25 + 0.5 * (1 + 2))  # 0.5 per auxiliary output
    losses = multi_task_losses({"depth": final}, {"depth": []}, {"depth": target}, aux_weight=0.5)
    assert losses["depth"].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="no loss for task 'edge'"):
        task_loss("edge", final, target)


# balancers

TASKS = ["semseg", "depth", "normals"]


def run_lps_epoch(balancer, projected_per_step):
    """One epoch of steps whose projected losses P_t = log(1 + L_t) are given (float64, exact)."""
    for step in projected_per_step:
        balancer({t: torch.tensor(math.expm1(p), dtype=torch.float64) for t, p in zip(TASKS, step)})
    return balancer.end_epoch()


# epoch means of P (semseg, depth, normals): (3, 1, 2), (2.4, 0.9, 1.5), (2.4, 0.45, 1.5)
LPS_EPOCHS = [[(2.0, 1.0, 2.0), (4.0, 1.0, 2.0)], [(2.4, 0.9, 1.5)], [(2.0, 0.4, 1.0), (2.8, 0.5, 2.0)]]


def assert_weights(weights, expected):
    assert list(weights) == TASKS
    assert list(weights.values()) == pytest.approx(expected, rel=1e-9)


def test_lps_by_hand():
    lps = make_balancer("lps", TASKS)
    assert_weights(lps.weights, [1, 1, 1])
    total = lps({t: torch.tensor(math.expm1(p), dtype=torch.float64) for t, p in zip(TASKS, (2.0, 1.0, 2.0))})
    assert total.item() == pytest.approx(5.0)  # epoch 0: w = 1, objective sum_t P_t
    run_lps_epoch(lps, LPS_EPOCHS[0][1:])
    # inverse share: M = 6, 6/m = (2, 6, 3), mean 11/3 -> (6/11, 18/11, 9/11)
    assert_weights(lps.weights, [6 / 11, 18 / 11, 9 / 11])
    total = lps({t: torch.tensor(math.expm1(p), dtype=torch.float64) for t, p in zip(TASKS, LPS_EPOCHS[1][0])})
    assert total.item() == pytest.approx(6 / 11 * 2.4 + 18 / 11 * 0.9 + 9 / 11 * 1.5)  # sum_t w_t P_t
    lps.end_epoch()
    # M 6 -> 4.8 (x0.8); r = (0.8, 0.9, 0.75) / 0.8 = (1, 1.125, 0.9375), mean 49/48; w = mean + 7.5 (r - mean)
    assert_weights(lps.weights, [49 / 48 - 7.5 / 48, 49 / 48 + 7.5 * 5 / 48, 49 / 48 - 7.5 * 4 / 48])
    state = io.BytesIO()
    torch.save(lps.state_dict(), state)
    run_lps_epoch(lps, LPS_EPOCHS[2])
    # M 4.8 -> 4.35 (x29/32); r = (1, 0.5, 1) * 32/29, mean 80/87; depth 80/87 - 7.5 * 32/87 < 0 -> floor 0.1
    assert_weights(lps.weights, [200 / 87, 0.1, 200 / 87])
    # a fresh balancer resumed from the checkpoint continues identically
    state.seek(0)
    resumed = make_balancer("lps", TASKS)
    resumed.load_state_dict(torch.load(state, weights_only=True))
    assert len(resumed.history) == 2
    run_lps_epoch(resumed, LPS_EPOCHS[2])
    assert resumed.weights == lps.weights and resumed.history == lps.history
    with pytest.raises(ValueError, match="tasks"):
        make_balancer("lps", ["semseg", "depth"]).load_state_dict(lps.state_dict())


def test_lps_pascal_spread():
    lps = make_balancer("lps", TASKS, spread=1.6)
    for epoch in LPS_EPOCHS[:2]:
        run_lps_epoch(lps, epoch)
    assert_weights(lps.weights, [49 / 48 - 1.6 / 48, 49 / 48 + 1.6 * 5 / 48, 49 / 48 - 1.6 * 4 / 48])


def test_equal_and_unknown_balancer():
    equal = make_balancer("equal", TASKS)
    total = equal({t: torch.tensor(v) for t, v in zip(TASKS, (1.0, 2.0, 3.5))})
    assert total.item() == 6.5 and equal.weights == {t: 1.0 for t in TASKS}
    assert list(equal.parameters()) == []
    with pytest.raises(ValueError, match="expects losses for"):
        equal({"semseg": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="unknown balancer"):
        make_balancer("gradnorm", TASKS)


def test_dwa_by_hand():
    dwa = make_balancer("dwa", ["semseg", "depth"])
    for losses in [(1.0, 2.0), (0.5, 2.0)]:
        dwa({"semseg": torch.tensor(losses[0]), "depth": torch.tensor(losses[1])})
        assert dwa.weights == {"semseg": 1.0, "depth": 1.0}  # the first two epochs
        dwa.end_epoch()
    # r = (0.5, 1); w = 2 softmax(r / 2) = 2 e^{r/2} / (e^{0.25} + e^{0.5})
    expected = {"semseg": 2 / (1 + math.exp(0.25)), "depth": 2 * math.exp(0.25) / (1 + math.exp(0.25))}
    assert dwa.weights == pytest.approx(expected)
    total = dwa({"semseg": torch.tensor(1.0), "depth": torch.tensor(1.0)})
    assert total.item() == pytest.approx(2.0)


def test_uw_by_hand():
    uw = make_balancer("uw", ["semseg", "depth"])
    losses = {"semseg": torch.tensor(2.0, requires_grad=True), "depth": torch.tensor(3.0)}
    assert uw(losses).item() == pytest.approx(5.0)  # s = 0
    with torch.no_grad():
        uw.log_vars["semseg"].fill_(math.log(2))
    total = uw(losses)
    assert total.item() == pytest.approx(0.5 * 2 + math.log(2) + 3)
    total.backward()
    # d/ds_t = 1 - exp(-s_t) L_t: semseg 1 - 0.5 * 2 = 0, depth 1 - 3 = -2; d/dL_semseg = exp(-s) = 0.5
    assert uw.log_vars["semseg"].grad.item() == pytest.approx(0.0, abs=1e-6)
    assert uw.log_vars["depth"].grad.item() == pytest.approx(-2.0)
    assert losses["semseg"].grad.item() == pytest.approx(0.5)
    assert uw.weights == pytest.approx({"semseg": 0.5, "depth": 1.0})
    resumed = make_balancer("uw", ["semseg", "depth"])
    resumed.load_state_dict(uw.state_dict())
    assert torch.equal(resumed.log_vars["semseg"], uw.log_vars["semseg"])


# metrics


def one_hot_logits(labels, classes):
    return F.one_hot(labels, classes).permute(0, 3, 1, 2).float()  # (B, C, H, W)


def test_semseg_spec_vector():
    gt = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 255], [1, 1, 2, 2]]])
    pred = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 3], [1, 1, 2, 2]]])
    metrics = Metrics({"semseg": 4})
    metrics.update({"semseg": one_hot_logits(pred, 4)}, {"semseg": gt})
    result = metrics.compute()["semseg"]
    assert result["mIoU"] == pytest.approx(100 * (0.5 + 0.8 + 0.75 + 0) / 4)  # 51.25
    assert result["pixel_acc"] == pytest.approx(100 * 9 / 11)


def test_human_parts_images_without_parts_are_skipped():
    # image 2 is unsupervised (all 255); image 3 has no part pixel (only 0 and 255): both evaluators skip it
    gt = torch.tensor([[[0, 1], [2, 2]], [[255, 255], [255, 255]], [[0, 0], [255, 0]]])
    pred = torch.tensor([[[0, 1], [2, 0]], [[1, 1], [1, 1]], [[1, 2], [1, 1]]])
    metrics = Metrics({"human_parts": 3})
    metrics.update({"human_parts": one_hot_logits(pred, 3)}, {"human_parts": gt})
    result = metrics.compute()["human_parts"]
    assert result["mIoU"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert result["pixel_acc"] == pytest.approx(75.0)
    with pytest.raises(ValueError, match="labels outside"):
        metrics.update({"human_parts": one_hot_logits(pred.clamp(max=2), 3)}, {"human_parts": gt.clamp(max=7)})


def test_depth_spec_vector_and_by_hand():
    metrics = Metrics({"depth": 1})
    metrics.update({"depth": torch.tensor([[1.5, 2], [3, 3]]).view(1, 1, 2, 2)},
                   {"depth": torch.tensor([[1.0, 2], [0, 4]]).view(1, 1, 2, 2)})
    metrics.update({"depth": torch.tensor([[2.5, 6]]).view(1, 1, 1, 2)},
                   {"depth": torch.tensor([[2.0, 7]]).view(1, 1, 1, 2)})
    assert metrics.compute()["depth"]["rmse"] == pytest.approx(0.707107, abs=1e-6)
    # (gt, pred): (1, 1), (2, 1), (4, 4.5), (1, -1 -> clamped to 1e-9 before every metric), (0, 7) invalid
    metrics = Metrics({"depth": 1})
    metrics.update({"depth": torch.tensor([1.0, 1, 4.5, -1, 7]).view(1, 1, 1, 5)},
                   {"depth": torch.tensor([1.0, 2, 4, 1, 0]).view(1, 1, 1, 5)})
    result = metrics.compute()["depth"]
    assert result["rmse"] == pytest.approx(math.sqrt((0 + 1 + 0.25 + (1 - 1e-9) ** 2) / 4))  # not (1 - -1)^2
    assert result["log_rmse"] == pytest.approx(
        math.sqrt((math.log(2) ** 2 + math.log(1.125) ** 2 + math.log(1e-9) ** 2) / 4), rel=1e-6)
    assert result["abs_rel"] == pytest.approx((0 + 0.5 + 0.125 + (1 - 1e-9)) / 4, rel=1e-6)
    assert result["delta1"] == pytest.approx(50.0)


def test_normals_known_angles():
    d = math.radians
    gt = torch.tensor([[0, 0, 1.0]] * 5 + [[0, 0, 0]])  # the last pixel is invalid
    pred = torch.tensor([[0, 0, 2.0], [3, 0, 0], [1, 0, 1], [0, math.sin(d(20)), math.cos(d(20))],
                         [0, 2 * math.sin(d(60)), 2 * math.cos(d(60))], [1, 0, 0]])  # 0, 90, 45, 20, 60 deg
    metrics = Metrics({"normals": 3})
    metrics.update({"normals": pred.T.reshape(1, 3, 2, 3)}, {"normals": gt.T.reshape(1, 3, 2, 3)})
    result = metrics.compute()["normals"]
    assert result["mean"] == pytest.approx(43.0, abs=1e-4)
    assert result["median"] == pytest.approx(45.0, abs=0.01)  # within the histogram bin
    assert result["rmse"] == pytest.approx(math.sqrt((90 ** 2 + 45 ** 2 + 20 ** 2 + 60 ** 2) / 5), abs=1e-4)
    assert (result["11.25"], result["22.5"], result["30"]) == pytest.approx((20.0, 40.0, 40.0))


def logit(p):
    return math.log(p / (1 - p))


def test_saliency_maxf_and_miou_by_hand():
    metrics = Metrics({"sal": 1})
    # image 1: GT (1, 1, 0, 0); image 2: no salient pixel, nothing predicted above 0.2 (IoU 1)
    probs = torch.tensor([[0.92, 0.32, 0.72, 0.12], [0.12] * 4]).apply_(logit)
    metrics.update({"sal": probs.view(2, 1, 1, 4)}, {"sal": torch.tensor([[1.0, 1, 0, 0], [0] * 4]).view(2, 1, 1, 4)})
    # image 3: GT (1, 0)
    metrics.update({"sal": torch.tensor([logit(0.62), logit(0.22)]).view(1, 1, 1, 2)},
                   {"sal": torch.tensor([1.0, 0]).view(1, 1, 1, 2)})
    result = metrics.compute()["sal"]
    # pooled: positives 0.92 0.32 0.62, negatives 0.72 0.22 0.12 (x5); the best threshold, 0.25 or 0.30,
    # gives tp 3, fp 1, fn 0: P = 3/4, R = 1, F = 1.3 * 0.75 / (0.3 * 0.75 + 1) = 39/49
    assert result["maxF"] == pytest.approx(100 * 39 / 49, rel=1e-6)
    # per-image IoU at 0.25 / 0.30: image 1 {0.92, 0.32, 0.72} vs GT -> 2/3, image 2 -> 1, image 3 -> 1
    assert result["mIoU"] == pytest.approx(100 * (2 / 3 + 1 + 1) / 3, rel=1e-6)
    # maxF_mtcp at 0.25 / 0.30: per-image (P, R) = (2/3, 1), (0, 0) (nothing predicted, nothing salient),
    # (1, 1); means P = 5/9, R = 2/3; F = 2 P R / (P + R) = 20/33 (0.20: 0.491, 0.35: 0.5)
    assert result["maxF_mtcp"] == pytest.approx(100 * 20 / 33, rel=1e-6)


def test_saliency_maxf_mtcp_with_an_empty_prediction():
    # image A: GT (1, 1, 0, 0), probabilities (0.95, 0.52, 0.52, 0.1); image B: GT (1, 0, 0, 0), nothing predicted
    metrics = Metrics({"sal": 1})
    probs = torch.tensor([[0.95, 0.52, 0.52, 0.1], [0.1] * 4]).apply_(logit)
    metrics.update({"sal": probs.view(2, 1, 1, 4)}, {"sal": torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]]).view(2, 1, 1, 4)})
    # thresholds 0.20..0.50: A (P, R) = (2/3, 1), B (0, 0) -> P = 1/3, R = 1/2, F = 2 (1/6) / (5/6) = 0.4;
    # 0.55..0.90: A (1, 1/2), B (0, 0) -> P = 1/2, R = 1/4, F = 1/3
    assert metrics.compute()["sal"]["maxF_mtcp"] == pytest.approx(40.0, rel=1e-6)


def random_batch(seed, batch=4):
    g = torch.Generator().manual_seed(seed)
    preds = {"semseg": torch.randn(batch, 5, 6, 7, generator=g),
             "human_parts": torch.randn(batch, 3, 6, 7, generator=g),
             "depth": torch.rand(batch, 1, 6, 7, generator=g) * 4 - 0.5,  # some negative predictions
             "normals": torch.randn(batch, 3, 6, 7, generator=g),
             "sal": torch.randn(batch, 1, 6, 7, generator=g)}
    targets = {"semseg": torch.randint(0, 5, (batch, 6, 7), generator=g),
               "human_parts": torch.randint(0, 3, (batch, 6, 7), generator=g),
               "depth": torch.rand(batch, 1, 6, 7, generator=g) * 4,
               "normals": F.normalize(torch.randn(batch, 3, 6, 7, generator=g), dim=1),
               "sal": (torch.rand(batch, 1, 6, 7, generator=g) > 0.6).float()}
    targets["semseg"][:, 0] = 255
    targets["human_parts"][1] = 255  # an image without parts
    targets["depth"][:, :, 0] = 0
    targets["normals"][:, :, :, 0] = 0
    return preds, targets


NUM_OUTPUTS = {"semseg": 5, "human_parts": 3, "depth": 1, "normals": 3, "sal": 1}


def metrics_of(preds, targets, shards=(slice(None),)):
    metrics = Metrics(NUM_OUTPUTS)
    for shard in shards:
        metrics.update({t: p[shard] for t, p in preds.items()}, {t: y[shard] for t, y in targets.items()})
    return metrics.compute()


def assert_same_results(a, b):
    assert a.keys() == b.keys()
    for task in a:
        assert a[task] == pytest.approx(b[task], rel=1e-9, abs=1e-12), task


def test_metrics_two_updates_equal_one():
    preds, targets = random_batch(0)
    assert_same_results(metrics_of(preds, targets, [slice(0, 1), slice(1, 4)]), metrics_of(preds, targets))


def test_delta_m_spec_vector():
    stl = {"semseg": {"mIoU": 50.0}, "depth": {"rmse": 0.50}, "normals": {"mean": 20.0}}
    mtl = {"semseg": {"mIoU": 51.0}, "depth": {"rmse": 0.51}, "normals": {"mean": 19.5}}
    assert delta_m(mtl, stl) == pytest.approx(0.8333, abs=1e-4)
    assert HEADLINE["depth"] == ("rmse", -1)


def test_delta_m_scores_saliency_by_miou_as_mtcp():
    stl = {"semseg": {"mIoU": 50.0}, "sal": {"mIoU": 60.0, "maxF": 80.0, "maxF_mtcp": 75.0}}
    mtl = {"semseg": {"mIoU": 50.0}, "sal": {"mIoU": 63.0, "maxF": 70.0, "maxF_mtcp": 70.0}}
    assert delta_m(mtl, stl) == pytest.approx(100 * (0 + 3 / 60) / 2)  # +2.5 %; by maxF it would be -6.25 %


# two gloo ranks

# each rank's epochs of projected losses; their union is LPS_EPOCHS
RANK_EPOCHS = [[LPS_EPOCHS[0][:1], LPS_EPOCHS[1], LPS_EPOCHS[2][:1]],
               [LPS_EPOCHS[0][1:], LPS_EPOCHS[1], LPS_EPOCHS[2][1:]]]


def gloo_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    preds, targets = random_batch(0, batch=5)
    shard = [slice(i, i + 1) for i in range(rank, 5, 2)]  # range(rank, N, world), one image per update
    metrics = metrics_of(preds, targets, shard)
    only_rank0 = metrics_of(preds, targets, [] if rank else [slice(None)])  # rank 1 has an empty shard
    lps = make_balancer("lps", TASKS)
    weights = [run_lps_epoch(lps, epoch) for epoch in RANK_EPOCHS[rank]]
    torch.save({"metrics": metrics, "only_rank0": only_rank0, "weights": weights}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(gloo_worker, args=(str(tmp / "init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_gloo_metrics_equal_single_process(gloo_results):
    preds, targets = random_batch(0, batch=5)
    single = metrics_of(preds, targets)
    for result in gloo_results:
        assert_same_results(result["metrics"], single)
        assert_same_results(result["only_rank0"], single)


def test_gloo_lps_weights_identical_across_ranks(gloo_results):
    assert gloo_results[0]["weights"] == gloo_results[1]["weights"]
    single = make_balancer("lps", TASKS)
    for epoch, weights in zip(LPS_EPOCHS, gloo_results[0]["weights"]):
        assert weights == pytest.approx(run_lps_epoch(single, epoch), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Model

TINY = dict(dim=16)
THREE = {"semseg": 5, "depth": 1, "normals": 3}


@pytest.mark.parametrize("backbone", ["swin_tiny_patch4_window7_224", "test_convnext", "test_resnet"])
@pytest.mark.parametrize("size", [(64, 96), (75, 100)])
def test_model_shapes_for_1_2_3_tasks(backbone, size):
    for n in (1, 2, 3):
        num_outputs = dict(list(THREE.items())[:n])
        model = mtcp.MTCP(num_outputs, backbone=backbone, img_size=size, **TINY).eval()
        with torch.no_grad():
            preds, aux = model(torch.randn(2, 3, *size))
        assert (model.cfm is None) == (n == 1)  # one task: no CFM partner
        for t, c in num_outputs.items():
            assert preds[t].shape == (2, c, *size)
            assert [a.shape for a in aux[t]] == [(2, c, *size)] * 3


def test_decoder_stages_are_layer_normed_and_x_is_signed():
    torch.manual_seed(0)
    decoder = mtcp.TaskDecoder(dim=16, feat_size=(16, 16))
    feats, x = decoder(torch.randn(2, 16, 16, 16).abs() + 1)  # a positive input, as after a ReLU
    for f, width in zip(feats, (16, 32, 64)):
        assert f.shape[1] == width
        assert f.mean(1).abs().max() < 1e-5  # zero mean over channels at every position
        assert (f.var(1, unbiased=False) - 1).abs().max() < 1e-3  # unit variance (LayerNorm's eps aside)
    assert (x < 0).any() and (x > 0).any()  # the FPN ends in a plain conv: X_t is signed
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU)) for m in decoder.fpn.modules())


def test_every_parameter_gets_a_finite_gradient():
    torch.manual_seed(0)
    model = mtcp.MTCP(THREE, backbone="test_convnext", img_size=(64, 64), **TINY)
    preds, aux = model(torch.randn(2, 3, 64, 64))
    targets = {"semseg": torch.randint(0, 5, (2, 64, 64)), "depth": torch.rand(2, 1, 64, 64) + 1,
               "normals": F.normalize(torch.randn(2, 3, 64, 64), dim=1)}
    sum(mtcp.multi_task_losses(preds, aux, targets).values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient (DDP would need find_unused_parameters): {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backbone", ["test_resnet", "swin_tiny_patch4_window7_224"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(backbone):
    def step(checkpointing):
        torch.manual_seed(0)
        model = mtcp.MTCP(THREE, backbone=backbone, img_size=(64, 64), **TINY)  # train mode, CFM and trace-back
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        x = torch.randn(2, 3, 64, 64)
        targets = {"semseg": torch.randint(0, 5, (2, 64, 64)), "depth": torch.rand(2, 1, 64, 64) + 1,
                   "normals": F.normalize(torch.randn(2, 3, 64, 64), dim=1)}
        loss = sum(mtcp.multi_task_losses(*model(x), targets).values())
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return loss, grads, {n: b for n, b in model.named_buffers() if not n.startswith("backbone.body")}
    loss, grads, buffers = step(False)
    loss_ckpt, grads_ckpt, buffers_ckpt = step(True)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ckpt.keys() and all(g is not None for g in grads_ckpt.values())
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-5, msg=name)
    # outside timm's backbone, the recomputation leaves BN running statistics as one forward left them
    for name in buffers:
        torch.testing.assert_close(buffers_ckpt[name], buffers[name], atol=1e-6, rtol=1e-6, msg=name)


def reference_shifted_window_block(block, x, window=7, shift=3):
    """The original Swin's shifted block, written out: zero-pad to a multiple of the window, roll, attend
    within each window (mask: tokens of different regions of the padded map never attend), roll back, crop."""
    B, H, W, C = x.shape
    heads = block.attn.num_heads
    h = F.pad(block.norm1(x), (0, 0, 0, -W % window, 0, -H % window))
    Hp, Wp = h.shape[1:3]

    def region(i, n):  # 0: never wrapped, 1: the last window but the shift, 2: the wrapped strip
        return 0 if i < n - window else 1 if i < n - shift else 2
    label = torch.tensor([[3 * region(i, Hp) + region(j, Wp) for j in range(Wp)] for i in range(Hp)])
    h = torch.roll(h, (-shift, -shift), (1, 2))
    bias = block.attn._get_rel_pos_bias()[0]  # (heads, N, N)
    out = torch.zeros_like(h)
    for b in range(B):
        for i in range(0, Hp, window):
            for j in range(0, Wp, window):
                tokens = h[b, i:i + window, j:j + window].reshape(-1, C)  # (N, C)
                q, k, v = block.attn.qkv(tokens).view(-1, 3, heads, C // heads).permute(1, 2, 0, 3)
                lab = label[i:i + window, j:j + window].reshape(-1)
                logits = q @ k.transpose(-1, -2) * (C // heads) ** -0.5 + bias
                logits = logits + torch.where(lab[:, None] == lab[None, :], 0.0, -100.0)
                o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, C)
                out[b, i:i + window, j:j + window] = block.attn.proj(o).view(window, window, C)
    y = x + torch.roll(out, (shift, shift), (1, 2))[:, :H, :W]
    return y + block.mlp(block.norm2(y))


def test_swin_blocks_pad_before_they_shift():
    from timm.models.swin_transformer import SwinTransformerBlock
    torch.manual_seed(0)
    timm_block = SwinTransformerBlock(dim=32, input_resolution=(10, 12), num_heads=2, window_size=7, shift_size=3,
                                      always_partition=True).double().eval()
    ours = mtcp.pad_before_shift(copy.deepcopy(timm_block))
    x = torch.randn(2, 10, 12, 32, dtype=torch.float64)  # neither side a multiple of 7
    with torch.no_grad():
        reference = reference_shifted_window_block(ours, x)
        torch.testing.assert_close(ours(x), reference, atol=1e-12, rtol=0)
        assert (timm_block(x) - reference).abs().max() > 1e-3  # timm rolls first: tokens wrap across the border
    model = mtcp.MTCP(THREE, backbone="swin_tiny_patch4_window7_224", img_size=(64, 96), **TINY)
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    assert blocks and all(b._attn.__func__ is mtcp._padded_window_attention for b in blocks)  # backbone too
    # the decoders keep 7x7 windows and shift 3 on maps of 7 or less (stages 2 and 3 here: 4x5, 2x3), as released
    decoder = mtcp.TaskDecoder(dim=16, feat_size=(8, 10))
    assert [(b.window_size, b.shift_size) for stage in decoder.stages for b in stage.blocks] == [
        ((7, 7), (0, 0)), ((7, 7), (0, 0)), ((7, 7), (3, 3)), ((7, 7), (0, 0))]
    assert model.cfm["depth"].value[0].spatial[1].momentum == 0.01  # CBAM's spatial gate, as released


def test_the_method_half_runs_alone(tmp_path):
    """The method half of mtcp.py (up to its program banner), executed with `data` not importable."""
    source = Path(mtcp.__file__).read_text()
    method = source[:source.index("# " + "=" * 20)]
    script = tmp_path / "method_only.py"
    script.write_text(method + textwrap.dedent('''
        import sys
        assert sys.modules["data"] is None  # never imported: an import would have failed
        torch.manual_seed(0)
        tasks = {"semseg": 4, "depth": 1, "normals": 3}
        model = MTCP(tasks, backbone="test_resnet", dim=16, img_size=(32, 48))
        preds, aux = model(torch.randn(2, 3, 32, 48))
        targets = {"semseg": torch.randint(0, 4, (2, 32, 48)), "depth": torch.rand(2, 1, 32, 48) + 0.5,
                   "normals": F.normalize(torch.randn(2, 3, 32, 48), dim=1)}
        lps = make_balancer("lps", list(tasks))
        for epoch in range(2):
            total = lps(multi_task_losses(preds, aux, targets))
            lps.end_epoch()
        total.backward()
        metrics = Metrics(tasks)
        metrics.update({t: p.detach() for t, p in preds.items()}, targets)
        results = metrics.compute()
        print(sorted(results), round(delta_m(results, results), 6), sorted(lps.weights))
    '''))
    env = dict(os.environ, PYTHONPATH="")  # data.py is not on the path: `import data` would fail
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules['data'] = None; "
                          f"exec(open({str(script)!r}).read())"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['depth', 'normals', 'semseg'] 0.0 ['depth', 'normals', 'semseg']"


def test_cfm_attention_equals_naive_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(2, 50, 32) * 0.3, torch.randn(2, 50, 32) * 0.3
    v = torch.randn(2, 50, 16)
    reference = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v  # (B, N, Dv), no 1/sqrt(d)
    torch.testing.assert_close(mtcp.global_attention(q, k, v), reference, atol=1e-5, rtol=1e-5)
    cfm = mtcp.CoherenceFusion(dim=16, num_aux=2).eval()
    x, others = torch.randn(2, 16, 6, 7), [torch.randn(2, 16, 6, 7) for _ in range(2)]
    with torch.no_grad():
        fast = cfm(x, others)
        cfm.naive_attention = True
        torch.testing.assert_close(fast, cfm(x, others), atol=1e-5, rtol=1e-5)


def test_ablation_switches_run_and_shrink_the_model():
    full = mtcp.MTCP(THREE, backbone="test_resnet", img_size=(64, 64), **TINY)
    size = sum(p.numel() for p in full.parameters())
    for kwargs in (dict(cfm=False), dict(traceback=False)):
        model = mtcp.MTCP(THREE, backbone="test_resnet", img_size=(64, 64), **TINY, **kwargs).eval()
        assert sum(p.numel() for p in model.parameters()) < size
        with torch.no_grad():
            preds, aux = model(torch.randn(1, 3, 64, 64))
        assert preds["depth"].shape == (1, 1, 64, 64)
        assert all(len(a) == (0 if "traceback" in kwargs else 3) for a in aux.values())


def test_paper_and_odd_input_sizes():
    for size in ((480, 640), (375, 500)):
        model = mtcp.MTCP(THREE, backbone="test_resnet", img_size=size, dim=8).eval()
        with torch.no_grad():
            preds, aux = model(torch.randn(1, 3, *size))
        assert preds["normals"].shape == (1, 3, *size) and aux["semseg"][0].shape == (1, 5, *size)


def test_input_of_another_size_is_a_clear_error():
    model = mtcp.MTCP({"depth": 1}, backbone="test_resnet", img_size=(64, 64), **TINY)
    with pytest.raises(ValueError, match=r"built for inputs of \(64, 64\), got \(64, 80\)"):
        model(torch.randn(1, 3, 64, 80))


def test_backbone_weights_load_strictly(tmp_path):
    import timm
    state = timm.create_model("test_convnext").state_dict()  # a classification checkpoint, as timm's hub has
    torch.save(state, tmp_path / "good.pth")
    model = mtcp.MTCP({"depth": 1}, backbone="test_convnext", weights=str(tmp_path / "good.pth"),
                      img_size=(64, 64), **TINY)
    torch.testing.assert_close(model.backbone.body.stem_0.weight, state["stem.0.weight"])
    state.pop("stages.1.blocks.0.conv_dw.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="bad.pth do not match the model: 1 missing"):
        mtcp.MTCP({"depth": 1}, backbone="test_convnext", weights=str(tmp_path / "bad.pth"), img_size=(64, 64), **TINY)


def test_overfitting_one_batch_halves_the_loss(tmp_path):
    torch.manual_seed(0)
    root = data.make_toy(tmp_path, "nyud", n_train=2, n_val=1, size=(48, 64))
    train_set = data.NYUD(root, "train", size=(48, 64), num_classes=len(data.TOY_CLASSES), train=False)
    batch = data.collate([train_set[0], train_set[1]])
    targets = {t: batch[t] for t in train_set.num_outputs}
    model = mtcp.MTCP(train_set.num_outputs, backbone="test_resnet", img_size=(48, 64), **TINY)
    for head in model.heads["depth"]:  # as train() does: start at the mean depth
        torch.nn.init.constant_(head[-1].bias, targets["depth"][targets["depth"] > 0].mean().item())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    balancer = mtcp.make_balancer("equal", list(train_set.num_outputs))
    losses = []
    for _ in range(30):
        preds, aux = model(batch["image"])
        loss = balancer(mtcp.multi_task_losses(preds, aux, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------------------
# The program: train, resume, eval-only, torchrun, PASCAL, predict, benchmark

SMALL = ["--backbone", "test_resnet", "--dim", "16", "--img-size", "48", "64", "--batch-size", "4", "--workers", "0",
         "--log-every", "1", "--eval-every", "1", "--lr", "2e-3"]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    return str(data.make_toy(tmp_path_factory.mktemp("toy"), "nyud", n_train=8, n_val=4, size=(48, 64)))


def run_main(*argv):
    return mtcp.main([str(a) for a in argv])


def test_train_writes_every_output(toy_root, tmp_path, capsys):
    results = run_main("--data-root", toy_root, "--out-dir", tmp_path, "--epochs", 2, *SMALL)
    out = capsys.readouterr().out
    assert "parameters backbone" in out and "ETA" in out and "final metrics" in out
    assert set(results) == {"semseg", "depth", "normals"}
    for name in ("config.json", "log.jsonl", "metrics.json", "checkpoint.pt"):
        assert (tmp_path / name).is_file(), name
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"losses", "weights", "next_weights", "lr", "img_per_s", "metrics"} <= set(log[0])
    assert log[1]["weights"] == log[0]["next_weights"]  # the LPS weights of epoch 2 come from epoch 1
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == results == log[-1]["metrics"]
    pictures = list((tmp_path / "vis").glob("*.png"))
    assert len(pictures) == 4 and Image.open(pictures[0]).size[0] == 3 * 64 + 12  # image | GT | prediction
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2 and not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])


def test_resume_continues_exactly(toy_root, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run_main("--data-root", toy_root, "--out-dir", straight, "--epochs", 3, "--balancer", "lps", *SMALL)
    save = mtcp.save_checkpoint

    def crash_after_epoch_2(path, state):
        save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt("simulated crash")
    monkeypatch.setattr(mtcp, "save_checkpoint", crash_after_epoch_2)
    crashed = tmp_path / "crashed"
    with pytest.raises(mtcp.Interrupted, match="continues from epoch 3"):
        run_main("--data-root", toy_root, "--out-dir", crashed, "--epochs", 3, "--balancer", "lps", *SMALL)
    monkeypatch.undo()
    saved = torch.load(crashed / "checkpoint.pt", weights_only=True)
    run_main("--resume", "--out-dir", crashed, "--workers", 0)
    log = [json.loads(line) for line in (crashed / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    balancer = mtcp.make_balancer("lps", ["semseg", "depth", "normals"])
    balancer.load_state_dict(saved["balancer"])
    assert log[2]["weights"] == balancer.weights != {t: 1.0 for t in balancer.weights}
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(crashed / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6, msg=key)


def test_eval_only_reproduces_the_last_evaluation(toy_root, tmp_path):
    results = run_main("--data-root", toy_root, "--out-dir", tmp_path, "--epochs", 1, *SMALL)
    again = run_main("--eval-only", tmp_path / "checkpoint.pt", "--workers", 0)
    assert_same_results(again, results)
    assert (tmp_path / "eval" / "metrics.json").is_file()


@pytest.mark.parametrize("balancer", ["equal", "uw", "dwa"])
def test_every_balancer_trains_through_the_command_line(toy_root, tmp_path, balancer):
    """--balancer X with the default LPS flags present (the ablation's runs); LPS is run by the tests above."""
    run_main("--data-root", toy_root, "--out-dir", tmp_path, "--epochs", 1, "--balancer", balancer, *SMALL)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["args"]["balancer"] == balancer and (tmp_path / "metrics.json").is_file()


def test_single_task_runs_are_baselines_for_delta_m(toy_root, tmp_path):
    for task in ("semseg", "depth", "normals"):
        run_main("--data-root", toy_root, "--out-dir", tmp_path / task, "--epochs", 1, "--tasks", task, *SMALL)
    files = [tmp_path / t / "metrics.json" for t in ("semseg", "depth", "normals")]
    with pytest.raises(mtcp.UserError, match="no single-task metrics for"):  # before training, not after
        run_main("--data-root", toy_root, "--out-dir", tmp_path / "mtl", "--epochs", 1, "--baselines", files[0], *SMALL)
    results = run_main("--data-root", toy_root, "--out-dir", tmp_path / "mtl", "--epochs", 1, "--baselines", *files,
                       *SMALL)
    baselines = {t: json.loads(f.read_text())["metrics"][t] for t, f in zip(("semseg", "depth", "normals"), files)}
    written = json.loads((tmp_path / "mtl" / "metrics.json").read_text())["delta_m"]
    assert written == pytest.approx(delta_m(results, baselines)) and math.isfinite(written)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(toy_root, tmp_path, monkeypatch):
    calls = []  # 2 steps per epoch, 4 depth outputs per step: NaN from the first step of epoch 2

    def depth_loss(pred, target):
        calls.append(1)
        return mtcp.depth_loss(pred, target) * (float("nan") if len(calls) > 8 else 1.0)
    monkeypatch.setitem(mtcp.TASK_LOSSES, "depth", depth_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 2/2 step 1.*last good checkpoint"):
        run_main("--data-root", toy_root, "--out-dir", tmp_path, "--epochs", 2, *SMALL)  # epochs as printed
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and not mtcp.non_finite(checkpoint)


def test_missing_dataset_root_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="no nyud dataset at .*nowhere: download .* python data.py check"):
        run_main("--dataset", "nyud", "--data-root", tmp_path / "nowhere", "--no-pretrained", *SMALL)
    with pytest.raises(data.DataError, match="split file not found(.|\n)*python data.py check --dataset nyud"):
        run_main("--dataset", "nyud", "--data-root", tmp_path, "--no-pretrained", *SMALL)  # incomplete


def test_pretrained_weights_missing_from_the_cache_is_a_clear_error():
    with pytest.raises(mtcp.UserError, match="never downloaded at run time"):  # main() forbids downloads
        run_main("--benchmark", "--dataset", "nyud", "--backbone", "test_resnet.r160_in1k", "--pretrained",
                 "--dim", 16, "--img-size", 32, 32, "--batch-size", 1)


def test_pascal_layout_trains_and_evaluates(tmp_path):
    root = data.make_toy(tmp_path / "pascal", "pascal", n_train=8, n_val=4, size=(48, 64))
    results = run_main("--dataset", "pascal", "--data-root", root, "--out-dir", tmp_path / "run", "--epochs", 1,
                       "--no-pretrained", *SMALL)
    assert set(results) == {"semseg", "human_parts", "sal"}
    assert 0 <= results["sal"]["maxF"] <= 100 and 0 <= results["human_parts"]["mIoU"] <= 100


def test_torchrun_two_processes_equal_one_process_eval(toy_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "mtcp.py",
           "--data-root", toy_root, "--out-dir", str(tmp_path), "--epochs", "2", "--eval-batch-size", "1",
           *SMALL[:7], "--batch-size", "2", "--workers", "0", "--log-every", "1", "--eval-every", "1"]
    run = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(mtcp.__file__)), env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "global batch 4 (2 x 2)" in run.stdout and run.stdout.count("final metrics") == 1  # rank 0 prints
    distributed = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    single = subprocess.run([sys.executable, "mtcp.py", "--eval-only", str(tmp_path / "checkpoint.pt"),
                             "--eval-batch-size", "1", "--workers", "0", "--out-dir", str(tmp_path / "single")],
                            cwd=os.path.dirname(os.path.abspath(mtcp.__file__)), env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert_same_results(json.loads((tmp_path / "single" / "metrics.json").read_text())["metrics"], distributed)


def test_predict_on_own_images(toy_root, tmp_path):
    run_main("--data-root", toy_root, "--out-dir", tmp_path / "run", "--epochs", 1, *SMALL)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (333, 500, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (97, 129, 3), dtype=np.uint8)).save(folder / "small.png")
    out = tmp_path / "pred"
    run_main("--predict", folder, "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--out-dir", out)
    for name, (h, w) in (("wide", (333, 500)), ("small", (97, 129))):
        semseg = np.load(out / f"{name}_semseg.npy")
        depth, normals = np.load(out / f"{name}_depth.npy"), np.load(out / f"{name}_normals.npy")
        assert semseg.shape == (h, w) and semseg.dtype == np.int64 and 0 <= semseg.min() <= semseg.max() < 6
        assert depth.shape == (1, h, w) and depth.dtype == np.float32
        assert normals.shape == (3, h, w) and np.allclose(np.linalg.norm(normals, axis=0), 1, atol=1e-4)
        for task in ("semseg", "depth", "normals"):
            assert Image.open(out / f"{name}_{task}.png").size == (w, h)
    (folder / "broken.jpg").write_bytes(b"not a picture")
    with pytest.raises(mtcp.UserError, match="broken.jpg"):
        run_main("--predict", folder, "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--out-dir", tmp_path / "p2")
    assert (tmp_path / "p2" / "wide_depth.npy").is_file()  # the readable images were still written


def test_benchmark_json_has_every_field(tmp_path):
    path = tmp_path / "bench.json"
    run_main("--benchmark", "--benchmark-steps", 1, "--benchmark-warmup", 1, "--benchmark-json", path, *SMALL)
    result = json.loads(path.read_text())
    for key in ("train_img_per_s", "eval_img_per_s", "peak_memory_gib", "params_m", "train_gflops_per_img",
                "eval_gflops_per_img", "achieved_tflops", "mfu", "device", "first_step_s"):
        assert key in result, key
    assert result["train_img_per_s"] > 0 and result["train_gflops_per_img"] > result["eval_gflops_per_img"] > 0
    # The first step's loss depends only on --seed (weights and random data): what --compile is compared by.
    run_main("--benchmark", "--benchmark-steps", 1, "--benchmark-warmup", 0, "--benchmark-json", path, *SMALL)
    assert json.loads(path.read_text())["first_step_loss"] == result["first_step_loss"]


# ---------------------------------------------------------------------------------------------------------
# Summaries of several runs

def write_run(folder, flags, seed, metrics):
    """A finished toy run's config.json (as train() writes it) and metrics.json, with hand-chosen metrics."""
    folder.mkdir(parents=True)
    args = mtcp.fill_defaults(mtcp.get_args(["--dataset", "toy", "--seed", str(seed), "--out-dir", str(folder),
                                             *flags])[0])
    (folder / "config.json").write_text(json.dumps(vars(args)))
    (folder / "metrics.json").write_text(json.dumps(dict(dataset="toy", tasks=list(metrics), metrics=metrics)))
    return str(folder)


def test_summarize_groups_seeds_and_computes_delta_m(tmp_path, capsys):
    def run(name, flags, seed, semseg=None, depth=None, normals=None):
        metrics = {t: {m: v, "other": 1.0} for t, m, v in (("semseg", "mIoU", semseg), ("depth", "rmse", depth),
                                                          ("normals", "mean", normals)) if v is not None}
        return write_run(tmp_path / f"{name}_s{seed}", flags, seed, metrics)

    single = {t: ["--tasks", t] for t in ("semseg", "depth", "normals")}  # the Delta_m baselines
    folders = [run("nocfm", ["--no-cfm"], 0, 49, 0.52, 21), run("semseg", single["semseg"], 0, semseg=49),
               run("full", [], 0, 51, 0.49, 19.6), run("full", [], 1, 53, 0.47, 19.2),
               run("nocfm", ["--no-cfm"], 1, 48, 0.51, 20), run("semseg", single["semseg"], 1, semseg=51),
               run("depth", single["depth"], 0, depth=0.52), run("depth", single["depth"], 1, depth=0.48),
               run("normals", single["normals"], 0, normals=19), run("normals", single["normals"], 1, normals=21),
               run("uw", ["--balancer", "uw"], 0, 50, 0.49, 20)]
    out = mtcp.main(["--summarize", *folders])
    assert capsys.readouterr().out == out + "\n"
    # Baselines (seed-means): semseg 50, depth 0.5, normals 20. Delta_m = (100/3) sum_t s_t (M_t - B_t) / B_t:
    # full s0: (100/3)(1/50 + 0.01/0.5 + 0.4/20) = 2.0; s1: (100/3)(3/50 + 0.03/0.5 + 0.8/20) = 5.3333
    #   -> mean 3.6667, std 3.3333 / sqrt(2) = 2.3570; semseg std sqrt(2) = 1.4142, depth 0.01414, normals 0.2828
    # --no-cfm s0: (100/3)(-1/50 - 0.02/0.5 - 1/20) = -3.6667; s1: (100/3)(-2/50 - 0.01/0.5 + 0) = -2.0
    #   -> mean -2.8333, std 1.6667 / sqrt(2) = 1.1785; metric stds 0.7071, 0.007071, 0.7071
    # --balancer uw, one seed: (100/3)(0 + 0.01/0.5 + 0) = 0.6667, no std
    assert out.startswith(f"Read 11 runs (toy): {folders[0]}, ")
    assert [line for line in out.splitlines() if line.startswith("|")] == [
        "| configuration | semseg mIoU ↑ | depth rmse ↓ | normals mean ↓ | seeds | Delta_m, % |",
        "|---|---|---|---|---|---|",
        "| full | 52.00 ± 1.41 | 0.4800 ± 0.0141 | 19.40 ± 0.28 | 2 | +3.67 ± 2.36 |",
        "| --no-cfm | 48.50 ± 0.71 | 0.5150 ± 0.0071 | 20.50 ± 0.71 | 2 | -2.83 ± 1.18 |",
        "| --balancer uw | 50.00 ± – | 0.4900 ± – | 20.00 ± – | 1 | +0.67 ± – |",
        "| --tasks semseg | 50.00 ± 1.41 |  |  | 2 | – |",
        "| --tasks depth |  | 0.5000 ± 0.0283 |  | 2 | – |",
        "| --tasks normals |  |  | 20.00 ± 1.41 | 2 | – |"]
    assert "no single-task run" not in out
    partial = mtcp.summarize(folders[:4])  # no depth or normals baseline: no Delta_m, and the note says why
    assert "| full | 52.00 ± 1.41 | 0.4800 ± 0.0141 | 19.40 ± 0.28 | 2 | – |" in partial
    assert "no single-task run of depth, normals among these folders" in partial
    write_run(tmp_path / "again", [], 1, {"semseg": {"mIoU": 1.0}})
    with pytest.raises(mtcp.UserError, match="same configuration with the same seed 1"):
        mtcp.summarize([*folders, str(tmp_path / "again")])
    # an ablation run at a shared non-default flag: named without it, and its single-task runs still baselines
    fp32 = [run(f"fp32_{name}", [*flags, "--no-amp"], 0, **values) for name, flags, values in (
        ("full", [], dict(semseg=51, depth=0.49, normals=19.6)), ("semseg", single["semseg"], dict(semseg=50)),
        ("depth", single["depth"], dict(depth=0.5)), ("normals", single["normals"], dict(normals=20)))]
    out = mtcp.summarize(fp32)
    assert out.startswith("Read 4 runs (toy; every run with --no-amp): ")
    assert "| full | 51.00 ± – | 0.4900 ± – | 19.60 ± – | 1 | +2.00 ± – |" in out  # as full s0 above
    assert "| --tasks depth |  | 0.5000 ± – |  | 1 | – |" in out


def test_summarize_reports_a_folder_without_metrics(tmp_path, capsys):
    folder = tmp_path / "interrupted_s0"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(vars(mtcp.fill_defaults(mtcp.get_args([])[0]))))
    assert mtcp.cli(["--summarize", str(folder)]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "metrics.json" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# torchrun launch
# The README's commands as a new user types them: default data roots, one error message for N ranks,
# several "nodes" on one machine through a c10d rendezvous, and a worker restart that resumes the run.

MTCP_PY = os.path.abspath(mtcp.__file__)
LAUNCH = [*SMALL[:7], "--batch-size", "2", "--workers", "0", "--log-every", "1"]  # small model, 2 images per rank


def torchrun(*args, cwd, timeout=300):
    """`torchrun ARGS mtcp.py`-style command (ARGS must include the script) run to completion."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *map(str, args)], cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dataset, folder", [("pascal", "data/PASCAL_MT"), ("nyud", "data/NYUD_MT")])
def test_torchrun_without_data_reports_once(tmp_path, dataset, folder):
    start = time.monotonic()
    run = torchrun("--nproc_per_node=2", MTCP_PY, "--dataset", dataset, cwd=tmp_path, timeout=60)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and time.monotonic() - start < 60
    assert output.count("mtcp: error:") == 1, output
    message = output[output.index("mtcp: error:"):]
    assert folder in message and data.DATASETS[dataset]["download"] in message, message
    assert f"python data.py check --dataset {dataset} {folder}" in message, message
    # torchrun itself ends every failed job with its ChildFailedError summary; no traceback comes from mtcp.
    assert 'mtcp.py", line' not in output and "UserError" not in output, output
    assert not (tmp_path / "runs").exists()  # a run that could not start leaves no output folder


def test_torchrun_trains_pascal_from_the_default_root(tmp_path):
    data.make_toy(tmp_path / "data" / "PASCAL_MT", "pascal", n_train=8, n_val=4, size=(48, 64))
    run = torchrun("--nproc_per_node=2", MTCP_PY, "--dataset", "pascal", "--no-pretrained", "--epochs", 1, *LAUNCH,
                   cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert set(json.loads((tmp_path / "runs" / "pascal" / "metrics.json").read_text())["metrics"]) == {
        "semseg", "human_parts", "sal"}


def test_torchrun_two_nodes_equal_one_process_eval(toy_root, tmp_path):
    node = ["--nnodes", 2, "--nproc_per_node", 1, "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}", "--rdzv-id", "two-nodes", MTCP_PY, "--data-root", toy_root,
            "--out-dir", tmp_path / "run", "--epochs", 1, "--eval-batch-size", 1, *LAUNCH]
    command = [sys.executable, "-m", "torch.distributed.run", *map(str, node)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "global batch 4 (2 x 2)" in "".join(outputs) and list((tmp_path / "run").glob("**/metrics.json")) == [
        tmp_path / "run" / "metrics.json"]
    distributed = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    single = run_main("--eval-only", tmp_path / "run" / "checkpoint.pt", "--eval-batch-size", 1, "--workers", 0,
                      "--out-dir", tmp_path / "single")
    assert_same_results(single, distributed)


def worker_pids(agent_pid):
    """The mtcp.py processes started by a torchrun agent, by rank (psutil-free: /proc children)."""
    children = []
    for task in os.listdir(f"/proc/{agent_pid}/task"):
        with open(f"/proc/{agent_pid}/task/{task}/children") as f:
            children += [int(pid) for pid in f.read().split()]
    ranks = {}
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def test_torchrun_worker_restart_resumes_exactly(tmp_path):
    root = data.make_toy(tmp_path / "toy", "nyud", n_train=32, n_val=4, size=(48, 64))
    run = ["--nproc_per_node", 2, "--max-restarts", 1, MTCP_PY, "--data-root", root, "--epochs", 3,
           "--eval-every", 3, *LAUNCH]
    straight = torchrun(*run, "--out-dir", tmp_path / "straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", *map(str, run), "--out-dir", str(tmp_path / "killed")]
    agent = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and agent.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.poll() is None and checkpoint.exists(), "the run ended before the first checkpoint or the kill"
    victim = worker_pids(agent.pid)[1]  # rank 1, in epoch 2 while rank 0 carries on until its collective fails
    os.kill(victim, signal.SIGKILL)
    output = agent.communicate(timeout=300)[0]
    assert agent.returncode == 0, output[-3000:]
    assert "restart 1: resuming from epoch" in output, output[-3000:]
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(checkpoint, weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


# ---------------------------------------------------------------------------------------------------------
# Failure cases
# Nothing lost, nothing silently wrong: each case ends in one message naming the file or flag, never a traceback,
# and leaves every earlier output as it was.

@pytest.fixture(scope="module")
def trained(toy_root, tmp_path_factory):
    """A finished 1-epoch toy run; tests copy it before writing into it."""
    out = tmp_path_factory.mktemp("trained")
    run_main("--data-root", toy_root, "--out-dir", out, "--epochs", 1, *SMALL)
    return out


def cli_error(capsys, *argv, code=mtcp.USER_ERROR_EXIT):
    """Runs the real entry point, checks its exit code, and returns its one-message stderr."""
    capsys.readouterr()
    assert mtcp.cli([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    assert err.startswith("mtcp: error: ") and "Traceback" not in err, err
    return err


def test_new_run_refuses_a_folder_with_a_checkpoint(toy_root, trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = {f: (out / f).read_bytes() for f in ("checkpoint.pt", "metrics.json", "log.jsonl", "config.json")}
    err = cli_error(capsys, "--data-root", toy_root, "--out-dir", out, "--epochs", 2, *SMALL)
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert before == {f: (out / f).read_bytes() for f in before}  # nothing of the old run touched
    run_main("--data-root", toy_root, "--out-dir", out, "--epochs", 2, "--overwrite", *SMALL)
    assert [r["epoch"] for r in mtcp.read_log(out / "log.jsonl")] == [1, 2]  # a fresh log, not appended


def test_eval_only_never_writes_a_dataset(trained, tmp_path, capsys):
    empty = tmp_path / "some" / "PASCAL_MT"
    empty.mkdir(parents=True)
    err = cli_error(capsys, "--eval-only", trained / "checkpoint.pt", "--data-root", empty)
    assert str(empty) in err and list(empty.iterdir()) == []
    err = cli_error(capsys, "--data-root", tmp_path / "nowhere", "--out-dir", tmp_path / "run", *SMALL)
    assert "NYUD_MT layout" in err  # a toy training run writes the toy only into the default data/toy
    assert not (tmp_path / "nowhere").exists()


def test_checkpoints_never_hold_inf_or_nan(toy_root, tmp_path, monkeypatch, capsys):
    bn = nn.BatchNorm2d(2)
    bn.running_var[1] = float("inf")  # a finite loss can come with infinite BN statistics
    assert mtcp.non_finite({"model": bn.state_dict()}) == ["model.running_var"]
    step, steps = torch.optim.AdamW.step, []

    def poisoned_step(self, *args, **kwargs):  # from epoch 2 one Adam moment is inf; the weights stay finite
        result = step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) > 2:
            self.state[self.param_groups[0]["params"][0]]["exp_avg_sq"].fill_(float("inf"))
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    err = cli_error(capsys, "--data-root", toy_root, "--out-dir", tmp_path, "--epochs", 2, *SMALL)
    assert "non-finite values after epoch 2/2" in err and "optimizer.state.0.exp_avg_sq" in err
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and mtcp.non_finite(checkpoint) == []
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


def test_predict_keeps_same_stem_inputs_apart_and_reads_16_bit(trained, tmp_path, capsys):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 50), dtype=np.uint16)
    for folder, image in (("a", pixels), ("b", 255 - pixels), ("c", pixels)):
        (tmp_path / folder).mkdir()
        Image.fromarray(image.astype(np.uint8)).save(tmp_path / folder / "x.png")
    Image.fromarray(pixels * 257).save(tmp_path / "c" / "deep.png")  # 16-bit grey, the same picture
    assert Image.open(tmp_path / "c" / "deep.png").mode.startswith("I")
    out = tmp_path / "pred"
    run_main("--predict", tmp_path / "a", tmp_path / "b", tmp_path / "c", "--checkpoint", trained / "checkpoint.pt",
             "--out-dir", out)
    assert "x_1_*" in capsys.readouterr().out
    depth = {name: np.load(out / f"{name}_depth.npy") for name in ("x", "x_1", "x_2", "deep")}
    assert not np.array_equal(depth["x"], depth["x_1"])  # a/x.png and b/x.png: two sets of outputs
    np.testing.assert_allclose(depth["deep"], depth["x_2"], atol=1e-5)  # 16 bits scaled to 8, not clipped
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, "--predict", tmp_path / "empty", "--checkpoint", trained / "checkpoint.pt")
    assert "no images" in err and str(tmp_path / "empty") in err


def damaged_copy(toy_root, tmp_path, split):
    """A copy of the toy data with the first `split` sample's semseg png cut short; returns (root, file)."""
    root = tmp_path / "data"
    shutil.copytree(toy_root, root)
    bad = root / "segmentation" / ((root / "gt_sets" / f"{split}.txt").read_text().split()[0] + ".png")
    bad.write_bytes(bad.read_bytes()[:40])
    return root, bad


def test_checkpoint_is_written_before_validation_and_val_files_are_checked_first(toy_root, trained, tmp_path,
                                                                                  monkeypatch, capsys):
    root, bad = damaged_copy(toy_root, tmp_path, "val")
    err = cli_error(capsys, "--data-root", root, "--out-dir", tmp_path / "run", "--epochs", 1, *SMALL)
    assert str(bad) in err and not (tmp_path / "run" / "checkpoint.pt").exists()  # before any training
    out = tmp_path / "crash"

    def crash(*args, **kwargs):
        raise RuntimeError("validation crashed")
    monkeypatch.setattr(mtcp, "evaluate", crash)
    with pytest.raises(RuntimeError, match="validation crashed"):
        run_main("--data-root", toy_root, "--out-dir", out, "--epochs", 2, *SMALL)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the epoch is kept
    monkeypatch.undo()
    run_main("--resume", "--out-dir", out)
    log = mtcp.read_log(out / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2] and all("metrics" in r for r in log)  # epoch 1's redone on resume


@pytest.mark.parametrize("flag, value", [("--epochs", -3), ("--epochs", 0), ("--batch-size", 0), ("--lr", 0),
                                         ("--dim", 0), ("--workers", -1), ("--lr", "nan"), ("--eval-every", 0)])
def test_values_that_cannot_work_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exit:
        run_main(flag, value)
    assert exit.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_flags_a_mode_would_ignore_are_errors(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    err = cli_error(capsys, "--resume", "--out-dir", out, "--epochs", 4)
    assert "--epochs 4 (it has 1)" in err
    assert "--lr" in cli_error(capsys, "--resume", "--out-dir", out, "--lr", 0.1)
    run_main("--resume", "--out-dir", out, "--epochs", 1, "--lr", 2e-3, "--workers", 0)  # the same values: fine
    err = cli_error(capsys, "--eval-only", out / "checkpoint.pt", "--dataset", "nyud", "--tasks", "depth")
    assert "does not use --dataset, --tasks" in err
    with pytest.raises(SystemExit):
        run_main("--resume", "--overwrite", "--out-dir", out)
    assert "pass one of them" in capsys.readouterr().err


def test_a_full_disk_keeps_the_previous_checkpoint(toy_root, tmp_path, monkeypatch, capsys):
    save, saves = torch.save, []

    def full_disk(state, f):  # the second save writes half a file, then the disk is full
        saves.append(f)
        if len(saves) == 1:
            return save(state, f)
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    err = cli_error(capsys, "--data-root", toy_root, "--out-dir", tmp_path, "--epochs", 2, *SMALL)
    assert str(tmp_path / "checkpoint.pt") in err and "previous checkpoint is kept" in err
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()

    def half_then_full(f):  # every other output (log.jsonl, metrics.json, pictures) goes the same way
        f.write(b"{")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(mtcp.UserError, match="cannot write .*metrics.json .*No space left"):
        mtcp.write_atomic(tmp_path / "metrics.json", half_then_full)
    assert sorted(p.name for p in tmp_path.iterdir() if "metrics" in p.name) == []


def test_a_full_tmpfs_keeps_the_previous_checkpoint(toy_root, trained, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    size = (trained / "checkpoint.pt").stat().st_size * 3 // 2 + 64 * 1024  # one checkpoint fits, not two
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        err = cli_error(capsys, "--data-root", toy_root, "--out-dir", disk, "--epochs", 2, *SMALL)
        assert "previous checkpoint is kept" in err
        assert not (disk / "checkpoint.pt.tmp").exists()
        assert torch.load(disk / "checkpoint.pt", weights_only=True)["epoch"] == 1
    finally:
        subprocess.run(["umount", str(disk)])


def test_user_errors_are_one_message(trained, toy_root, tmp_path, capsys):
    assert "nowhere" in cli_error(capsys, "--dataset", "nyud", "--data-root", tmp_path / "nowhere", "--no-pretrained",
                                  "--out-dir", tmp_path / "run", *SMALL)
    root, bad = damaged_copy(toy_root, tmp_path, "train")
    assert str(bad) in cli_error(capsys, "--data-root", root, "--out-dir", tmp_path / "run", *SMALL)
    err = cli_error(capsys, "--data-root", toy_root, "--out-dir", tmp_path / "run", *SMALL, "--backbone", "resnet_18")
    assert "--backbone resnet_18" in err and "resnet18" in err
    text, cut, foreign = tmp_path / "notes.txt", tmp_path / "cut.pt", tmp_path / "foreign.pt"
    text.write_text("hello\n")
    cut.write_bytes((trained / "checkpoint.pt").read_bytes()[:5000])
    torch.save({"weights": torch.zeros(2)}, foreign)
    for path in (text, cut, foreign, tmp_path / "missing.pt"):
        assert str(path) in cli_error(capsys, "--eval-only", path)
    (tmp_path / "bad_run").mkdir()
    shutil.copy(text, tmp_path / "bad_run" / "checkpoint.pt")
    assert "checkpoint.pt" in cli_error(capsys, "--resume", "--out-dir", tmp_path / "bad_run")


def test_ctrl_c_says_how_to_continue_and_resume_leaves_one_record_per_epoch(toy_root, tmp_path, monkeypatch, capsys):
    save = mtcp.save_checkpoint

    def ctrl_c_after_epoch_1(path, state):
        save(path, state)
        raise KeyboardInterrupt
    monkeypatch.setattr(mtcp, "save_checkpoint", ctrl_c_after_epoch_1)
    err = cli_error(capsys, "--data-root", toy_root, "--out-dir", tmp_path, "--epochs", 2, *SMALL, code=130)
    assert err == f"mtcp: error: interrupted; `python mtcp.py --resume --out-dir {tmp_path}` continues from epoch 2\n"
    monkeypatch.undo()
    with open(tmp_path / "log.jsonl", "a") as f:  # what older kills left: a later epoch's record, a cut line
        f.write(json.dumps({"epoch": 2}) + "\n" + '{"epoch": 3, "lo')
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"partial")
    run_main("--resume", "--out-dir", tmp_path)
    assert [r["epoch"] for r in mtcp.read_log(tmp_path / "log.jsonl")] == [1, 2]
    assert not (tmp_path / "checkpoint.pt.tmp").exists()


# ---------------------------------------------------------------------------------------------------------
# Failure cases, part two: data that would train on garbage, unwritable or shared output folders, poisoned
# checkpoints, SIGTERM and SIGKILL, --predict's outputs, a symlink in the output folder, one rank's error.

def nyud_error(capsys, root, tmp_path):
    """The one message of a NYUD training run on `root` that must stop before it writes anything."""
    err = cli_error(capsys, "--dataset", "nyud", "--data-root", root, "--no-pretrained", "--out-dir",
                    tmp_path / "run", *SMALL)
    assert not (tmp_path / "run").exists(), "a run that cannot start leaves no output folder"
    return err


@pytest.mark.parametrize("split", ["val", "train"])
def test_an_empty_split_file_is_refused(toy_root, tmp_path, capsys, split):
    root = make_nyud(tmp_path / "nyud")
    (root / "gt_sets" / f"{split}.txt").write_text("\n")
    assert f"gt_sets/{split}.txt lists no images" in nyud_error(capsys, root, tmp_path)
    toy = tmp_path / "toy"  # the toy went on to a ZeroDivisionError
    shutil.copytree(toy_root, toy)
    (toy / "gt_sets" / f"{split}.txt").write_text("")
    err = cli_error(capsys, "--data-root", toy, "--out-dir", tmp_path / "run", *SMALL)
    assert f"{toy}/gt_sets/{split}.txt lists no images" in err


def test_duplicate_ids_are_refused_by_the_readers_and_the_checker(tmp_path, capsys):
    root = make_nyud(tmp_path / "nyud", ids=("a", "b", "c"))
    (root / "gt_sets" / "val.txt").write_text("a\nb\na\nc\na\n")
    assert "gt_sets/val.txt lists 1 ids more than once (first: ['a'])" in nyud_error(capsys, root, tmp_path)
    assert data.check("nyud", str(root), any_split_size=True)
    assert "NOT usable" in capsys.readouterr().out


@pytest.mark.parametrize("task, convert, message", [
    ("normals", lambda n: np.round((n + 1) * 127.5).astype(np.uint8), "normals stored as uint8"),
    ("depth", lambda d: np.round(d * 1000 + 1091).astype(np.uint16), "millimetres? NYUD depth is in metres"),
    ("depth", lambda d: d * 1000 + 1091, "expected metres in 0..20: millimetres?"),
    ("normals", lambda n: n * 3, "of the normals are neither unit vectors nor zero"),
])
def test_depth_and_normals_in_other_units_are_refused(tmp_path, capsys, task, convert, message):
    root = make_nyud(tmp_path / "nyud")
    path = root / task / "b.npy"
    np.save(path, convert(np.load(path)))
    err = nyud_error(capsys, root, tmp_path)
    assert str(path) in err and message in err, err
    assert data.check("nyud", str(root), any_split_size=True)
    out = capsys.readouterr().out
    assert "NOT usable" in out and message in out


def test_normals_of_the_wrong_shape_say_so(tmp_path, capsys):
    root = make_nyud(tmp_path / "nyud")
    np.save(root / "normals" / "b.npy", np.zeros((6, 8), np.float32))
    assert "normals/b.npy: normals of shape 6x8, expected 6x8x3" in nyud_error(capsys, root, tmp_path)


def test_a_run_stopped_by_its_data_or_its_flags_writes_nothing(toy_root, tmp_path, capsys):
    root, bad = damaged_copy(toy_root, tmp_path, "train")
    assert str(bad) in cli_error(capsys, "--data-root", root, "--out-dir", tmp_path / "run", *SMALL)
    assert not (tmp_path / "run").exists()
    err = cli_error(capsys, "--data-root", toy_root, "--out-dir", tmp_path / "run", *SMALL, "--batch-size", 64)
    assert "fewer than one batch" in err and not (tmp_path / "run").exists()  # config.json was left behind


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photos" / "0000.png"
    path.parent.mkdir()
    write_image(path, (30, 40))
    return path


def test_an_out_dir_that_is_a_file_is_refused_in_every_mode(toy_root, trained, photo, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me\n")
    for argv in (["--data-root", toy_root, *SMALL], ["--eval-only", trained / "checkpoint.pt"],
                 ["--predict", photo, "--checkpoint", trained / "checkpoint.pt"]):
        assert f"--out-dir {file} is a file, not a folder" in cli_error(capsys, *argv, "--out-dir", file)
    assert file.read_text() == "keep me\n"


@pytest.fixture
def read_only(tmp_path):
    """A folder that cannot be written: a read-only tmpfs as root (permissions do not stop root), else mode 555."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    mounted = os.geteuid() == 0
    if mounted and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                  capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    if not mounted:
        folder.chmod(0o555)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)])
    else:
        folder.chmod(0o755)


def test_an_unwritable_out_dir_is_refused_before_any_work(toy_root, trained, photo, read_only, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("the work ran before the output folder was checked")
    monkeypatch.setattr(mtcp, "evaluate", no_work)
    monkeypatch.setattr(mtcp, "predict", no_work)
    err = cli_error(capsys, "--eval-only", trained / "checkpoint.pt", "--out-dir", read_only)
    assert f"--out-dir {read_only} is not writable" in err
    assert f"cannot create {read_only / 'run'}" in cli_error(capsys, "--data-root", toy_root, *SMALL, "--out-dir",
                                                             read_only / "run")
    cli_error(capsys, "--predict", photo, "--checkpoint", trained / "checkpoint.pt", "--out-dir", read_only)


def test_a_checkpoint_is_checked_when_read(trained, photo, tmp_path, capsys):
    checkpoint = torch.load(trained / "checkpoint.pt", weights_only=True)
    del checkpoint["args"]["dim"]  # an older or edited file
    torch.save(checkpoint, tmp_path / "edited.pt")
    err = cli_error(capsys, "--eval-only", tmp_path / "edited.pt")
    assert str(tmp_path / "edited.pt") in err and "args.dim" in err
    poisoned = tmp_path / "poisoned"  # one NaN weight: eval-only, predict and resume all refuse it
    shutil.copytree(trained, poisoned)
    checkpoint = torch.load(trained / "checkpoint.pt", weights_only=True)
    name = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][name].view(-1)[0] = float("nan")
    torch.save(checkpoint, poisoned / "checkpoint.pt")
    for argv in (["--eval-only", poisoned / "checkpoint.pt"], ["--resume", "--out-dir", poisoned],
                 ["--predict", photo, "--checkpoint", poisoned / "checkpoint.pt", "--out-dir", tmp_path / "pred"]):
        err = cli_error(capsys, *argv)
        assert f"{poisoned / 'checkpoint.pt'} holds non-finite values in 1 tensors (model.{name})" in err, err
    assert not (tmp_path / "pred").exists()


def mtcp_process(*argv, cwd):
    return subprocess.Popen([sys.executable, MTCP_PY, *map(str, argv)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None and path.exists(), f"{path} never appeared: {process.communicate()}"


def test_sigterm_is_handled_as_ctrl_c(toy_root, tmp_path):
    run = mtcp_process("--data-root", toy_root, "--out-dir", tmp_path / "run", "--epochs", 200, *SMALL, cwd=tmp_path)
    wait_for(tmp_path / "run" / "log.jsonl", run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 143, err
    assert re.fullmatch(rf"mtcp: error: terminated \(SIGTERM\); `python mtcp.py --resume --out-dir "
                        rf"{tmp_path / 'run'}` continues from epoch \d+\n", err), err
    assert not list((tmp_path / "run").glob("*.tmp"))
    epoch = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"]
    epochs = [r["epoch"] for r in mtcp.read_log(tmp_path / "run" / "log.jsonl")]  # the last one --resume redoes
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) in (epoch - 1, epoch)


def test_sigterm_under_torchrun_says_how_to_continue(toy_root, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", MTCP_PY, "--data-root",
               str(toy_root), "--out-dir", str(tmp_path / "run"), "--epochs", "200", *LAUNCH]
    agent = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "run" / "checkpoint.pt", agent)
    agent.send_signal(signal.SIGTERM)  # what srun passes on to torchrun, which passes it on to every worker
    output = agent.communicate(timeout=120)[0]
    assert agent.returncode != 0
    assert f"mtcp: error: terminated (SIGTERM); `python mtcp.py --resume --out-dir {tmp_path / 'run'}`" in output, output
    assert 'mtcp.py", line' not in output and not list((tmp_path / "run").glob("*.tmp")), output


def test_a_killed_write_leaves_no_partial_file(toy_root, trained, photo, tmp_path):
    """SIGKILL in the middle of --predict's first .npy: no file under its final name, complete or none."""
    script = textwrap.dedent(f'''
        import os, signal, sys
        import numpy as np
        sys.path.insert(0, {os.path.dirname(MTCP_PY)!r})
        import mtcp
        def killed_save(file, value):  # half a file, then SIGKILL
            f = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file
            f.write(b"\\x93NUMPY\\x01\\x00v\\x00{{'descr'")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        np.save = killed_save
        mtcp.main(["--predict", {str(photo)!r}, "--checkpoint", {str(trained / "checkpoint.pt")!r},
                   "--out-dir", {str(tmp_path / "pred")!r}])
    ''')
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert not list((tmp_path / "pred").glob("*.npy")) and not list((tmp_path / "pred").glob("*.png"))


def test_two_runs_cannot_share_an_out_dir(toy_root, tmp_path):
    out = tmp_path / "run"
    first = mtcp_process("--data-root", toy_root, "--out-dir", out, "--epochs", 500, *SMALL, "--eval-every", 500,
                         cwd=tmp_path)
    assert first.stdout.readline().startswith("MTCP ")  # it holds the folder from before it reads the data
    second = subprocess.run([sys.executable, MTCP_PY, "--data-root", toy_root, "--out-dir", out, *SMALL],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"--out-dir {out} is in use by another mtcp run (pid {first.pid})" in second.stderr, second.stderr
    assert first.poll() is None, "the first run ended before the second one tried"
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    assert first.returncode == 143
    epochs = [r["epoch"] for r in mtcp.read_log(out / "log.jsonl")]  # one run's records, none twice
    assert epochs == list(range(1, len(epochs) + 1))


def test_predict_reports_an_unwritable_name_after_writing_the_others(trained, photo, tmp_path, capsys):
    long = photo.parent / ("a" * 245 + ".png")  # sorted first; its outputs' names are too long to create
    shutil.copy(photo, long)
    out = tmp_path / "pred"
    err = cli_error(capsys, "--predict", photo.parent, "--checkpoint", trained / "checkpoint.pt", "--out-dir", out)
    assert str(long) in err and "File name too long" in err, err
    assert np.load(out / "0000_depth.npy").shape == (1, 30, 40)


def test_predict_refuses_a_folder_with_other_predictions(trained, photo, tmp_path, capsys):
    out, other = tmp_path / "pred", photo.parent / "other.png"
    write_image(other, (20, 20))
    run_main("--predict", other, "--checkpoint", trained / "checkpoint.pt", "--out-dir", out)
    err = cli_error(capsys, "--predict", photo, "--checkpoint", trained / "checkpoint.pt", "--out-dir", out)
    assert str(out) in err and "--overwrite" in err and sorted(p.name for p in out.iterdir())[0] == "other_depth.npy"
    run_main("--predict", photo, "--checkpoint", trained / "checkpoint.pt", "--out-dir", out, "--overwrite")
    assert {p.name.split("_")[0] for p in out.iterdir()} == {"0000"}  # one model's predictions, not two


def test_a_symlink_in_the_output_folder_is_replaced_not_followed(trained, photo, tmp_path):
    victim = tmp_path / "victim" / "data.txt"
    victim.parent.mkdir()
    victim.write_text("precious\n")
    out = tmp_path / "pred"
    out.mkdir()
    (out / "0000_depth.npy").symlink_to(victim)
    run_main("--predict", photo, "--checkpoint", trained / "checkpoint.pt", "--out-dir", out, "--overwrite")
    assert victim.read_text() == "precious\n"
    assert not (out / "0000_depth.npy").is_symlink() and np.load(out / "0000_depth.npy").shape == (1, 30, 40)
    link = tmp_path / "metrics.json"  # every writer: the link is replaced by the file
    link.symlink_to(victim)
    mtcp.write_text(link, "{}")
    assert victim.read_text() == "precious\n" and link.read_text() == "{}" and not link.is_symlink()


def test_one_ranks_error_after_start_up_is_one_message_per_rank(toy_root, tmp_path):
    wrapper = tmp_path / "rank1_fails.py"  # rank 1 alone meets a bad training sample, in its second step
    wrapper.write_text(textwrap.dedent(f'''
        import os, sys
        sys.path.insert(0, {os.path.dirname(MTCP_PY)!r})
        import data, mtcp
        getitem, calls = data.NYUD.__getitem__, []
        def bad_on_rank_1(self, i):
            calls.append(i) if self.train else None
            if os.environ["RANK"] == "1" and len(calls) > 2:
                raise data.DataError(f"{{self.root}}/images/{{self.ids[i]}}.jpg: damaged after start-up")
            return getitem(self, i)
        data.NYUD.__getitem__ = bad_on_rank_1
        sys.exit(mtcp.cli())
    '''))
    run = torchrun("--nproc_per_node=2", wrapper, "--data-root", toy_root, "--out-dir", tmp_path / "run",
                   "--epochs", 2, *LAUNCH, cwd=tmp_path)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and 'mtcp.py", line' not in output, output
    errors = [line for line in output.splitlines() if line.startswith("mtcp: error:")]
    assert len(errors) == 2 and "damaged after start-up (rank 1)" in errors[0] + errors[1], output
    assert any("rank 0 stops: another process of this job has stopped" in e or "terminated (SIGTERM)" in e
               for e in errors), output
    assert "exitcode: 2" in output, output


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(trained, tmp_path, monkeypatch, capsys):
    def no_flock(fd, operation):  # what some Lustre and NFS mounts answer
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(mtcp.fcntl, "flock", no_flock)
    run_main("--eval-only", trained / "checkpoint.pt", "--out-dir", tmp_path / "eval")
    assert f"warning: cannot lock {tmp_path / 'eval'} (No locks available)" in capsys.readouterr().out
    assert (tmp_path / "eval" / "metrics.json").is_file()
