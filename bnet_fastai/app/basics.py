"""BatchNorm itself, for `notebooks/batchnorm_basics.ipynb`: small images as tensors, small models, measurements.

- an MLP (784-128-64-10, bias-free linear layers, BN before the activation) with and without BatchNorm1d;
- one trained BN model evaluated in train mode (batch statistics) and eval mode (running statistics);
- a small CNN with BatchNorm2d, whose statistics are per feature map;
- a recurrent network reading an image row by row, with batch statistics kept per time step, shared
  across steps, or absent (Cooijmans et al., "Recurrent Batch Normalization", 2016).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from fastai.callback import progress, schedule  # noqa: F401  (Learner.no_bar, Learner.fit_one_cycle)
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

from bnet_fastai._checks import check_choice, parse_parameter
from bnet_fastai.runs.config import MAX_SEED
from bnet_fastai.data.datasets import DATASETS, image_files, prepare

SIDE = 28  # MNIST's size; the 8x8 sample digits are resized to it so every model is the same
BASICS_DATASETS = ("mnist", "fashion-mnist", "sample")  # 10 classes of 28x28 grayscale images each


class Settings(NamedTuple):
    """The notebook's parameters, checked and converted (`resolve`); `dataset` is never "auto"."""

    dataset: str
    max_train: int | None
    max_valid: int | None
    epochs: int
    rnn_epochs: int
    bs: int
    lr: float
    seed: int


def resolve(dataset: str = "auto", max_train: int | None = 12000, max_valid: int | None = None, epochs: int = 5,
            rnn_epochs: int = 5, bs: int = 128, lr: float = 1e-2, seed: int = 0) -> Settings:
    """batchnorm_basics.ipynb's parameters as a user or papermill's ``-p`` gives them (numbers as text, "None"),
    checked and converted; a bad value raises ValueError in one line naming the parameter, before anything
    is written. ``dataset="auto"``: MNIST if on disk or downloadable, else Fashion-MNIST offline, else `sample`."""
    def optional(name: str, value: object) -> int | None:
        value = None if isinstance(value, str) and value.strip().lower() == "none" else value
        number = parse_parameter(name, value, int)
        if number is not None and number < 1:
            raise ValueError(f"{name} must be a whole number >= 1 or None (all images), got {number}")
        return number

    dataset = parse_parameter("DATASET", dataset, str)
    check_choice("DATASET", dataset, ("auto", *BASICS_DATASETS))
    numbers = {name: parse_parameter(name, value, int) for name, value in
               (("EPOCHS", epochs), ("RNN_EPOCHS", rnn_epochs), ("BS", bs), ("SEED", seed))}
    for name, low in (("EPOCHS", 1), ("RNN_EPOCHS", 1), ("BS", 2)):  # BatchNorm needs 2 samples a batch
        if numbers[name] < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {numbers[name]}")
    if not 0 <= numbers["SEED"] <= MAX_SEED:
        raise ValueError(f"SEED must be in 0 .. {MAX_SEED}, got {numbers['SEED']}")
    lr = parse_parameter("LR", lr, float)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"LR must be a finite number > 0, got {lr}")
    max_train, max_valid = optional("MAX_TRAIN", max_train), optional("MAX_VALID", max_valid)
    if max_train is not None and max_train < numbers["BS"]:
        raise ValueError(f"MAX_TRAIN={max_train} is smaller than BS={numbers['BS']}: no batch would be trained")
    if dataset == "auto":
        from bnet_fastai.data.available import auto_dataset

        dataset = auto_dataset(BASICS_DATASETS)[0]
    return Settings(dataset, max_train, max_valid, numbers["EPOCHS"], numbers["RNN_EPOCHS"], numbers["BS"], lr,
                    numbers["SEED"])


def image_tensors(dataset: str = "mnist", max_train: int | None = None, max_valid: int | None = None,
                  seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, valid) datasets of (1, 28, 28) float images scaled to mean 0, std 1 and integer labels (the
    index of the class folder in sorted order): MNIST, Fashion-MNIST or the `sample` digits."""
    check_choice("dataset", dataset, BASICS_DATASETS)
    spec, path = DATASETS[dataset], prepare(dataset)
    files = image_files(path, spec)
    classes = sorted({p.parent.name for p in files})
    rng = np.random.default_rng(seed)
    splits = []
    for split, limit in ((spec.train, max_train), (spec.valid, max_valid)):
        chosen = [p for p in files if p.relative_to(path).parts[0] == split]
        if limit is not None and limit < len(chosen):
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), limit, replace=False))]
        pixels = np.stack([_load(p) for p in chosen])
        labels = torch.tensor([classes.index(p.parent.name) for p in chosen])
        splits.append((torch.from_numpy(pixels).unsqueeze(1), labels))
    mean, std = splits[0][0].mean(), splits[0][0].std()  # training-set statistics for both splits
    return tuple(TensorDataset((x - mean) / std, y) for x, y in splits)


def _load(path: Path) -> np.ndarray:
    image = Image.open(path).convert("L")
    if image.size != (SIDE, SIDE):
        image = image.resize((SIDE, SIDE), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255


def digit_dls(train: TensorDataset, valid: TensorDataset, bs: int = 128, seed: int = 0) -> DataLoaders:
    """fastai DataLoaders over tensor datasets; `set_seed` first, so the model built next and the batch
    order are the same for every model compared."""
    set_seed(seed, reproducible=True)
    return DataLoaders.from_dsets(train, valid, bs=bs, device="cpu" if not torch.cuda.is_available() else None)


def mlp(bn: bool) -> nn.Sequential:
    """784-128-64-10 with bias-free linear layers; with `bn`, BatchNorm1d before each activation."""
    def block(n_in: int, n_out: int) -> list[nn.Module]:
        return [nn.Linear(n_in, n_out, bias=False), *([nn.BatchNorm1d(n_out)] if bn else []), nn.ReLU()]

    return nn.Sequential(nn.Flatten(), *block(SIDE * SIDE, 128), *block(128, 64), nn.Linear(64, 10))


def cnn(bn: bool) -> nn.Sequential:
    """A small CNN; with `bn`, BatchNorm2d (one mean and variance per feature map) after each conv."""
    def block(n_in: int, n_out: int) -> list[nn.Module]:
        return [nn.Conv2d(n_in, n_out, 3, stride=2, padding=1, bias=not bn),
                *([nn.BatchNorm2d(n_out)] if bn else []), nn.ReLU()]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


RNN_NORMS = ("none", "shared", "per_step")


class RowRNN(nn.Module):
    """A tanh RNN reading a (1, 28, 28) image one row per time step, then classifying its last state.

    `norm` normalises the input and recurrent projections separately, as in Recurrent Batch
    Normalization: ``"per_step"`` keeps one BatchNorm1d (statistics) per time step, ``"shared"`` one for all
    steps, ``"none"`` none. Per-step statistics matter because activations drift along the sequence.
    """

    def __init__(self, norm: str = "per_step", hidden: int = 64, steps: int = SIDE):
        super().__init__()
        check_choice("RowRNN norm", norm, RNN_NORMS)
        self.norm, self.steps = norm, steps
        self.wx = nn.Linear(SIDE, hidden, bias=norm == "none")
        self.wh = nn.Linear(hidden, hidden, bias=False)
        n_norms = {"none": 0, "shared": 1, "per_step": steps}[norm]
        self.bn_x = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(n_norms))
        self.bn_h = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(n_norms))
        self.head = nn.Linear(hidden, 10)

    def _bn(self, norms: nn.ModuleList, t: int, z: torch.Tensor) -> torch.Tensor:
        return z if not norms else norms[t if len(norms) > 1 else 0](z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.squeeze(1)  # (N, 28 rows, 28 pixels)
        h = rows.new_zeros(rows.shape[0], self.wh.in_features)
        for t in range(self.steps):
            h = torch.tanh(self._bn(self.bn_x, t, self.wx(rows[:, t])) + self._bn(self.bn_h, t, self.wh(h)))
        return self.head(h)


def learner(dls: DataLoaders, model: nn.Module) -> Learner:
    """A fastai Learner with cross-entropy and accuracy (no extra callbacks: what you see is BN alone)."""
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy)


@torch.no_grad()
def accuracy_in_mode(model: nn.Module, data: TensorDataset, train_mode: bool, bs: int = 32,
                     shuffle: bool = True, seed: int = 0) -> float:
    """Accuracy of `model` on `data` with BN in train mode (each batch's own statistics) or eval mode.

    `shuffle` mixes classes within batches (a seeded permutation); without it, batches follow the data's
    order, which for sorted data means batches of one class. Works on a copy, so evaluating in train mode
    does not move the model's running statistics.
    """
    model = copy.deepcopy(model).train(train_mode)
    x, y = data.tensors
    if shuffle:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        x, y = x[order], y[order]
    device = next(model.parameters()).device
    correct = sum((model(x[i:i + bs].to(device)).argmax(1).cpu() == y[i:i + bs]).sum().item()
                  for i in range(0, len(y), bs))
    return correct / len(y)


@torch.no_grad()
def channel_stats(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """Per-channel mean and std entering each BatchNorm2d of `model` and after its normalisation
    (before gamma and beta are applied), in a train-mode forward of `x`."""
    records, hooks = [], []
    model = copy.deepcopy(model).train()
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            def hook(module, inputs, output, name=name):
                dims, view = (0, 2, 3), (1, -1, 1, 1)
                x_hat = (output - module.bias.view(view)) / module.weight.view(view)
                records.append({"layer": name, "channels": output.shape[1],
                                "in_mean": inputs[0].mean(dims), "in_std": inputs[0].std(dims),
                                "out_mean": x_hat.mean(dims), "out_std": x_hat.std(dims)})
            hooks.append(m.register_forward_hook(hook))
    model(x)
    for h in hooks:
        h.remove()
    return records


def save_png(fig: Figure, path: Path) -> str:
    """Save `fig` as a PNG (for the results folder and for display in a notebook); returns the path."""
    fig.savefig(path, dpi=120)
    return str(path)


def history(learn: Learner, name: str) -> pd.DataFrame:
    """The Learner's per-epoch record (train loss, valid loss, accuracy) as a DataFrame, labelled `name`."""
    names = ["train_loss", "valid_loss", "accuracy"]
    rows = [dict(zip(names, map(float, values))) for values in learn.recorder.values]
    return pd.DataFrame(rows).assign(epoch=range(1, len(rows) + 1), model=name)


def plot_histories(histories: pd.DataFrame, title: str) -> Figure:
    """Training loss (per batch) is noisy; this plots the per-epoch train loss, valid loss and accuracy."""
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    for name, group in histories.groupby("model", sort=False):
        for ax, metric in zip(axes, ("train_loss", "valid_loss", "accuracy")):
            ax.plot(group["epoch"], group[metric], marker="o", ms=3, label=name)
            ax.set(title=metric.replace("_", " "), xlabel="epoch")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_channel_stats(records: list[dict], title: str) -> Figure:
    """Per-channel mean and std at the first BatchNorm2d, before and after normalisation: every map (0, 1)."""
    first = records[0]
    fig = Figure(figsize=(10, 3.2))
    axes = fig.subplots(1, 2)
    channels = np.arange(first["channels"])
    for ax, stat in zip(axes, ("mean", "std")):
        ax.bar(channels - 0.2, first[f"in_{stat}"].numpy(), width=0.4, label="before BN")
        ax.bar(channels + 0.2, first[f"out_{stat}"].numpy(), width=0.4, label="normalised (before gamma, beta)")
        ax.set(title=f"per-channel {stat}, layer {first['layer']}", xlabel="channel (feature map)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_step_statistics(model: RowRNN) -> pd.DataFrame:
    """For a per-step RowRNN: the running mean and variance of the recurrent projection at each step,
    averaged over units: how much the statistics drift along the sequence."""
    return pd.DataFrame([{"step": t + 1, "running_mean": bn.running_mean.abs().mean().item(),
                          "running_var": bn.running_var.mean().item()} for t, bn in enumerate(model.bn_h)])
