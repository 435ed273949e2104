"""A differentiable executor of ONNX graphs in torch, for training a pruned model's weights.

Why our own and not onnx2torch: onnx2torch imports torchvision, which does not import beside the
CPU torch this project pins; and the graphs the tool prunes use a small, known op set
(``torch_ops.OPS``). The executor runs the graph node by node in its stored (topological) order.

* Trainable parameters are the float initializers that are weights or biases of Conv,
  ConvTranspose, Gemm and MatMul and the scale/bias of BatchNormalization; every other
  initializer is a fixed buffer. Nodes whose inputs are all fixed (shape arithmetic, folded
  constants) are computed once, when the executor is built.
* A graph with an op outside the table, an op from another domain, or an attribute form the table
  does not compute is refused with ``ConfigError`` naming the node and op: never guessed.
* Floats are computed in float32 whatever the model stores; ``write_back`` casts the trained
  values to each initializer's stored dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import ConfigError
from . import torch_layout_ops  # noqa: F401  (registers the shape and layout ops)
from .torch_ops import OPS, UnsupportedForm, torch_dtype

#: Inputs of each layer op that hold trainable weights/biases when they are float initializers.
TRAINABLE_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2),
                    "MatMul": (0, 1), "BatchNormalization": (1, 2)}
_DOMAINS = ("", "ai.onnx")


@dataclass
class _Step:
    node: onnx.NodeProto
    label: str
    attrs: dict


def check_supported(model: onnx.ModelProto) -> str | None:
    """Why the executor cannot run ``model`` (the first node it has no rule for), else None."""
    for node in model.graph.node:
        if node.domain not in _DOMAINS:
            return f"op {node.domain}.{node.op_type} (node {node.name or node.output[0]})"
        if node.op_type != "Constant" and node.op_type not in OPS:
            return f"op {node.op_type} (node {node.name or node.output[0]})"
    return None


def trainable_names(model: onnx.ModelProto) -> list[str]:
    """Float initializers read as weights/biases by a layer (see the module docstring)."""
    floats = {t.name for t in model.graph.initializer
              if helper.tensor_dtype_to_np_dtype(t.data_type).kind == "f"}
    names: dict[str, None] = {}
    for node in model.graph.node:
        for index in TRAINABLE_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] in floats:
                names[node.input[index]] = None
    return list(names)


class TorchGraph:
    """``model`` as a torch computation: ``run(feeds)`` returns every tensor it computed."""

    def __init__(self, model: onnx.ModelProto, device: torch.device | str = "cpu",
                 trainable: bool = True) -> None:
        reason = check_supported(model)
        if reason:
            raise ConfigError(f"the differentiable executor cannot run this graph: no rule for "
                              f"{reason}; --recover distill needs a graph of supported ops")
        self.device = torch.device(device)
        self.opset = next((o.version for o in model.opset_import if o.domain in _DOMAINS), 13)
        self.outputs = [o.name for o in model.graph.output]
        learn = set(trainable_names(model)) if trainable else set()
        self.params: dict[str, torch.nn.Parameter] = {}
        self.constants: dict[str, torch.Tensor] = {}
        for init in model.graph.initializer:
            value = self._tensor(numpy_helper.to_array(init))
            if init.name in learn:
                self.params[init.name] = torch.nn.Parameter(value.to(self.device))
            else:
                self.constants[init.name] = value
        self.inputs = [v.name for v in model.graph.input if v.name not in self.constants
                       and v.name not in self.params]
        self.steps: list[_Step] = []
        for node in model.graph.node:
            step = _Step(node, f"{node.op_type} node {node.name or node.output[0]}",
                         self._attrs(node))
            if node.op_type == "Constant":
                self.constants[node.output[0]] = step.attrs["_value"]
            elif all(not n or n in self.constants for n in node.input):
                self._store(step, self._execute(step, self.constants), self.constants)
            else:
                self.steps.append(step)
        for name, value in self.constants.items():  # floats beside the params; ints on CPU
            if value.is_floating_point():
                self.constants[name] = value.to(self.device)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Execute the graph on ``feeds`` (float inputs as float32) and return every tensor."""
        env: dict[str, torch.Tensor] = {**self.constants, **self.params}
        for name in self.inputs:
            if name not in feeds:
                raise ConfigError(f"no value for graph input {name}")
            env[name] = feeds[name]
        for step in self.steps:
            self._store(step, self._execute(step, env), env)
        return env

    def run_step(self, step: _Step, env: dict[str, torch.Tensor],
                 inputs: list[torch.Tensor | None] | None = None) -> None:
        """Execute one of ``steps`` into ``env``; ``inputs`` (the node's input tensors) instead
        of env's values, e.g. a refitted weight (``sequential.py`` walks the graph this way)."""
        self._store(step, self._execute(step, env, inputs), env)

    def trained_values(self) -> dict[str, np.ndarray]:
        """A copy of the current parameters as float32 NumPy arrays, by initializer name (a
        copy: on CPU ``.numpy()`` shares the parameter's memory, which training goes on changing)."""
        return {name: p.detach().cpu().numpy().copy() for name, p in self.params.items()}

    def load_values(self, values: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, value in values.items():
                self.params[name].copy_(torch.from_numpy(value))

    # ---- internals ----
    @staticmethod
    def _tensor(value: np.ndarray) -> torch.Tensor:
        if value.dtype.kind == "f":
            value = value.astype(np.float32)
        elif value.dtype == np.uint64 or value.dtype == np.uint32:
            value = value.astype(np.int64)
        return torch.from_numpy(np.array(value, copy=True, order="C"))

    def _attrs(self, node: onnx.NodeProto) -> dict:
        attrs: dict = {"_opset": self.opset, "_op": node.op_type,
                       "_n_outputs": len(node.output)}
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise ConfigError(f"the differentiable executor cannot run {node.op_type} node "
                                  f"{node.name}: it holds a subgraph")
            value = helper.get_attribute_value(attr)
            if isinstance(value, onnx.TensorProto):
                value = self._tensor(numpy_helper.to_array(value))
            attrs[attr.name] = value
        if node.op_type == "Constant":
            attrs["_value"] = self._constant_value(node, attrs)
        return attrs

    def _constant_value(self, node: onnx.NodeProto, attrs: dict) -> torch.Tensor:
        if "value" in attrs:
            return attrs["value"]
        for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                           ("value_int", torch.int64), ("value_ints", torch.int64)):
            if key in attrs:
                return torch.tensor(attrs[key], dtype=dtype)
        raise ConfigError(f"the differentiable executor cannot run Constant node {node.name}: "
                          f"no tensor, float or int value")

    def _execute(self, step: _Step, env: dict[str, torch.Tensor], inputs=None):
        if inputs is None:
            inputs = [env[name] if name else None for name in step.node.input]
        devices = {t.device for t in inputs if t is not None}
        if len(devices) > 1:  # shape values (CPU) meeting activations
            inputs = [t.to(self.device) if t is not None else None for t in inputs]
        try:
            return OPS[step.node.op_type](inputs, step.attrs)
        except UnsupportedForm as err:
            raise ConfigError(f"the differentiable executor cannot run {step.label}: {err}; "
                              f"--recover distill needs a graph of supported forms") from err
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as err:
            raise ConfigError(f"the differentiable executor failed on {step.label}: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                              ) from err

    @staticmethod
    def _store(step: _Step, result, env: dict[str, torch.Tensor]) -> None:
        values = result if isinstance(result, tuple) else (result,)
        for name, value in zip(step.node.output, values):
            if name:
                env[name] = value


def float_feeds(arrays: dict[str, np.ndarray], graph: TorchGraph,
                device: torch.device) -> dict[str, torch.Tensor]:
    """NumPy inputs as torch tensors for ``graph`` (floats as float32, on ``device``)."""
    feeds = {}
    for name, value in arrays.items():
        tensor = TorchGraph._tensor(value)
        feeds[name] = tensor.to(device) if tensor.is_floating_point() else tensor
    return feeds


def write_back(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with these initializers' data replaced (same names, shapes, dtypes)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for init in result.graph.initializer:
        if init.name not in values:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
        value = values[init.name]
        if tuple(value.shape) != tuple(init.dims):
            raise ValueError(f"trained {init.name} has shape {value.shape}, "
                             f"the graph stores {tuple(init.dims)}")
        init.CopyFrom(numpy_helper.from_array(value.astype(dtype), init.name))
    return result


__all__ = ["TorchGraph", "check_supported", "float_feeds", "torch_dtype", "trainable_names",
           "write_back"]
