"""Real photographs -> ImageNet-normalized 224x224 tensors, enlarged by seeded random crops/flips.

Calibration and evaluation use *different* photos (``CALIBRATION_PHOTOS`` / ``EVALUATION_PHOTOS``,
shipped in ``quantizer/vision_data``; sources and licences in its README). A handful of photos is
all that can ship, so each is cut into many random-resized crops (Inception-style: a random
area fraction and aspect ratio, bilinear resize with antialiasing, random horizontal flip). The
crops of one seed are identical on every machine: all randomness comes from one
``torch.Generator``. Decoding needs Pillow (the ``vision`` extra).
"""

from __future__ import annotations

import math
import os
from typing import Dict, Iterable, Sequence, Tuple

import torch
import torch.nn.functional as F

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vision_data")
# Why so many photographs: with a handful of calibration photos (most of them microscopy or
# astronomy) longer learning schedules over-fitted the calibration crops, and with few evaluation
# photos the crops of one photo flip together and move the agreement in large correlated steps
# (docs/RESULTS_VISION.md).
CALIBRATION_PHOTOS = ("astronaut", "china", "retina", "hubble_deep_field", "ihc", "grace_hopper",
                      "kde_bythewater", "kde_coldripple", "kde_colorfulcups", "kde_darkesthour",
                      "kde_fallenleaf", "kde_grey", "kde_path", "kde_summer_1am",
                      "mate_blinds", "mate_dune", "mate_freshflower", "mate_garden", "mate_greenmeadow",
                      "mate_raindrops")
EVALUATION_PHOTOS = ("chelsea", "coffee", "flower", "rocket",
                     "mate_aqua", "mate_ladybird", "mate_storm", "mate_twowings", "mate_wood", "mate_yellowflower")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Crop area fraction and aspect ratio ranges: calibration sees varied views (the paper's
# ImageNet training crops); evaluation uses milder crops so most views still show the object.
CALIB_SCALE, EVAL_SCALE = (0.25, 1.0), (0.5, 1.0)
RATIO = (3 / 4, 4 / 3)


def load_photo(name: str, data_dir: str = DATA_DIR) -> torch.Tensor:
    """uint8 ``[3, H, W]`` RGB tensor of ``data_dir/<name>.jpg``."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("decoding the photos needs Pillow: pip install 'flexround[vision]' (or pillow)") from e
    path = os.path.join(data_dir, f"{name}.jpg")
    if not os.path.isfile(path):
        known = sorted(f[:-4] for f in os.listdir(data_dir) if f.endswith(".jpg")) if os.path.isdir(data_dir) else []
        raise FileNotFoundError(f"photo name={name!r}: {path} does not exist; expected one of {known}")
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        return data.reshape(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()


def load_photos(names: Iterable[str], data_dir: str = DATA_DIR) -> Dict[str, torch.Tensor]:
    return {n: load_photo(n, data_dir) for n in names}


def normalize(x: torch.Tensor) -> torch.Tensor:
    """float ``[..., 3, H, W]`` in [0, 1] -> ImageNet-normalized."""
    mean = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(3, 1, 1)
    return (x - mean) / std


def _crop_box(h: int, w: int, scale: Tuple[float, float], gen: torch.Generator) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering ``scale`` of the area at a random
    aspect ratio (log-uniform); falls back to the largest centred box of the photo's own ratio."""
    area = h * w
    for _ in range(10):
        frac = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=gen))
        logr = math.log(RATIO[0]) + (math.log(RATIO[1]) - math.log(RATIO[0])) * float(torch.rand((), generator=gen))
        r = math.exp(logr)
        cw, ch = int(round(math.sqrt(area * frac * r))), int(round(math.sqrt(area * frac / r)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return top, left, ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def random_crops(photos: Sequence[torch.Tensor], n: int, seed: int, size: int = 224,
                 scale: Tuple[float, float] = CALIB_SCALE, flip: bool = True) -> torch.Tensor:
    """``[n, 3, size, size]`` float32 ImageNet-normalized crops, photos taken in turn (crop ``i``
    comes from photo ``i % len(photos)``), reproducible from ``seed``."""
    if not photos:
        raise ValueError("random_crops: photos is empty; expected at least one uint8 [3, H, W] tensor")
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"random_crops: n={n!r}; expected a positive integer")
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"random_crops: size={size!r}; expected a positive integer")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"random_crops: scale={scale!r}; expected 0 < lo <= hi <= 1")
    for i, p in enumerate(photos):
        if p.dtype != torch.uint8 or p.dim() != 3 or p.shape[0] != 3:
            raise ValueError(f"random_crops: photos[{i}] is {p.dtype} {tuple(p.shape)}; expected uint8 [3, H, W]")
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = photos[i % len(photos)]
        top, left, ch, cw = _crop_box(img.shape[1], img.shape[2], scale, gen)
        crop = img[:, top:top + ch, left:left + cw].float()[None] / 255.0
        # Antialiasing matters when shrinking: without it a 320 px crop resized to 224 aliases.
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if flip and bool(torch.rand((), generator=gen) < 0.5):
            crop = crop.flip(-1)
        out[i] = normalize(crop.clamp_(0, 1))
    return out


def calibration_images(n: int = 256, seed: int = 0, size: int = 224,
                       photos: Sequence[str] = CALIBRATION_PHOTOS) -> torch.Tensor:
    """``n`` crops of the calibration photos (never the evaluation ones); ``photos``: a subset of
    ``CALIBRATION_PHOTOS`` (e.g. to hold some out for checking what was learned)."""
    unknown = [p for p in photos if p not in CALIBRATION_PHOTOS]
    if not photos or unknown:
        raise ValueError(f"calibration_images: photos={list(photos)!r}; expected a non-empty subset of "
                         f"CALIBRATION_PHOTOS {list(CALIBRATION_PHOTOS)}")
    return random_crops(list(load_photos(photos).values()), n, seed, size, CALIB_SCALE)


def evaluation_images(n: int = 192, seed: int = 1, size: int = 224) -> torch.Tensor:
    """``n`` lightly augmented crops of the evaluation photos (disjoint from calibration)."""
    photos = load_photos(EVALUATION_PHOTOS)
    return random_crops(list(photos.values()), n, seed, size, EVAL_SCALE)

