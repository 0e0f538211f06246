"""Memory-augmented transformer pretraining: data tools, models, DeepSpeed training.

The fused CUDA kernels of ``csrc/`` are built here only on request, as DeepSpeed's DS_BUILD_OPS:
``MEMTRAIN_BUILD_OPS=1 pip install --no-build-isolation -e .`` (torch with CUDA and the CUDA toolkit present;
architectures from TORCH_CUDA_ARCH_LIST, default "8.0;9.0").  Without it nothing is compiled and nothing of
CUDA is needed; on a GPU machine the kernels are then built on first use (pretrain/ops/kernels.py).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _fail(message: str):
    print(f"setup.py: {message}", file=sys.stderr)
    sys.exit(2)


def _kernel_build():
    """(ext_modules, cmdclass) for MEMTRAIN_BUILD_OPS=1, else empty; a clear exit (status 2) when the
    request cannot be met."""
    flag = os.environ.get("MEMTRAIN_BUILD_OPS", "0").strip()
    if flag in ("", "0"):
        return [], {}
    if flag != "1":
        _fail(f"MEMTRAIN_BUILD_OPS={flag!r}: use 1 to build the fused CUDA kernels, 0 (or unset) not to")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _fail("MEMTRAIN_BUILD_OPS=1 needs torch importable while building: install torch first, then "
              "`MEMTRAIN_BUILD_OPS=1 pip install --no-build-isolation -e .`")
    if torch.version.cuda is None or CUDA_HOME is None:
        _fail(f"MEMTRAIN_BUILD_OPS=1 needs a CUDA build of torch (this is {torch.__version__}) and the CUDA toolkit "
              f"(CUDA_HOME or nvcc on the PATH); unset MEMTRAIN_BUILD_OPS for an install without the kernels (a GPU "
              f"machine then builds them on first use)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    cu = glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu"))
    sources = ["csrc/binding.cpp"] + sorted(os.path.relpath(p, ROOT) for p in cu)
    ext = CUDAExtension("memtrain_kernels", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]})
    return [ext], {"build_ext": BuildExtension}


EXT_MODULES, CMDCLASS = _kernel_build()

setup(
    name="memtrain",
    version="0.1.0",
    description="Pretraining pipeline for memory-augmented transformer language models "
                "(Transformer-XL, LaMemo, RMT, Compressive, fast weights, Memformer) on "
                "megatron-core layers and DeepSpeed",
    packages=find_packages(include=["data_tools", "data_tools.*", "pretrain", "pretrain.*"]),
    package_data={"pretrain": ["configs/*.yaml"]},
    python_requires=">=3.11",
    # Ranges, not pins: the tested pins are in constraints.txt. torch must be installed before this
    # package (CPU machines: `pip install torch==2.13.0`), or pip pulls the CUDA build from PyPI.
    install_requires=[
        "torch>=2.11",
        "numpy>=1.26",
        "deepspeed>=0.16",
        "megatron-core>=0.16.1,<0.20",
        "ninja",
        "tokenizers>=0.19",
        "gigatoken>=0.10",
        "sentencepiece>=0.2",
        "tqdm",
        "pyyaml",
        "safetensors",
        "tensorboard",
        "wandb",
        "matplotlib",
    ],
    # fla-core without extras brings only its plain-PyTorch files (and einops), not Triton: the fast-weight
    # op tests load its reference functions file by file.  transformers (no torch dependency of its own: it uses
    # the torch installed first) is the reference the MemBART tests compare with (BART, generate).
    # hf: pretrain/export_hf.py (the exported directory itself needs only torch and transformers 5);
    # lm_eval: the lm-evaluation-harness model (pretrain/hf/lm_eval_memtrain.py); the test extra has it too
    # (tests/test_hf_export.py scores a local task through the harness), with ~45 packages of its own (its
    # typepy[datetime] wants python-dateutil < 3: constraints.txt pins 2.9.0.post0).
    extras_require={"test": ["pytest>=8", "pytest-timeout", "tiktoken", "fla-core>=0.6,<0.7",
                             "transformers>=4.46", "lm-eval>=0.4.13,<0.5"],
                    "hf": ["transformers>=5,<6"],
                    "lm_eval": ["transformers>=5,<6", "lm-eval>=0.4.13,<0.5"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
