"""KFP component: fingerprint the raw data, so that the cached preprocess step reruns when it changes."""

from kfp import dsl

from metarec.images import components_image


@dsl.component(base_image=components_image(), install_kfp_package=False)
def fingerprint_data(data_uri: str = "synthetic") -> str:
    """Returns a fingerprint of the data under ``data_uri`` (never cached: it must look every time).

    Args:
        data_uri: Raw data location, as for the preprocess component.

    Returns:
        ``sha256:<hex>`` of the object names, generations, sizes and crc32c (``gs://``) or file
        checksums (local); ``synthetic:<preset>`` for generated data.
    """
    from metarec.preprocessing import data_fingerprint

    fingerprint = data_fingerprint(data_uri)
    print(f"{data_uri}: {fingerprint}")
    return fingerprint
