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


def test_tensor_and_number_checks():
    import numpy as np

    from torchdefects._check import _check_finite_values, _check_tensor, _number_or_tensor

    _check_tensor(torch.zeros(1), "x")
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got numpy\.ndarray \(convert"):
        _check_tensor(np.zeros(1), "x")
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
        _check_tensor([1.0], "x")
    t = _number_or_tensor(0.25, "thr")
    assert t.dtype == torch.float64 and t.item() == 0.25 and t.dim() == 0
    assert _number_or_tensor(None, "thr") is None
    assert _number_or_tensor(np.float32(0.5), "thr").item() == 0.5  # NumPy scalars are numbers
    for bad in (True, "1", [1.0], np.ones(2)):
        with pytest.raises(TypeError, match=r"thr must be a number or a torch\.Tensor"):
            _number_or_tensor(bad, "thr")
    _check_finite_values(torch.tensor([0.0, 1.0]), "v")
    _check_finite_values(torch.tensor([float("inf")]), "v", allow_inf=True)
    with pytest.raises(ValueError, match="v must be finite, got inf"):
        _check_finite_values(torch.tensor([0.0, float("inf")]), "v")
    with pytest.raises(ValueError, match="v must be not NaN, got nan"):
        _check_finite_values(torch.tensor([float("nan")]), "v", allow_inf=True)
