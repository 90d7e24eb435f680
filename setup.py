"""internvl-mcore: megatron-core based 3D-parallel training engine for InternVL models."""

from setuptools import find_packages, setup

setup(
    name="internvl-mcore",
    version="0.1.0",
    description="Megatron-core based 3D-parallel pretraining and fine-tuning engine for InternVL",
    packages=find_packages(include=["internvl_mcore", "internvl_mcore.*"]),
    python_requires=">=3.11",
    install_requires=[
        # torch is installed first (CPU wheel 2.13.0 here; the NGC image's build on GPU clusters).
        "torch>=2.4",
        # 0.17+ needs Python >= 3.12; 0.16.1 is the newest that installs on 3.11 (see README).
        "megatron-core==0.16.1",
        "psutil",  # megatron-core's checkpoint saving imports it without declaring it
        "numpy",
        "pillow",
        "pyarrow",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "tiktoken",
        "tqdm",
        "tensorboard",
        "einops",
        "protobuf",  # sentencepiece-backed tokenizers (transformers v5 behaviour) need it
    ],
    extras_require={
        # Both compile CUDA extensions against the torch already installed: install with nvcc on the
        # PATH (CUDA_HOME set) and WITHOUT build isolation, else pip builds them against a fresh torch
        # in a throw-away environment (or fails):  pip install --no-build-isolation -e ".[gpu]"
        # (docs/gpu.md). megatron-core 0.16.1 supports transformer-engine >= 2.9.0a0, < 2.12.0 (its
        # pyproject); TE 2.9 accepts flash-attn <= 2.8.1 (TE 2.10/2.11: <= 2.8.3), so 2.8.1 fits all.
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0", "flash-attn==2.8.1"],
        "wandb": ["wandb"],  # --wandb-project (WANDB_MODE=offline works without a network)
        "dev": [
            "pytest>=8",
            "pytest-timeout",
            "pytest-xdist>=3.5",  # scripts/test.sh / CI run the suite on 2 workers (tests/xdist_plan.py)
            "transformers==5.23.0",
            "scikit-learn",
            "matplotlib",
            "av",  # video files in the data pipeline's tests (optional at run time)
            "peft",  # LoRA export test: PeftModel.from_pretrained on the transformers export (no torchvision)
            "hypothesis",  # tests/reliability/test_fuzz_data.py: generated records, conversations and image bytes
            "wandb",  # tests/reliability/test_wandb_offline.py: --wandb-project in offline mode
            "ruff==0.17.6",  # lint and format check (ruff.toml), run by .ci/run; pinned: formatting changes between versions
        ],
    },
)
