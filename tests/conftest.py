import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import harness` from any test folder


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


_SHM_BUFFERS = "deepspeed_allreduce_buffer_*"


def pytest_sessionstart(session):
    session.config._shm_before = {p.name for p in Path("/dev/shm").glob(_SHM_BUFFERS)}


def pytest_sessionfinish(session, exitstatus):
    """DeepSpeed's CPU shm all-reduce leaves a ~66 MiB /dev/shm buffer per rank of every process group it
    creates (RAM on tmpfs, never unlinked). Over a suite that is gigabytes of a 24 GiB CI machine; remove
    the ones this session's ranks made."""
    before = getattr(session.config, "_shm_before", set())
    for path in Path("/dev/shm").glob(_SHM_BUFFERS):
        if path.name not in before:
            path.unlink(missing_ok=True)
