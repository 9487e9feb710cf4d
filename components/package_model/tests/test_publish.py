"""Publishing: a new version per run, never over an existing one, and only past the quality gate."""

import json

import pytest

from metarec import storage
from metarec.components.common import publish_version

PASSED = {"beats_baseline": True, "message": "maml beats global_mean"}
FAILED = {"beats_baseline": False, "message": "maml loses to item_user_bias"}


@pytest.fixture()
def archive(tmp_path):
    folder = tmp_path / "archive"
    (folder / "model-store").mkdir(parents=True)
    (folder / "model-store" / "metarec.mar").write_bytes(b"mar")
    return folder


def test_each_run_publishes_a_new_complete_version(archive, gcs_bucket):
    root = f"gs://{gcs_bucket}/models/metarec"
    first = publish_version(str(archive), root, "run-1", PASSED, publish_if_worse=False)
    (archive / "model-store" / "metarec.mar").write_bytes(b"mar v2")
    second = publish_version(str(archive), root, "run-2", PASSED, publish_if_worse=False)
    assert (first, second) == (f"{root}/run-1", f"{root}/run-2")
    assert storage.is_complete(first) and storage.is_complete(second)
    assert storage.read_bytes(f"{first}/model-store/metarec.mar") == b"mar"  # the live one is untouched


def test_an_existing_version_is_never_overwritten(archive, tmp_path):
    root = tmp_path / "published"
    publish_version(str(archive), str(root), "run-1", PASSED, publish_if_worse=False)
    with pytest.raises(ValueError, match="never overwritten"):
        publish_version(str(archive), str(root), "run-1", PASSED, publish_if_worse=False)


def _half_published(target):
    """What an attempt killed mid-promote leaves: some files copied, no completion manifest."""
    storage.write_bytes(f"{target}/model-store/metarec.mar", b"m")  # truncated copy of the archive
    storage.write_bytes(f"{target}/config/stale.properties", b"first attempt")  # not in the archive


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_a_retry_republishes_a_version_its_killed_attempt_left_incomplete(archive, tmp_path, where, request):
    bucket = request.getfixturevalue("gcs_bucket") if where == "gcs" else None
    root = f"gs://{bucket}/models" if bucket else str(tmp_path / "models")
    target = f"{root}/run-1"
    _half_published(target)
    assert storage.exists(target) and not storage.is_complete(target)

    # KFP "Retry run": same run id, so the same version.
    published = publish_version(str(archive), root, "run-1", PASSED, publish_if_worse=False)

    assert published == target and storage.is_complete(target)
    assert storage.read_bytes(f"{target}/model-store/metarec.mar") == b"mar"
    names = {uri[len(target) + 1 :] for uri in storage.list_uris(target)}
    assert names == {"model-store/metarec.mar", storage.MANIFEST_NAME}  # the stale file is gone
    # Once complete, the version is immutable again.
    with pytest.raises(ValueError, match="never overwritten"):
        publish_version(str(archive), root, "run-1", PASSED, publish_if_worse=False)


def test_a_published_version_whose_files_were_changed_is_still_never_overwritten(archive, tmp_path):
    root = tmp_path / "published"
    target = publish_version(str(archive), str(root), "run-1", PASSED, publish_if_worse=False)
    (root / "run-1" / "model-store" / "metarec.mar").write_bytes(b"edited by hand")
    assert not storage.is_complete(target)
    with pytest.raises(ValueError, match="never overwritten"):
        publish_version(str(archive), str(root), "run-1", PASSED, publish_if_worse=False)
    assert (root / "run-1" / "model-store" / "metarec.mar").read_bytes() == b"edited by hand"


def test_quality_gate_blocks_a_model_that_loses_to_the_baseline(archive, tmp_path):
    root = tmp_path / "published"
    with pytest.raises(ValueError, match="quality gate.*loses to item_user_bias"):
        publish_version(str(archive), str(root), "run-1", FAILED, publish_if_worse=False)
    assert not root.exists()
    published = publish_version(str(archive), str(root), "run-1", FAILED, publish_if_worse=True)
    assert json.loads((root / "run-1" / storage.MANIFEST_NAME).read_text())["files"]
    assert published == f"{root}/run-1"


@pytest.mark.parametrize("version", ["", "{{$.pipeline_job_uuid}}", "a/b"])
def test_version_must_be_a_plain_name(archive, tmp_path, version):
    with pytest.raises(ValueError, match="version"):
        publish_version(str(archive), str(tmp_path), version, PASSED, publish_if_worse=False)
