"""preprocess from its compiled YAML under kfp.local."""

import json

import pytest
from kfp import dsl
from kfp_fakes import load, task_dir

pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")


@pytest.mark.slow
def test_preprocess_from_yaml_runs_locally(local_runner):
    @dsl.pipeline(name="preprocess-only")
    def pipe():
        load("preprocess")(data_uri="synthetic:tiny", config='{"seed": 3}')

    pipe()
    dataset = task_dir(local_runner, "preprocess") / "dataset"
    for file_name in ("schema.json", "users.parquet", "items.parquet", "interactions.parquet"):
        assert (dataset / file_name).is_file(), file_name
    schema = json.loads((dataset / "schema.json").read_text())
    assert schema["splits"]["seed"] == 3  # the JSON config reached the step function
    metadata = json.loads((task_dir(local_runner, "preprocess") / "executor_output.json").read_text())
    dataset_metadata = metadata["artifacts"]["dataset"]["artifacts"][0]["metadata"]
    assert dataset_metadata["data_uri"] == "synthetic:tiny"
    assert dataset_metadata["n_users"] > 0
