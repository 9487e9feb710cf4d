"""KFP component: fingerprint the raw data, so that the cached preprocess step reruns when it changes."""

from kfp import dsl

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def fingerprint_data(data_uri: str = "synthetic", dataset_config: str = "") -> str:
    """Returns a fingerprint of what preprocess reads; turn caching off for its task.

    A cached fingerprint would be the one of the data as it was, and preprocess would be cached with it.

    Args:
        data_uri: Raw data location, as for the preprocess component.
        dataset_config: Data-set config, as for the preprocess component: a file or ``gs://`` config
            edited in place, or a sentence-embedding model folder it names, changes the fingerprint too.

    Returns:
        ``sha256:<hex>`` of the object names, generations, sizes and crc32c (``gs://``) or file
        checksums (local), with the config's and its models' when ``dataset_config`` is set;
        ``synthetic:<preset>`` for generated data without a config.
    """
    from metarec.preprocessing import data_fingerprint

    fingerprint = data_fingerprint(data_uri, dataset_config)
    print(f"{data_uri} {dataset_config}: {fingerprint}")
    return fingerprint
