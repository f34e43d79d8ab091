"""Example: train and evaluate a classifier on a dataset that ships with scikit-learn.

    skyloop run examples/train.py:training_pipeline -p n_estimators=50

load → split → train (one model per candidate setting, in parallel) → evaluate each → pick the best
→ report, which only runs when the best model clears `min_accuracy`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pandas as pd

from skyloop import Resources, pipeline, step, unmapped, when


class Split(NamedTuple):
    train: pd.DataFrame
    test: pd.DataFrame


class Scored(NamedTuple):
    accuracy: float
    f1: float
    params: dict[str, Any]


@step
def load_data(dataset: str) -> pd.DataFrame:
    """Load a dataset bundled with scikit-learn as a DataFrame with a `target` column."""
    from sklearn import datasets

    loaders = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine, "iris": datasets.load_iris}
    if dataset not in loaders:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(loaders)}")
    frame = loaders[dataset](as_frame=True).frame
    print(f"loaded {dataset}: {frame.shape[0]} rows, {frame.shape[1] - 1} features")
    return frame


@step
def split_data(frame: pd.DataFrame, test_size: float, seed: int) -> Split:
    """Stratified train/test split."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(frame, test_size=test_size, random_state=seed, stratify=frame["target"])
    return Split(train, test)


@step
def candidates(n_estimators: int) -> list[dict[str, Any]]:
    """The settings to try (a small grid around the requested size)."""
    sizes = sorted({max(1, n_estimators // 2), n_estimators})  # one tree is a size too
    return [{"n_estimators": n, "max_depth": d} for n in sizes for d in (3, None)]


@step(resources=Resources(cpus=1, memory="256Mi"), retries=1, timeout=300)
def train(train: pd.DataFrame, params: dict[str, Any], seed: int) -> Any:
    """Fit a random forest with one candidate setting."""
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(random_state=seed, n_jobs=1, **params)
    model.fit(train.drop(columns="target"), train["target"])
    return model


@step
def evaluate(model: Any, test: pd.DataFrame) -> Scored:
    """Accuracy and macro F1 on the held-out split."""
    from sklearn.metrics import accuracy_score, f1_score

    predicted = model.predict(test.drop(columns="target"))
    accuracy = float(accuracy_score(test["target"], predicted))
    f1 = float(f1_score(test["target"], predicted, average="macro"))
    print(f"{model.get_params()['n_estimators']} trees, depth {model.get_params()['max_depth']}: "
          f"accuracy {accuracy:.3f}, f1 {f1:.3f}")
    return Scored(accuracy, f1, {k: model.get_params()[k] for k in ("n_estimators", "max_depth")})


class Best(NamedTuple):
    accuracy: float
    params: dict[str, Any]
    index: int


@step
def pick_best(accuracies: list[float], settings: list[dict[str, Any]]) -> Best:
    """The candidate with the highest accuracy (first one on ties)."""
    index = max(range(len(accuracies)), key=lambda i: accuracies[i])
    return Best(accuracies[index], settings[index], index)


@step
def report(accuracy: float, params: dict[str, Any], dataset: str) -> str:
    """A short human-readable summary."""
    text = f"best model on {dataset}: accuracy {accuracy:.3f} with {params}"
    print(text)
    return text


@pipeline
def training_pipeline(dataset: str = "breast_cancer", n_estimators: int = 60, test_size: float = 0.25,
                      seed: int = 7, min_accuracy: float = 0.8):
    """Train a few random forests in parallel, keep the best, report it if it is good enough."""
    frame = load_data(dataset)
    parts = split_data(frame, test_size, seed)
    settings = candidates(n_estimators)
    models = train.map(unmapped(parts.train), settings, unmapped(seed))
    scores = evaluate.map(models, unmapped(parts.test))
    best = pick_best(scores.accuracy, settings)
    with when(best.accuracy >= min_accuracy):
        summary = report(best.accuracy, best.params, dataset)
    return {"accuracy": best.accuracy, "params": best.params, "report": summary}
