"""Integrations: distributed (DDP) recording and optional trainer callbacks.

* :mod:`trajectory.integrations.ddp` — :class:`DistributedRecorder` (torch only, always available).
* :mod:`trajectory.integrations.lightning` — ``SgdwalkCallback`` for PyTorch Lightning
  (``pip install sgdwalk[lightning]``).
* :mod:`trajectory.integrations.huggingface` — ``SgdwalkTrainerCallback`` for the 🤗 Transformers
  ``Trainer`` (``pip install sgdwalk[hf]``).

Importing this package (or :mod:`trajectory`) never imports Lightning or Transformers; import
the submodule of the trainer you use. See docs/integrations.md.
"""
from .ddp import DistributedRecorder, make_recorder, unwrap_model

__all__ = ["DistributedRecorder", "make_recorder", "unwrap_model"]
