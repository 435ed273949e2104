"""Big models for the memory and time budget (issue 12), written without holding their weights.

Two architectures, random He-normal weights (shapes, not values, set memory and time):

- ``vgg11bn``: VGG-11 with BatchNorm at 224x224 as torchvision lays it out (8 Conv-BN-ReLU,
  five max-pools, Flatten, 25088 -> 4096 -> 4096 -> 1000 classifier): 132.9 M params, 531 MB.
- ``stack``: a deep 3x3 conv stack of ``--width`` channels at ``--size`` x ``--size``: a stem,
  then ``--stages`` stages of one plain conv and ``--blocks`` residual blocks
  (conv-ReLU-conv + skip, ReLU), then a 1x1 head and global average pool. The default
  (20 stages x 7 blocks, width 512) has 302 convs of 512 x 4608, 707 M params, 2.83 GB.

Weights go to ``OUT.data`` as external data (``--external``, on by default for ``stack``), one
tensor at a time, so a 2.8 GB model is generated in a few hundred MB of memory.

Usage: ``python models/make_big.py stack out.onnx [--stages 4]``;
``python models/make_big.py vgg11bn out.onnx``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

_ALIGN = 4096


class _Writer:
    """Collects initializers, either embedded or streamed to a data file."""

    def __init__(self, out: Path, external: bool, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.initializers: list[TensorProto] = []
        self.location = out.name + ".data"
        self.data = open(out.parent / self.location, "wb") if external else None

    def add(self, name: str, value: np.ndarray) -> str:
        value = np.ascontiguousarray(value)
        if self.data is None or value.nbytes < 1024:
            self.initializers.append(onnx.numpy_helper.from_array(value, name))
            return name
        offset = self.data.tell()
        if offset % _ALIGN:
            self.data.write(b"\0" * (_ALIGN - offset % _ALIGN))
            offset = self.data.tell()
        self.data.write(value.tobytes())
        stub = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype),
                           dims=value.shape, data_location=TensorProto.EXTERNAL)
        for key, val in (("location", self.location), ("offset", offset),
                         ("length", value.nbytes)):
            entry = stub.external_data.add()
            entry.key, entry.value = key, str(val)
        self.initializers.append(stub)
        return name

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        value = self.rng.standard_normal(shape, dtype=np.float32)
        value *= np.float32(np.sqrt(2.0 / fan_in))
        return self.add(name, value)

    def bias(self, name: str, n: int) -> str:
        return self.add(name, (self.rng.standard_normal(n, dtype=np.float32) * 0.1))

    def close(self) -> None:
        if self.data is not None:
            self.data.close()


def _conv(w: _Writer, nodes: list, x: str, name: str, c_in: int, c_out: int, k: int) -> str:
    weight = w.weight(f"{name}.weight", (c_out, c_in, k, k), c_in * k * k)
    bias = w.bias(f"{name}.bias", c_out)
    nodes.append(helper.make_node("Conv", [x, weight, bias], [f"{name}.out"], name=name,
                                  kernel_shape=[k, k], pads=[k // 2] * 4))
    return f"{name}.out"


def _relu(nodes: list, x: str, name: str) -> str:
    nodes.append(helper.make_node("Relu", [x], [f"{name}.out"], name=name))
    return f"{name}.out"


def build_stack(w: _Writer, stages: int, blocks: int, width: int, size: int):
    nodes: list = []
    x = _relu(nodes, _conv(w, nodes, "input", "stem", 3, width, 3), "stem.relu")
    for s in range(stages):
        x = _relu(nodes, _conv(w, nodes, x, f"s{s}.plain", width, width, 3), f"s{s}.plain.relu")
        for b in range(blocks):
            p = f"s{s}.b{b}"
            y = _relu(nodes, _conv(w, nodes, x, f"{p}.conv1", width, width, 3), f"{p}.relu1")
            y = _conv(w, nodes, y, f"{p}.conv2", width, width, 3)
            nodes.append(helper.make_node("Add", [y, x], [f"{p}.add"], name=f"{p}.add"))
            x = _relu(nodes, f"{p}.add", f"{p}.relu2")
    x = _relu(nodes, _conv(w, nodes, x, "head", width, 16, 1), "head.relu")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["output"], name="pool"))
    return nodes, [1, 3, size, size], [1, 16, 1, 1]


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def build_vgg11bn(w: _Writer):
    nodes: list = []
    x, c_in = "input", 3
    for i, spec in enumerate(_VGG11):
        if spec == "M":
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{i}"], name=f"pool{i}",
                                          kernel_shape=[2, 2], strides=[2, 2]))
            x = f"pool{i}"
            continue
        x = _conv(w, nodes, x, f"features.{i}", c_in, spec, 3)
        bn = [w.add(f"features.{i}.bn.{k}", v) for k, v in (
            ("scale", w.rng.uniform(0.5, 1.5, spec).astype(np.float32)),
            ("bias", (w.rng.standard_normal(spec) * 0.2).astype(np.float32)),
            ("mean", (w.rng.standard_normal(spec) * 0.1).astype(np.float32)),
            ("var", w.rng.uniform(0.5, 1.5, spec).astype(np.float32)))]
        nodes.append(helper.make_node("BatchNormalization", [x, *bn], [f"bn{i}"], name=f"bn{i}"))
        x, c_in = _relu(nodes, f"bn{i}", f"relu{i}"), spec
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    x, fan_in = "flat", 512 * 7 * 7
    for j, n_out in enumerate((4096, 4096, 1000)):
        weight = w.weight(f"classifier.{j}.weight", (n_out, fan_in), fan_in)
        bias = w.bias(f"classifier.{j}.bias", n_out)
        nodes.append(helper.make_node("Gemm", [x, weight, bias], [f"fc{j}"], name=f"fc{j}",
                                      transB=1))
        x, fan_in = (_relu(nodes, f"fc{j}", f"fc{j}.relu") if j < 2 else f"fc{j}"), n_out
    nodes[-1].output[0] = "output"
    return nodes, [1, 3, 224, 224], [1, 1000]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arch", choices=["stack", "vgg11bn"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--stages", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--external", action=argparse.BooleanOptionalAction, default=None,
                        help="weights as external data (default: on for stack)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    external = args.external if args.external is not None else args.arch == "stack"
    writer = _Writer(args.out, external, args.seed)
    try:
        if args.arch == "stack":
            nodes, in_shape, out_shape = build_stack(writer, args.stages, args.blocks,
                                                     args.width, args.size)
        else:
            nodes, in_shape, out_shape = build_vgg11bn(writer)
    finally:
        writer.close()
    graph = helper.make_graph(
        nodes, args.arch, [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        initializer=writer.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    tmp = args.out.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        handle.write(model.SerializeToString())
    os.replace(tmp, args.out)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"{args.out}: {len(nodes)} nodes, {n_params:,} params, {n_params * 4 / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
