"""A training task that asks for a GPU fails loudly when none is visible, instead of training on the CPU
while the GPU it holds sits idle."""

import pytest
import torch

from metarec.distributed import pick_device
from metarec.preprocessing import run_preprocessing
from metarec.training import run_meta_training

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_asking_for_cuda_without_cuda_fails(device):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device(device)


@no_cuda
def test_meta_training_on_cuda_without_cuda_fails_before_training(tmp_path):
    run_preprocessing("synthetic:tiny", None, None, str(tmp_path / "pre"))
    with pytest.raises(RuntimeError, match="use the -cuda image on a GPU node"):
        run_meta_training(
            str(tmp_path / "pre"), "maml", {"device": "cuda", "meta_steps": 1}, str(tmp_path / "m")
        )
    assert not (tmp_path / "m" / "model.pt").exists()


def test_auto_and_cpu_still_resolve():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
