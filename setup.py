"""Install the driver (megatron.training) beside the pinned pip megatron-core.

`megatron/` has no __init__.py: it is a namespace package shared with
megatron-core, which installs `megatron/core`.
"""

from setuptools import find_namespace_packages, setup

setup(
    name="finllama-megatron",
    version="0.1.0",
    description="Megatron-style 3D-parallel pretraining, conversion and fine-tuning of Llama models on megatron-core",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["megatron.training*", "tools*", "tasks*"]),
    py_modules=["pretrain_gpt"],
    install_requires=[
        "megatron-core==0.16.1",
        "liger-kernel==0.8.5",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "transformers",
        "safetensors",
        "psutil",
        "tqdm",
        "nltk",
    ],
    extras_require={
        "tensorboard": ["tensorboard"],
        "test": ["pytest", "peft==0.21.2", "bitsandbytes==0.50.2"],
        "qlora": ["bitsandbytes==0.50.2"],  # --lora-quant-bits 4|8 (the NF4 / int8 formats)
        "gpu": ["vllm"],
    },
)
