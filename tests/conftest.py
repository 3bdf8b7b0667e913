import os

import pytest
import torch

# Without a GPU, Triton's kernels run in its CPU interpreter (tests/test_triton.py). Triton decides that when it
# is first imported (its own library functions are decorated then), and torch's compiler may import it in any
# test: so for the whole session, before any test module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def read_only_bind(tmp_path):
    """`mount(src)`: `src` bind-mounted read-only at a new folder, which it returns; unmounted after the test.
    Skips where that cannot be done (root and mount(8) needed): `chmod` does not stop root."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root and mount(8)")
    mounted = []

    def mount(src):
        ro = src.with_name(src.name + "-ro")
        ro.mkdir()
        for cmd in (["mount", "--bind", str(src), str(ro)], ["mount", "-o", "remount,ro,bind", str(ro)]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                subprocess.run(["umount", str(ro)], capture_output=True)
                pytest.skip(f"cannot bind-mount read-only here: {done.stderr.strip()}")
        mounted.append(ro)
        return ro

    yield mount
    for ro in mounted:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def pytest_sessionstart(session):
    """BNET's C++ kernels built once, before any test, where the machine has what the build needs: the subprocesses
    tests start (benchmarks, sweeps, a fresh venv) then load them from torch's extension cache instead of each paying
    for the build inside its own time limit. A failing build fails tests/test_cpp_bnet.py, which says why."""
    from bnet_fastai.nn.compute import cpp_bnet

    if cpp_bnet.missing() is None:
        cpp_bnet.load()
