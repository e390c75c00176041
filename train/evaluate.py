"""Metrics for a classifier's probabilities, the frozen-encoder baselines, and forgetting checks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of cells whose true class is among their k most probable (scikit-learn's top_k_accuracy_score takes
    two-class probabilities as one score column and fails on two)."""
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(y_true)[:, None]).any(axis=1).mean())


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    labels = np.arange(len(classes))
    pred = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y_true, pred, labels=labels)
    return {
        "top1": float((pred == y_true).mean()),
        "top3": top_k_accuracy(y_true, probs, min(3, len(classes))),
        # over the classes the cells hold: a class absent from them would count as F1 0 and drag the mean down
        "macro_f1": float(f1_score(y_true, pred, labels=np.unique(y_true), average="macro", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)),
        "classes_with_a_correct_prediction": int((np.diag(cm) > 0).sum()),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion_matrix": cm.tolist(),
        "top_confused_pairs": top_confused_pairs(cm, classes),
    }


def top_confused_pairs(cm: np.ndarray, classes: list[str], n: int = 5) -> list[dict]:
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:n]
    pairs = [np.unravel_index(i, off.shape) for i in order]
    return [{"true": classes[t], "predicted": classes[p], "cells": int(off[t, p])} for t, p in pairs if off[t, p] > 0]


PROBE_CS = np.logspace(-3, 1, 9)  # inverse regularisation on standardised embeddings: 0.001 to 10


@dataclass
class LinearProbe:
    probabilities: np.ndarray  # on the validation cells
    weight: np.ndarray  # [classes, latent]: the fitted probe as one Linear layer on raw embeddings
    bias: np.ndarray
    fit: dict


def linear_probe(z_train: np.ndarray, y_train: np.ndarray, z_val: np.ndarray, n_classes: int, seed: int = 0,
                 cs: np.ndarray = PROBE_CS) -> LinearProbe:
    """Logistic regression on standardised frozen embeddings, C chosen by 5-fold cross-validated log-loss, lbfgs to convergence.

    Unit-norm embeddings have tiny per-feature scale; without standardising, any fixed C over-regularises. C is
    chosen by log-loss among `cs`, not by accuracy: on near-separable embeddings accuracy ties across C and
    picked anything from 0.27 to 51.8 (head row norms 321 to 3,400, which int8 rounds badly); log-loss prefers
    the C whose probabilities are right, and the grid's top bounds the weights.
    """
    max_iter = 10000
    scaler = StandardScaler().fit(z_train)
    with warnings.catch_warnings():  # scikit-learn 1.9's notices of changing defaults; scoring is set explicitly
        warnings.simplefilter("ignore", FutureWarning)
        clf = LogisticRegressionCV(Cs=cs, cv=5, max_iter=max_iter, scoring="neg_log_loss", random_state=seed).fit(scaler.transform(z_train), y_train)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # two classes: sigmoid as a two-way softmax
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    probs = _all_columns(clf.predict_proba(scaler.transform(z_val)), clf.classes_, n_classes)
    iterations = int(np.max(clf.n_iter_))
    return LinearProbe(probs, weight, bias, {"C": float(np.ravel(clf.C_)[0]), "iterations": iterations, "converged": iterations < max_iter})


# MB of distances scikit-learn's neighbour search holds at once (its default, 1,024, took 2.5 GB at 10,000 validation
# cells against 25,000 fitted: cosine distances make several temporaries of each chunk)
KNN_WORKING_MEMORY_MB = 128


def knn_classifier(z_train: np.ndarray, y_train: np.ndarray, z_val: np.ndarray, n_classes: int, k: int) -> np.ndarray:
    clf = KNeighborsClassifier(n_neighbors=min(k, len(z_train)), metric="cosine", weights="distance").fit(z_train, y_train)
    with sklearn.config_context(working_memory=KNN_WORKING_MEMORY_MB):
        return _all_columns(clf.predict_proba(z_val), clf.classes_, n_classes)


def _all_columns(probs: np.ndarray, present: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(probs), n_classes))
    out[:, present] = probs
    return out


def knn_transfer_accuracy(z: np.ndarray, labels: np.ndarray, k: int, seed: int = 0) -> float:
    """5-fold k-NN label transfer within a dataset: how well the embedding keeps its cell types apart."""
    folds = min(5, int(np.unique(labels, return_counts=True)[1].min()))
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine")
    with sklearn.config_context(working_memory=KNN_WORKING_MEMORY_MB):
        return float(cross_val_score(clf, z, labels, cv=max(folds, 2)).mean())


def mean_cosine_drift(z_before: np.ndarray, z_after: np.ndarray) -> float:
    """Mean of 1 - cos(before, after) per cell; both are L2-normalised."""
    return float(np.mean(1.0 - np.sum(z_before * z_after, axis=1)))
