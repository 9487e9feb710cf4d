"""The components' bodies run again into their own leftovers, and fed bad inputs, as a platform team's
pipeline would: a retry on a FUSE-mounted pipeline root sees the earlier attempt's files in its output
paths, and a wrong input fails with a ValueError naming it."""

import json
import os
from pathlib import Path

import pytest

from metarec.components.build import load_component

TRAIN = json.dumps({"meta_steps": 2, "meta_batch": 4, "val_every": 0, "checkpoint_every": 0})
EVALUATE = json.dumps({"scenarios": ["user_cold"], "baselines": ["global_mean"], "kshots": [1],
                       "tune_on_val": False})  # fmt: skip


class Artifact:
    """The part of a KFP artifact the component bodies use (path, uri, metadata, log_metric)."""

    def __init__(self, path, metadata=None):
        self.path = self.uri = str(path)
        self.metadata = dict(metadata or {})

    def log_metric(self, name, value):
        self.metadata[name] = value


def body(name: str):
    """The Python function behind a component: what its container runs."""
    return load_component(name).python_func


def _train(dataset: Path, out: Path, method: str, **parameters) -> Artifact:
    model = Artifact(out, {})
    body("meta_train")(Artifact(dataset), model, Artifact(f"{out}.metrics"), method=method, config=TRAIN,
                       run_id="run-1", task_id=f"task-{method}", **parameters)  # fmt: skip
    model.metadata["method"] = method
    return model


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """preprocess, two meta_train candidates, evaluate and select_model on synthetic:tiny."""
    root = tmp_path_factory.mktemp("chain")
    dataset = root / "dataset"
    body("preprocess")(Artifact(dataset), data_uri="synthetic:tiny")
    models = [_train(dataset, root / f"model-{method}", method) for method in ("maml", "reptile")]
    evaluation = Artifact(root / "evaluation")
    body("evaluate")(Artifact(dataset), models, Artifact(root / "metrics"), Artifact(root / "report"), evaluation,
                     config=EVALUATE)  # fmt: skip
    selected, selection = Artifact(root / "selected"), Artifact(root / "selection")
    body("select_model")(evaluation, models, selected, selection, Artifact(root / "select-metrics"))
    return {"root": root, "dataset": dataset, "models": models, "evaluation": evaluation,
            "selected": selected, "selection": selection}  # fmt: skip


def _leave(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("left by an earlier attempt")


# ---------------------------------------------------------------------------------------------------
# A second attempt into the same output location


def test_preprocess_rerun_leaves_nothing_of_the_earlier_attempt(chain, tmp_path):
    out = tmp_path / "dataset"
    _leave(out, "stale.parquet", "old/schema.json")
    body("preprocess")(Artifact(out), data_uri="synthetic:tiny")
    assert sorted(os.listdir(out)) == sorted(os.listdir(chain["dataset"]))


def test_meta_train_rerun_leaves_nothing_of_the_earlier_attempt(chain, tmp_path):
    out = tmp_path / "model"
    _leave(out, "stale.txt", "model.json")
    _train(chain["dataset"], out, "fomaml")
    assert sorted(os.listdir(out)) == sorted(os.listdir(chain["models"][0].path))
    assert json.loads((out / "model.json").read_text())["method"] == "fomaml"


def test_select_model_into_another_selections_leftovers_copies_only_the_winner(chain, tmp_path):
    out = tmp_path / "selected"
    _leave(out, "from-another-candidate.pt")
    body("select_model")(chain["evaluation"], chain["models"], Artifact(out), Artifact(tmp_path / "selection"),
                         Artifact(tmp_path / "metrics"))  # fmt: skip
    assert sorted(os.listdir(out)) == sorted(os.listdir(chain["selected"].path))


def _package(chain, out: Path, **parameters) -> Artifact:
    archive = Artifact(out)
    body("package_model")(chain["selected"], chain["evaluation"], chain["selection"], Artifact(chain["dataset"]),
                          archive, **parameters)  # fmt: skip
    return archive


def test_package_model_rerun_publishes_no_archive_of_the_earlier_attempt(chain, tmp_path):
    out = tmp_path / "archive"
    # An earlier attempt packaged the model under another name; its .mar must not be published now.
    _package(chain, out, model_name="old-name")
    _package(chain, out, model_name="demo", output_uri=str(tmp_path / "published"), version="v1",
             publish_if_worse=True)  # fmt: skip
    assert sorted(os.listdir(out / "model-store")) == ["demo.mar"]
    assert sorted(os.listdir(tmp_path / "published" / "v1" / "model-store")) == ["demo.mar"]


# ---------------------------------------------------------------------------------------------------
# Bad inputs fail with a ValueError naming what is wrong


def test_select_model_without_an_evaluation_document_names_it(chain, tmp_path):
    missing = Artifact(tmp_path / "no-evaluation")
    with pytest.raises(ValueError, match="evaluation.*no-evaluation.*missing"):
        body("select_model")(missing, chain["models"], Artifact(tmp_path / "s"), Artifact(tmp_path / "j"),
                             Artifact(tmp_path / "m"))  # fmt: skip
    (tmp_path / "broken").write_text("{not json")
    with pytest.raises(ValueError, match="evaluation.*broken is not valid JSON"):
        body("select_model")(Artifact(tmp_path / "broken"), chain["models"], Artifact(tmp_path / "s"),
                             Artifact(tmp_path / "j"), Artifact(tmp_path / "m"))  # fmt: skip


def test_package_model_with_a_broken_selection_names_it(chain, tmp_path):
    (tmp_path / "selection").write_text("[]")
    broken = dict(chain, selection=Artifact(tmp_path / "selection"))
    with pytest.raises(ValueError, match="selection.*JSON list, not an object"):
        _package(broken, tmp_path / "archive")
    with pytest.raises(ValueError, match="evaluation.*missing"):
        _package(dict(chain, evaluation=Artifact(tmp_path / "none")), tmp_path / "archive")


@pytest.mark.parametrize("uri", ["s3://bucket/serving", "gcs://bucket/serving", "gs:///serving"])
def test_package_model_refuses_an_output_uri_it_cannot_publish_to(chain, tmp_path, uri, monkeypatch):
    # Any scheme but gs:// was taken for a local folder ("s3:") and the version lost with the container.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="output_uri"):
        _package(chain, tmp_path / "archive", output_uri=uri, version="v1", publish_if_worse=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(":")]


def test_evaluate_and_select_refuse_a_candidate_without_its_model_files(chain, tmp_path):
    empty = Artifact(tmp_path / "empty-model", {"method": "fomaml"})
    os.makedirs(empty.path)
    with pytest.raises(ValueError, match="empty-model has no model.json, model.pt"):
        body("evaluate")(Artifact(chain["dataset"]), [*chain["models"], empty], Artifact(tmp_path / "m"),
                         Artifact(tmp_path / "r"), Artifact(tmp_path / "e"), config=EVALUATE)  # fmt: skip
    broken = Artifact(tmp_path / "broken-model")
    _leave(Path(broken.path), "model.pt")
    (Path(broken.path) / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.json.*not valid JSON"):
        body("select_model")(chain["evaluation"], [broken], Artifact(tmp_path / "s"), Artifact(tmp_path / "j"),
                             Artifact(tmp_path / "m"))  # fmt: skip


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"device": "tpu"}, "device must be 'cpu' or 'cuda'"),
        ({"checkpoint_root": "s3://b/ckpt"}, "checkpoint_root"),
    ],
)
def test_meta_train_refuses_a_device_or_checkpoint_root_it_cannot_use(
    chain, tmp_path, parameters, message, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # an s3:// root was written to a local folder 's3:' here
    with pytest.raises(ValueError, match=message):
        _train(chain["dataset"], tmp_path / "model", "maml", **parameters)
