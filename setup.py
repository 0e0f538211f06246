"""Memory-augmented transformer pretraining: data tools, models, DeepSpeed training."""
from setuptools import find_packages, setup

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
    # op tests load its reference functions file by file.
    extras_require={"test": ["pytest>=8", "pytest-timeout", "tiktoken", "fla-core>=0.6,<0.7"]},
)
