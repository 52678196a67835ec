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


def _mapped_shm_buffers() -> set[str]:
    """Names of the DeepSpeed segments some live process has mapped (another pytest session's running ranks)."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # a process that ended meanwhile, or another user's
            continue
        for line in text.splitlines():
            if "/dev/shm/deepspeed_allreduce_buffer_" in line:
                mapped.add(line.split("/dev/shm/", 1)[1].split(" ", 1)[0])
    return mapped


def pytest_sessionfinish(session, exitstatus):
    """DeepSpeed's CPU shm all-reduce leaves a ~66 MiB /dev/shm buffer per rank of every process group it
    creates (RAM on tmpfs, never unlinked; switchyard's launchers unlink their ranks' own, the in-process ranks of
    tests do not). Over a suite that is gigabytes of a 24 GiB CI machine; remove the ones made during this session
    that no live process has mapped, so a concurrent session's running ranks keep theirs."""
    before = getattr(session.config, "_shm_before", set())
    in_use = _mapped_shm_buffers()
    for path in Path("/dev/shm").glob(_SHM_BUFFERS):
        if path.name not in before and path.name not in in_use:
            path.unlink(missing_ok=True)
