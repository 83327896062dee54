"""`keep_freed_memory`: a second large allocation reuses the first one's pages instead of faulting new ones."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import torch
if sys.argv[1] == "keep":
    from nfn_plugins.memory import keep_freed_memory
    assert keep_freed_memory()
torch.ones(50 * 2**20)  # 200 MB, filled (faulted in) and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(50 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_second_allocation(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc allocator setting")
def test_keep_freed_memory_reuses_pages():
    pages = 200 * 2**20 // 4096
    assert _faults_of_second_allocation("default") > pages // 2  # the probe sees the faults it should remove
    assert _faults_of_second_allocation("keep") < pages // 20
