"""Evaluation protocols: which clips train and which test, and the validation split carved from train.

Schemes (`--folds`):
  official         the dataset's own protocol: `split` column (train / valid / test) or `fold` column
                   (leave-one-fold-out, e.g. ESC-50's 5 folds, UrbanSound8K's 10).
  kfold:K          stratified K-fold over clips (shuffled with the seed).
  kfold:K:COLUMN   stratified K-fold that keeps every COLUMN value (e.g. a speaker) on one side.
  group:COLUMN     leave-one-group-out (e.g. group:speaker = leave-one-speaker-out).
  group            the same with the layout's natural group (FSDD speaker, ESC-50 src_file, US8K fsID).
  group:COLUMN:K   K folds of whole groups.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import (
    GroupKFold,
    GroupShuffleSplit,
    KFold,
    LeaveOneGroupOut,
    ShuffleSplit,
    StratifiedGroupKFold,
    StratifiedKFold,
    StratifiedShuffleSplit,
)

from matpac_fast.evaluation.datasets import LabelledSet

TRAIN_NAMES, VALID_NAMES, TEST_NAMES = {"train", "training"}, {"valid", "val", "validation", "dev"}, {"test", "eval"}


@dataclass
class Fold:
    name: str
    train: np.ndarray  # int64 indices into the dataset
    test: np.ndarray
    val: np.ndarray | None = None  # a predefined validation split; None = carve one from train
    groups: np.ndarray | None = None  # per-clip group ids when the scheme is grouped (val is carved by group too)


@dataclass(frozen=True)
class Scheme:
    kind: str  # official | kfold | group
    k: int | None = None
    column: str | None = None

    @property
    def slug(self) -> str:
        return "-".join(str(x) for x in (self.kind, self.column, self.k) if x is not None)

    @property
    def text(self) -> str:
        """The --folds spelling of this scheme (after `for_dataset`, plain 'group' reads 'group:<column>')."""
        if self.kind == "kfold":
            return ":".join(str(x) for x in (self.kind, self.k, self.column) if x is not None)
        return ":".join(str(x) for x in (self.kind, self.column, self.k) if x is not None)

    def for_dataset(self, ds: LabelledSet) -> Scheme:
        """Plain 'group' with the layout's default group column filled in, so that `--folds group` and
        `--folds group:speaker` on FSDD are one protocol with one task name. Other schemes are returned as is."""
        if self.kind == "group" and self.column is None and ds.default_group is not None:
            return Scheme("group", self.k, ds.default_group)
        return self


def parse_scheme(text: str) -> Scheme:
    parts = text.split(":")
    usage = "use official, kfold:K, kfold:K:COLUMN, group, group:COLUMN or group:COLUMN:K"
    try:
        if parts == ["official"]:
            return Scheme("official")
        if parts == ["group"]:
            return Scheme("group")  # column filled in from the dataset's default group
        if parts[0] == "kfold" and len(parts) in (2, 3):
            k = int(parts[1])
            if k < 2:
                raise ValueError
            return Scheme("kfold", k, parts[2] if len(parts) == 3 else None)
        if parts[0] == "group" and len(parts) in (2, 3) and parts[1]:
            k = int(parts[2]) if len(parts) == 3 else None
            if k is not None and k < 2:
                raise ValueError
            return Scheme("group", k, parts[1])
    except ValueError:
        pass
    raise ValueError(f"--folds {text!r}: not understood; {usage}")


def make_folds(ds: LabelledSet, scheme: Scheme | str, seed: int = 0) -> list[Fold]:
    scheme = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    if scheme.kind == "official":
        folds = _official(ds)
    elif scheme.kind == "kfold":
        folds = _kfold(ds, scheme.k, scheme.column, seed)
    else:
        column = scheme.column or ds.default_group
        if column is None:
            raise ValueError(f"--folds group: {ds.name} has no default group column; use group:COLUMN")
        folds = _group(ds, column, scheme.k)
    for f in folds:
        check_test_labels_seen(ds, f)
    return folds


def _official(ds: LabelledSet) -> list[Fold]:
    if ds.official == "split":
        split = np.array([s.lower() for s in ds.column("split")])
        known = TRAIN_NAMES | VALID_NAMES | TEST_NAMES
        bad = np.flatnonzero(~np.isin(split, list(known)))
        if len(bad):
            raise ValueError(f"{ds.where(bad[0])}: split {split[bad[0]]!r} is not one of train / valid / test")
        tr, va, te = (np.flatnonzero(np.isin(split, list(s))) for s in (TRAIN_NAMES, VALID_NAMES, TEST_NAMES))
        if not len(tr) or not len(te):
            raise ValueError(f"{ds.source}: the split column needs both 'train' and 'test' rows")
        return [Fold("official", tr, te, va if len(va) else None)]
    if ds.official == "fold":
        fold = np.array(ds.column("fold"))
        empty = np.flatnonzero(fold == "")
        if len(empty):  # scored as a fold of their own ('fold') before: say which rows lack one
            raise ValueError(f"{ds.where(empty[0])}: empty 'fold' cell ({len(empty)} row(s) without a fold); give "
                             "every row its fold, or use --folds kfold:K")
        values = sorted(set(fold), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
        if len(values) < 2:
            raise ValueError(f"{ds.source}: the fold column has a single value {values[0]!r}; use --folds kfold:K")
        return [Fold(f"fold{v}", np.flatnonzero(fold != v), np.flatnonzero(fold == v)) for v in values]
    raise ValueError(
        f"{ds.source}: no official protocol (no 'split' or 'fold' column); use --folds kfold:K or group:COLUMN"
    )


def _labels_for_stratify(ds: LabelledSet) -> np.ndarray | None:
    return None if ds.multilabel else ds.targets()


def _kfold(ds: LabelledSet, k: int, column: str | None, seed: int) -> list[Fold]:
    n = len(ds)
    y = _labels_for_stratify(ds)
    X = np.zeros((n, 1))
    groups = _group_ids(ds, column) if column else None
    if groups is not None:
        if len(np.unique(groups)) < k:
            raise ValueError(f"--folds kfold:{k}:{column}: only {len(np.unique(groups))} groups; lower K")
        splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed) if y is not None else GroupKFold(k)
        it = splitter.split(X, y, groups)
    else:
        if k > n:
            raise ValueError(f"--folds kfold:{k}: only {n} clips")
        # Stratified whenever there are labels to stratify by: a class with fewer clips than K is then spread over
        # as many folds as it has clips, so any class of 2 clips or more is always seen in training. (Plain shuffled
        # K-fold, used for such a class before, could put all its clips in one test fold: an error for some seeds.)
        # Only when every class has fewer than K clips does scikit-learn refuse, and plain K-fold is the rest.
        if y is not None and np.bincount(y).max() >= k:
            with warnings.catch_warnings():  # "the least populated class has only N members": handled above
                warnings.simplefilter("ignore", UserWarning)
                it = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y))
        else:
            it = KFold(k, shuffle=True, random_state=seed).split(X, y)
    return [Fold(f"kfold{i}", tr, te, None, groups) for i, (tr, te) in enumerate(it)]


def _group(ds: LabelledSet, column: str, k: int | None) -> list[Fold]:
    groups = _group_ids(ds, column)
    names = np.array(ds.column(column))
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"--folds group:{column}: the column has a single value; nothing to leave out")
    if k is None:
        it = LeaveOneGroupOut().split(np.zeros((len(ds), 1)), None, groups)
        return [Fold(f"{column}={names[te[0]]}", tr, te, None, groups) for tr, te in it]
    if k > n_groups:
        raise ValueError(f"--folds group:{column}:{k}: only {n_groups} groups; lower K")
    it = GroupKFold(k).split(np.zeros((len(ds), 1)), None, groups)
    return [Fold(f"{column}-fold{i}", tr, te, None, groups) for i, (tr, te) in enumerate(it)]


def _group_ids(ds: LabelledSet, column: str) -> np.ndarray:
    _, ids = np.unique(np.array(ds.column(column)), return_inverse=True)
    return ids.astype(np.int64)


def check_test_labels_seen(ds: LabelledSet, fold: Fold) -> None:
    """A test clip whose label never occurs in training cannot be predicted: that is a data error, say where."""
    seen = {lab for i in fold.train for lab in ds.clips[i].labels}
    for i in fold.test:
        for lab in ds.clips[i].labels:
            if lab not in seen:
                n = sum(lab in c.labels for c in ds.clips)
                if n == 1:  # no protocol can train on it and test it: the fix is in the data
                    raise ValueError(f"{ds.where(i)}: label {lab!r} has this one clip, so no fold can both train "
                                     "on it and test it; add clips of it, or drop the row (--classes selects classes)")
                raise ValueError(
                    f"{ds.where(i)}: label {lab!r} does not occur in the training part of {fold.name} (its {n} "
                    "clips are all in the test part); fix the label or use another --folds scheme"
                )


def carve_validation(
    train: np.ndarray, y: np.ndarray | None, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split `train` into (fit, val). Grouped schemes carve whole groups (so early stopping sees unseen groups,
    like the test); otherwise stratified by label when every class has >= 2 clips, else a plain shuffle."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    X = np.zeros((len(train), 1))
    if groups is not None and len(np.unique(groups[train])) >= 2:
        s = GroupShuffleSplit(1, test_size=fraction, random_state=seed)
        fit, val = next(s.split(X, None, groups[train]))
    else:
        try:
            if y is None or y.ndim != 1 or _min_count(y[train]) < 2:
                raise ValueError("not stratifiable")
            fit, val = next(StratifiedShuffleSplit(1, test_size=fraction, random_state=seed).split(X, y[train]))
        except ValueError:  # too few clips per class for a stratified carve (e.g. val smaller than #classes)
            fit, val = next(ShuffleSplit(1, test_size=fraction, random_state=seed).split(X))
    return train[fit], train[val]


def _min_count(y: np.ndarray) -> int:
    c = np.bincount(y)
    return int(c[c > 0].min())
