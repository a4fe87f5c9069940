from setuptools import find_packages, setup

setup(
    name="mom_train",
    version="0.1.0",
    description="Pretraining Mixture-of-Memories (MoM) linear-attention language models",
    packages=find_packages(include=["mom_train", "mom_train.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "mistral-common",
        "zstandard",
        "tqdm",
        # the rank layout of multi-process runs and tensor parallelism's layers and mappings
        "megatron-core",
    ],
    extras_require={
        # triton ships with CUDA builds of torch; CPU installs add it for the interpreter tests
        "triton": ["triton"],
        "parquet": ["pyarrow"],
        "parallel": ["deepspeed"],
        "plot": ["matplotlib"],
        # streaming SlimPajama from the hub (without data.path) and logging.wandb: imported only when used
        "hub": ["datasets"],
        "wandb": ["wandb"],
        # Hugging Face export / import (transformers only to load the result; fla for its model classes)
        "hf": ["safetensors", "tokenizers", "transformers", "protobuf"],
        "fla": ["flash-linear-attention>=0.6.0"],
        # mom-train lm-eval; accelerate for lm-eval's own `hf` model on an export
        "eval": ["lm-eval", "accelerate"],
        "full": ["triton", "pyarrow", "deepspeed", "matplotlib", "datasets", "wandb", "safetensors", "tokenizers",
                 "transformers", "protobuf", "lm-eval"],
        "test": ["pytest", "pytest-timeout", "pyarrow", "matplotlib", "deepspeed", "safetensors", "tokenizers",
                 "transformers", "protobuf", "flash-linear-attention==0.6.0", "lm-eval", "accelerate"],
    },
    entry_points={"console_scripts": ["mom-train=mom_train.cli:main"]},
)
