"""KFP component: package the selected model as a TorchServe archive in KServe's layout, and publish it
under a new version when the model passed the quality gate."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def package_model(
    model: Input[Model],
    evaluation: Input[Artifact],
    selection: Input[Artifact],
    dataset: Input[Dataset],
    archive: Output[Model],
    model_name: str = "metarec",
    serving_config: str = "{}",
    output_uri: str = "",
    publish_if_worse: bool = False,
    version: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
):
    """Builds ``config/config.properties`` + ``model-store/<model_name>.mar`` for TorchServe / KServe.

    Args:
        model: The selected model directory (output ``selected_model`` of select_model).
        evaluation: Evaluation document; its scores travel inside the archive as model card data.
        selection: select_model's summary: publishing requires ``beats_baseline`` (the quality gate).
        dataset: Preprocessed data set: the archive carries the item catalogue (ids and features) from it.
        archive: Output directory in KServe's TorchServe layout; metadata ``published_uri`` names the
            published version (what deploy_model rolls out).
        model_name: Model name in TorchServe (URL ``/predictions/<model_name>``).
        serving_config: JSON object with the ``package.serving`` settings (see
            ``metarec.serving_settings.ServingSettings``); ``"{}"`` keeps the defaults.
        output_uri: Optional ``gs://`` prefix (or local directory) of the published versions: the archive
            goes to ``<output_uri>/<version>``, promoted with a completion manifest written last. A
            published version (manifest present) is never overwritten; files without a manifest, left
            by an attempt killed mid-copy, are replaced. A live one is replaced only by deploy_model.
        publish_if_worse: Publish even when the model does not beat the best baseline (off: the gate
            fails the step, so nothing reaches the bucket).
        version: Version folder name; the default is the KFP run id, new for every run.
    """
    from metarec.components.common import (
        check_location,
        fresh_output_dir,
        parse_config,
        publish_version,
        read_json_artifact,
    )
    from metarec.packaging import build_archive

    gate = read_json_artifact(selection.path, "selection (output 'selection' of select_model)")
    read_json_artifact(evaluation.path, "evaluation (output 'evaluation' of evaluate)")
    check_location(output_uri, "output_uri")
    settings = parse_config(serving_config, "package.serving")
    # An earlier attempt's files (another model name's .mar) would otherwise be published with this one.
    fresh_output_dir(archive.path)
    summary = build_archive(
        model_dir=model.path,
        evaluation_json=evaluation.path,
        output_dir=archive.path,
        model_name=model_name,
        serving_config=settings,
        preprocessed_dir=dataset.path,
    )
    archive.metadata["model_name"] = model_name
    for key in ("version", "method", "archive_sha256", "archive_bytes"):
        if summary.get(key) is not None:
            archive.metadata[key] = summary[key]
    print(f"archive written to {archive.path}")
    if output_uri:
        published = publish_version(archive.path, output_uri, version, gate, publish_if_worse)
        archive.metadata["published_uri"] = published
        print(f"archive published to {published}")
