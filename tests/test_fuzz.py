"""Random-architecture property test: prune() either verifies or refuses with a clear message.

For a random model (``tests/fuzz_models.py``), a random sparsity in [0, 1] and random options,
``onnx_fpgm.prune`` must either

* return a model that matches the masked original (prune() verifies internally; a
  ``VerificationError`` fails the property), keeps the graph interface, passes
  ``onnx.checker.check_model(full_check=True)`` and the independent checks of
  ``tests.conftest.check_pruned``; or
* refuse with an ``OnnxFpgmError`` other than ``VerificationError``/``RewriteError``, with a
  message.

Anything else (another exception, a verification or rewrite error) is a failure.

The default run is a fast, deterministic profile (``derandomize=True``, no example database).
``ONNX_FPGM_FUZZ_EXAMPLES=N`` runs N examples instead (a soak), e.g.::

    ONNX_FPGM_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py -q -x -p no:logging

and ``ONNX_FPGM_FUZZ_SEED=S`` draws other examples than the default ones (still reproducible),
``ONNX_FPGM_FUZZ_BLOCKS=16`` builds larger graphs.

A failure prints ``random_model(seed, max_blocks=...)`` and the options; rebuild that model and
shrink it into ``tests/test_regressions.py`` by hand.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import onnx_fpgm
from onnx_fpgm.model.runtime import make_session, random_inputs
from tests.conftest import check_pruned
from tests.fuzz_models import random_model

FAST_EXAMPLES = 300
EXAMPLES = int(os.environ.get("ONNX_FPGM_FUZZ_EXAMPLES", FAST_EXAMPLES))
SOAK_SEED = os.environ.get("ONNX_FPGM_FUZZ_SEED")

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=SOAK_SEED is None,  # the same examples on every run: CI is deterministic
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

#: Errors that are bugs, never acceptable refusals.
BUGS = (onnx_fpgm.VerificationError, onnx_fpgm.RewriteError)
PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

#: Model seeds. Hypothesis reuses small integers heavily (one seed in four would be 1); four
#: integers mixed by SeedSequence give mostly distinct models.
SEED = st.tuples(*[st.integers(0, 2**32 - 1)] * 4).map(
    lambda ints: int(np.random.SeedSequence(list(ints)).generate_state(1)[0]))
#: Hypothesis favours boundary values (0, 1, tiny floats); the grid keeps most runs pruning.
SPARSITY = st.one_of(st.integers(1, 19).map(lambda k: k / 20), st.floats(0.0, 1.0))
#: Mostly full-size models; smaller block counts are what shrinking moves towards.
#: ``ONNX_FPGM_FUZZ_BLOCKS`` raises the cap (up to 16) for soaks of larger graphs.
BLOCKS = int(os.environ.get("ONNX_FPGM_FUZZ_BLOCKS", 8))
MAX_BLOCKS = st.one_of(st.sampled_from(range(BLOCKS + 1)), st.just(BLOCKS))
#: Mostly none; else one (pattern, sparsity) pair for a family of producers.
LAYER_SPARSITY = st.one_of(
    st.just(()), st.just(()), st.just(()),
    st.tuples(st.tuples(st.sampled_from(["^conv", "fc|gemm", "dwconv|se_"]), SPARSITY)))
OPTIONS = st.fixed_dictionaries({
    "sparsity": SPARSITY,
    "layer_sparsity": LAYER_SPARSITY,
    "dist": st.sampled_from([1, 2]),
    "round_to": st.sampled_from([None, 2, 4, 8]),
    "min_channels": st.integers(1, 3),
    "strict": st.sampled_from([False] * 9 + [True]),
})


def _exclude(model: onnx.ModelProto, data: st.DataObject) -> tuple[str, ...]:
    """No exclusion mostly; else a pattern for one producer, a family, or a match-nothing one."""
    producers = [n.name for n in model.graph.node if n.op_type in PRODUCERS]
    kind = data.draw(st.sampled_from(["none", "none", "none", "node", "family", "nothing",
                                      "none", "none", "none", "node", "family", "invalid"]),
                     label="exclude kind")
    if kind == "invalid":  # must be refused with a ConfigError naming the pattern
        return ("conv_(1",)
    if kind == "node" and producers:
        return (f"^{data.draw(st.sampled_from(producers), label='excluded node')}$",)
    if kind == "family":
        return (data.draw(st.sampled_from(["^conv", "gemm|fc", "dwconv|se_", "_1\\d$"]),
                          label="excluded family"),)
    if kind == "nothing":
        return ("^no_such_node$",)
    return ()


def _interface(model: onnx.ModelProto) -> tuple[list, list]:
    return ([(v.name, v.type.SerializeToString()) for v in model.graph.input],
            [(v.name, v.type.SerializeToString()) for v in model.graph.output])


def check_generated(model: onnx.ModelProto) -> None:
    """The generator's contract: full checker, onnxruntime runs it, outputs as declared."""
    onnx.checker.check_model(model, full_check=True)
    outputs = make_session(model, optimize=True).run(None, random_inputs(model, 0))
    for value, info in zip(outputs, model.graph.output, strict=True):
        assert list(value.shape) == [d.dim_value for d in info.type.tensor_type.shape.dim]
        assert np.isfinite(value).all(), info.name
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)


@contextlib.contextmanager
def _in_empty_directory():
    """Run in a fresh working directory; yields the list of files left behind (filled after)."""
    left: list[str] = []
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnx-fpgm-fuzz-") as where:
        os.chdir(where)
        try:
            yield left
        finally:
            os.chdir(previous)
            left.extend(sorted(os.listdir(where)))


def dead_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of nodes none of whose outputs reaches a graph output."""
    needed = {o.name for o in model.graph.output}
    live = set()
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            live.add(node.name)
            needed.update(node.input)
    return {n.name for n in model.graph.node} - live


def known_issue(model: onnx.ModelProto, stray_files: list[str], error: BaseException | None,
                pruned: onnx.ModelProto | None = None):
    """The regression test of an open, diagnosed bug this failure matches, or None.

    Every entry is an ``xfail(strict=True)`` test in ``tests/test_regressions.py``: once the bug
    is fixed, that test fails (XPASS) and its entry here must go.
    """
    # No diagnosed bug is open at the moment (the ones found were fixed; see
    # tests/test_regressions.py).
    return None


def expected_keep(n: int, producers: list[str], options: dict) -> int:
    """Channels a group of ``n`` keeps, as the README states the rule (not plan.n_to_keep)."""
    sparsity = next((value for pattern, value in options["layer_sparsity"]
                     if any(re.search(pattern, name) for name in producers)),
                    options["sparsity"])
    keep = max(n - round(sparsity * n), min(options["min_channels"], n))
    round_to = options["round_to"]
    if round_to and round_to > 1:
        keep = max(round_to, math.ceil(keep / round_to) * round_to)
    return min(keep, n)


def check_counts(result: onnx_fpgm.PruneResult, options: dict) -> None:
    """Every group keeps what the rule says, or all of it with a reason."""
    for group in result.report.groups:
        if group.frozen:
            assert group.channels_after == group.channels_before, group
        else:
            assert group.channels_after == expected_keep(group.channels_before, group.producers,
                                                         options), group
    if options["sparsity"] == 0 and not options["layer_sparsity"]:
        assert not result.plan.n_removed


def check_layers(model: onnx.ModelProto, result: onnx_fpgm.PruneResult) -> None:
    """The report's per-layer kept indices agree with the pruned model's output widths."""
    dead = dead_nodes(model)
    inferred = onnx.shape_inference.infer_shapes(result.model)
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None
                     for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.output]}
    nodes = {n.name: n for n in result.model.graph.node}
    for layer in result.report.layers:
        assert layer.kept == sorted(set(layer.kept)), layer
        assert len(layer.kept) == layer.channels_after, layer
        assert all(0 <= k < layer.channels_before for k in layer.kept), layer
        if layer.name not in nodes and layer.name in dead:
            event("known: test_pruning_keeps_nodes_that_feed_no_output")
            continue
        shape = dims.get(nodes[layer.name].output[0])
        if shape:
            width = shape[-1 if layer.op == "MatMul" else 1]
            assert width in (None, layer.channels_after), (layer, shape)


def check_property(model: onnx.ModelProto, options: dict) -> str:
    """Prune ``model``; returns "pruned", "unchanged" or "refused", raising on a failure.

    A failure that matches a diagnosed open bug (``known_issue``) is reported as an event
    ("known: <test>") instead; a stray file does not stop the other checks.
    """
    error: BaseException | None = None
    outcome = "refused"
    with _in_empty_directory() as stray_files:
        try:
            result = onnx_fpgm.prune(model, device="cpu", **options)
        except BUGS:
            raise
        except onnx_fpgm.OnnxFpgmError as err:  # a refusal: allowed, with a message
            assert str(err).strip(), f"{type(err).__name__} without a message"
            if options["strict"]:  # the only refusal a valid model may get
                assert isinstance(err, onnx_fpgm.UnsupportedOpError), err
                assert "unsupported op" in str(err), err
        else:
            outcome = "pruned" if result.plan.n_removed else "unchanged"
    if stray_files:
        known = known_issue(model, stray_files, None)
        assert known, f"prune() wrote files into the working directory: {stray_files}"
        event(f"known: {known}")
    if outcome == "refused":
        return outcome
    assert _interface(result.model) == _interface(model), "graph inputs/outputs changed"
    check_counts(result, options)
    check_layers(model, result)
    if options["strict"]:
        assert not any(g.frozen and "unsupported op" in g.frozen for g in result.report.groups)
    with _in_empty_directory():  # check_pruned's own shape inference may leave the same file
        try:
            check_pruned(model, result)  # full checker, names, the oracle rerun, copied weights
        except AssertionError as err:
            error = err
    known = known_issue(model, [], error, result.model) if error else None
    if known:
        return f"known: {known}"
    if error:
        raise error
    return outcome


@FUZZ
@(hypothesis_seed(int(SOAK_SEED)) if SOAK_SEED else lambda test: test)
@given(seed=SEED, max_blocks=MAX_BLOCKS, options=OPTIONS, data=st.data())
def test_random_architecture_prunes_exactly_or_refuses(seed: int, max_blocks: int,
                                                       options: dict,
                                                       data: st.DataObject) -> None:
    model = random_model(seed, max_blocks=max_blocks)
    onnx.checker.check_model(model, full_check=True)
    options = {**options, "exclude": _exclude(model, data)}
    note(f"model: random_model({seed}, max_blocks={max_blocks}); options: {options!r}")
    event(f"opset {model.opset_import[0].version}")
    if options["exclude"] == ("conv_(1",):
        with pytest.raises(onnx_fpgm.ConfigError, match=re.escape("conv_(1")):
            onnx_fpgm.prune(model, device="cpu", **options)
        event("refused")
        return
    event(check_property(model, options))


@pytest.mark.parametrize("seed", range(40))
def test_generator_builds_valid_models(seed: int) -> None:
    check_generated(random_model(seed, max_blocks=8 if seed % 2 else 16))


@pytest.mark.parametrize("max_blocks", [0, 1, 16])
def test_generator_is_deterministic(max_blocks: int) -> None:
    model = random_model(7, max_blocks=max_blocks)
    assert model.SerializeToString() == random_model(7, max_blocks=max_blocks).SerializeToString()
    check_generated(model)


def test_generator_covers_every_opset() -> None:
    opsets = {random_model(seed).opset_import[0].version for seed in range(200)}
    assert opsets == set(range(11, 22))
