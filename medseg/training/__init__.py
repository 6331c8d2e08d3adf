"""Training: the loop, checkpoints and exact resume, multi-process training.

- :mod:`medseg.training.run`: ``train(dataset_dir, config) -> Run`` (what ``medseg train`` calls);
- :mod:`medseg.training.trainer`: the loop for one fold (``Trainer``);
- :mod:`medseg.training.checkpoint`: atomic, weights-only checkpoints and RNG state;
- the model folder it writes is :mod:`medseg.model_folder` (outside training: inference reads it);
- :mod:`medseg.training.distributed`: devices, determinism, torchrun/DDP;
- :mod:`medseg.training.monitor`: metrics.csv, train.log, TensorBoard.

Submodules import torch; import them directly (``medseg.api`` re-exports ``train`` and ``Run``).
"""
