"""Checkpoints: the training-checkpoint directory format and reading it without a model or a process
group. `dist_reader.py` reads the global tensors of a megatron-core torch_dist checkpoint (any
layout) box by box from the .distcp files; `dist_canonical.py` names them as the canonical layout
(models/weights.py) with the padding of models/sharding.py undone. Dependencies: this package may
import models/ and config/, never convert/ or training/ (both of which read checkpoints through it).
"""
