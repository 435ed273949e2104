"""Generators of hostile and careless inputs for ``test_hostile.py``: models with external data,
crafted names and dims, odd files, and the helpers that check the tool's promise about files
(exit code, one stderr line, inputs byte-identical, nothing left behind)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent


def conv_model(name: str = "conv1", filters: int = 16, dims: list[int] | None = None,
               seed: int = 0) -> onnx.ModelProto:
    """input(1,3,8,8) -> Conv ``name`` (filters) -> Relu -> Conv head(4): one prunable group."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((filters, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((4, filters, 1, 1)).astype(np.float32)
    weight = numpy_helper.from_array(w1, "conv1.weight")
    if dims is not None:  # crafted dims over the same bytes
        del weight.dims[:]
        weight.dims.extend(dims)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "conv1.weight"], ["c1"], name=name, pads=[1] * 4),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "head.weight"], ["output"], name="head")],
        "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])],
        [weight, numpy_helper.from_array(w2, "head.weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    """``model`` as ``path`` with every tensor in one data file (default ``<name>.data``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or path.name + ".data", size_threshold=0)
    return path


def outputs(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """onnxruntime's outputs of the model file ``path`` (its data read from its folder)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
             .astype(np.float32) for i in session.get_inputs()}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def digest(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links as their target, not followed) -> a content hash."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "dir" if path.is_dir() else "special"
    return found


def run_cli(*args: str | os.PathLike, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m onnx_fpgm ARGS`` in a child (a FIFO or a crash must not stop the tests)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "onnx_fpgm", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=environment,
                          check=False)


def start_cli(*args: str | os.PathLike, env: dict[str, str] | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "onnx_fpgm", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment)


def one_error_line(stderr: str, *fragments: str) -> str:
    """Exactly one ``onnx-fpgm: error:`` line on stderr holding every fragment, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("onnx-fpgm: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def nested_json(depth: int) -> str:
    """A valid JSON document nested ``depth`` lists deep (Python's parser recurses)."""
    return '{"layers": ' + "[" * depth + "]" * depth + "}"


def sparse_model() -> onnx.ModelProto:
    """A Conv whose weight is a sparse initializer (COO, linear indices)."""
    model = conv_model()
    dense = next(t for t in model.graph.initializer if t.name == "head.weight")
    array = numpy_helper.to_array(dense).ravel()
    keep = np.flatnonzero(np.abs(array) > 0.5)
    values = numpy_helper.from_array(array[keep], "head.weight")
    indices = numpy_helper.from_array(keep.astype(np.int64), "head.weight.indices")
    sparse = helper.make_sparse_tensor(values, indices, list(dense.dims))
    model.graph.initializer.remove(dense)
    model.graph.sparse_initializer.append(sparse)
    return model


def if_body_model() -> onnx.ModelProto:
    """``conv_model`` plus an If whose branches hold their own weights (added to the output)."""
    model = conv_model()
    rng = np.random.default_rng(5)
    branches = []
    for name in ("then", "else"):
        weight = numpy_helper.from_array(
            rng.standard_normal((1, 4, 8, 8)).astype(np.float32), f"{name}.bias")
        branches.append(helper.make_graph(
            [helper.make_node("Identity", [f"{name}.bias"], [f"{name}.out"])], name, [],
            [helper.make_tensor_value_info(f"{name}.out", TensorProto.FLOAT, [1, 4, 8, 8])],
            [weight]))
    graph = model.graph
    graph.output[0].name = "head.out"
    graph.node[-1].output[0] = "head.out"
    graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    graph.node.append(helper.make_node("If", ["cond"], ["branch"], name="choose",
                                       then_branch=branches[0], else_branch=branches[1]))
    graph.node.append(helper.make_node("Add", ["head.out", "branch"], ["output"], name="add"))
    graph.output[0].name = "output"
    return model


def retarget(path: Path, tensor: str, **entries: str) -> None:
    """Rewrite ``tensor``'s external data entries (location, offset, length) in ``path``'s
    header, written as bytes (``onnx.save`` would try to write the data)."""
    header = onnx.load(str(path), load_external_data=False)
    target = next(t for t in header.graph.initializer if t.name == tensor)
    info = {e.key: e.value for e in target.external_data} | entries
    del target.external_data[:]
    for key, value in info.items():
        entry = target.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(header.SerializeToString())


def training_info_model() -> onnx.ModelProto:
    """``conv_model`` with a training_info entry updating conv1.weight."""
    model = conv_model()
    info = model.training_info.add()
    info.algorithm.CopyFrom(helper.make_graph(
        [helper.make_node("Identity", ["conv1.weight"], ["conv1.weight.new"])], "step", [], []))
    binding = info.update_binding.add()
    binding.key, binding.value = "conv1.weight", "conv1.weight.new"
    return model
