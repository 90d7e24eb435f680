# internvl-mcore on NVIDIA's NGC PyTorch image, which already ships CUDA, NCCL, PyTorch,
# transformer-engine, apex and flash-attn. Only this package and its pure-Python dependencies are
# added; torch is never reinstalled (NGC images from 25.03 on pin their own packages through
# PIP_CONSTRAINT=/etc/pip/constraint.txt, and the last step below checks that torch is unchanged).
#
#   docker build -t internvl-mcore .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 --rm -it \
#       -v /path/to/data:/data internvl-mcore \
#       bash examples/internvl3_8b/2nd_finetune.sh
#
# What runs differently on GPU (layer specs, attention kernels) and what is not yet verified there:
# docs/gpu.md. The image has not been built or run by this project (no GPU was available); on a GPU
# machine, `bash scripts/gpu_check.sh` inside it runs the GPU checks in one command.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

WORKDIR /workspace/internvl-mcore

# dependencies first (cached across source edits): setup.py alone is enough to resolve them.
# transformers: gpu_check's export check; scikit-learn: the digits data gpu_check makes its shards of.
# The image's own transformer-engine and flash-attn are kept (never the [gpu] extra: it would compile).
COPY setup.py ./
RUN mkdir internvl_mcore && touch internvl_mcore/__init__.py \
 && python -c "import torch; print(torch.__version__)" > /tmp/torch_version \
 && pip install -e . "transformers==5.23.0" scikit-learn \
 && rm -rf internvl_mcore internvl_mcore.egg-info

COPY . .
# what the GPU path and scripts/gpu_check.sh import: megatron-core, TE's PyTorch modules (the same test
# megatron-core makes) in the range megatron-core 0.16.1 supports, flash-attn (packed attention),
# transformers and scikit-learn; the build fails when one is missing or TE is out of range (then pick
# a BASE_IMAGE whose TE is >= 2.9, < 2.12)
RUN pip install --no-deps -e . \
 && python -c "import torch; print(torch.__version__)" | diff - /tmp/torch_version \
 && python -c "import internvl_mcore, megatron.core, transformer_engine.pytorch, flash_attn, transformers, sklearn; \
from packaging.version import Version as V; te = V(transformer_engine.__version__); \
assert V('2.9.0a0') <= te < V('2.12.0'), f'transformer-engine {te}: megatron-core 0.16.1 needs >= 2.9.0a0, < 2.12.0'; \
print('internvl-mcore ready: megatron-core', megatron.core.__version__, '| transformer-engine', te, \
'| flash-attn', flash_attn.__version__)"

CMD ["bash"]
