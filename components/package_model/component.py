"""KFP component: package the selected model as a TorchServe archive in KServe's layout."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def package_model(
    model: Input[Model],
    evaluation: Input[Artifact],
    dataset: Input[Dataset],
    archive: Output[Model],
    model_name: str = "metarec",
    serving_config: str = "{}",
    output_uri: str = "",
):
    """Builds ``config/config.properties`` + ``model-store/<model_name>.mar`` for TorchServe / KServe.

    Args:
        model: The selected model directory (output ``selected_model`` of select_model).
        evaluation: Evaluation document; its scores travel inside the archive as model card data.
        dataset: Preprocessed data set: the archive carries the item catalogue (ids and features) from it.
        archive: Output directory in KServe's TorchServe layout (point an InferenceService's
            ``storageUri`` at it, or at ``output_uri``).
        model_name: Model name in TorchServe (URL ``/predictions/<model_name>``).
        serving_config: JSON object with the ``package.serving`` settings (see
            ``metarec.serving_settings.ServingSettings``); ``"{}"`` keeps the defaults.
        output_uri: Optional ``gs://`` prefix (or local directory) the archive is also published to;
            promoted with a completion manifest written last, so readers never see half an archive.
    """
    from metarec.components.common import parse_config

    from metarec.packaging import build_archive

    summary = build_archive(
        model_dir=model.path,
        evaluation_json=evaluation.path,
        output_dir=archive.path,
        model_name=model_name,
        serving_config=parse_config(serving_config, "package.serving"),
        preprocessed_dir=dataset.path,
    )
    archive.metadata["model_name"] = model_name
    for key in ("version", "method", "archive_sha256", "archive_bytes"):
        if summary.get(key) is not None:
            archive.metadata[key] = summary[key]
    if output_uri:
        from metarec import storage

        storage.promote(archive.path, output_uri)
        archive.metadata["published_uri"] = output_uri
        print(f"archive published to {output_uri}")
    print(f"archive written to {archive.path}")
