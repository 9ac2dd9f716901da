import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        params = [
            pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else [])
            for d in ["cpu", "cuda"]
        ]
        metafunc.parametrize("device", params)


@pytest.fixture(autouse=True)
def _skip_missing_cuda(request):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("CUDA not available")
