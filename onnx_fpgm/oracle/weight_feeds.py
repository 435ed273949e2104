"""Running a model in onnxruntime without a second copy of its weights.

An ``InferenceSession`` built from a model's bytes holds the serialised bytes, its own parsed
copy of the model and its own copy of every initializer: three times the weights at the peak,
on top of the copy the caller holds. Here the large float initializers become graph inputs
instead, fed from NumPy arrays at each run: onnxruntime's CPU provider reads input arrays in
place, so a session costs the (small) graph plus its activations, two sessions can share the
same weight arrays, and nothing near 2 GiB is ever serialised. Verification runs with graph
optimisations off, so a weight being an input rather than an initializer changes no kernel
choice; small and integer tensors (shapes, axes, scales that kernels need as constants) stay
initializers, and so do the inputs a kernel prepacks when they are constant and computes with
otherwise when fed (com.microsoft MatMulNBits' scales: with ``accuracy_level`` 4 a constant
one runs the int8 kernel, a fed one the float path, so the two sessions would differ).
"""
from __future__ import annotations

import gc

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..model import io
from ..model.runtime import make_session

#: Float initializers of at least this many elements are fed as inputs.
FED_MIN_ELEMENTS = 1024
#: (op, domain) -> the first input that kernel prepacks: never fed (see the module docstring).
_PREPACKED_FROM = {("MatMulNBits", "com.microsoft"): 1}
#: Element types onnxruntime's Python API accepts as NumPy inputs.
_FEEDABLE = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16})


def split_weights(model: onnx.ModelProto, known: dict[str, np.ndarray] | None = None
                  ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """``model`` without its large float initializers, and those as arrays keyed by name.

    ``known`` holds arrays the caller already has for some initializers (the loaded graph's
    constants): they are used as they are. Other arrays are read-only views over one copy of
    each tensor's bytes (the protobuf field cannot be viewed in place). The light model
    declares them as graph inputs.
    """
    known = known or {}
    light = onnx.ModelProto()
    io.copy_fields(model, light, skip={"graph"})
    io.copy_fields(model.graph, light.graph, skip={"initializer"})
    declared = {v.name for v in model.graph.input}
    prepacked = {name for node in model.graph.node
                 for name in node.input[_PREPACKED_FROM.get((node.op_type, node.domain),
                                                            len(node.input)):]}
    weights: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        have = known.get(tensor.name)
        if tensor.name in prepacked:
            if have is not None and tensor.data_location == TensorProto.EXTERNAL:
                tensor = numpy_helper.from_array(np.asarray(have), tensor.name)
            light.graph.initializer.append(tensor)
            continue
        if have is not None and (
                have.dtype != onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                or have.shape != tuple(tensor.dims)):
            have = None
        if have is not None and tensor.data_type in _FEEDABLE and have.size >= FED_MIN_ELEMENTS:
            weights[tensor.name] = have  # mapped external data, or the graph's own array
        elif tensor.data_type in _FEEDABLE and tensor.data_location != TensorProto.EXTERNAL \
                and int(np.prod(tensor.dims)) >= FED_MIN_ELEMENTS:
            weights[tensor.name] = numpy_helper.to_array(tensor)
        elif have is not None and tensor.data_location == TensorProto.EXTERNAL:
            # mapped but not fed (shapes, sizes): onnxruntime must see its value as a constant
            light.graph.initializer.append(numpy_helper.from_array(np.asarray(have), tensor.name))
            continue
        else:
            light.graph.initializer.append(tensor)
            continue
        if tensor.name not in declared:
            light.graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    return light, weights


#: Weights above this size are worth a full garbage collection when a session closes.
COLLECT_ABOVE_BYTES = 64 << 20

class WeightFedSession:
    """A CPU session of a light model whose weights are fed on every run.

    ``error`` holds onnxruntime's first line when the session could not be built.
    """

    def __init__(self, light: onnx.ModelProto, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights
        self.session = None
        self.error: str | None = None
        try:
            self.session = make_session(light.SerializeToString())
        except Exception as err:
            self.error = _first_line(err)

    @classmethod
    def of(cls, model: onnx.ModelProto) -> WeightFedSession:
        return cls(*split_weights(model))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.session is None:
            raise RuntimeError(self.error)
        return self.session.run(None, {**feeds, **self.weights})

    def close(self) -> None:
        """Drop the session and the weight arrays now (before the next session is built).

        A full garbage collection makes sure nothing in a reference cycle keeps a big model's
        arrays alive; it costs ~0.1 s in a process with many objects, so small models skip it.
        """
        held = sum(np.asarray(a).nbytes for a in self.weights.values())
        self.session = None
        self.weights = {}
        if held >= COLLECT_ABOVE_BYTES:
            gc.collect()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
