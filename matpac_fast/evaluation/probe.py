"""Probes on frozen embeddings: the EVAR/M2D linear probe (METHOD.md §6) and scikit-learn logistic regression.

Linear probe, per fold and seed:
  1. carve a validation split from the fold's training clips (`folds.carve_validation`, 10 % by default);
  2. standardise with the mean/std of the remaining *fit* clips only (no statistic sees validation or test);
  3. train one `Linear(D, C)` with Adam (lr 3e-5, weight decay 1e-8 - the M2D setting), batch 200, up to 200
     epochs; cross-entropy (single-label) or BCE-with-logits (multi-label);
  4. after every epoch score the validation split (accuracy / mAP; ties broken by lower validation loss), stop
     after `patience` (20) epochs without improvement and restore the best epoch's weights;
  5. score the test clips.
Mean and std (population, ddof=0) are over every (fold, seed) run.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from matpac_fast.evaluation.folds import Fold, carve_validation
from matpac_fast.evaluation.metrics import score


@dataclass
class LinearProbeConfig:
    lr: float = 3e-5  # M2D/EVAR setting; the CLI's default is larger (see cli.py)
    weight_decay: float = 1e-8
    batch_size: int = 200
    max_epochs: int = 200
    patience: int = 20
    val_fraction: float = 0.1


@dataclass
class ProbeSettings:
    kind: str = "linear"  # linear | logreg
    seeds: int = 3  # linear probe runs per fold (logreg is deterministic: one run per fold)
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    logreg_c: float = 1.0
    device: str = "cpu"


class Standardizer:
    """Per-dimension (x - mean) / std, like sklearn's StandardScaler (a constant dimension keeps std 1)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)

    @classmethod
    def fit(cls, X: np.ndarray) -> Standardizer:
        X = np.asarray(X, dtype=np.float64)
        std = X.std(0)
        std[std < 1e-12] = 1.0
        return cls(X.mean(0), std)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, dtype=np.float32) - self.mean) / self.std).astype(np.float32)


@dataclass
class LinearProbe:
    scaler: Standardizer
    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    best_epoch: int  # 0-based
    history: list[dict]  # per epoch: train_loss, val_loss, val_score

    def scores(self, X: np.ndarray) -> np.ndarray:
        """Raw logits (n, C): argmax (accuracy) and per-class ranking (AP) do not need a squashing function."""
        return self.scaler(X) @ self.weight.T + self.bias


def _loss_fn(multilabel: bool):
    return torch.nn.BCEWithLogitsLoss() if multilabel else torch.nn.CrossEntropyLoss()


def fit_linear_probe(
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    multilabel: bool,
    cfg: LinearProbeConfig,
    seed: int,
    device: str = "cpu",
) -> LinearProbe:
    scaler = Standardizer.fit(X_fit)  # training statistics only
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(device)
    Xf, Xv = (torch.from_numpy(scaler(x)).to(dev) for x in (X_fit, X_val))
    to_y = (lambda y: torch.from_numpy(y).float()) if multilabel else (lambda y: torch.from_numpy(y).long())
    yf, yv = to_y(y_fit).to(dev), to_y(y_val).to(dev)
    d = Xf.shape[1]
    lin = torch.nn.Linear(d, n_classes).to(dev)
    with torch.no_grad():  # nn.Linear's default U(-1/sqrt(d), 1/sqrt(d)) init, drawn from the seeded generator
        lin.weight.copy_((torch.rand(n_classes, d, generator=g) * 2 - 1) / d**0.5)
        lin.bias.copy_((torch.rand(n_classes, generator=g) * 2 - 1) / d**0.5)
    opt = torch.optim.Adam(lin.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = _loss_fn(multilabel)
    best = (-np.inf, np.inf)  # (val score, -) compared as (higher score, lower loss)
    best_state, best_epoch, history = None, -1, []
    for epoch in range(cfg.max_epochs):
        train_loss = _train_epoch(lin, opt, loss_fn, Xf, yf, cfg.batch_size, g)
        with torch.no_grad():
            logits = lin(Xv)
            val_loss = float(loss_fn(logits, yv))
        val_score = score(y_val, logits.cpu().numpy(), multilabel)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_score": val_score})
        if val_score > best[0] or (val_score == best[0] and val_loss < best[1]):
            best, best_epoch = (val_score, val_loss), epoch
            best_state = {k: v.detach().clone() for k, v in lin.state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            break
    lin.load_state_dict(best_state)  # restore the best epoch, not the last
    return LinearProbe(
        scaler,
        lin.weight.detach().cpu().numpy().astype(np.float32),
        lin.bias.detach().cpu().numpy().astype(np.float32),
        best_epoch,
        history,
    )


def _train_epoch(lin, opt, loss_fn, X, y, batch_size: int, g: torch.Generator) -> float:
    perm = torch.randperm(len(X), generator=g).to(X.device)
    total = 0.0
    for i in range(0, len(X), batch_size):
        idx = perm[i : i + batch_size]
        loss = loss_fn(lin(X[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
    return total / len(X)


def fit_logreg(X_train: np.ndarray, y_train: np.ndarray, n_classes: int, multilabel: bool, c: float = 1.0):
    """Standardised multinomial (or one-vs-rest for multi-label) logistic regression; returns a scores(X) closure
    giving (n, n_classes) columns even when a class is absent from training (score -inf there)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    scaler = Standardizer.fit(X_train)
    clf = LogisticRegression(C=c, max_iter=2000)
    if multilabel:
        clf = OneVsRestClassifier(clf)
    clf.fit(scaler(X_train), y_train)

    def scores(X: np.ndarray) -> np.ndarray:
        s = clf.decision_function(scaler(X)) if multilabel else clf.predict_log_proba(scaler(X))
        if multilabel:
            return s
        out = np.full((len(X), n_classes), -np.inf, dtype=np.float64)
        out[:, clf.classes_] = s
        return out

    return scores, scaler


@dataclass
class RunScore:
    fold: str
    seed: int
    score: float
    n_fit: int
    n_val: int
    n_test: int
    best_epoch: int | None = None
    seconds: float = 0.0


def run_probes(
    X: np.ndarray,
    Y: np.ndarray,
    folds: list[Fold],
    n_classes: int,
    multilabel: bool,
    settings: ProbeSettings,
    seed: int = 0,
    progress: bool = True,
) -> list[RunScore]:
    """Every (fold, seed) run of the chosen probe; returns one RunScore per run."""
    if settings.kind not in ("linear", "logreg"):
        raise ValueError(f"--probe {settings.kind!r}: choose linear or logreg")
    seeds = range(seed, seed + settings.seeds) if settings.kind == "linear" else [seed]
    jobs = [(f, s) for f in folds for s in seeds]
    with _cpu_threads(1 if settings.device == "cpu" else None):
        return _run_jobs(X, Y, jobs, n_classes, multilabel, settings, progress)


@contextmanager
def _cpu_threads(n: int | None):
    """The probe's matmuls are tiny: one thread is as fast alone and many times faster on a shared, busy CPU
    (measured on 2 cores: 1-3 s vs 3-12 s per FSDD run with other jobs running)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _run_jobs(X, Y, jobs, n_classes, multilabel, settings: ProbeSettings, progress: bool) -> list[RunScore]:
    strat = None if multilabel else Y
    out = []
    # Closed however the loop ends: a bar left open after a Ctrl-C had the CLI's one line printed after it, on its line
    with tqdm(jobs, desc=f"{settings.kind} probe", unit="run", disable=not progress, leave=False) as bar:
        for fold, s in bar:
            t0 = time.perf_counter()
            if settings.kind == "linear":
                if fold.val is not None:
                    fit, val = fold.train, fold.val
                else:
                    fit, val = carve_validation(fold.train, strat, fold.groups, settings.linear.val_fraction, s)
                p = fit_linear_probe(
                    X[fit], Y[fit], X[val], Y[val], n_classes, multilabel, settings.linear, s, settings.device
                )
                test_scores, best = p.scores(X[fold.test]), p.best_epoch
            else:  # no early stopping, so the predefined validation part (if any) is training data too
                fit = fold.train if fold.val is None else np.concatenate([fold.train, fold.val])
                val, best = np.array([], dtype=np.int64), None
                scores_fn, _ = fit_logreg(X[fit], Y[fit], n_classes, multilabel, settings.logreg_c)
                test_scores = scores_fn(X[fold.test])
            sc = score(Y[fold.test], test_scores, multilabel)
            out.append(RunScore(fold.name, s, sc, len(fit), len(val), len(fold.test), best, time.perf_counter() - t0))
    return out


def summarize(runs: list[RunScore]) -> tuple[float, float]:
    v = np.array([r.score for r in runs], dtype=np.float64)
    return float(v.mean()), float(v.std())
