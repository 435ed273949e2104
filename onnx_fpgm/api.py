"""``prune()``: load -> analyse -> score (or allocate a target, or read a saved plan) -> plan ->
rewrite -> verify -> compensate / recover -> measure."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from .config import PruneConfig
from .deps import handlers  # noqa: F401  (registers every op handler)
from .deps.analysis import build_analysis
from .deps.channels import Analysis
from .deps.constants import fold_constant_shapes
from .deps.interface import interface_changes, refuse_data_options, resized, resized_shapes
from .deps.op_families import QUANTIZED_LAYERS, RECURRENT_OPS
from .deps.registry import handler_for
from .deps.rewrite import apply_plan
from .errors import ConfigError, UnsupportedOpError, VerificationError
from .importance.cost import freeze_costly_groups
from .measure.bench import MAC_OPS, ModelSize, count_macs, count_params
from .measure.bench import benchmark as _benchmark
from .measure.calibration import fidelity, load_calibration, verification_feeds
from .model import export, io, mapped, save
from .model.outer_scope import layers_in_bodies
from .oracle.input_sizes import choose_sizes
from .oracle.sized_shapes import infer_shapes_at
from .oracle.symbolic_dims import InputSizes
from .oracle.validate import CompareResult, smoke_check
from .oracle.validate import verify as _verify
from .oracle.weight_feeds import COLLECT_ABOVE_BYTES
from .planning.allocate import channel_scorer, plan_to_target
from .planning.plan import PrunePlan, plan_pruning
from .planning.plan_io import plan_from_report
from .recover.compensate import compensate, find_consumers
from .recover.layers import uncompensated
from .recover.obs import ObsCriterion
from .report import GroupReport, LayerReport, Report

logger = logging.getLogger(__name__)

#: A progress callback: ``progress(phase, total)`` starts a phase and returns an ``advance(n)``.
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass
class PruneResult:
    """A pruned model and what was done to it.

    Attributes:
        model: the pruned model.
        report: per-layer and per-group decisions, sizes, verification and timings.
        plan: the decision per group (kept channel positions).
        original: the input model. For an input whose external data were memory-mapped
            (``mapped.MAP_EXTERNAL_BYTES`` or more), its large initializers still reference the
            input's data file: ``onnx.load`` the input for a copy with the data.
        external_data: the input stored its weights as external data (kept on save).
        input_sizes: the input sizes verification and MACs used.
    """

    model: onnx.ModelProto
    report: Report
    plan: PrunePlan
    original: onnx.ModelProto = field(repr=False)
    analysis: Analysis = field(repr=False)
    external_data: bool = False
    #: Sizes of the inputs used for verification and MACs (chosen when dims are symbolic).
    input_sizes: InputSizes | None = field(default=None, repr=False)
    #: What was read (``mapped.Loaded``): the input's files and where its mapped data lies.
    source: mapped.Loaded | None = field(default=None, repr=False)

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None,
             genai_config: bool = True) -> None:
        """Write the pruned model atomically, as a pair with its data file (external data when
        the input had it or > 2 GB); OUT carries all its data and overwrites no input file.
        With ``allow_interface_change`` IN's genai_config.json is rewritten beside OUT too
        (``save.genai_config_writer``: its OutputError or ConfigError come before any write)."""
        started = time.perf_counter()
        use_external = self.external_data if external_data is None else external_data
        source = self.source or mapped.Loaded(self.original, self.external_data)
        allowed = genai_config and self.report.settings.get("allow_interface_change") == "true"
        genai = allowed and save.genai_config_writer(path, source.read_files(), self.model,
                                                     self.report.interface_changes)
        save.save_model(self.model, path, external_data=use_external,
                        source_dir=source.directory, reads=source.read_files())
        if genai:
            self.report.notes.append(genai())
        self.report.timings_s["save"] = time.perf_counter() - started


@contextmanager
def _timed(report: Report, phase: str):
    started = time.perf_counter()
    yield
    report.timings_s[phase] = report.timings_s.get(phase, 0.0) + time.perf_counter() - started


def prune(model: str | os.PathLike | onnx.ModelProto | mapped.Loaded, sparsity: float = 0.5, *,
          config: PruneConfig | None = None, progress: Progress | None = None,
          cache: dict | None = None, **options) -> PruneResult:
    """Prune ``model`` by FPGM and verify the result.

    Args:
        model: a path to an ``.onnx`` file (external data is read too), a ``ModelProto``, or
            a model loaded once for many prunes (``mapped.load_mapped``: a sweep).
        sparsity: fraction of each group's channels to remove (ignored when ``config`` is given).
        config: all options at once; otherwise ``options`` are ``PruneConfig`` fields.
        progress: optional progress callback for long phases.
        cache: a dict kept by the caller between runs on the same model and settings (a
            sweep): measured sensitivities and channel scores are reused from it.

    Returns:
        The pruned model with its report.

    Raises:
        ModelLoadError: unreadable or invalid input.
        ConfigError: invalid options, or a target that cannot be reached.
        PlanError: a saved plan (``plan=``) that does not fit the model.
        UnsupportedOpError: under ``strict``, when an unsupported op blocks pruning.
        VerificationError: the pruned model does not match the masked original.
    """
    config = config or PruneConfig(sparsity=sparsity, **options)
    if config.target_latency is not None:  # a search over prunes: outcome.entry dispatches it
        raise ConfigError("target_latency is searched by timing: call onnx_fpgm.prune")
    report = Report(settings=config.to_metadata())
    with _timed(report, "load"):
        loaded = model if isinstance(model, mapped.Loaded) else mapped.load_mapped(model)
        opset = io.default_opset(loaded.model)
    with mapped.reading_from(loaded):
        return _prune_loaded(loaded, config, report, opset, progress, cache)


def _prune_loaded(loaded: mapped.Loaded, config: PruneConfig, report: Report, opset: int,
                  progress: Progress | None, cache: dict | None) -> PruneResult:
    original, external = loaded.model, loaded.external
    with _timed(report, "sizes"):
        sizes = choose_sizes(original, dict(config.input_shapes), seed=config.seed,
                             must_run=config.verify)
    report.input_sizes = sizes.to_dict()
    runtime_ops = io.runtime_only_ops(original)
    if runtime_ops:
        report.notes.append(
            f"onnx.checker does not know {', '.join(runtime_ops)} (default domain), which "
            "onnxruntime registers (its tools write them there): loaded, and both the input and "
            "the pruned model were checked with those nodes left to onnxruntime")
    report.notes.extend(n for n in (sizes.budget_note, sizes.note) if n)
    with _timed(report, "analyse"):
        shapes = infer_shapes_at(original, sizes) if sizes.dims else \
            io.infer_shapes(io.light_copy(original))
        graph = io.import_graph(original, shapes)
        mapped.attach_weights(graph, loaded.weights)
        fold_constant_shapes(graph)
        overridable = io.overridable_inputs(original)
        analysis = build_analysis(graph, opset, overridable, config.allow_interface_change)
        # the arrays the analysis read, before the rewrite replaces them: the oracle shares them
        weights = io.loaded_constants(graph) if config.verify else None
    if config.strict:
        _check_strict(analysis)
    with _timed(report, "score"):
        # sizes chosen for symbolic dims: the cost model counts at them, and a folder of
        # calibration images is read at them (the OBS statistics, the allocation's sensitivity)
        sized = replace(config, input_shapes=tuple(sizes.primary.items()))
        if not config.plan and config.criterion in ("fpgm", "obs"):  # obs falls back to FPGM
            freeze_costly_groups(analysis, config.dist, config.max_scoring_work)
        score = _scorer(sized, original, analysis)
        if config.plan:
            plan, matched_by = plan_from_report(config.plan, analysis)
            report.notes.append(f"plan re-applied from {config.plan} (producers matched by "
                                f"{matched_by})")
        elif config.target:
            plan, report.target = plan_to_target(analysis, graph, original, sized, score,
                                                 progress, cache)
        else:
            advance = progress("scoring", len(analysis.groups)) if progress else None
            plan = plan_pruning(analysis, config, score, advance)
    if isinstance(score, ObsCriterion):
        report.notes.extend(score.notes)
    quantized = _quantized_layers(graph)
    with _timed(report, "rewrite"):
        changes = interface_changes(analysis, plan.removed_classes, original)
        refuse_data_options(changes, config)
        report.interface_changes = [c.to_dict() for c in changes]
        if plan.n_removed:
            notes = apply_plan(graph, analysis, plan.removed_classes, opset)
            metadata = {f"onnx_fpgm.{k}": v for k, v in config.to_metadata().items()}
            pruned = export.export_graph(graph, original, metadata, resized(changes))
            io.check_pruned(pruned, original)
        else:  # nothing to remove: the input as it is (value_info, IR version, every opset)
            notes, pruned = [], original
        # the pruned protobuf holds the sliced weights now: the graph's arrays of them would
        # stay alive (a second copy) through verification
        graph = None
        io.release_free_memory(collect=io.weight_bytes(pruned) >= COLLECT_ABOVE_BYTES)
    report.notes.extend(notes)
    listed = io.initializer_inputs(original)
    if listed and not overridable and plan.n_removed:
        report.notes.append(
            f"all {len(listed)} initializers are also listed as graph inputs (an old exporter's "
            "form): they were taken as weights, as onnxsim takes them; the pruned ones stay "
            "listed as inputs with their new shapes (a caller who feeds one feeds that shape)")
    if pruned is not original and len(original.training_info):
        report.notes.append(
            f"training_info ({len(original.training_info)} entr"
            f"{'y' if len(original.training_info) == 1 else 'ies'}) not written to OUT: its "
            "training graphs and update bindings refer to the weights as they were before "
            "pruning; re-create it for the pruned model")
    _note_alignment(report, analysis, plan, config)
    _fill_decisions(report, analysis, plan)
    input_shapes = sizes.primary
    with _timed(report, "measure"):
        report.before = ModelSize(count_params(original), count_macs(original, input_shapes),
                                  io.weight_bytes(original))
        report.after = ModelSize(count_params(pruned), count_macs(  # at its own cache sizes
            pruned, resized_shapes(input_shapes, changes)), io.weight_bytes(pruned))
    if report.target is not None:
        _check_target(report)
    calibration = load_calibration(config.calibration, original, sized) \
        if config.calibration else None
    if calibration is not None and calibration.drawn:
        report.notes.append(f"{config.calibration} has no array for {', '.join(calibration.drawn)}:"
                            " drawn as random inputs are (from what they index)")
    if config.verify:
        with _timed(report, "verify"):
            advance = progress("verifying", 1) if progress else None
            samples = verification_feeds(calibration, original) if calibration else None
            result = _verify(original, pruned, analysis=analysis,
                             removed_classes=plan.removed_classes, opset=opset,
                             seed=config.seed, size_sets=sizes.sets, weights=weights,
                             extra_feeds=samples, interface_changes=changes)
            if advance:
                advance(1)
        report.verification = _verification_dict(result)
        if not result:
            raise VerificationError(f"verification failed: {result.summary()}")
    weights = None
    io.release_free_memory()
    if config.calibration or config.evaluation or config.compensate != "none":
        if config.compensate != "none" or config.recover != "none":  # they read the data
            original = mapped.with_data(original)  # from the protobuf
        with _timed(report, "compensate"):
            pruned = _compensate_and_measure(original, pruned, analysis, plan, config, report,
                                             sizes.primary, calibration, progress)
    if quantized:
        report.notes.append(
            f"{len(quantized)} QOperator/integer layer(s) left unpruned ({', '.join(quantized[:6])}"
            f"{', ...' if len(quantized) > 6 else ''}): onnx-fpgm has no handler for them yet, so "
            "their integer weights, scales and zero points stay whole; QDQ models (weights "
            "through DequantizeLinear) are pruned: quantize with the QDQ format, or prune the "
            "float model before quantizing")
    removed = analysis.removed_atoms(plan.removed_classes)
    changed = {m.node for m in analysis.members if removed[m.atoms].any()}
    in_bodies = [layer for layer in layers_in_bodies(original, (*MAC_OPS, *RECURRENT_OPS))
                 if layer.split(" ", 1)[1] not in changed]
    if in_bodies:
        report.notes.append(
            f"{len(in_bodies)} layer(s) inside If/Loop/Scan bodies left untouched "
            f"({', '.join(in_bodies[:4])}{', ...' if len(in_bodies) > 4 else ''}): onnx-fpgm "
            "prunes inside If/Loop/Scan bodies only channels that stay inside the body (not "
            "those reaching its outputs); an export without control flow (e.g. one traced at "
            "a fixed sample rate or sequence length) can be pruned there")
    if not analysis.sources:
        report.notes.append("no prunable layer: the model has no Conv, ConvTranspose, Gemm or "
                            "MatMul with constant weights (stored, or dequantized from stored "
                            f"integers){' outside control flow' if in_bodies else ''}; written "
                            "unchanged")
    elif not plan.n_removed:
        report.notes.append("nothing was pruned: no prunable group lost a channel "
                            "(the frozen reasons are listed above)")
    source = mapped.Loaded(loaded.model, external, directory=loaded.directory, files=loaded.files)
    return PruneResult(pruned, report, plan, original, analysis, external, sizes, source)


def verify(original: onnx.ModelProto | str, pruned: onnx.ModelProto | str, *, seed: int = 0,
           input_shapes: dict[str, tuple[int, ...]] | None = None) -> CompareResult:
    """Run both models on the same random inputs and compare every output.

    Used on its own (without the analysis), the reference is ``original`` itself: use it for
    models that should be numerically identical (e.g. a sparsity-0 run, or a re-export).
    Symbolic input dims get sizes as in ``prune`` (two sets where the model allows).
    """
    original, _ = io.load_model(original)
    pruned, _ = io.load_model(pruned)
    sizes = choose_sizes(original, input_shapes, seed=seed)
    return _verify(original, pruned, seed=seed, size_sets=sizes.sets)


def benchmark(original: onnx.ModelProto | str, pruned: onnx.ModelProto | str, *,
              runs: int = 30, warmup: int = 5, provider: str | None = None,
              input_shapes: dict[str, tuple[int, ...]] | None = None):
    """Latency of both models, interleaved in one process (see ``bench.benchmark``)."""
    original, _ = io.load_model(original)
    pruned, _ = io.load_model(pruned)
    return _benchmark(original, pruned, runs=runs, warmup=warmup, provider=provider,
                      input_shapes=choose_sizes(original, input_shapes).primary)


def _compensate_and_measure(original, pruned, analysis, plan, config, report,
                            input_shapes, calibration, progress=None) -> onnx.ModelProto:
    """Apply --compensate (choosing the best for ``auto``), then --recover, and report fidelity
    on real data (``calibration``: loaded once by the run, sized like it)."""
    config = replace(config, input_shapes=tuple(input_shapes.items()))
    if config.compensate == "auto" and calibration is None:
        raise ConfigError("--compensate auto needs --calibration data to choose")
    removed_atoms = analysis.removed_atoms(plan.removed_classes)
    consumers = find_consumers(original, analysis, removed_atoms)
    if config.compensate != "none":
        report.notes.extend(f"{name}: quantized codes (MatMulNBits); not compensated"
                            for name in uncompensated(original, analysis, removed_atoms))
    modes = ("none", "bias", "lstsq") if config.compensate == "auto" else (config.compensate,)
    candidates = []
    for mode in modes:
        model, notes = compensate(original, pruned, consumers, mode, calibration)
        scores = fidelity(original, model, original, calibration) if calibration else None
        candidates.append((mode, model, notes, scores))

    def quality(candidate) -> tuple:  # the worst output part decides, not the average
        scores = candidate[3] or []
        accuracy = min((f.accuracy_pruned for f in scores if f.accuracy_pruned is not None),
                       default=0.0)
        agreement = min((f.top1_agreement for f in scores if f.top1_agreement is not None),
                        default=0.0)
        return (accuracy, agreement, -max((f.relative_error for f in scores), default=0.0))

    mode, model, notes, scores = max(candidates, key=quality)
    report.notes.extend(notes)
    report.compensation = mode
    if config.compensate == "auto":
        report.notes.append("compensate auto: " + ", ".join(
            f"{m}: " + "; ".join(f.summary() for f in (sc or [])) for m, _, _, sc in candidates)
            + f" -> chose {mode}")
    evaluation = load_calibration(config.evaluation, original, config) \
        if config.evaluation else None
    if config.recover == "distill":
        model = _recover(original, model, analysis, plan, config, calibration,
                         evaluation or calibration, report, input_shapes, progress)
    if evaluation is not None:
        scores = fidelity(original, model, original, evaluation)
        report.fidelity_on = "evaluation"
    elif config.recover != "none":
        scores = fidelity(original, model, original, calibration)
        report.fidelity_on = "calibration"
    elif scores:
        report.fidelity_on = "calibration"
    if scores:
        report.fidelity = [f.summary() for f in scores]
        report.fidelity_data = [dict(vars(f)) for f in scores]
    if report.recovery is not None:
        report.recovery.fidelity_after = [f.summary() for f in scores]
    if any(Path(p).is_dir() for p in (config.calibration, config.evaluation) if p):
        report.notes.append(f"images read as {config.image_scaling.describe()}")
    if mode != "none" or config.recover != "none":
        problem = smoke_check(original, model, seed=config.seed, input_shapes=input_shapes)
        if problem:
            raise VerificationError(f"compensated model fails: {problem}")
        report.after = ModelSize(count_params(model),
                                 count_macs(model, input_shapes),
                                 io.weight_bytes(model))
    return model


def _recover(original, model, analysis, plan, config, calibration, data, report,
             input_shapes, progress) -> onnx.ModelProto:
    """--recover distill from ``model`` (the plain or compensated rewrite); the trained model
    must run in onnxruntime with ``model``'s interface."""
    # torch (the trainer and the device choice): loaded on first use, off the start-up path
    from .importance.fpgm import resolve_device
    from .recover.distill import distill

    before = fidelity(original, model, original, data)
    trained, recovery = distill(
        original, model, analysis, analysis.removed_atoms(plan.removed_classes), calibration,
        steps=config.recover_steps, time_limit=config.recover_time,
        device=resolve_device(config.device), seed=config.seed, progress=progress)
    recovery.fidelity_before = [f.summary() for f in before]
    report.recovery = recovery

    def interface(m: onnx.ModelProto) -> list[bytes]:
        return [v.SerializeToString() for v in (*m.graph.input, *m.graph.output)]

    if interface(trained) != interface(model):
        raise VerificationError("distilled model's inputs/outputs differ from the pruned model's")
    problem = smoke_check(model, trained, seed=config.seed, input_shapes=input_shapes)
    if problem:
        raise VerificationError(f"distilled model fails: {problem}")
    return trained


def _check_target(report: Report) -> None:
    """Record the measured ratio; a cost model that disagrees with the count is noted."""
    outcome = report.target
    before, after = getattr(report.before, outcome.metric), getattr(report.after, outcome.metric)
    outcome.achieved = after / before if before else 1.0
    if abs(outcome.achieved - outcome.estimated) > 1e-6:
        logger.warning("cost model estimated %.6f, measured %.6f", outcome.estimated,
                       outcome.achieved)
        report.notes.append(f"the cost model estimated {outcome.estimated:.4f} of the original "
                            f"{outcome.metric}, the rewritten model has {outcome.achieved:.4f}")


def _scorer(config: PruneConfig, original: onnx.ModelProto, analysis: Analysis):
    """Selection of exactly ``n_prune`` channels of a group by the configured criterion (for
    ``obs``, an ``ObsCriterion``: FPGM serves the groups it cannot score)."""
    # importance imports torch: loaded on first use, off the start-up path
    from .importance.fpgm import fpgm_select, resolve_device
    from .importance.group import group_filters
    from .importance.norms import l1_scores, l2_scores

    device = resolve_device(config.device)

    def select(analysis: Analysis, group, n_prune: int) -> np.ndarray:
        if config.criterion == "random":
            rng = np.random.default_rng([config.seed, group.id])
            return np.sort(rng.choice(group.n_channels, n_prune, replace=False))
        filters = group_filters(analysis, group)
        if config.criterion in ("l1", "l2"):
            norms = (l1_scores if config.criterion == "l1" else l2_scores)(filters).numpy()
            return np.sort(np.lexsort((np.arange(len(norms)), norms))[:n_prune])
        # round((k / n) * n) == k for every k <= n, so the core prunes exactly k filters.
        return fpgm_select(filters, n_prune / len(filters), dist=config.dist, device=device,
                           min_channels=1)

    if config.criterion == "obs":
        fpgm = replace(config, criterion="fpgm")
        data = load_calibration(config.calibration, original, config)
        return ObsCriterion(mapped.with_data(original), analysis, data, _scorer(fpgm, original,
                            analysis), channel_scorer(analysis, fpgm))
    return select


def _note_alignment(report: Report, analysis: Analysis, plan: PrunePlan,
                    config: PruneConfig) -> None:
    """Warn when pruning breaks multiples of 8: onnxruntime's CPU NCHWc kernels (and GPU tensor
    cores) then fall back to slower paths; measured: MobileNetV2 at 0.3 ran 0.78x as fast as the
    original without --round-to and 1.40x with --round-to 8 (benchmarks/RESULTS.md). Widths are
    counted per producing layer, in channels: a group's unit may hold several (a head, a block
    of int4 input columns), and what the kernels see is the layer's width."""
    if config.round_to:
        return
    removed = analysis.removed_atoms(plan.removed_classes)
    broken = {int(analysis.group_of_class[analysis.class_of_atom[src.start]])
              for src in analysis.sources if src.n % 8 == 0 and 0 < np.count_nonzero(
                  removed[src.start:src.start + src.n]) and np.count_nonzero(
                  ~removed[src.start:src.start + src.n]) % 8}
    if broken:
        report.notes.append(
            f"{len(broken)} group(s) now keep a channel count that is not a multiple of 8; "
            "onnxruntime runs such layers on slower kernels: consider --round-to 8")


def _quantized_layers(graph) -> list[str]:
    """``op name`` of every QOperator/integer layer (QLinear/Integer ops, onnxruntime's contrib
    ones): these have no handler. QDQ layers (float ops over DequantizeLinear) are not listed."""
    return [f"{node.op} {node.name}" for node in graph.nodes
            if node.op in QUANTIZED_LAYERS and handler_for(node.op, node.domain or "") is None]


def _check_strict(analysis: Analysis) -> None:
    for group in analysis.groups:
        if group.frozen and "unsupported op" in group.frozen:
            raise UnsupportedOpError(f"--strict: group of {group.producers[0]} is blocked: "
                                     f"{group.frozen}")


def _fill_decisions(report: Report, analysis: Analysis, plan: PrunePlan) -> None:
    removed = analysis.removed_atoms(plan.removed_classes)
    group_of_class = analysis.group_of_class
    frozen_group = {g.group_id for g in plan.groups if g.frozen}
    for gp in plan.groups:
        group = analysis.groups[gp.group_id]
        report.groups.append(GroupReport(gp.group_id, gp.producers, gp.n_channels, gp.n_keep,
                                         gp.sparsity, gp.frozen, group.heads, group.dims))
    for src in analysis.sources:
        atoms = np.arange(src.start, src.start + src.n)
        kept = np.flatnonzero(~removed[atoms])
        groups = np.unique(group_of_class[analysis.class_of_atom[atoms]])
        report.layers.append(LayerReport(src.node, src.op, src.n, len(kept), kept.tolist(),
                                         int(groups[0]),
                                         int(analysis.members[src.member].rows.shape[1])))
        report.total_channels += src.n
        open_atoms = [g not in frozen_group for g in group_of_class[analysis.class_of_atom[atoms]]]
        report.prunable_channels += int(np.count_nonzero(open_atoms))
    report.blocked_tensors = list(analysis.blocked_tensors)


def _verification_dict(result: CompareResult) -> dict:
    return {
        "passed": bool(result),
        "max_rel_error": result.max_rel_error,
        "summary": result.summary(),
        "checked_at": list(result.checked_at),
        "outputs": [{"name": o.name, "max_abs_error": o.max_abs_error,
                     "max_rel_error": o.max_rel_error, "finite": o.finite} for o in
                    result.outputs],
    }
