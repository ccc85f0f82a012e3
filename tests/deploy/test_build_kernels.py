"""deploy/docker/build_kernels.py: the hard-coded CUDA arch flags go, everything else stays valid."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests.deploy.dashboard_queries import REPO

# Written for this test in the shape of the kernel packages' setup.py (arch flags inside if-blocks).
SETUP_PY = """\
import os
cc_flag = []
if CUDA_HOME is not None:
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_75,code=sm_75")
    if bare_metal_version >= Version("11.8"):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
cc_flag.append("-DBUILD_PYTHON_PACKAGE")
nvcc = ["-O3", "--use_fast_math"] + cc_flag
"""


@pytest.fixture(scope="module")
def kernels() -> ModuleType:
    path = REPO / "deploy" / "docker" / "build_kernels.py"
    spec = importlib.util.spec_from_file_location("tssc_build_kernels", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_hardcoded_arches_are_removed_and_the_file_still_compiles(kernels: ModuleType) -> None:
    patched, count = kernels.strip_hardcoded_arches(SETUP_PY)
    assert count == 4
    assert "arch=compute" not in patched and '"-gencode"' not in patched
    assert 'cc_flag.append("-DBUILD_PYTHON_PACKAGE")' in patched
    compile(patched, "setup.py", "exec")  # the emptied if-blocks hold `pass`
    namespace = {"CUDA_HOME": "/usr/local/cuda", "bare_metal_version": 12, "Version": lambda v: 11}
    exec(patched, namespace)
    assert namespace["nvcc"] == ["-O3", "--use_fast_math", "-DBUILD_PYTHON_PACKAGE"]


def test_a_setup_without_hardcoded_arches_is_unchanged(kernels: ModuleType) -> None:
    plain = 'flags = ["-O3"]\nflags.append("-lineinfo")\n'
    assert kernels.strip_hardcoded_arches(plain) == (plain, 0)


@pytest.mark.parametrize(
    ("arch_list", "sass"),
    [("8.0;8.6;8.9;9.0", {"80", "86", "89", "90"}), ("7.5 9.0+PTX", {"75", "90"}), ("9.0a", {"90a"})],
)
def test_requested_sass_parses_torch_cuda_arch_list(
    kernels: ModuleType, arch_list: str, sass: set[str]
) -> None:
    assert kernels.requested_sass(arch_list) == sass


def test_an_empty_arch_list_is_refused(kernels: ModuleType) -> None:
    with pytest.raises(ValueError, match="empty"):
        kernels.requested_sass(" ")
