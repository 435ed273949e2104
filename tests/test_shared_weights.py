"""One weight applied more than once (ALBERT's shared layer): its uses keep the same channels and
the weight is sliced once, in place, under its own name; a use that cannot agree keeps a copy."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnx_fpgm


def _export(module, example, dynamo: bool) -> onnx.ModelProto:
    import torch

    from tests.torch_models import _quiet_exporter

    with tempfile.TemporaryDirectory() as tmp, _quiet_exporter():
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(module, example, path, dynamo=dynamo, opset_version=18 if dynamo else 17,
                          input_names=["x"], output_names=["y"], external_data=False)
        return onnx.load(path)


def _shared_linear(form: str):
    import torch
    from torch import nn

    class Shared(nn.Module):
        """``fc_in -> shared -> shared -> fc_out`` in sequence, ``shared`` on two branches, or
        (mixed) a second use that reaches a graph output."""

        def __init__(self) -> None:
            super().__init__()
            self.fc_in = nn.Linear(8, 32)
            self.shared = nn.Linear(32, 32)
            self.fc_out = nn.Linear(32, 4)

        def forward(self, x):
            h = torch.relu(self.fc_in(x))
            if form == "mixed":
                return self.fc_out(torch.relu(self.shared(h))), self.shared(torch.sigmoid(h))
            if form == "branches":
                return self.fc_out(torch.relu(self.shared(h)) + self.shared(torch.sigmoid(h)))
            return self.fc_out(torch.relu(self.shared(torch.relu(self.shared(h)))))

    torch.manual_seed(0)
    return Shared().eval(), (torch.randn(2, 8),)


def _shared_conv():
    import torch
    from torch import nn

    class Convs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.shared = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            return self.head(torch.relu(self.shared(torch.relu(self.shared(h)))))

    torch.manual_seed(0)
    return Convs().eval(), (torch.randn(1, 3, 8, 8),)


def _readers(model: onnx.ModelProto, name: str) -> list[str]:
    return [n.name for n in model.graph.node if name in n.input]


def _weight_readers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Initializer name -> reading nodes, for weights of rank 2 or more read by a layer."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {name: _readers(model, name) for name, value in inits.items() if value.ndim >= 2
            and _readers(model, name)}


def _params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("form", ["sequence", "branches", "conv"])
def test_shared_weight_is_sliced_once_in_place(form, dynamo):
    module, example = _shared_conv() if form == "conv" else _shared_linear(form)
    model = _export(module, example, dynamo)
    before = _weight_readers(model)
    shared = [name for name, readers in before.items() if len(readers) == 2]
    assert len(shared) == 1, before
    result = onnx_fpgm.prune(model, sparsity=0.5)  # verified by the oracle
    assert result.report.verification["passed"]
    pruned = result.model
    after = _weight_readers(pruned)
    assert after[shared[0]] == before[shared[0]]  # one initializer, same name, both readers
    assert not [name for name in after if name.startswith(shared[0] + "__")]
    shape = [d for i in pruned.graph.initializer if i.name == shared[0] for d in i.dims]
    assert 16 in shape or 8 in shape, shape  # it was pruned, once
    assert result.report.after.params == _params(pruned) < _params(model)
    assert any("sliced once, in place" in note for note in result.report.notes)


def test_a_use_that_cannot_agree_keeps_a_private_copy():
    """One use of the shared weight reaches the graph output (its channels stay): the other
    use is pruned on a copy named after the original, which the whole use keeps."""
    module, example = _shared_linear("mixed")
    model = _export(module, example, dynamo=False)
    shared = [name for name, r in _weight_readers(model).items() if len(r) == 2][0]
    result = onnx_fpgm.prune(model, sparsity=0.5)
    assert result.report.verification["passed"]
    after = _weight_readers(result.model)
    copies = [name for name in after if name.startswith(shared + "__")]
    assert len(after[shared]) == 1 and len(copies) == 1
    assert any("used a sliced copy" in note for note in result.report.notes)
