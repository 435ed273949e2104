"""Calibration from a folder of images (measure/images.py): sizes, layout, scaling."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.config import ImageScaling, PruneConfig
from onnx_fpgm.measure.calibration import load_calibration

Image = pytest.importorskip("PIL.Image")


def _model(shape: list, channels_last: bool = False) -> onnx.ModelProto:
    """A conv over an NCHW (or NHWC, transposed first) image input of this declared shape."""
    rng = np.random.default_rng(0)
    c = shape[3] if channels_last else shape[1]
    nodes, first = [], "input"
    if channels_last:
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]))
        first = "nchw"
    nodes += [helper.make_node("Conv", [first, "w1", "b1"], ["a"], name="conv1", pads=[1] * 4),
              helper.make_node("Relu", ["a"], ["r"]),
              helper.make_node("Conv", ["r", "w2"], ["output"], name="conv2")]
    inits = [numpy_helper.from_array(rng.standard_normal((8, c, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                                            ["n", 4, "h", "w"])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _folder(tmp_path, n: int = 3, size=(20, 10)):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        pixels = np.zeros((size[1], size[0], 3), np.uint8)
        pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 10 * i, 0
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("shape, channels_last", [([1, 3, 8, 6], False), (["N", 3, 8, 6], False),
                                                  ([1, 8, 6, 3], True)],
                         ids=["nchw", "nchw_symbolic_batch", "nhwc"])
def test_images_follow_the_declared_layout_and_size(tmp_path, shape, channels_last) -> None:
    model = _model(shape, channels_last)
    data = load_calibration(_folder(tmp_path), model)
    x = data.inputs["input"]
    assert data.n_samples == 3 and x.dtype == np.float32
    assert x.shape == ((3, 8, 6, 3) if channels_last else (3, 3, 8, 6))
    red = x[..., 0] if channels_last else x[:, 0]
    green = x[..., 1] if channels_last else x[:, 1]
    np.testing.assert_allclose(red, 1.0, atol=1e-6)  # default 0..1 RGB
    np.testing.assert_allclose(green[2], 20 / 255, atol=1e-6)


def test_scaling_mean_std_and_bgr(tmp_path) -> None:
    model = _model([1, 3, 8, 6])
    config = PruneConfig(image_scaling=ImageScaling(1.0, (100.0, 0.0, 0.0), (5.0, 1.0, 1.0),
                                                    bgr=True))
    x = load_calibration(_folder(tmp_path), model, config).inputs["input"]
    np.testing.assert_allclose(x[:, 0], -20.0, atol=1e-5)  # blue (0) first: (0 - 100) / 5
    np.testing.assert_allclose(x[:, 2], 255.0, atol=1e-5)  # red last


def test_letterbox_pads_with_grey(tmp_path) -> None:
    model = _model([1, 3, 8, 8])
    config = PruneConfig(image_scaling=ImageScaling(letterbox=True))
    x = load_calibration(_folder(tmp_path, size=(16, 8)), model, config).inputs["input"]
    np.testing.assert_allclose(x[0, 1, 0], 114 / 255, atol=1e-6)  # top rows: padding
    np.testing.assert_allclose(x[0, 0, 4], 1.0, atol=1e-6)  # middle: the image


def test_symbolic_sizes_come_from_the_run(tmp_path) -> None:
    model = _model(["N", 3, "H", "W"])
    folder = _folder(tmp_path)
    with pytest.raises(onnx_fpgm.ConfigError, match="input-shape"):
        load_calibration(folder, model)
    result = onnx_fpgm.prune(model, 0.5, calibration=str(folder))
    assert result.report.fidelity
    assert any("images read as pixels x 0.00392157, RGB" in n for n in result.report.notes)


def test_empty_folder_and_non_image_models_are_refused(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(onnx_fpgm.ConfigError, match="no .jpg"):
        load_calibration(empty, _model([1, 3, 8, 6]))
    gemm = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]))
    with pytest.raises(onnx_fpgm.ConfigError, match="rank-4 image input"):
        load_calibration(_folder(tmp_path), gemm)


def test_cli_reads_a_folder_and_refuses_to_write_over_one_of_its_images(tmp_path) -> None:
    """A folder is a valid --calibration (not "not a regular file"); its images are reads, so
    an OUT onto one of them is a collision (exit 2), the image untouched."""
    from onnx_fpgm.cli import main as cli

    source = tmp_path / "model.onnx"
    onnx.save(_model([1, 3, 8, 6]), source)
    folder = _folder(tmp_path)
    assert cli.main([str(source), str(tmp_path / "out.onnx"), "--calibration", str(folder),
                     "-q"]) == 0
    image = folder / "img0.png"
    before = image.read_bytes()
    assert cli.main([str(source), str(image), "--calibration", str(folder), "-q"]) == 2
    assert image.read_bytes() == before
