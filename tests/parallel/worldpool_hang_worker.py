"""A job that never ends (tests/parallel/test_worldpool.py): rank 1 waits for a message nobody sends."""

import torch
import torch.distributed as dist

if dist.get_rank() == 1:
    dist.recv(torch.zeros(1), src=0)
