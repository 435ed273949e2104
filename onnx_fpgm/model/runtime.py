"""Running a model: onnxruntime sessions and seeded random inputs.

Every stage that runs a model (verification, size probing, calibration, timing, compensation)
needs these, so they sit at the bottom with the model's load and save.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import onnx

from ..errors import ConfigError
from . import io, mapped, save
from .input_ranges import draw_integers, integer_ranges

#: Symbols that name nothing: each occurrence is a dim of its own (Paddle writes ``?`` twice).
ANONYMOUS = frozenset({"", "?", "-1", "None", "none", "unk", "unknown", "dynamic"})

def is_float(dtype: np.dtype) -> bool:
    """numpy floats plus ml_dtypes' (bfloat16, float8...), which numpy files under void."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float"))


def is_unknown(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """A dim without a positive value (a name, ``-1`` as exporters write it, or nothing)."""
    return not dim.HasField("dim_value") or dim.dim_value < 0


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def check_given(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Given sizes must name real inputs and match their rank.

    Raises:
        ConfigError: naming the input and ``--input-shape``.
    """
    inputs = {v.name: v for v in real_inputs(model)}
    for name, shape in shapes.items():
        if name not in inputs:
            raise ConfigError(f"--input-shape names {name!r}, which is not a graph input "
                              f"(inputs: {', '.join(inputs)})")
        rank = len(inputs[name].type.tensor_type.shape.dim)
        if rank and len(shape) != rank:
            raise ConfigError(f"--input-shape {name} has {len(shape)} dims, the input has {rank}")


def make_session(model: onnx.ModelProto | bytes, *, optimize: bool = False,
                 provider: str = "CPUExecutionProvider", threads: int = 0, quiet: bool = False):
    """An onnxruntime session on bytes; spinning off so sessions coexist.

    ``quiet`` silences onnxruntime's own error log too (for runs that may fail on purpose).

    A model too large for one protobuf message (``io.too_large``) cannot become bytes: it is
    written to a temporary directory with external data and the session reads that path. A
    mapped model (``mapped.reading_from``) is its small header: its data stays in its files.
    """
    import onnxruntime as ort  # imported on first use: keeps it off the CLI's start-up path

    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    directory = mapped.EXTERNAL_DIR.get()
    header = isinstance(model, onnx.ModelProto) and io.has_external_data(model)
    if isinstance(model, onnx.ModelProto) and not header and io.too_large(model):
        with tempfile.TemporaryDirectory(prefix="onnx-fpgm-") as tmp:
            path = Path(tmp) / "model.onnx"
            save.save_model(model, path, external_data=True)
            with _time_limit():
                return ort.InferenceSession(str(path), options, providers=[provider])
    if directory is not None and (header or isinstance(model, bytes)):
        # a mapped model's stubs name files relative to its directory
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(directory))
    data = model if isinstance(model, bytes) else model.SerializeToString()
    with _time_limit():
        return ort.InferenceSession(data, options, providers=[provider])


#: Seconds one onnxruntime session may take to load a model before the process gives up
#: (``None``: no limit, the API's default; the CLI sets one: ``limit_sessions``).
SESSION_TIME_LIMIT_S: float | None = None
#: Environment variable overriding the CLI's limit (seconds).
SESSION_LIMIT_ENV = "ONNX_FPGM_SESSION_LIMIT_S"


def limit_sessions(default_s: float = 900.0) -> None:
    """From now on a session that takes longer than the limit to load ends the process with
    exit 2 and one line (onnxruntime's check of some crafted models never returns, and a
    thread inside it cannot be stopped). For the command line only: it runs before OUT is
    written, so nothing is left behind."""
    global SESSION_TIME_LIMIT_S
    try:
        SESSION_TIME_LIMIT_S = float(os.environ.get(SESSION_LIMIT_ENV, default_s))
    except ValueError:
        SESSION_TIME_LIMIT_S = default_s


@contextlib.contextmanager
def _time_limit():
    limit = SESSION_TIME_LIMIT_S
    if limit is None:
        yield
        return

    def give_up() -> None:
        sys.stderr.write(f"onnx-fpgm: error: onnxruntime did not finish loading the model "
                         f"within {limit:g} s (a model it cannot check?); nothing was written\n")
        sys.stderr.flush()
        os._exit(2)

    watchdog = threading.Timer(limit, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()


def random_inputs(model: onnx.ModelProto, seed: int = 0,
                  shapes: dict[str, tuple[int, ...]] | None = None, *,
                  positive_scalars: bool = False,
                  variant: int | None = None) -> dict[str, np.ndarray]:
    """Seeded random feeds for every real graph input (symbolic dims from ``shapes`` or 1).

    Floats are standard normal; integers are drawn from what they index (below the rows of the
    table a token id, position or token type gathers from; 0/1 rows, ones first, for a mask:
    see ``input_ranges``), so that the model runs on them. Every stage that runs a model
    (size probing, verification, calibration fill-ins, timing) draws here.
    ``positive_scalars`` draws one-element float inputs as magnitudes: scalars such as a
    frequency range's bounds, where a negative value makes the model itself output NaN (the
    oracle redraws with it). ``variant`` k draws the k-th value integer inputs are compared
    with (an If's branch: ``input_ranges.variant_count``), the last variant none of them.
    """
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    initializers = {t.name for t in model.graph.initializer}
    check_given(model, shapes)
    ranges = integer_ranges(model)
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        ttype = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
        if value.name in shapes:
            shape = tuple(shapes[value.name])
        else:
            dims = ttype.shape.dim
            unknown = [i for i, d in enumerate(dims) if is_unknown(d)]
            if any(i > 0 for i in unknown):
                names = [dims[i].dim_param or "?" for i in unknown]
                example = [str(d.dim_value) if not is_unknown(d) else
                           "1" if i == 0 else d.dim_param or f"D{i + 1}"
                           for i, d in enumerate(dims)]  # the batch defaults to 1
                missing = [example[i] for i in unknown if i > 0]
                raise ConfigError(f"input {value.name} has symbolic dims {names}: verification "
                                  f"needs concrete sizes; give --input-shape "
                                  f"{value.name}={','.join(example)} with numbers for "
                                  f"{', '.join(missing)} (input_shapes= in Python)")
            shape = tuple(1 if is_unknown(d) else d.dim_value for d in dims)
        if is_float(dtype):
            values = rng.standard_normal(shape)
            if positive_scalars and values.size == 1:
                values = np.abs(values) + 0.5
            feeds[value.name] = np.asarray(values, dtype)
        elif value.name in ranges:
            feeds[value.name] = draw_integers(rng, shape, dtype, ranges[value.name],
                                               variant)
        else:
            feeds[value.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds
