"""Confidence-weighted refit of a detector's class-score layers (``recover/confidence.py``): the
weights are the teacher's confidence at each position, found from the graph; a model without
class scores refits as before, bit for bit; the weighted refit is better where a detection is."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import onnx_fpgm
from onnx_fpgm.measure.calibration import load_calibration
from onnx_fpgm.recover import confidence, obs, sequential
from onnx_fpgm.recover.torch_graph import TorchGraph, float_feeds

SIDE, CLASSES, WIDTH = 8, 3, 12


class TinyDetector(nn.Module):
    """A stem, then a box branch (4 coordinates in pixels) and a class branch (logits behind a
    sigmoid) per position, concatenated as a YOLOv8 head is: (N, 4 + classes, positions).
    ``sigmoid`` off: the class part is raw logits (no part in [0, 1])."""

    def __init__(self, sigmoid: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, WIDTH, 3, padding=1)
        self.box1, self.box2 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1), nn.Conv2d(WIDTH, 4, 1)
        self.cls1 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)
        self.cls2 = nn.Conv2d(WIDTH, CLASSES, 1)
        self.sigmoid = sigmoid
        with torch.no_grad():  # as a trained head: background far below the threshold, the
            # highest tenth of the positions (the blobs of ``_images``) above it
            self.cls2.bias.zero_()
            self.cls2.weight.abs_()
            raw = self._logits(torch.from_numpy(_images(64, 99)))
            self.cls2.weight.mul_(3 / raw.std())
            top = torch.quantile(raw.transpose(0, 1).reshape(CLASSES, -1), 0.9, dim=1)
            self.cls2.bias.copy_(-top * 3 / raw.std() + 1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls2(torch.relu(self.cls1(torch.relu(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes = self.box2(torch.relu(self.box1(torch.relu(self.stem(x))))) * 8 + 16
        logits = self._logits(x)
        scores = torch.sigmoid(logits) if self.sigmoid else logits
        return torch.cat([boxes.flatten(2), scores.flatten(2)], 1)


def _export(module: nn.Module) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        path = os.path.join(folder, "m.onnx")
        torch.onnx.export(module.eval(), (torch.zeros(1, 3, SIDE, SIDE),), path, dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["output"],
                          dynamic_axes={"images": {0: "n"}, "output": {0: "n"}})
        return onnx.load(path)


def _images(n: int, seed: int) -> np.ndarray:
    """Noise with a bright blob at a random place in each image: something to detect."""
    rng = np.random.default_rng(seed)
    images = 0.3 * rng.standard_normal((n, 3, SIDE, SIDE))
    for image in images:
        row, col = rng.integers(0, SIDE - 2, 2)
        image[:, row:row + 3, col:col + 3] += rng.uniform(1, 2, (3, 1, 1))
    return images.astype(np.float32)


def _save(tmp_path, name: str, images: np.ndarray) -> str:
    path = tmp_path / f"{name}.npz"
    np.savez(path, images=images)
    return str(path)


def _conv_names(model: onnx.ModelProto) -> dict[str, str]:
    """The torch module of each Conv node (``/cls1/Conv`` -> ``cls1``)."""
    return {n.name: n.name.strip("/").split("/")[0] for n in model.graph.node
            if n.op_type == "Conv"}


def _maps(model: onnx.ModelProto, images: np.ndarray, tmp_path):
    teacher = TorchGraph(model, "cpu", trainable=False)
    calibration = load_calibration(_save(tmp_path, "maps", images), model)
    probe = [float_feeds({"images": images[:1]}, teacher, torch.device("cpu"))]
    return confidence.confidence_maps(model, teacher, probe, calibration,
                                      set(_conv_names(model)))


def test_weights_follow_the_teachers_confidence(tmp_path) -> None:
    module = TinyDetector()
    model = _export(module)
    images = _images(24, 0)
    maps, note = _maps(model, images, tmp_path)
    assert maps is not None, note
    modules = _conv_names(model)
    assert sorted(modules[node] for node in maps.layers) == ["cls1", "cls2"]
    with torch.no_grad():
        logits = module._logits(torch.from_numpy(images)).numpy().astype(np.float64)
    confident = 1 / (1 + np.exp(-logits.max(1).reshape(len(images), -1)))
    want = np.maximum(confident, confidence.FLOOR)
    for node in maps.layers:
        np.testing.assert_allclose(maps.row_weights(node, 0, len(images)), want.reshape(-1),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps.row_weights(next(iter(maps.layers)), 3, 5),
                               want[3:5].reshape(-1), rtol=1e-5, atol=1e-6)
    assert (confident < confidence.FLOOR).mean() > 0.5  # the floor is what most positions get
    assert (want > 0.5).sum() >= len(images)  # and every image has a confident position
    assert "2 class-score layer(s) weighted" in note


def test_a_model_without_class_scores_is_unchanged(tmp_path, monkeypatch) -> None:
    model = _export(TinyDetector(sigmoid=False))
    calib = _save(tmp_path, "calib", _images(24, 0))
    maps, note = _maps(model, _images(8, 0), tmp_path)
    assert maps is None and note == ""
    results = []
    for weighted in (True, False):
        monkeypatch.setattr(sequential, "CONFIDENCE_WEIGHTS", weighted)
        results.append(onnx_fpgm.prune(model, 0.5, compensate="sequential", calibration=calib))
    assert results[0].model.SerializeToString() == results[1].model.SerializeToString()
    assert not any("class-score" in n for n in results[0].report.notes)


def _class_error_where_confident(model: onnx.ModelProto, pruned: onnx.ModelProto,
                                 images: np.ndarray) -> tuple[float, float]:
    """(mean squared score error at the teacher's confident positions, elsewhere)."""
    outputs = [ort.InferenceSession(m.SerializeToString()).run(None, {"images": images})[0]
               for m in (model, pruned)]
    want, have = (o[:, 4:] for o in outputs)
    confident = want.max(1) >= 0.25
    error = np.square(have - want).mean(1)
    return float(error[confident].mean()), float(error[~confident].mean())


@pytest.mark.parametrize(("mode", "seed"), [("sequential", 0), ("sequential", 1), ("obs", 0)])
def test_the_weighted_refit_is_better_where_a_detection_is(tmp_path, monkeypatch, mode: str,
                                                           seed: int) -> None:
    model = _export(TinyDetector())
    calib = _save(tmp_path, "calib", _images(64, seed))
    held_out = _images(64, seed + 10)
    errors = {}
    for weighted in (True, False):
        monkeypatch.setattr(sequential if mode == "sequential" else obs, "CONFIDENCE_WEIGHTS",
                            weighted)
        result = onnx_fpgm.prune(model, 0.5, compensate=mode, calibration=calib)
        if mode == "sequential":
            assert any("class-score layer(s) weighted" in n
                       for n in result.report.notes) == weighted
        errors[weighted] = _class_error_where_confident(model, result.model, held_out)
    # measured 2026-12-04: see the commit
    # measured 2026-12-04 (confident, elsewhere): seed 0 weighted (0.105, 0.030), unweighted
    # (0.158, 0.0075); seed 1 (0.112, 0.032) and (0.151, 0.0087); obs (0.110, 0.025) and
    # (0.164, 0.0064): the background pays for it
    assert errors[True][0] < 0.8 * errors[False][0], errors
