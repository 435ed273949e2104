"""Augmentation of the calibration images that distillation trains on.

Image inputs (rank-4 float) are shifted a little and jittered in brightness and contrast (and
flipped left-right with probability ``FLIP``); other inputs pass as they are. Where the model
declares an image's height and width symbolic (a fully convolutional graph that runs at any
size) and the image is large, training runs on random crops of ``CROP`` of its side: a quarter
of the pixels, so a quarter of the teacher's and the student's compute per sample, while every
layer still sees the objects at their own scale. Measured on YOLOv8n at 320x320 on 2 loaded CPU
cores, one forward and backward of 2 images took 2.3 s whole and 0.45-0.8 s at 160x160. Both
models run on the same crop, so the supervision stays exact; the held-out judgement runs on
whole images. A crop the graph cannot run at (an op that needs the full size) is found once, on
one sample, and then crops stay off.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import torch

from ..errors import ConfigError
from ..measure.calibration import Calibration

#: Largest shift of an augmented image, as a fraction of its height/width.
MAX_SHIFT = 0.04
#: Share of augmented images flipped left-right: off, since measured on the MNIST model
#: flips (digits are not mirror-symmetric) kept the lstsq start from improving at all.
FLIP = 0.0
#: Largest contrast change (relative) and brightness change (in input standard deviations).
JITTER = 0.05
#: Side of a training crop as a share of the image's side (1: no crops).
CROP = 0.5
#: Crops only when the cropped side is at least this many pixels (a digit of 28x28 stays whole).
MIN_CROP_SIDE = 64
#: A crop's side is a multiple of the largest power of two up to this that divides the image's
#: side: strided models (YOLO's 32) need the sizes their strides and upsamplings meet again.
CROP_ALIGN = 32


@dataclass
class _Image:
    h_axis: int
    w_axis: int
    mean: float
    std: float
    crop: tuple[int, int] | None  # (height, width) of a training crop, None: whole images


class Augmenter:
    """``augment(feeds)``: a new augmented batch, drawn from its own seeded generator."""

    def __init__(self, model: onnx.ModelProto, calibration: Calibration, seed: int) -> None:
        self.images = _image_inputs(model, calibration)
        self.generator = torch.Generator().manual_seed(seed)

    def check_crops(self, feeds: dict[str, torch.Tensor],
                    runs: Callable[[dict[str, torch.Tensor]], bool]) -> None:
        """Turn crops off unless ``runs`` succeeds on ``feeds`` cropped (one sample is enough)."""
        if not any(image.crop for image in self.images.values()):
            return
        try:
            ok = runs(self._crop(feeds))
        except (ConfigError, RuntimeError):  # a size the graph or the loss cannot take
            ok = False
        if not ok:
            for image in self.images.values():
                image.crop = None

    @property
    def crops(self) -> bool:
        return any(image.crop for image in self.images.values())

    def augment(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Crop, flip, shift and jitter each image of the batch."""
        result = self._crop(feeds)
        for name, image in self.images.items():
            result[name] = self._jitter(result[name], image)
        return result

    def _crop(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result = dict(feeds)
        for name, image in self.images.items():
            if image.crop is None:
                continue
            x = feeds[name]
            for axis, side in ((image.h_axis, image.crop[0]), (image.w_axis, image.crop[1])):
                start = int(torch.randint(0, x.shape[axis] - side + 1, (),
                                          generator=self.generator))
                x = x.narrow(axis, start, side)
            result[name] = x.contiguous()
        return result

    def _jitter(self, x: torch.Tensor, image: _Image) -> torch.Tensor:
        n, generator = x.shape[0], self.generator
        flip = torch.rand(n, generator=generator) < FLIP
        x = torch.where(flip.to(x.device).reshape(-1, 1, 1, 1), x.flip(image.w_axis), x)
        dy, dx = (int(torch.randint(-m, m + 1, (), generator=generator)) if m else 0
                  for m in (int(MAX_SHIFT * x.shape[image.h_axis]),
                            int(MAX_SHIFT * x.shape[image.w_axis])))
        x = _shift(x, image.h_axis, dy)
        x = _shift(x, image.w_axis, dx)
        contrast = 1 + 2 * JITTER * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
        brightness = JITTER * image.std * (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1)
        return image.mean + (x - image.mean) * contrast.to(x.device) + brightness.to(x.device)


def _image_inputs(model: onnx.ModelProto, calibration: Calibration) -> dict[str, _Image]:
    """Rank-4 float inputs, with their axes, statistics and training crop."""
    declared = {v.name: v.type.tensor_type.shape.dim for v in model.graph.input}
    images = {}
    for name, value in calibration.inputs.items():
        if value.ndim != 4 or value.dtype.kind != "f":
            continue
        channels_last = value.shape[3] in (1, 3, 4) and value.shape[1] not in (1, 3, 4)
        axes = (1, 2) if channels_last else (2, 3)
        dims = declared.get(name)
        symbolic = dims is not None and len(dims) == 4 and \
            not any(dims[a].HasField("dim_value") for a in axes)
        crop = tuple(_crop_side(value.shape[a]) for a in axes) if symbolic else None
        images[name] = _Image(*axes, float(value.mean()), float(value.std()) or 1.0,
                              crop if crop and all(crop) else None)
    return images


def _crop_side(side: int) -> int:
    """``CROP`` of ``side``, down to the alignment ``side`` has; 0 when too small to crop."""
    align = math.gcd(side, CROP_ALIGN)
    cropped = int(side * CROP) // align * align
    return cropped if MIN_CROP_SIDE <= cropped < side else 0


def _shift(x: torch.Tensor, axis: int, by: int) -> torch.Tensor:
    """Move the image ``by`` pixels along ``axis``, repeating the edge into the gap."""
    if not by:
        return x
    size = x.shape[axis]
    edge = x.narrow(axis, 0, 1) if by > 0 else x.narrow(axis, size - 1, 1)
    fill = edge.expand(*[abs(by) if a == axis else -1 for a in range(x.dim())])
    body = x.narrow(axis, 0, size - by) if by > 0 else x.narrow(axis, -by, size + by)
    return torch.cat([fill, body] if by > 0 else [body, fill], dim=axis)
