import pytest
import torch


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        params = [
            pytest.param("cpu"),
            pytest.param("cuda", marks=pytest.mark.cuda),
        ]
        metafunc.parametrize("device", params)


@pytest.fixture(autouse=True)
def _skip_missing_cuda(request):
    callspec = getattr(request.node, "callspec", None)
    wants_cuda = callspec is not None and callspec.params.get("device") == "cuda"
    if wants_cuda and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
