"""Calibration data (``--calibration data.npz``) and output fidelity on real inputs.

The npz holds one array per graph input, keyed by the input's name, with a leading batch axis,
and optionally ``labels`` (one integer class per sample). Random inputs prove the rewrite exact;
real inputs tell how much the removed channels mattered.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..config import PruneConfig
from ..errors import ConfigError
from ..model.runtime import make_session
from .fidelity import output_parts
from .images import load_image_folder

LABELS_KEY = "labels"


@dataclass(frozen=True)
class Calibration:
    """Feeds for every graph input (batch axis first) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.inputs.values())))


def load_calibration(path: str | Path, model: onnx.ModelProto,
                     config: PruneConfig | None = None) -> Calibration:
    """Read and validate an npz against the model's graph inputs, or read a folder of images
    (``images.load_image_folder``, scaled and sized by ``config``).

    Raises:
        ConfigError: unreadable file, missing or unknown names, wrong rank, static dims, dtype,
            batch sizes that differ, or labels that are not one integer per sample.
    """
    path = Path(path)
    if path.is_dir():
        config = config or PruneConfig()
        return Calibration(load_image_folder(path, model, dict(config.input_shapes),
                                             config.image_scaling))
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{path}: not a readable .npz file ({err})") from err
    initializers = {t.name for t in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in initializers}
    labels = arrays.pop(LABELS_KEY, None)
    unknown = sorted(set(arrays) - set(inputs))
    if unknown:
        raise ConfigError(f"{path}: arrays {unknown} are not graph inputs "
                          f"(inputs: {sorted(inputs)}; '{LABELS_KEY}' is also accepted)")
    missing = sorted(set(inputs) - set(arrays))
    if missing:
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
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != sizes.pop():
            raise ConfigError(f"{path}: '{LABELS_KEY}' must be one integer class per sample")
    return Calibration(arrays, labels)


def run_batched(session, model: onnx.ModelProto, calibration: Calibration,
                outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run ``session`` over all samples, in chunks the input's batch dim allows."""
    first = model.graph.input[0] if len(model.graph.input) else None
    batch = None
    for value in model.graph.input:
        if value.name in calibration.inputs:
            first = value
            break
    dim0 = first.type.tensor_type.shape.dim[0] if first is not None else None
    if dim0 is not None and dim0.HasField("dim_value"):
        batch = dim0.dim_value
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
