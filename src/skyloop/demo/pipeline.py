"""The demo's training pipeline: load data (simulated, or what the loop logged and labelled), split,
train a random forest, evaluate it, register it with its training inputs as the drift reference.

    skyloop run skyloop.demo.pipeline:train_agent -p data=""        # first model, simulated data
    (the loop passes data=PATH.parquet: the features and a `target` column)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pandas as pd

from skyloop import Resources, pipeline, step

__all__ = ["Scored", "Split", "evaluate", "load", "register", "split", "train", "train_agent"]


class Split(NamedTuple):
    train: pd.DataFrame
    test: pd.DataFrame


class Scored(NamedTuple):
    accuracy: float
    rows: int


@step
def load(data: str, rows: int, seed: int) -> pd.DataFrame:
    """The labelled rows at `data` (parquet), or `rows` simulated ones before the shift when `data` is empty."""
    if data:
        frame = pd.read_parquet(data)
        print(f"loaded {len(frame)} logged and labelled rows from {data}")
        return frame
    from skyloop.demo.world import FEATURES, World

    world = World(seed)
    x = world.observe(rows)
    frame = pd.DataFrame(x, columns=FEATURES).assign(target=world.truth(x))
    print(f"simulated {len(frame)} rows")
    return frame


@step
def split(frame: pd.DataFrame, seed: int) -> Split:
    """75/25 split, stratified."""
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(frame, test_size=0.25, random_state=seed, stratify=frame["target"])
    return Split(train, test)


@step(resources=Resources(cpus=1, memory="512Mi"), retries=1, timeout=300)
def train(train: pd.DataFrame, seed: int) -> Any:
    """A random forest on the features."""
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=60, min_samples_leaf=3, random_state=seed, n_jobs=1)
    model.fit(train.drop(columns="target"), train["target"].astype(int))
    return model


@step
def evaluate(model: Any, test: pd.DataFrame) -> Scored:
    """Accuracy on the held-out rows."""
    accuracy = float((model.predict(test.drop(columns="target")) == test["target"].astype(int)).mean())
    print(f"test accuracy {accuracy:.3f} on {len(test)} rows")
    return Scored(accuracy, len(test))


@step
def register(model: Any, train: pd.DataFrame, accuracy: float, name: str) -> str:
    """Register the model, with its training inputs as the drift reference."""
    from skyloop.registry import log_model

    features = train.drop(columns="target")
    # One named FP64 input per feature: requests name what they send, and logs and drift use the names.
    signature = {"inputs": [{"name": str(c), "datatype": "FP64", "shape": [-1]} for c in features.columns],
                 "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1]}]}
    info = log_model(model, name, signature=signature, reference=features, metrics={"accuracy": accuracy})
    print(f"registered {info.uri}")
    return info.uri


@pipeline
def train_agent(data: str = "", rows: int = 3000, seed: int = 7, name: str = "agent") -> dict[str, Any]:
    """Train and register the agent's model."""
    frame = load(data, rows, seed)
    parts = split(frame, seed)
    model = train(parts.train, seed)
    score = evaluate(model, parts.test)
    uri = register(model, parts.train, score.accuracy, name)
    return {"uri": uri, "accuracy": score.accuracy}
