"""Training: the loop, checkpoints and exact resume, model folders, multi-process training.

- :mod:`medseg.training.run`: ``train(dataset_dir, config) -> Run`` (what ``medseg train`` calls);
- :mod:`medseg.training.trainer`: the loop for one fold (``Trainer``);
- :mod:`medseg.training.checkpoint`: atomic, weights-only checkpoints and RNG state;
- :mod:`medseg.training.model_folder`: the folder ``medseg infer -m`` reads;
- :mod:`medseg.training.distributed`: devices, determinism, torchrun/DDP;
- :mod:`medseg.training.monitor`: metrics.csv, train.log, TensorBoard.

Submodules import torch; import them directly (``medseg.api`` re-exports ``train`` and ``Run``).
"""
