import pytest
import torch

from torchdefects._check import check_choice, check_device


def test_check_device_values():
    assert check_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert check_device("auto").type == expected
    with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        check_device("tpu")
    with pytest.raises(ValueError, match="got 'meta'"):
        check_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only host")
def test_check_device_without_cuda():
    with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available"):
        check_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_check_device_picks_local_rank_gpu():
    n = torch.cuda.device_count()
    assert check_device("cuda", local_rank=n + 1) == torch.device("cuda", (n + 1) % n)


def test_check_choice_wants_the_same_type():
    check_choice("connectivity", 8, (4, 8))
    for bad in (8.0, True, "8"):
        with pytest.raises(ValueError, match="connectivity must be one of 4, 8"):
            check_choice("connectivity", bad, (4, 8))
