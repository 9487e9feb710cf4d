"""The GPU serving overlay serves on the GPU: the handler takes the device TorchServe assigns its worker
(``context.system_properties["gpu_id"]``) and stays on the CPU when there is none."""

import pytest
import torch

# Skip only without TorchServe itself: importorskip on the handler would also skip when the handler
# fails to import (a module it needs is missing), which must fail instead.
pytest.importorskip("ts", reason="TorchServe is not installed")
from ts.context import Context  # noqa: E402 - only once TorchServe is known to be installed

from metarec.serving import handler as handler_module  # noqa: E402


@pytest.mark.parametrize(
    ("gpu_id", "cuda", "expected"), [(3, True, "cuda:3"), (None, True, "cpu"), (0, False, "cpu")]
)
def test_handler_uses_the_device_torchserve_assigns(monkeypatch, tmp_path, gpu_id, cuda, expected):
    chosen = {}

    class Loaded(Exception):
        """Stops initialize once the model would be loaded: only the device matters here."""

    def from_dir(model_dir, device, **settings):
        chosen["device"] = device
        raise Loaded

    monkeypatch.setattr(handler_module.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(handler_module.Recommender, "from_dir", from_dir)
    context = Context("metarec", str(tmp_path), {"model": {"modelName": "metarec"}}, 1, gpu_id, "0.12.0",
                      model_yaml_config={"handler": {}})  # fmt: skip
    with pytest.raises(Loaded):
        handler_module.MetaRecHandler().initialize(context)
    assert chosen["device"] == torch.device(expected)
