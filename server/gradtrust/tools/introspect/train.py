"""Training the introspective network: the classifier's logits and features on labelled
images -> the unit factors of the introspective feature -> an MLP trained with
cross-entropy, Adam, a seeded stratified validation split and early stopping."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from numpy.typing import NDArray
from torch.nn import functional as F
from tqdm import tqdm

from gradtrust.core.introspection import introspective_factors
from gradtrust.errors import ConfigError
from gradtrust.serving.classifier import Classifier
from gradtrust.serving.contract import FEATURES, LOGITS
from gradtrust.tools.introspect.network import DEFAULT_HIDDEN, IntrospectiveMLP


def network_outputs(
    classifier: Classifier,
    images: np.ndarray,
    to_input: Callable[[np.ndarray], np.ndarray] | None = None,
    batch: int = 256,
    desc: str | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The classifier's logits (N, C) and penultimate features (N, D), float64."""
    if not classifier.has_features:
        raise ConfigError(
            "introspection needs the model's penultimate 'features' output, which its ONNX "
            "file lacks: re-export the entry with `gradtrust prepare`"
        )
    logits, features = [], []
    for start in tqdm(
        range(0, len(images), batch), desc=desc, unit="batch", leave=False, disable=desc is None
    ):
        chunk = images[start : start + batch]
        x = to_input(chunk) if to_input is not None else chunk
        out = classifier.run(np.asarray(x), [LOGITS, FEATURES])
        logits.append(out[LOGITS].astype(np.float64))
        features.append(out[FEATURES].astype(np.float64))
    return np.concatenate(logits), np.concatenate(features)


def validation_split(
    labels: NDArray[np.int64], fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train indices, validation indices), about ``fraction`` of every class validated."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"--val-fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 17])
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        val.append(members[: max(1, int(round(fraction * members.size)))])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    return np.setdiff1d(np.arange(labels.size), val_idx).astype(np.int64), val_idx


@dataclass(frozen=True)
class TrainingConfig:
    hidden: int = DEFAULT_HIDDEN
    rank: int = 0  # 0: network.default_rank
    seed: int = 0
    val_fraction: float = 0.2
    max_epochs: int = 200
    patience: int = 15
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 128


@dataclass
class TrainingLog:
    epochs: int = 0
    best_epoch: int = 0
    best_val_loss: float = float("inf")
    val_accuracy: float = 0.0
    train_size: int = 0
    val_size: int = 0
    history: list[tuple[float, float, float]] = field(default_factory=list)  # train, val, acc


def train_introspective(
    logits: np.ndarray,
    features: np.ndarray,
    labels: NDArray[np.int64],
    config: TrainingConfig = TrainingConfig(),
    progress: bool = True,
) -> tuple[IntrospectiveMLP, TrainingLog]:
    """Fit the MLP on (introspective factors, true label); the weights of the epoch with the
    lowest validation loss are kept, and training stops ``patience`` epochs after it."""
    labels = np.asarray(labels, np.int64)
    num_classes = logits.shape[1]
    if labels.size != len(logits) or labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(
            f"{labels.size} labels for {len(logits)} images, in 0..{num_classes - 1}: "
            "give one class index per image"
        )
    if np.unique(labels).size < 2:
        raise ConfigError("the labelled data hold a single class: introspection needs several")
    g, h = introspective_factors(logits, features)
    train_idx, val_idx = validation_split(labels, config.val_fraction, config.seed)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    g_t = torch.from_numpy(g.astype(np.float32))
    h_t = torch.from_numpy(h.astype(np.float32))
    y_t = torch.from_numpy(labels)
    model = IntrospectiveMLP(num_classes, h.shape[1], config.hidden, config.rank)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    tv, vv = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    log = TrainingLog(train_size=train_idx.size, val_size=val_idx.size)
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    bar = tqdm(
        range(config.max_epochs), desc="introspective network", unit="epoch", disable=not progress
    )
    for epoch in bar:
        model.train()
        order = tv[torch.randperm(tv.numel(), generator=gen)]
        total = 0.0
        for start in range(0, order.numel(), config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = F.cross_entropy(model(g_t[idx], h_t[idx]), y_t[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * idx.numel()
        model.eval()
        with torch.no_grad():
            out = model(g_t[vv], h_t[vv])
            val_loss = float(F.cross_entropy(out, y_t[vv]))
            val_acc = float((out.argmax(1) == y_t[vv]).float().mean())
        log.history.append((total / max(1, tv.numel()), val_loss, val_acc))
        log.epochs = epoch + 1
        if val_loss < log.best_val_loss - 1e-6:
            log.best_val_loss, log.best_epoch, log.val_accuracy = val_loss, epoch + 1, val_acc
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
        if epoch + 1 - log.best_epoch >= config.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    return model.eval(), log


def predict(
    model: IntrospectiveMLP, logits: np.ndarray, features: np.ndarray
) -> NDArray[np.float64]:
    """The introspective logits (N, C) of the torch model, float64 (for reports and tests)."""
    g, h = introspective_factors(logits, features)
    with torch.no_grad():
        out = model.float()(
            torch.from_numpy(g.astype(np.float32)), torch.from_numpy(h.astype(np.float32))
        )
    return out.double().numpy()
