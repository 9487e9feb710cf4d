"""KFP component: raw ratings (local path, gs:// or the embedded synthetic set) -> preprocessed Dataset."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def preprocess(
    dataset: Output[Dataset],
    data_uri: str = "synthetic",
    dataset_config: str = "",
    config: str = "{}",
    data_fingerprint: str = "",
):
    """Validates, encodes and splits a ratings data set into few-shot tasks.

    Args:
        dataset: Output directory in the preprocessing layout (schema.json, users.parquet,
            items.parquet, interactions.parquet). Its metadata holds the summary counts.
        data_uri: Raw data location: a local directory, a ``gs://`` prefix, ``"synthetic"`` (the
            embedded synthetic data set) or ``"synthetic:tiny"`` (a small one for tests).
        dataset_config: Data-set config: a shipped name (``movielens-100k``, ``movielens-csv``,
            ``synthetic``), a YAML file path or a ``gs://`` URI; empty picks the default for ``data_uri``.
        config: JSON object with the ``preprocess`` section of the run config (see
            ``metarec.preprocessing.DEFAULTS``); ``"{}"`` keeps the defaults.
        data_fingerprint: Output of the fingerprint_data step. Unused by the code, it is part of the
            cache key: KFP reuses a cached Dataset only while the data is byte for byte the same.
    """
    from metarec.components.common import fresh_output_dir, numeric_items, parse_config
    from metarec.preprocessing import run_preprocessing

    settings = parse_config(config, "preprocess")
    fresh_output_dir(dataset.path)  # no file of an earlier attempt may stay in the data set
    summary = run_preprocessing(
        data_uri=data_uri,
        dataset_config=dataset_config or None,
        config=settings,
        output_dir=dataset.path,
    )
    dataset.metadata.update(numeric_items(summary or {}))
    dataset.metadata["data_uri"] = data_uri
    dataset.metadata["data_fingerprint"] = data_fingerprint
