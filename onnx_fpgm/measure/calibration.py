"""Calibration data (``--calibration data.npz``) and output fidelity on real inputs.

The npz holds one array per graph input, keyed by the input's name, with a leading batch axis,
and optionally ``labels`` (one integer class per sample); inputs it has no array for are drawn
as the oracle draws them (``runtime.random_inputs``). Random inputs prove the rewrite exact;
real inputs tell how much the removed channels mattered, and a few of them are verified too.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..config import PruneConfig
from ..errors import ConfigError
from ..model.runtime import make_session, random_inputs, real_inputs
from .fidelity import output_parts
from .images import load_image_folder

LABELS_KEY = "labels"
#: Calibration samples the oracle checks the pruned model on (besides its random inputs).
VERIFY_SAMPLES = 4


@dataclass(frozen=True)
class Calibration:
    """Feeds for every graph input (batch axis first) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    drawn: tuple[str, ...] = ()  # inputs the file has no array for: drawn at random

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.inputs.values())))


def load_calibration(path: str | Path, model: onnx.ModelProto,
                     config: PruneConfig | None = None) -> Calibration:
    """Read and validate an npz against the model's graph inputs, or read a folder of images
    (``images.load_image_folder``, scaled and sized by ``config``).

    Raises:
        ConfigError: unreadable file, no array for any input, unknown names, wrong rank,
            static dims, dtype, batch sizes that differ, or labels that are not one integer
            per sample.
    """
    path = Path(path)
    if path.is_dir():
        config = config or PruneConfig()
        return Calibration(load_image_folder(path, model, dict(config.input_shapes),
                                             config.image_scaling))
    initializers = {t.name for t in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in initializers}
    arrays = _read_npz(path, inputs)
    labels = arrays.pop(LABELS_KEY, None)
    missing = sorted(set(inputs) - set(arrays))
    if not arrays:
        raise ConfigError(f"{path}: no array for graph input(s) {missing}")
    sizes = set()
    for name, value in arrays.items():
        ttype = inputs[name].type.tensor_type
        want = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if value.dtype != want:
            raise ConfigError(f"{path}: {name} has dtype {value.dtype}, the model wants {want}")
        dims = ttype.shape.dim
        if value.ndim != len(dims):
            raise ConfigError(f"{path}: {name} has {value.ndim} dims, the input has {len(dims)}")
        for axis, (size, dim) in enumerate(zip(value.shape, dims)):
            if axis and dim.HasField("dim_value") and dim.dim_value != size:
                raise ConfigError(f"{path}: {name} has size {size} on axis {axis}, "
                                  f"the model wants {dim.dim_value}")
        if not len(value):
            raise ConfigError(f"{path}: {name} has no samples")
        sizes.add(len(value))
    if len(sizes) != 1:
        raise ConfigError(f"{path}: inputs have different batch sizes {sorted(sizes)}")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != next(iter(sizes)):
            raise ConfigError(f"{path}: '{LABELS_KEY}' must be one integer class per sample")
    if missing:  # the data is silent on these: drawn as verification draws them
        filled = random_inputs(model, 0, _shapes_beside(model, arrays))
        arrays = {value.name: arrays.get(value.name, filled[value.name])
                  for value in inputs.values()}
    return Calibration(arrays, labels, tuple(missing))


def _shapes_beside(model: onnx.ModelProto,
                   arrays: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shapes of every real input for samples ``arrays``: a symbolic dim takes the size the
    arrays give the same symbol (the batch: their sample count), static dims their value."""
    n = len(next(iter(arrays.values())))
    by_symbol: dict[str, int] = {}
    for value in real_inputs(model):
        if value.name in arrays:
            for dim, size in zip(value.type.tensor_type.shape.dim, arrays[value.name].shape):
                if dim.dim_param:
                    by_symbol.setdefault(dim.dim_param, int(size))
    shapes = {}
    for value in real_inputs(model):
        if value.name in arrays:
            shapes[value.name] = tuple(arrays[value.name].shape)
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else
            by_symbol.get(d.dim_param, n if axis == 0 else 1) for axis, d in enumerate(dims))
    return shapes


def verification_feeds(calibration: Calibration, model: onnx.ModelProto,
                       max_samples: int = VERIFY_SAMPLES) -> list[dict[str, np.ndarray]]:
    """A few calibration samples as feeds for the oracle (one batch, or one per run where the
    model's batch dim is static)."""
    batch = static_batch(model, calibration)
    step = batch or min(calibration.n_samples, max_samples)
    feeds = []
    for start in range(0, min(calibration.n_samples, max(max_samples, step)), step):
        chunk = {k: v[start:start + step] for k, v in calibration.inputs.items()}
        if len(next(iter(chunk.values()))) == step:
            feeds.append(chunk)
    return feeds


def static_batch(model: onnx.ModelProto, calibration: Calibration) -> int | None:
    """The fixed batch size of the model's first calibrated input, or None when it is free."""
    for value in model.graph.input:
        if value.name in calibration.inputs:
            dim0 = value.type.tensor_type.shape.dim[0] if \
                value.type.tensor_type.shape.dim else None
            if dim0 is not None and dim0.HasField("dim_value") and dim0.dim_value > 0:
                return dim0.dim_value
            return None
    return None


def _budget_bytes() -> int:
    """Bytes the decompressed calibration arrays may take: half of the physical memory."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _read_npz(path: Path, inputs: dict) -> dict[str, np.ndarray]:
    """The arrays named after graph inputs (and ``labels``), read only after their names and
    declared sizes were checked: no array is decompressed before the whole file is judged.

    Raises:
        ConfigError: not an npz archive (a ``.npy`` too), unknown names, or arrays whose
            declared sizes exceed the memory budget (inputs the file is silent on are drawn by
            the caller).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise ConfigError(f"{path}: not a readable .npz file ({err}); save the arrays with "
                          "numpy.savez") from err
    unknown = sorted(set(members) - set(inputs) - {LABELS_KEY})
    if unknown:
        raise ConfigError(f"{path}: arrays {unknown[:8]} are not graph inputs "
                          f"(inputs: {sorted(inputs)}; '{LABELS_KEY}' is also accepted)")
    declared = sum(info.file_size for info in members.values())
    if declared > _budget_bytes():
        raise ConfigError(f"{path}: its arrays declare {declared:,} bytes decompressed, more "
                          f"than the {_budget_bytes():,} bytes allowed (half the memory)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in members}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{path}: not a readable .npz file ({err})") from err
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise ConfigError(f"{path}: member {key!r} is not a .npy array")
    return arrays


def run_batched(session, model: onnx.ModelProto, calibration: Calibration,
                outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run ``session`` over all samples, in chunks the input's batch dim allows."""
    batch = static_batch(model, calibration)
    n = calibration.n_samples
    step = batch or min(n, 64)
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, step):
        feeds = {k: v[start:start + step] for k, v in calibration.inputs.items()}
        if batch and len(next(iter(feeds.values()))) != batch:
            break  # a static batch that does not divide the data: drop the remainder
        chunks.append(session.run(outputs, feeds))
    return [np.concatenate([c[i] for c in chunks]) for i in range(len(chunks[0]))]


@dataclass(frozen=True)
class Fidelity:
    """How close the pruned model's outputs are to the original's on real data (one output, or
    one part of it: see ``fidelity.output_parts``)."""

    output: str
    cosine: float
    relative_error: float
    top1_agreement: float | None
    accuracy_original: float | None
    accuracy_pruned: float | None
    agreement: str = "top-1"

    def summary(self) -> str:
        text = f"{self.output}: cosine {self.cosine:.4f}, relative error {self.relative_error:.3g}"
        if self.top1_agreement is not None:
            text += f", {self.agreement} agreement {100 * self.top1_agreement:.1f}%"
        if self.accuracy_original is not None:
            text += (f", accuracy {100 * self.accuracy_original:.2f}% -> "
                     f"{100 * self.accuracy_pruned:.2f}%")
        return text


def fidelity(original: onnx.ModelProto | bytes, pruned: onnx.ModelProto | bytes,
             model_for_inputs: onnx.ModelProto, calibration: Calibration) -> list[Fidelity]:
    """Compare every float output of both models, part by part, over the calibration samples."""
    want = run_batched(make_session(original), model_for_inputs, calibration)
    have = run_batched(make_session(pruned), model_for_inputs, calibration)
    n = min(len(want[0]), len(calibration.labels)) if calibration.labels is not None else None
    results = []
    for value, a, b in zip(model_for_inputs.graph.output, want, have):
        if a.dtype.kind != "f":
            continue
        for part in output_parts(a, b, value.name):
            acc_a = acc_b = None
            if n and part.scores_want is not None:
                acc_a = float(np.mean(part.scores_want[:n].argmax(-1) == calibration.labels[:n]))
                acc_b = float(np.mean(part.scores_have[:n].argmax(-1) == calibration.labels[:n]))
            results.append(Fidelity(part.name, part.cosine, part.relative_error, part.top1,
                                    acc_a, acc_b, part.agreement))
    return results
