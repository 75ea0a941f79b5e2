"""mtcp data: NYUD-v2 and PASCAL-Context multi-task readers, augmentations, a procedural toy in the same
layouts, the dataset table and builder for mtcp.py, pictures of task maps, and a checker for downloaded archives:
python data.py check --dataset nyud|pascal ROOT [--any-split-size (for the toy)]."""
import argparse
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.io
import scipy.ndimage
import torch
import torch.distributed
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_SIZES = {"nyud": {"train": 795, "val": 654}, "pascal": {"train": 4998, "val": 5105}}
# PASCAL-Part person part names -> 6 parts; other names are not painted (0 = background).
PART_ID = {**dict.fromkeys(("head", "hair", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "nose", "mouth"), 1),
           **dict.fromkeys(("torso", "neck"), 2), **dict.fromkeys(("luarm", "ruarm"), 3),
           **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4), **dict.fromkeys(("luleg", "ruleg"), 5),
           **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6)}
PERSON = 15  # VOC class index of 'person' in PASCAL-Part structs and VOC12 labels
ZOOMS = (1.0, 1.2, 1.5)  # NYUD random centred zoom factors
TOY_CLASSES = ("wall", "floor", "ceiling", "box", "sphere", "cylinder")  # toy NYUD semseg, png values 1..6
TOY_FOCAL = 0.8  # toy intrinsics: fx = fy = TOY_FOCAL * W pixels, principal point at the image centre
TOY_VOC = {"box": (9, "chair"), "sphere": (16, "pottedplant"), "cylinder": (5, "bottle")}  # PASCAL toy


class DataError(RuntimeError):
    """A dataset folder or file that cannot be used; the message names the file or the expected layout."""


# ----------------------------------------------------------------------------------------------------------
# Datasets: decoding, augmentation

def _read(path, mode=None):
    """Decode a .npy or image file fully into a numpy array (PIL `mode` converts, None keeps palette indices)."""
    try:
        if path.endswith(".npy"):
            return np.load(path)
        with Image.open(path) as im:
            if im.mode.startswith("I") and mode in ("L", "RGB"):  # 16-bit grey ("I;16", "I"): scaled, not clipped
                grey = np.clip(np.array(im, np.float64) * (255 / 65535), 0, 255).round().astype(np.uint8)
                return np.repeat(grey[..., None], 3, -1) if mode == "RGB" else grey
            return np.array(im if mode is None or im.mode == mode else im.convert(mode))
    except Exception as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _human_parts(path, hw):
    """Paint PASCAL-Part person parts, objects then parts in file order, later wins: (H, W) uint8 in 0..6,
    or all 255 when no part pixel gets painted (no supervision)."""
    try:
        objects = scipy.io.loadmat(path)["anno"][0][0][1]
        parts = [(str(p[0][0]), p[1].astype(bool)) for o in (objects[0] if objects.size else ())
                 if int(np.squeeze(o[1])) == PERSON and o[3].size for p in o[3][0]]
    except Exception as e:
        raise DataError(f"cannot read {path} as a PASCAL-Part struct: {e}") from e
    target, painted = np.zeros(hw, np.uint8), False
    for name, mask in parts:
        if mask.shape != hw:
            raise DataError(f"{path}: label size {mask.shape[0]}x{mask.shape[1]} does not match image size "
                            f"{hw[0]}x{hw[1]}")
        if name in PART_ID and mask.any():
            target[mask], painted = PART_ID[name], True
    return target if painted else np.full(hw, 255, np.uint8)


def augment(img, targets, size, flip=False, angle=0.0, scale=1.0):
    """Flip, rotate by `angle` degrees, scale about the centre and resize to `size` (H, W) with one PIL affine per
    plane (image bicubic, labels nearest; borders 0); normals' (x, y) turn too (x = columns, as the released code).
    img (H, W, 3) uint8 and targets {task: array at the image's size} -> the same at `size`."""
    (h, w), (H, W) = img.shape[:2], size
    c, a = np.array([w / 2, h / 2]), np.deg2rad(angle)  # c: centre in PIL's continuous pixel coordinates
    # output point q' -> input point p = c + Flip R(-angle) (D q' - c) / scale, D = resize to (h, w)
    M = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) / scale
    M[0] *= -1 if flip else 1
    A, b = M * [w / W, h / H], c - M @ c
    coeffs = (A[0, 0], A[0, 1], b[0], A[1, 0], A[1, 1], b[1])

    def warp(plane, resample, fill):
        im = Image.fromarray(np.ascontiguousarray(plane))
        return np.array(im.transform((W, H), Image.Transform.AFFINE, coeffs, resample, fillcolor=fill))
    # NOTE(repro): PIL's affine bicubic (a = -1; its resize() would use a = -0.5) where the released code uses
    # OpenCV's (a = -0.75); the rotation's border is black in both.
    img = warp(img, Image.Resampling.BICUBIC, (0, 0, 0))
    out = {}
    for task, arr in targets.items():
        if task == "human_parts" and (arr == 255).all():  # no supervision stays no supervision
            out[task] = np.full((H, W), 255, np.uint8)
            continue
        if task == "normals" and (flip or angle):
            # v in the input appears as scale * M^-1 v in the output; without the scale normals stay unit
            rot = np.linalg.inv(M) / scale  # (2, 2) on (x, y)
            arr = np.concatenate([arr[..., :2] @ rot.T.astype(np.float32), arr[..., 2:]], -1)
        planes = [warp(p, Image.Resampling.NEAREST, 0) for p in np.moveaxis(np.atleast_3d(arr), -1, 0)]
        out[task] = np.stack(planes, -1) if arr.ndim == 3 else planes[0]
        if task == "depth":  # zooming in by s brings the scene s times closer
            out[task] /= np.float32(scale)
    return img, out


def normalize(img, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, normalised with `mean` / `std` (ImageNet, in 0..1 units)."""
    image = torch.from_numpy(img).permute(2, 0, 1).float()  # (3, H, W) in 0..255
    return image.sub_(torch.tensor(mean).view(3, 1, 1) * 255).div_(torch.tensor(std).view(3, 1, 1) * 255)


def read_image(path):
    """An image file as (H, W, 3) uint8 RGB; a DataError naming the file if it cannot be decoded."""
    return _read(str(path), "RGB")


def to_input(img, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(H, W, 3) uint8 RGB -> (3, H, W) as a model sees it in evaluation, resized as the datasets do (--predict)."""
    return normalize(augment(img, {}, size)[0], mean, std)


MAX_DEPTH = 20.0  # m: NYUD depth is in metres, indoors; larger values are another unit (millimetres)


def check_values(task, arr, path, stored):
    """The value checks of depth and normals .npy files, shared by the readers and `data.py check`: stored as
    floats; depth in metres, 0 (invalid) or in (0, MAX_DEPTH]; normals unit vectors or zero (invalid; |n| <= 0.01),
    at most 1 % of them off by more than 0.1 in length. `arr`: the decoded array, `stored`: the file's dtype."""
    mm = ": millimetres? NYUD depth is in metres" if task == "depth" and arr.max(initial=0) > 100 else ""
    if not np.issubdtype(stored, np.floating):
        raise DataError(f"{path}: {task} stored as {stored} (values {arr.min():g}..{arr.max():g}); expected float "
                        + ("metres" if task == "depth" else "unit vectors") + mm)
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: {task} has non-finite values")
    if task == "depth" and (arr.min() < 0 or arr.max() > MAX_DEPTH):
        raise DataError(f"{path}: depth values {arr.min():.4g}..{arr.max():.4g}, expected metres in 0..{MAX_DEPTH:g}" + mm)
    if task == "normals":
        norm = np.linalg.norm(arr.reshape(-1, 3), axis=1)
        bad = norm[(norm > 0.01) & (np.abs(norm - 1) > 0.1)]
        if bad.size > 0.01 * norm.size:
            raise DataError(f"{path}: {bad.size / norm.size:.1%} of the normals are neither unit vectors nor zero "
                            f"(lengths {bad.min():.3g}..{bad.max():.3g})")


class _MultiTask(torch.utils.data.Dataset):
    """Shared by NYUD and PASCALContext: split file, decoding, augmentation, tensors. Each training sample seeds
    a numpy Generator from torch's RNG (per worker and epoch in a DataLoader; torch.manual_seed reproduces a run).
    Override `draw` (tests do) to force augmentation parameters."""
    files = {}  # 'image' or task -> candidate paths relative to root, first existing one is used
    channels = {}  # task -> output channels
    split_path = layout = ""

    def __init__(self, root, split, tasks, train, size):
        self.root, self.split, self.tasks, self.size = str(root), split, tuple(tasks), tuple(size)
        self.train = split == "train" if train is None else bool(train)
        if set(self.tasks) - set(self.channels):
            raise ValueError(f"unknown tasks {set(self.tasks) - set(self.channels)}; known: {list(self.channels)}")
        split_file = os.path.join(self.root, self.split_path.format(split))
        if not os.path.isfile(split_file):
            what, path = ("split file", split_file) if os.path.isdir(self.root) else ("dataset root", self.root)
            raise DataError(f"{what} not found: {path}. Expected the {self.layout}")
        self.ids = Path(split_file).read_text().split()
        twice = [i for i, n in Counter(self.ids).items() if n > 1]
        if not self.ids or twice:  # an image listed twice would be trained on and scored twice
            raise DataError(f"{split_file} lists " + (f"{len(twice)} ids more than once (first: {twice[:3]})"
                                                      if twice else "no images"))
        self.num_outputs = {t: self.channels[t] for t in self.tasks}

    def __len__(self):
        return len(self.ids)

    def find(self, key, id):
        """Path of the file for `key` ('image' or a task) and sample `id`; the first candidate that exists."""
        paths = [os.path.join(self.root, p.format(id)) for p in self.files[key]]
        for path in paths:
            if os.path.isfile(path):
                return path
        raise DataError(f'missing file {" or ".join(paths)} (id {id!r} of {self.split_path.format(self.split)})')

    def decode(self, task, path, hw):
        """One target as numpy at the image's (H, W): semseg/parts uint8, depth float32 metres, normals
        (H, W, 3) float32 as stored (renormalised later), sal uint8 grey (thresholded later)."""
        if task == "human_parts":
            return _human_parts(path, hw)
        arr = _read(path, {"normals": "RGB", "sal": "L"}.get(task))
        raw = arr
        if task == "normals":  # png stores v = (n + 1) * 255 / 2
            arr = arr * np.float32(2 / 255) - 1 if path.endswith(".png") else arr.astype(np.float32)
        elif task == "depth":
            arr = np.squeeze(arr).astype(np.float32)
        size = "x".join(map(str, arr.shape))
        if task == "normals" and (arr.ndim != 3 or arr.shape[2] != 3):
            raise DataError(f"{path}: normals of shape {size}, expected {hw[0]}x{hw[1]}x3 (a 3-vector per pixel)")
        if arr.shape != ((*hw, 3) if task == "normals" else hw):
            raise DataError(f"{path}: label size {size} does not match image size {hw[0]}x{hw[1]}")
        if task in ("depth", "normals") and path.endswith(".npy"):  # 8-bit .png normals are unit by encoding
            check_values(task, arr, path, raw.dtype)
        return self.semseg(arr, path) if task == "semseg" else arr

    def load(self, i):
        """Sample i decoded, before augmentation: image (H, W, 3) uint8 and {task: array at (H, W)}."""
        img = _read(self.find("image", self.ids[i]), "RGB")
        return img, {t: self.decode(t, self.find(t, self.ids[i]), img.shape[:2]) for t in self.tasks}

    def __getitem__(self, i):
        img, targets = self.load(i)
        meta = {"id": self.ids[i], "size": img.shape[:2]}
        if self.train:
            rng = np.random.default_rng(int(torch.randint(2 ** 62, ())))
            img, targets = augment(img, targets, self.size, **self.draw(rng))
            sample = {"image": normalize(img)}
        else:  # eval: the image resized as in training, targets stay at the original resolution
            sample = {"image": to_input(img, self.size)}
        for task, arr in targets.items():
            if task in ("semseg", "human_parts"):
                sample[task] = torch.from_numpy(arr.astype(np.int64))  # (H, W), 255 = ignore
            elif task == "sal":  # v / 255 > 0.5
                sample[task] = torch.from_numpy((arr > 127.5).astype(np.float32))[None]
            elif task == "normals":  # unit vectors again after resizing; zero vectors (invalid) stay zero
                norm = np.sqrt(np.einsum("hwc,hwc->hw", arr, arr))
                scale = np.divide(1, norm, out=np.zeros_like(norm), where=norm > 1e-6)
                sample[task] = torch.from_numpy((arr * scale[..., None]).transpose(2, 0, 1).copy())  # (3, H, W)
            else:
                sample[task] = torch.from_numpy(np.ascontiguousarray(arr, np.float32))[None]  # (1, H, W)
        sample["meta"] = meta
        return sample


class NYUD(_MultiTask):
    """NYUD-v2 in the NYUD_MT layout (also the InvPT/ATRC .png variant and the toy, num_classes=len(TOY_CLASSES)).
    train (default split == 'train'): flip, centred zoom ZOOMS; size (H, W) of the image, and of targets in train.
    Samples: image (3, H, W) float32 ImageNet-normalised, semseg (H, W) int64 (255 ignore), depth (1, H, W) float32
    metres (0 invalid), normals (3, H, W) float32 unit (0 invalid), meta {id, size}."""
    files = {"image": ("images/{}.jpg", "images/{}.png"), "semseg": ("segmentation/{}.png",),
             "depth": ("depth/{}.npy",), "normals": ("normals/{}.npy", "normals/{}.png")}
    split_path = "gt_sets/{}.txt"
    layout = ("NYUD_MT layout: ROOT/gt_sets/{train,val}.txt, images/<id>.jpg (.png in the InvPT/ATRC variant), "
              "segmentation/<id>.png, depth/<id>.npy, normals/<id>.npy (or .png). Download NYUD_MT from Google "
              "Drive id 14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw (Vandenhende's Multi-Task-Learning-PyTorch), or "
              "write a toy with data.make_toy(ROOT, 'nyud')")

    def __init__(self, root, split="train", tasks=("semseg", "depth", "normals"), train=None, size=(480, 640),
                 num_classes=40):
        self.num_classes, self.channels = num_classes, {"semseg": num_classes, "depth": 1, "normals": 3}
        super().__init__(root, split, tasks, train, size)

    def semseg(self, label, path):
        if label.max(initial=0) > self.num_classes:
            raise DataError(f"{path}: semseg value {label.max()} out of range 0..{self.num_classes}")
        return np.where(label == 0, 255, label - 1).astype(np.uint8)  # 0 = unlabelled -> 255 (ignore), k -> k - 1

    def draw(self, rng):
        return dict(flip=rng.random() < 0.5, angle=0.0, scale=float(rng.choice(ZOOMS)))


class PASCALContext(_MultiTask):
    """PASCAL-Context in the PASCAL_MT layout, as NYUD: semseg (21 classes), human_parts (7, all 255 without a
    person part), sal (1, float {0, 1}), normals (normals_distill png). Train: flip, rotation U(-20, 20) deg,
    scale U(0.75, 1.25)."""
    files = {"image": ("JPEGImages/{}.jpg",), "semseg": ("semseg/VOC12/{}.png", "semseg/pascal-context/{}.png"),
             "human_parts": ("human_parts/{}.mat",), "sal": ("sal_distill/{}.png",),
             "normals": ("normals_distill/{}.png",)}
    channels = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3}
    split_path = "ImageSets/Context/{}.txt"
    layout = ("PASCAL_MT layout: ROOT/ImageSets/Context/{train,val}.txt, JPEGImages/<id>.jpg, "
              "semseg/VOC12/<id>.png or semseg/pascal-context/<id>.png, human_parts/<id>.mat, "
              "sal_distill/<id>.png. Download https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz, "
              "or write a toy with data.make_toy(ROOT, 'pascal')")

    def __init__(self, root, split="train", tasks=("semseg", "human_parts", "sal"), train=None, size=(512, 512)):
        super().__init__(root, split, tasks, train, size)

    def semseg(self, label, path):
        bad = (label > 20) & (label != 255)
        if bad.any():
            raise DataError(f"{path}: semseg values {np.unique(label[bad])} out of range 0..20 or 255")
        return label.astype(np.uint8)

    def draw(self, rng):
        return dict(flip=rng.random() < 0.5, angle=rng.uniform(-20, 20), scale=rng.uniform(0.75, 1.25))


DATASETS = {  # reader, task -> output channels, default folder (relative to the working directory), archive
    "nyud": dict(reader=NYUD, tasks={"semseg": 40, "depth": 1, "normals": 3}, root="data/NYUD_MT",
                 download="https://drive.google.com/file/d/14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw"),
    "pascal": dict(reader=PASCALContext, tasks={"semseg": 21, "human_parts": 7, "sal": 1}, root="data/PASCAL_MT",
                   download="https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz"),
    "toy": dict(reader=NYUD, tasks={"semseg": len(TOY_CLASSES), "depth": 1, "normals": 3}, root="data/toy",
                download=None, toy=dict(n_train=320, n_val=80, size=(120, 160))),
}


def verify(ds, workers=8):
    """Decode every sample of dataset `ds` once (threads: PIL, np.load and zlib release the GIL); a DataError
    naming the unreadable files, so a damaged file stops a program before its work rather than midway."""
    def problem(i):
        try:
            ds.load(i)
        except DataError as e:
            return str(e)
    with ThreadPoolExecutor(workers) as pool:
        problems = [p for p in pool.map(problem, range(len(ds))) if p]
    if problems:
        raise DataError(f"{len(problems)} of {len(ds)} {ds.split} samples in {ds.root} cannot be read, the first "
                        f"{min(len(problems), 5)}:\n  " + "\n  ".join(problems[:5]))


def build_datasets(dataset: str, root: str, *, tasks, size, training: bool = True, master: bool = True):
    """(train, val) datasets of DATASETS[dataset] at `root`. Every val file, and when training every train file,
    is decoded here, so a damaged file stops the program before training; only a toy training run into the
    default data/toy writes the toy (on first use). A missing real dataset: a DataError naming the download."""
    if (dataset == "toy" and training and master and Path(root) == Path(DATASETS["toy"]["root"])
            and not (Path(root) / "gt_sets" / "val.txt").exists()):
        print(f"writing the toy dataset to {root} ...", flush=True)
        make_toy(root, layout="nyud", **DATASETS["toy"]["toy"])
    if dataset == "toy" and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # the other ranks wait for rank 0's toy data
    try:
        reader = DATASETS[dataset]["reader"]
        extra = {} if dataset == "pascal" else dict(num_classes=DATASETS[dataset]["tasks"]["semseg"])
        sets = [reader(root, split, tasks=tuple(tasks), size=tuple(size), **extra) for split in ("train", "val")]
        verify(sets[1])
        if training:
            verify(sets[0])
        return tuple(sets)
    except DataError as e:  # every rank gets here before any collective: each raises
        if dataset == "toy":
            raise
        check = f"python data.py check --dataset {dataset} {root}"
        if os.path.isdir(root):  # incomplete: e names the missing file, the layout and the download
            raise DataError(f"{e}\nCheck the folder with: {check}") from None
        raise DataError(f"no {dataset} dataset at {root}: download {DATASETS[dataset]['download']}, unpack it as "
                        f"{root} (or pass --data-root) and check it with: {check}") from None


def label_means(ds) -> dict:
    """The best constant prediction per task over a split's labels (decoded, not augmented), as the raw
    output (C,) a model's head would emit: one-hot logits of the most frequent class, the mean depth in
    metres, the unit mean normal, the mean saliency as a logit."""
    counts, sums = {}, {}
    for i in range(len(ds)):
        _, targets = ds.load(i)
        for t, arr in targets.items():
            if t in ("semseg", "human_parts"):
                counts[t] = counts.get(t, 0) + np.bincount(arr[arr != 255].ravel(), minlength=ds.num_outputs[t])
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


def collate(batch):
    """DataLoader collate: `image` stacked (B, 3, H, W); each target stacked (B, ...) when all samples share
    its shape, else a list of per-sample tensors (eval mode keeps original label sizes); `meta` a list."""
    out = {}
    for key in batch[0]:
        values = [sample[key] for sample in batch]
        same = key != "meta" and all(v.shape == values[0].shape for v in values)
        out[key] = torch.stack(values) if same else values
    return out


# ----------------------------------------------------------------------------------------------------------
# Toy dataset: ray-cast rooms written in the NYUD_MT / PASCAL_MT layouts

@np.errstate(divide="ignore", invalid="ignore")  # rays parallel to a plane meet it at infinity
def _render_room(rng, h, w, n_objects):
    """Ray-cast a room with boxes, spheres and upright cylinders on the floor, one point light. World y up, floor
    y = 0; camera x right, y down, z forward (TOY_FOCAL). Returns rgb (h, w, 3) in [0, 1], class (h, w) index into
    TOY_CLASSES, instance (h, w) (-1 = room), depth (h, w) camera z metres, normals (h, w, 3) unit, camera frame."""
    rw, rd, rh = rng.uniform(4, 7), rng.uniform(5, 9), rng.uniform(2.4, 3.0)  # room width x, depth z, height
    o = np.array([rng.uniform(-1, 1), rng.uniform(1.2, 1.6), -rd / 2 + rng.uniform(0.3, 1.0)])  # camera (m)
    yaw, pitch = rng.uniform(-0.5, 0.5), rng.uniform(-0.35, -0.05)  # radians, pitch < 0 looks down
    fwd = np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    right = np.array([np.cos(yaw), 0, -np.sin(yaw)])
    R = np.stack([right, np.cross(right, fwd), fwd], 1)  # camera -> world; columns x right, y down, z fwd
    v, u = np.mgrid[:h, :w] + 0.5  # pixel centres
    f = TOY_FOCAL * w
    d = np.stack([(u - w / 2) / f, (v - h / 2) / f, np.ones_like(u)], -1) @ R.T  # (h, w, 3), camera z = 1,
    d = np.where(np.abs(d) < 1e-9, 1e-9, d)  # so the hit distance t along d is the depth
    at = lambda t: o + np.where(np.isfinite(t), t, 0)[..., None] * d  # hit points (h, w, 3)

    def sphere(dd, oc, r):  # nearest t > 0 with |oc + t dd| = r, inf on a miss
        b, a2 = dd @ oc, (dd * dd).sum(-1)
        disc = b * b - a2 * (oc @ oc - r * r)
        t = (-b - np.sqrt(np.maximum(disc, 0))) / a2
        return np.where((disc > 0) & (t > 0), t, np.inf)
    # the room is the inside of a box: the nearest of the three walls ahead is hit
    tt = np.where(d > 0, [rw / 2, rh, rd / 2] - o, [-rw / 2, 0, -rd / 2] - o) / d
    axis, t = tt.argmin(-1), tt.min(-1)
    n = -np.sign(d) * np.eye(3)[axis]  # inward normals
    cls = np.where(axis != 1, 0, np.where(d[..., 1] < 0, 1, 2))  # wall, floor, ceiling
    p = at(t)
    tiles = (np.floor(p[..., 0] / 0.5) + np.floor(p[..., 2] / 0.5)) % 2  # 0.5 m floor tiles: a scale cue
    stripes = (p[..., 0] + p[..., 2]) / 0.3 % 1 < 0.5 if rng.random() < 0.5 else np.zeros_like(t)
    wall = rng.uniform(0.4, 0.9, 3) * (1 - 0.15 * stripes[..., None]) * np.where(p[..., 1:2] < 0.1, 0.5, 1)
    floor = rng.uniform(0.2, 0.7, 3) * (0.7 + 0.3 * tiles[..., None])
    albedo = np.choose(cls[..., None], [wall, floor, rng.uniform(0.8, 1.0, 3) + 0 * wall])
    inst = np.full((h, w), -1)
    for k in range(n_objects):
        kind, col = rng.integers(3), rng.uniform(0.1, 0.95, 3)
        dist, side = rng.uniform(1.5, 5), rng.uniform(-0.6, 0.6)  # in front of the camera, inside the room
        c = np.array([np.clip(o[0] + dist * np.sin(yaw + side), -rw / 2 + .6, rw / 2 - .6), 0,
                      np.clip(o[2] + dist * np.cos(yaw + side), -rd / 2 + .6, rd / 2 - .6)])
        if kind == 0:  # box at a random yaw: slab test in its own frame; darker edges
            s, a = rng.uniform(0.15, 0.5, 3), rng.uniform(0, np.pi)
            c[1] = s[1]
            Ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
            ol, dl = (o - c) @ Ry, d @ Ry  # world -> box frame
            t1, t2 = (-s - ol) / dl, (s - ol) / dl
            tn, tf = np.minimum(t1, t2).max(-1), np.maximum(t1, t2).min(-1)
            tk = np.where((tn < tf) & (tn > 0), tn, np.inf)
            nk = (-np.sign(dl) * np.eye(3)[np.minimum(t1, t2).argmax(-1)]) @ Ry.T  # box frame -> world
            edge = (np.abs(np.abs((at(tk) - c) @ Ry) - s) < 0.03).sum(-1) >= 2
            ak = col * np.where(edge, 0.4, 1)[..., None]
        elif kind == 1:  # sphere resting on the floor; latitude bands
            r = rng.uniform(0.15, 0.45)
            c[1] = r
            tk = sphere(d, o - c, r)
            nk, ak = (at(tk) - c) / r, col * (0.8 + 0.2 * np.cos(at(tk)[..., 1:2] * 40))
        else:  # upright cylinder: side (a circle in x, z) or top cap; horizontal rings
            r, top, xz = rng.uniform(0.12, 0.35), rng.uniform(0.3, 1.1), np.array([1, 0, 1])
            ts = sphere(d * xz, (o - c) * xz, r)
            ts = np.where((at(ts)[..., 1] >= 0) & (at(ts)[..., 1] <= top), ts, np.inf)
            tc = (top - o[1]) / d[..., 1]
            tc = np.where((tc > 0) & ((((at(tc) - c) * xz) ** 2).sum(-1) <= r * r), tc, np.inf)
            tk = np.minimum(ts, tc)
            nk = np.where((tc < ts)[..., None], [0, 1, 0], (at(tk) - c) * xz / r)
            ak = col * (0.75 + 0.25 * (at(tk)[..., 1:2] * 10 % 1 < 0.5))
        near = tk < t  # z-buffer
        t, n, albedo = np.where(near, tk, t), np.where(near[..., None], nk, n), np.where(near[..., None], ak, albedo)
        cls, inst = np.where(near, 3 + kind, cls), np.where(near, k, inst)
    # Lambertian shading from a point light under the ceiling, plus ambient
    light = np.array([rng.uniform(-rw / 3, rw / 3), rh - 0.2, rng.uniform(-rd / 4, rd / 3)]) - at(t)
    light /= np.linalg.norm(light, axis=-1, keepdims=True)
    rgb = albedo * (0.35 + 0.65 * np.clip((n * light).sum(-1, keepdims=True), 0, 1))
    return rgb, cls, inst, t.astype(np.float32), (n @ R).astype(np.float32)


def _figure(rng, h, w):
    """A 2-D articulated person facing the camera: [(PASCAL-Part name, mask, colour)] in paint order."""
    s, x0, y0 = rng.uniform(0.45, 0.8) * h, rng.uniform(0.15, 0.85) * w, rng.uniform(0.8, 1.0) * h
    skin, shirt, legs = rng.uniform(0.5, 1, 3) * [1, .8, .65], rng.uniform(0, 1, 3), rng.uniform(0, .6, 3)
    v, u = np.mgrid[:h, :w] + 0.5

    def capsule(a, b, r):  # pixels within r of the segment a-b (pixels)
        ab, q = b - a, np.stack([u - a[0], v - a[1]], -1)
        k = np.clip(q @ ab / max(ab @ ab, 1e-9), 0, 1)[..., None]
        return np.linalg.norm(q - k * ab, axis=-1) <= r

    def limb(start, side, lengths):  # two segments and an end, hanging down at random angles (y down)
        a1 = side * rng.uniform(0, 1.2)
        a2 = a1 + side * rng.uniform(-0.3, 1.0)
        mid = start + lengths[0] * s * np.array([np.sin(a1), np.cos(a1)])
        return mid, mid + lengths[1] * s * np.array([np.sin(a2), np.cos(a2)])
    P = lambda dx, dy: np.array([x0 + dx * s, y0 - dy * s])  # body coordinates (units of height, y up)
    hip, neck, head = P(0, 0.5), P(0, 0.8), P(0, 0.89)
    parts = [("torso", capsule(hip, neck, 0.08 * s), shirt), ("neck", capsule(neck, head, 0.03 * s), skin),
             ("head", capsule(head, head, 0.07 * s), skin)]
    for lr, side in (("l", 1), ("r", -1)):  # person's left is on the image right
        knee, ankle = limb(P(side * 0.05, 0.5), side * 0.3, (0.24, 0.24))
        parts += [(lr + "uleg", capsule(P(side * 0.05, 0.5), knee, 0.045 * s), legs),
                  (lr + "lleg", capsule(knee, ankle, 0.035 * s), legs),
                  (lr + "foot", capsule(ankle, ankle + [side * 0.05 * s, 0], 0.025 * s), 0.3 * legs)]
    for lr, side in (("l", 1), ("r", -1)):
        elbow, wrist = limb(P(side * 0.1, 0.78), side, (0.15, 0.14))
        parts += [(lr + "uarm", capsule(P(side * 0.1, 0.78), elbow, 0.03 * s), shirt),
                  (lr + "larm", capsule(elbow, wrist, 0.025 * s), skin),
                  (lr + "hand", capsule(wrist, wrist, 0.03 * s), skin)]
    return parts


def _save_parts(path, imname, objects):
    """Write a PASCAL-Part .mat struct: anno.objects(j) = (class, classIndex, mask, parts)."""
    objs = np.zeros((1, len(objects)), [("class", "O"), ("classIndex", "O"), ("mask", "O"), ("parts", "O")])
    for j, (name, index, mask, parts) in enumerate(objects):
        pa = np.zeros((1, len(parts)), [("part_name", "O"), ("mask", "O")]) if parts else np.zeros((0, 0))
        for k, (part, pmask) in enumerate(parts):
            pa[0, k] = (part, pmask.astype(np.uint8))
        objs[0, j] = (name, np.array([[index]], np.uint8), mask.astype(np.uint8), pa)
    anno = np.zeros((1, 1), [("imname", "O"), ("objects", "O")])
    anno[0, 0] = (imname, objs)
    scipy.io.savemat(path, {"anno": anno}, do_compression=True)


def voc_palette():
    """The PASCAL VOC colour map, (256, 3) uint8: the bits of the label index spread over R, G, B."""
    palette = np.zeros((256, 3), np.uint8)
    for j in range(8):
        palette |= (((np.arange(256)[:, None] >> (3 * j + np.arange(3))) & 1) << (7 - j)).astype(np.uint8)
    return palette


def make_toy(root, layout="nyud", n_train=200, n_val=50, size=(120, 160), seed=0):
    """Write a learnable toy in the NYUD_MT ('nyud') or PASCAL_MT ('pascal') layout, image i from
    default_rng([seed, i]); returns root at once if both split files (written last) hold n_train / n_val ids.
    NYUD: semseg 1..len(TOY_CLASSES) (0 = clutter), 5 % depth holes. PASCAL: sizes around `size` (some portrait),
    room = background, objects VOC classes (TOY_VOC), 0-2 figures (person) with PASCAL-Part masks."""
    nyud = layout == "nyud"
    splits = {"train": range(n_train), "val": range(n_train, n_train + n_val)}
    split_files = {s: os.path.join(root, (NYUD if nyud else PASCALContext).split_path.format(s)) for s in splits}
    if all(os.path.isfile(p) and len(open(p).read().split()) == len(splits[s]) for s, p in split_files.items()):
        return root
    for folder in (["images", "segmentation", "depth", "normals", "gt_sets"] if nyud else
                   ["JPEGImages", "semseg/VOC12", "human_parts", "sal_distill", "ImageSets/Context"]):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    voc = [TOY_VOC.get(name, (0, "background")) for name in TOY_CLASSES]  # toy class -> (VOC index, name)
    ids = [f"{i:04d}" if nyud else f"2008_{i:06d}" for i in range(n_train + n_val)]
    for i, id in enumerate(ids):
        rng, (h, w) = np.random.default_rng([seed, i]), size
        path = lambda folder, ext: os.path.join(root, folder, id + ext)
        if nyud:
            rgb, cls, _, depth, normals = _render_room(rng, h, w, rng.integers(3, 7))
            noise = scipy.ndimage.gaussian_filter(rng.standard_normal((h, w)), max(h, w) / 40)
            holes = noise > np.quantile(noise, 0.95)  # random blobs, 5 % of the pixels
            depth[holes], normals[holes] = 0, 0
            Image.fromarray(np.where(rng.random((h, w)) < 0.002, 0, cls + 1).astype(np.uint8)).save(
                path("segmentation", ".png"))
            np.save(path("depth", ".npy"), depth)
            np.save(path("normals", ".npy"), normals)
        else:
            h, w = (w, h) if rng.random() < 0.3 else (h, w)  # some portrait
            h, w = h + 8 * rng.integers(-1, 2), w + 8 * rng.integers(-1, 2)
            rgb, cls, inst, _, _ = _render_room(rng, h, w, rng.integers(1, 4))
            seg = np.array([index for index, _ in voc], np.uint8)[cls]
            objects = [[voc[cls[inst == k][0]][1], voc[cls[inst == k][0]][0], inst == k, []]
                       for k in range(inst.max() + 1) if (inst == k).any()]
            for _ in range(rng.choice([0, 1, 1, 2])):
                parts = _figure(rng, h, w)
                for name, mask, colour in parts:
                    rgb[mask], seg[mask] = colour * rng.uniform(0.85, 1), PERSON
                person = np.any([m for _, m, _ in parts], 0)
                for obj in objects:  # the new figure occludes earlier objects and figures
                    obj[2], obj[3] = obj[2] & ~person, [(name, m & ~person) for name, m in obj[3]]
                objects.append(["person", PERSON, person, [(name, m) for name, m, _ in parts]])
            label = Image.fromarray(seg)
            label.putpalette(voc_palette().tobytes())  # VOC12 labels are palette pngs
            label.save(path("semseg/VOC12", ".png"))
            Image.fromarray(np.where(seg > 0, 255, 0).astype(np.uint8)).save(path("sal_distill", ".png"))
            _save_parts(path("human_parts", ".mat"), id, objects)
        rgb = np.clip(rgb + rng.normal(0, 0.02, rgb.shape), 0, 1)  # camera noise
        Image.fromarray((rgb * 255).round().astype(np.uint8)).save(
            path("images" if nyud else "JPEGImages", ".jpg"), quality=90)
    for split, r in splits.items():
        with open(split_files[split], "w") as f:
            f.write("".join(ids[i] + "\n" for i in r))
    return root


# ----------------------------------------------------------------------------------------------------------
# Pictures and one's own images (mtcp.py --predict)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(paths) -> dict[Path, str]:
    """Image files among `paths` (files, or folders read one level deep, sorted) -> a distinct output stem each:
    the file's stem, or stem_1, stem_2, ... for a stem met before (a/x.png, b/x.png)."""
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p} does not exist")
        found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    stems, taken = {}, set()
    for path in dict.fromkeys(found):
        stem, k = path.stem, 0
        while stem in taken:
            k, stem = k + 1, f"{path.stem}_{k + 1}"
        stems[path] = stem
        taken.add(stem)
    return stems


def colorize(task: str, value: np.ndarray, *, depth_range: tuple[float, float] = (0.0, 10.0)) -> np.ndarray:
    """One task's map as an RGB picture (H, W, 3) uint8 from `value`: class ids (H, W) (255 ignore: grey); depth
    (1, H, W) metres (0 invalid: black); normals (3, H, W) unit, as (n + 1) / 2; saliency (1, H, W) probability."""
    if task in ("semseg", "human_parts"):
        rgb = voc_palette()[np.clip(value, 0, 255).astype(np.uint8)]
        rgb[value == 255] = 128
        return rgb
    if task == "depth":
        t = np.clip((value[0] - depth_range[0]) / (depth_range[1] - depth_range[0]), 0, 1)  # blue (near) .. red
        anchors = np.array([[48, 18, 59], [40, 120, 220], [30, 200, 140], [240, 200, 40], [180, 20, 10]], float)
        pos = t * (len(anchors) - 1)
        i = np.minimum(pos.astype(int), len(anchors) - 2)
        rgb = anchors[i] + (anchors[i + 1] - anchors[i]) * (pos - i)[..., None]
        rgb[value[0] <= 0] = 0
        return rgb.astype(np.uint8)
    if task == "normals":
        return ((np.transpose(value, (1, 2, 0)) + 1) * 127.5).clip(0, 255).astype(np.uint8)
    return np.repeat((value[0] * 255).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Checker: python data.py check --dataset nyud|pascal ROOT: names the variant, checks sizes, fails loudly

def _inspect(ds, i, strict):
    """Decode sample i without augmentation; returns (stats or None, [problems naming files])."""
    try:
        img, targets = ds.load(i)
    except DataError as e:
        return None, [str(e)]
    (h, w), image, problems = img.shape[:2], ds.find("image", ds.ids[i]), []
    stats = {"size": f"{h}x{w}", "variant": " ".join(os.path.splitext(ds.find(k, ds.ids[i]))[1]
                                                    for k in ("image", "normals") if k in ("image", *targets))}
    if strict and isinstance(ds, NYUD) and not ((h, w) == (480, 640) if image.endswith(".jpg") else
                                                h <= 448 and w <= 576):
        problems.append(f"{image}: {h}x{w}, not a published NYUD variant (NYUD_MT .jpg 480x640, InvPT/ATRC "
                        f".png <= 448x576)")
    if strict and isinstance(ds, PASCALContext) and max(h, w) > 500:
        problems.append(f"{image}: {h}x{w}, PASCAL images have their longest side <= 500")
    for task, arr in targets.items():
        if task == "semseg":
            stats["classes"] = set(np.unique(arr).tolist()) - {255}
        elif task == "depth":
            stats["depth"] = (arr[arr > 0].min(initial=np.inf), arr.max(), (arr == 0).mean())
        elif task == "normals":  # values checked by check_values when decoded
            stats["zero"] = (np.linalg.norm(arr, axis=-1) <= 0.01).mean()
        elif task == "sal":  # distilled saliency is soft: report how much
            stats["grey"] = ((arr > 0) & (arr < 255)).mean()
        elif task == "human_parts":
            stats["parts"] = bool((arr != 255).any())
    return stats, problems


def check(dataset, root, any_split_size=False, workers=16):
    """Check a dataset folder against the published archive and print a report; returns the problems found
    (empty = usable). `any_split_size` accepts any split and image size (toy)."""
    cls, problems, stats = NYUD if dataset == "nyud" else PASCALContext, [], []
    print(f"{cls.__name__} at {root}")
    for split, n in SPLIT_SIZES[dataset].items():
        try:
            ds = cls(root, split, train=False)
        except DataError as e:
            problems.append(str(e))
            continue
        print(f"  {split}: {len(ds)} ids (published archive: {n})")
        if len(ds) != n and not any_split_size:
            problems.append(f"{os.path.join(root, ds.split_path.format(split))}: {len(ds)} ids, expected {n}")
        with ThreadPoolExecutor(workers) as pool:  # PIL, np.load and zlib release the GIL
            for st, pr in pool.map(lambda i: _inspect(ds, i, not any_split_size), range(len(ds))):
                problems += pr
                stats += [st] if st else []
    problems = list(dict.fromkeys(problems))  # a missing root fails both splits the same way
    if stats:
        sizes = Counter(s["size"] for s in stats).most_common(5)
        print(f"  {len(stats)} readable samples; image sizes: " + ", ".join(f"{k} ({v})" for k, v in sizes))
        print(f'  semseg: classes seen {sorted(set().union(*(s["classes"] for s in stats)))}')
    if stats and dataset == "nyud":
        names = {".jpg .npy": "NYUD_MT (.jpg images, .npy normals)", ".png .png": "InvPT/ATRC NYUDv2 (.png)"}
        variants = Counter(names.get(s["variant"], s["variant"]) for s in stats)
        lo, hi, holes = np.array([s["depth"] for s in stats]).T
        print(f'  variant: {dict(variants)}\n  depth: {lo.min():.2f}..{hi.max():.2f} m, {holes.mean():.1%} '
              f'missing\n  normals: {np.mean([s["zero"] for s in stats]):.1%} zero (invalid)')
        if len(variants) > 1:
            problems.append(f"mixed file variants {dict(variants)}: one archive extracted over another?")
    elif stats:
        print(f'  saliency: {np.mean([s["grey"] for s in stats]):.1%} of pixels neither 0 nor 255\n'
              f'  human parts: {sum(s["parts"] for s in stats)} of {len(stats)} images carry parts')
    print("usable" if not problems else f"NOT usable: {len(problems)} problems, the first 20:\n  " +
          "\n  ".join(problems[:20]))
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description="mtcp dataset tools")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("check", help="verify a dataset folder against the published archive")
    p.add_argument("--dataset", choices=("nyud", "pascal"), required=True)
    p.add_argument("root", help="NYUD_MT or PASCAL_MT folder")
    p.add_argument("--any-split-size", action="store_true", help="accept any split and image size (toy data)")
    args = parser.parse_args(argv)
    return 1 if check(args.dataset, args.root, args.any_split_size) else 0


if __name__ == "__main__":
    sys.exit(main())
