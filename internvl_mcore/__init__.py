"""internvl-mcore: megatron-core based 3D-parallel training of InternVL models.

The first module of ours a process imports runs this: megatron-core's import, whenever it comes,
skips torch.compile's compiler stack and wandb until they are used (startup.py: ~2 s of CPU per
process, which every rank, loader fork server, checkpoint writer and tool pays)."""

from .startup import install

install()
