"""Stand-in KFP components for tests that need an upstream step's output without running it for real."""

from kfp import dsl
from kfp.dsl import Artifact, Model, Output


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fake_candidate(method: str, model: Output[Model]):
    """Writes a model directory that only names its method (select_model never loads the weights)."""
    import json
    import os

    os.makedirs(model.path, exist_ok=True)
    with open(os.path.join(model.path, "model.json"), "w") as handle:
        json.dump({"method": method}, handle)
    with open(os.path.join(model.path, "model.pt"), "wb") as handle:
        handle.write(method.encode())


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fake_evaluation(evaluation: Output[Artifact], best_meta_score: float = 0.9):
    """Writes an evaluation document: reptile is the best candidate, the baseline scores 0.8."""
    import json

    scenarios = {
        "user_cold": {
            "maml": {"ndcg@3": 0.7, "mae": 0.9},
            "reptile": {"ndcg@3": best_meta_score, "mae": 0.8},
            "global_mean": {"ndcg@3": 0.8, "mae": 0.85},
        }
    }
    methods = {"maml": {"kind": "meta"}, "reptile": {"kind": "meta"}, "global_mean": {"kind": "baseline"}}
    with open(evaluation.path, "w") as handle:
        # The same scores for the validation users, whose scores every choice reads.
        json.dump({"scenarios": scenarios, "validation": scenarios, "methods": methods}, handle)


def task_dir(root, task: str):
    """The folder of one task of the only run under a kfp.local pipeline root."""
    (run_dir,) = list(root.iterdir())
    return run_dir / task


def load(name: str):
    """Loads a component from its committed, compiled YAML (what a pipeline author would use)."""
    from pathlib import Path

    from kfp import components

    return components.load_component_from_file(
        str(Path(__file__).resolve().parents[1] / "components" / name / "component.yaml")
    )
