"""The fused kernels' sources compile for Hopper (sm_90) on a machine without a GPU, and the install stays
CPU-safe.

Compile-only: every ``csrc/*/*.cu`` with ``nvcc -c`` for sm_90, and the torch binding (``csrc/binding.cpp``,
as built for CUDA) against the installed torch headers.  A CPU wheel of torch lacks the generated header
``c10/cuda/impl/cuda_cmake_macros.h``; a two-line stand-in is written to a temporary include directory (never
into the sources, so a real build uses the real header).  Linking needs torch's CUDA libraries and is not
tried here; the GPU machine's build (scripts/gpu_check.sh) does it.
"""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from pretrain.ops import kernels

ROOT = Path(__file__).resolve().parents[1]


def _nvcc():
    path = shutil.which("nvcc")
    if path is None and os.environ.get("CUDA_HOME"):
        cand = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        path = str(cand) if cand.exists() else None
    return path


NVCC = _nvcc()


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME): the kernel "
                                         "sources cannot be compile-checked here")
def test_cuda_sources_compile_for_sm90(tmp_path):
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    tdir = Path(torch.__file__).parent / "include"
    common = ["-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", f"-I{tdir}", f"-I{tdir / 'torch/csrc/api/include'}",
              f"-I{sysconfig.get_paths()['include']}", f"-I{tmp_path / 'stub'}",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              "-DTORCH_EXTENSION_NAME=memtrain_kernels", "-DTORCH_API_INCLUDE_EXTENSION_H",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__", "-Xcompiler", "-fPIC"]
    sources = kernels.cuda_sources()
    cu = [s for s in sources if s.endswith(".cu")]
    assert {Path(s).name for s in cu} >= {"fast_weight.cu", "rel_attention.cu"}, cu
    jobs = {Path(s).name: [NVCC, "-c", *common, "--expt-relaxed-constexpr", "-gencode", "arch=compute_90,code=sm_90",
                           s, "-o", str(tmp_path / (Path(s).stem + ".o"))] for s in cu}
    # the binding is host C++ (nvcc hands it to the host compiler with the CUDA include path); syntax only
    jobs["binding.cpp"] = [NVCC, "-c", "-x", "c++", *common, "-Xcompiler", "-fsyntax-only", "-Xcompiler",
                           "-Wno-c++20-extensions", str(ROOT / "csrc" / "binding.cpp"), "-o",
                           str(tmp_path / "binding.o")]

    def run(cmd):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=400)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(jobs, pool.map(run, jobs.values())))
    for name, res in results.items():
        assert res.returncode == 0, f"{name} does not compile:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    for s in cu:
        assert (tmp_path / (Path(s).stem + ".o")).stat().st_size > 0


def _setup(env_value, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MEMTRAIN_BUILD_OPS"}
    if env_value is not None:
        env["MEMTRAIN_BUILD_OPS"] = env_value
    return subprocess.run([sys.executable, str(ROOT / "setup.py"), "--name"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_setup_without_build_request_needs_no_cuda(tmp_path):
    res = _setup(None, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "memtrain"


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the refusal on a CPU build of torch")
def test_setup_build_request_on_cpu_torch_is_refused(tmp_path):
    res = _setup("1", tmp_path)
    assert res.returncode == 2
    assert "MEMTRAIN_BUILD_OPS=1 needs a CUDA build of torch" in res.stderr


def test_setup_rejects_unknown_build_flag(tmp_path):
    res = _setup("yes", tmp_path)
    assert res.returncode == 2 and "MEMTRAIN_BUILD_OPS='yes'" in res.stderr


def test_cpu_torch_reports_why_kernels_are_unavailable():
    """On a machine without CUDA the loader says why, and nothing is built."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    reason = kernels.unavailable_reason(torch.device("cuda"))
    assert reason and ("CUDA" in reason)
    assert not kernels.available(torch.device("cpu"))
