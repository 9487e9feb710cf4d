"""The preprocess cache key follows the data: fingerprint_data over a real GCS emulator, and the pipeline
feeding it into preprocess with caching off for the fingerprint itself."""

import pytest

from metarec import storage
from metarec.preprocessing import data_fingerprint


def test_fingerprint_changes_when_an_object_changes_and_only_then(gcs_bucket):
    prefix = f"gs://{gcs_bucket}/ratings"
    storage.write_bytes(f"{prefix}/u.data", b"1\t1\t5\t0\n")
    storage.write_bytes(f"{prefix}/u.item", b"1|Toy Story\n")
    first = data_fingerprint(prefix)
    assert first.startswith("sha256:")
    assert data_fingerprint(prefix) == first  # nothing changed: the cached Dataset may be reused

    storage.write_bytes(f"{prefix}/u.data", b"1\t1\t4\t0\n")  # last week's file, refreshed in place
    refreshed = data_fingerprint(prefix)
    assert refreshed != first

    storage.write_bytes(f"{prefix}/u.user", b"1|24|M|technician|85711\n")  # a new file
    assert data_fingerprint(prefix) not in (first, refreshed)


def test_fingerprint_of_local_folders_and_synthetic_data(tmp_path):
    (tmp_path / "u.data").write_bytes(b"a")
    before = data_fingerprint(str(tmp_path))
    (tmp_path / "u.data").write_bytes(b"b")
    assert data_fingerprint(str(tmp_path)) != before
    assert data_fingerprint("synthetic:tiny") == "synthetic:tiny"
    # A preset preprocess would refuse gets no cache key either (the step fails here, not downstream).
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        data_fingerprint("synthetic:huge")


def test_fingerprint_follows_a_config_and_its_model_edited_in_place(gcs_bucket, tmp_path):
    import yaml

    from metarec.data.config import CONFIGS_DIR

    prefix = f"gs://{gcs_bucket}/cfg-data"
    storage.write_bytes(f"{prefix}/u.data", b"1\t1\t5\t0\n")
    config = yaml.safe_load((CONFIGS_DIR / "movielens-100k.yaml").read_text())
    config_uri = f"gs://{gcs_bucket}/configs/ml.yaml"
    storage.write_bytes(config_uri, yaml.safe_dump(config).encode())
    first = data_fingerprint(prefix, config_uri)
    assert first == data_fingerprint(prefix, config_uri) != data_fingerprint(prefix)

    config["ratings"]["rating_scale"] = [0, 5]  # edited in place: same URI, new meaning
    storage.write_bytes(config_uri, yaml.safe_dump(config).encode())
    edited = data_fingerprint(prefix, config_uri)
    assert edited != first

    model = tmp_path / "encoder"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"v1")
    config["items"]["features"].append(
        {
            "name": "title_vec",
            "kind": "text",
            "columns": ["title"],
            "encoder": "sentence",
            "model": str(model),
        }
    )
    storage.write_bytes(config_uri, yaml.safe_dump(config).encode())
    with_model = data_fingerprint(prefix, config_uri)
    (model / "weights.bin").write_bytes(b"v2")  # the model retrained under the same path
    assert data_fingerprint(prefix, config_uri) not in (with_model, edited)
    assert data_fingerprint("synthetic:tiny", "synthetic").startswith("sha256:")


def test_fingerprint_of_missing_data_names_it(gcs_bucket):
    with pytest.raises(storage.StorageError, match="nothing to fingerprint"):
        data_fingerprint(f"gs://{gcs_bucket}/nothing-here")


def test_pipeline_feeds_the_fingerprint_into_the_preprocess_cache_key(tmp_path):
    import yaml

    from metarec.pipelines.compile import compile_pipeline
    from metarec.pipelines.metarec_pipeline import PipelineOptions

    path = compile_pipeline(PipelineOptions(variant="cpu"), tmp_path / "p.yaml")
    dag = next(yaml.safe_load_all(path.read_text()))["root"]["dag"]["tasks"]
    assert dag["fingerprint-data"]["cachingOptions"] == {}  # enableCache absent: off
    wired = dag["preprocess"]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"]
    assert wired == {"outputParameterKey": "Output", "producerTask": "fingerprint-data"}
    config = dag["fingerprint-data"]["inputs"]["parameters"]["dataset_config"]
    assert config == {"componentInputParameter": "dataset_config"}
