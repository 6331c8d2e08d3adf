"""Inference: segment scans with a trained model folder and write masks on the scans' own grids.

Modules (imported on use; none imports torch at package import):

- :mod:`~medseg.inference.segmenter`: the predictor, :class:`Segmenter` (load a model
  folder or fold ensemble, ``predict`` a scan) and :class:`Prediction`;
- :mod:`~medseg.inference.outputs`: :class:`OutputSpec`, the output files of a case
  (names, checks before any work, writing);
- :mod:`~medseg.inference.jobs`: the job runner (cases from files, ``predict_many``,
  ``run_cohort`` with manifest, parts and resuming);
- :mod:`~medseg.inference.sliding_window`: ``predict_logits`` on the plan grid
  (Gaussian blending, window skipping, TTA, bounded-memory streaming; ``WindowOptions``);
- :mod:`~medseg.inference.restore`: plan-grid scores back onto the scan's grid;
- :mod:`~medseg.inference.postprocess`, :mod:`~medseg.inference.stats`,
  :mod:`~medseg.inference.preview`, :mod:`~medseg.inference.provenance`: outputs;
- :mod:`~medseg.inference.export`: TorchScript / ONNX export;
- :mod:`~medseg.inference.backends`: ``--backend`` (OpenVINO, ONNX Runtime, torch.compile ...).

See ``docs/inference.md``.
"""
