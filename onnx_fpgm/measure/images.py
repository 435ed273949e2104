"""Calibration data from a folder of JPEG/PNG images (``--calibration DIR``, ``--eval DIR``).

The model must have one rank-4 float input. Its layout is what it declares: the channels axis
is the one of size 3 or 1 (axis 1: NCHW, else axis 3: NHWC); its height and width come from the
model, or from the sizes chosen (or given by ``--input-shape``) for symbolic dims. Each image is
resized to that size (``letterbox``: scaled to fit, centred, padded with grey 114), converted to
RGB (or grey for one channel; BGR with ``bgr``) and scaled: ``(pixel * pixel_scale - mean) /
std`` per channel. Defaults: ``pixel_scale`` 1/255, mean 0, std 1: RGB in 0..1. Pillow is an
optional extra (``pip install 'onnx-fpgm[images]'``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..config import ImageScaling
from ..errors import ConfigError

SUFFIXES = (".jpg", ".jpeg", ".png")
LETTERBOX_FILL = 114


def load_image_folder(folder: str | Path, model: onnx.ModelProto,
                      sizes: dict[str, tuple[int, ...]],
                      scaling: ImageScaling) -> dict[str, np.ndarray]:
    """The images of ``folder`` (sorted by name) as the input's array, batch first."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ConfigError("reading a folder of images needs Pillow: "
                          "pip install 'onnx-fpgm[images]'") from err
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise ConfigError(f"{folder}: no {'/'.join(SUFFIXES)} images")
    name, shape, dtype = _image_input(model, sizes)
    channels_axis = 1 if shape[1] in (1, 3) else 3
    channels = shape[channels_axis]
    height, width = (shape[2], shape[3]) if channels_axis == 1 else (shape[1], shape[2])
    mean = _per_channel(scaling.mean, channels, "--mean")
    std = _per_channel(scaling.std, channels, "--std")
    if (std == 0).any():
        raise ConfigError("--std must not be 0")
    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                pixels = _fit(image, width, height, scaling.letterbox, Image)
        except OSError as err:
            raise ConfigError(f"{path}: not a readable image ({err})") from err
        pixels = pixels.reshape(height, width, channels).astype(np.float64)
        if scaling.bgr and channels == 3:
            pixels = pixels[..., ::-1]
        values = (pixels * scaling.pixel_scale - mean) / std
        arrays.append(values if channels_axis == 3 else values.transpose(2, 0, 1))
    return {name: np.stack(arrays).astype(dtype)}


def _image_input(model, sizes) -> tuple[str, list[int], np.dtype]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise ConfigError("a folder of images feeds a model with one rank-4 image input; this "
                          f"model has inputs {[v.name for v in inputs]}: give an .npz")
    value = inputs[0]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    if dtype.kind != "f":
        raise ConfigError(f"a folder of images feeds a float input; {value.name} is {dtype}")
    given = sizes.get(value.name)
    shape = [d.dim_value if d.HasField("dim_value") else (given[i] if given else 0)
             for i, d in enumerate(value.type.tensor_type.shape.dim)]
    if 0 in shape[1:] or not (shape[1] in (1, 3) or shape[3] in (1, 3)):
        raise ConfigError(f"{value.name} has shape {shape}: no channels axis of size 1 or 3 "
                          "and a known height and width (see --input-shape)")
    return value.name, shape, dtype


def _per_channel(values: tuple[float, ...], channels: int, flag: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise ConfigError(f"{flag} takes 1 or {channels} values, got {len(values)}")
    return np.broadcast_to(np.asarray(values, np.float64), (channels,))


def _fit(image, width: int, height: int, letterbox: bool, pil) -> np.ndarray:
    if not letterbox:
        return np.asarray(image.resize((width, height), pil.BILINEAR))
    scale = min(width / image.width, height / image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    fill = LETTERBOX_FILL if image.mode == "L" else (LETTERBOX_FILL,) * 3
    canvas = pil.new(image.mode, (width, height), fill)
    canvas.paste(image.resize((w, h), pil.BILINEAR), ((width - w) // 2, (height - h) // 2))
    return np.asarray(canvas)
