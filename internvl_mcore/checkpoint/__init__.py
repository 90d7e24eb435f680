"""Checkpoint files, below both training/ and convert/ (which import it; it imports neither):

- format.py: the training-checkpoint directory (tracker, iter_NNNNNNN/, run.json, format version),
  `CheckpointError`, and the check that a checkpoint was saved for a given model.
- checksums.py: checksums.json (written by a save, verified before --load takes a checkpoint).
- selection.py: which checkpoint --load takes (fallback to older complete ones), --keep-checkpoints.
- trust.py: megatron-core's pickled parts checked against an allow-list before anything reads them.
- weights.py: a training checkpoint's model weights into a model of any layout and either backend.
- safetensors_io.py: sharded safetensors directories read and written with plain file I/O, dtype
  names, HF side files, and the converters' error type `ConversionError`.
- canonical.py: the canonical (layout-independent) checkpoint directory.

Dependencies run training -> convert -> checkpoint -> models: nothing here imports training/ or
convert/, and models/ does not import this package.
"""
