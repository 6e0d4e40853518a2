"""Test-session setup: the Triton interpreter and the network guard.

`TRITON_INTERPRET` is read when `@triton.jit` decorates a kernel, so it must be set
before any kernel module is imported; on a machine with CUDA the `gpu`-marked tests run
the compiled kernels instead (set ARTAUG_TEST_GPU=1, which leaves the interpreter off).
"""

import os
import sys

import pytest

if os.environ.get("ARTAUG_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

_NETBLOCK = os.path.join(os.path.dirname(__file__), "netblock")
# Subprocesses started by tests import `sitecustomize` from here, so they are guarded too.
os.environ["PYTHONPATH"] = os.pathsep.join([_NETBLOCK] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
os.environ.setdefault("ARTAUG_HOME", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_models"))
os.environ["ARTAUG_NETBLOCK"] = "1"
sys.path.insert(0, _NETBLOCK)
import sitecustomize  # noqa: E402,F401  (installs the guard in this process)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (compiled Triton kernels)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available() and os.environ.get("ARTAUG_TEST_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs CUDA and ARTAUG_TEST_GPU=1")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (opt in: `pytestmark = pytest.mark.usefixtures("one_thread")`):
    the same arithmetic as the CLI subprocesses the interact tests start with --threads 1 (their
    byte-identity checks), and no thread thrash on a shared 2-core machine (the tiny model gains
    nothing from 2)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(one_thread):
    """The untrained tiny model in fp32 on CPU, one per test module."""
    import torch

    from artaug_ext.pipeline import load_pipeline

    return load_pipeline("tiny-random", device="cpu", torch_dtype=torch.float32)
