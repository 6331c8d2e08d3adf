"""``medseg.train``: from a dataset folder to a run folder that ``medseg infer`` can use.

::

    run = medseg.train("data/Task09_Spleen", "configs/cpu_quick.yaml")
    run.model_dir          # runs/Task09_Spleen_unet_3d/fold_0/model
    run.metrics            # {"val_dice": {"spleen": 0.93}, "mean_fg_dice": 0.93, ...}

Steps: resolve the config -> scan and check the dataset (every problem at once)
-> fingerprint -> plan -> splits -> preprocess every case once into the cache
-> for each fold: network, loss, loader, :class:`~medseg.training.trainer.Trainer`.

Run folder (documented in docs/training.md)::

    RUN_DIR/                      default runs/<dataset folder>_<model>_<spatial_dims>d
      config.yaml                 the resolved config
      plan.json  fingerprint.json labels.json  splits.json
      fold_K/ (or fold_all/)
        model/                    best weights as a model folder (medseg infer -m ...)
        model_last/               weights after the last epoch
        checkpoint_last.pt        training state for --resume
        metrics.csv  train.log  events/ (TensorBoard)
      cv_summary.json             after more than one fold
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.config import Config, apply_override, config_from_dict, load_config, save_config
from medseg.errors import ConfigError, DatasetError
from medseg.io.atomic import clean_stale_temps, make_folder, refuse_output_over_inputs, write_json_atomic
from medseg.records import json_safe
from medseg.training.trainer import CHECKPOINT_LAST

if TYPE_CHECKING:
    import torch

    from medseg.data.folders import DatasetIndex
    from medseg.data.plan import Plan
    from medseg.training.distributed import DistInfo

__all__ = ["FoldResult", "Run", "default_run_dir", "plan_from_config", "train"]

log = logging.getLogger(__name__)

RANK_SEED_STRIDE = 1_000_003
"""Each torchrun rank samples patches from seed ``train.seed + RANK_SEED_STRIDE * rank``."""

# fields that may differ between a run and its --resume (they do not change what is trained)
BUDGET_EPOCH_STRIDE = 1_000_000  # time budget: batch numbers of chunk e start at e * this (no chunk is longer)

RESUMABLE_CHANGES = {
    "train.max_epochs",
    "train.time_budget",
    "train.device",
    "train.num_threads",
    "train.early_stopping_patience",
    "train.val_every",
    "train.log_images_every",
    "train.fold",
    "data.num_workers",
    "data.cache_dir",
    "data.check_dataset",
}


@dataclass
class FoldResult:
    """One trained fold.

    Attributes:
        fold: fold index or ``"all"``.
        fold_dir: ``RUN_DIR/fold_K``.
        model_dir: ``fold_dir/model`` (best weights), or ``None`` when interrupted before any.
        status: ``completed``, ``early_stopped`` or ``interrupted``.
        epochs: epochs trained.
        best_epoch: epoch of the best validation (``None`` without validation cases).
        val_dice: per-class Dice at the best epoch.
        mean_fg_dice: mean over foreground classes at the best epoch.
    """

    fold: int | str
    fold_dir: Path
    model_dir: Path | None
    status: str
    epochs: int
    best_epoch: int | None
    val_dice: dict[str, float]
    mean_fg_dice: float | None


@dataclass
class Run:
    """A training run.

    Attributes:
        run_dir: the run folder.
        model_dir: what to pass to ``medseg infer -m`` / ``Segmenter.load``: the fold's
            model folder for one fold, the run folder (an ensemble of folds) for several.
        status: ``completed`` (all folds finished or stopped early) or ``interrupted``.
        folds: one :class:`FoldResult` per trained fold.
        metrics: ``{"val_dice": {class: dice}, "mean_fg_dice": float | None}``; for several
            folds the mean over folds plus ``"per_fold"``.
        config: the resolved config.
        plan: the plan.
    """

    run_dir: Path
    model_dir: Path | None
    status: str
    folds: list[FoldResult]
    metrics: dict[str, Any]
    config: Config
    plan: Plan


# --------------------------------------------------------------------------- config


def _resolve_config(config: Config | str | Path | None, overrides: Sequence[str]) -> tuple[Config, bool]:
    """The config plus overrides; the flag says whether the user gave a config at all."""
    if config is None:
        return load_config(None, list(overrides)), False
    if isinstance(config, Config):
        if not overrides:
            return config, True
        data = config.to_dict()
        for item in overrides:
            apply_override(data, item)
        return config_from_dict(data, source="config + overrides"), True
    return load_config(config, list(overrides)), True


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, section in cfg.to_dict().items() for k, v in section.items()}


def _resume_config(saved: Config, given: Config | None, overrides: Sequence[str], run_dir: Path) -> Config:
    """The saved config of the run, with overrides; refuse a given config that changes what is trained."""
    data = saved.to_dict()
    for item in overrides:
        apply_override(data, item)
    merged = config_from_dict(data, source=f"{run_dir / 'config.yaml'} + overrides")
    if given is not None:
        a, b = _flat(merged), _flat(given)
        diffs = [f"{k}: {a[k]!r} (run) != {b[k]!r} (given)" for k in a if a[k] != b[k] and k not in RESUMABLE_CHANGES]
        if diffs:
            raise ConfigError(
                f"--resume: the config differs from the run's {run_dir / 'config.yaml'}: " + "; ".join(diffs)
                + ". Resume without -c (the run's config is used) or start a new run with -o."
            )
    return merged


def default_run_dir(dataset_dir: str | Path, model_name: str, spatial_dims: int, runs_root: str | Path = "runs") -> Path:
    """``runs/<dataset folder name>_<model>_<spatial_dims>d``."""
    return Path(runs_root) / f"{Path(dataset_dir).resolve().name}_{model_name}_{spatial_dims}d"


# --------------------------------------------------------------------------- entry point


def train(
    dataset_dir: str | Path,
    config: Config | str | Path | None = None,
    *,
    output_dir: str | Path | None = None,
    fold: int | str | None = None,
    folds: Sequence[int | str] | None = None,
    resume: bool = False,
    init_from: str | Path | None = None,
    overrides: Sequence[str] = (),
    runs_root: str | Path = "runs",
) -> Run:
    """Train on a dataset folder and write a run folder (see the module docstring).

    Args:
        dataset_dir: the dataset (MSD, nnU-Net or plain layout).
        config: a :class:`~medseg.config.Config`, a YAML path, or ``None`` for the defaults.
        output_dir: the run folder (default ``runs/<dataset>_<model>_<dims>d``).
        fold: fold to train (overrides ``train.fold``): an index or ``"all"``.
        folds: several folds, trained in turn, then summarised in ``cv_summary.json``.
        resume: continue from the run folder's checkpoints (the run's config is used;
            ``overrides`` such as ``train.max_epochs`` apply on top).
        init_from: a model folder (or run folder) to start from (fine-tuning).
        overrides: ``section.key=value`` strings applied to the config.
        runs_root: where default run folders go.

    Returns:
        A :class:`Run`. When stopped by Ctrl-C/SIGTERM, ``status == "interrupted"``
        and the checkpoint to resume from is saved.

    Raises:
        ConfigError: invalid config, unknown keys, mismatched resume config.
        DatasetError: the dataset has problems (all listed).
        CheckpointError: a checkpoint made for another model, labels or plan.
        TrainingError: the loss became NaN/Inf.
    """
    from medseg.data.folders import scan_dataset
    from medseg.device import resolve_device
    from medseg.training.budget import format_duration, parse_duration
    from medseg.training.distributed import (
        barrier,
        configure_determinism,
        configure_threads,
        destroy_distributed,
        dist_info_from_env,
        init_distributed,
    )

    dataset_dir = Path(dataset_dir)
    given, user_config = _resolve_config(config, overrides)
    if fold is not None:
        given = dataclasses.replace(given, train=dataclasses.replace(given.train, fold=_fold_value(fold)))
    fold_list: list[int | str] = [_fold_value(f) for f in folds] if folds else [given.train.fold]
    if not dataset_dir.is_dir():
        raise DatasetError(f"dataset folder {dataset_dir} does not exist; pass the folder holding dataset.json/imagesTr.")

    run_dir = Path(output_dir) if output_dir is not None else None
    if resume:
        run_dir = run_dir or _find_run_to_resume(dataset_dir, given, runs_root)
        saved_path = run_dir / "config.yaml"
        if not saved_path.is_file():
            raise ConfigError(f"--resume: {saved_path} does not exist; {run_dir} is not a medseg run folder.")
        cfg = _resume_config(load_config(saved_path), given if user_config else None, overrides, run_dir)
        if fold is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fold=_fold_value(fold)))
        if not folds:
            fold_list = [cfg.train.fold]
    else:
        cfg = given
    _refuse_unknown_model_or_fold(cfg, fold_list)  # before check, fingerprint, plan or any folder
    if run_dir is not None:  # before anything is written
        _check_run_dir(run_dir, dataset_dir, cfg, fold_list, init_from=init_from)
    budget_s = parse_duration(cfg.train.time_budget)  # a bad value is refused before anything runs
    if budget_s is not None:
        log.info("time budget %s per fold (%d fold%s)", format_duration(budget_s), len(fold_list),
                 "" if len(fold_list) == 1 else "s")

    info = dist_info_from_env()
    device = resolve_device(cfg.train.device, local_rank=info.local_rank)
    configure_threads(cfg.train.num_threads, info)
    configure_determinism(cfg.train.deterministic, device)
    init_distributed(info, device)
    medseg_logger = logging.getLogger("medseg")
    old_level = medseg_logger.level
    if not info.is_main:  # rank 0 speaks for the job
        medseg_logger.setLevel(logging.WARNING)
    try:
        index = scan_dataset(dataset_dir, resample_tilt=cfg.data.resample_tilt)
        # under torchrun with -o, rank 0 checks and plans while the others wait, then read its files
        follower = info.is_distributed and not info.is_main and run_dir is not None
        if not follower:
            if cfg.data.check_dataset:
                from medseg.data.check import check_dataset

                log.info("checking %s (%d cases) ...", dataset_dir, len(index.cases))
                check_dataset(
                    index, num_folds=cfg.data.num_folds, ignore_label=cfg.loss.ignore_label
                ).raise_if_problems()
            plan, fingerprint = _plan(index, cfg, run_dir, resume=resume, device_type=device.type)
            if run_dir is None:
                run_dir = default_run_dir(dataset_dir, cfg.model.name, plan.spatial_dims, runs_root)
                _check_run_dir(run_dir, dataset_dir, cfg, fold_list, init_from=init_from)
            if not resume:
                _refuse_overwrite(run_dir, fold_list, cfg)
            splits = _splits(index, cfg, run_dir, resume=resume)
            if info.is_main:
                _write_run_files(run_dir, cfg, plan, splits, fingerprint)
        barrier()
        if follower:
            from medseg.data.plan import load_plan
            from medseg.data.splits import load_splits

            plan = load_plan(run_dir / "plan.json")
            splits = load_splits(run_dir / "splits.json", case_ids=index.case_ids)
        results = []
        for k in fold_list:
            result = _train_fold(
                index, cfg, plan, splits, k, run_dir=run_dir, resume=resume, init_from=init_from,
                device=device, info=info,
            )
            results.append(result)
            if result.status == "interrupted":
                break
    finally:
        medseg_logger.setLevel(old_level)
        destroy_distributed()
    return _summarise(run_dir, cfg, plan, results, write=info.is_main)


def _refuse_unknown_model_or_fold(cfg: Config, folds: Sequence[int | str]) -> None:
    """Refuse a model name that is not registered and folds the config cannot have, before any work.

    Raises:
        ConfigError: naming the model (with the closest registered one) or the fold and the folds there are.
    """
    import difflib

    from medseg.models import list_models

    models = list_models()
    if cfg.model.name not in models:
        close = difflib.get_close_matches(cfg.model.name, models, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown model {cfg.model.name!r} (--model / model.name); registered models: {', '.join(models)}.{hint}"
        )
    if cfg.data.splits_file:
        from medseg.data.splits import load_splits

        count, source = len(load_splits(cfg.data.splits_file)), f"data.splits_file {cfg.data.splits_file}"
    else:
        count, source = cfg.data.num_folds, "data.num_folds"
    for k in folds:
        if k != "all" and not (isinstance(k, int) and 0 <= k < count):
            raise ConfigError(
                f"fold {k!r} does not exist: there {'are' if count != 1 else 'is'} {count} "
                f"fold{'s' if count != 1 else ''} (0..{count - 1}, {source}); pass one of them, "
                "or 'all' to train on every case."
            )
    repeated = sorted({str(k) for k in folds if list(folds).count(k) > 1})
    if repeated:
        raise ConfigError(f"fold {', '.join(repeated)} is given more than once; list each fold once.")


def _fold_value(value: int | str) -> int | str:
    if isinstance(value, int) or value == "all":
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ConfigError(f"fold must be a number or 'all', got {value!r}.")


def _find_run_to_resume(dataset_dir: Path, cfg: Config, runs_root: str | Path) -> Path:
    if cfg.data.spatial_dims is not None:
        return default_run_dir(dataset_dir, cfg.model.name, cfg.data.spatial_dims, runs_root)
    stem = f"{dataset_dir.resolve().name}_{cfg.model.name}_"
    found = sorted(p for p in Path(runs_root).glob(f"{stem}*d") if (p / "config.yaml").is_file())
    if len(found) != 1:
        raise ConfigError(
            f"--resume: cannot tell which run to continue ({len(found)} candidates under {runs_root}/); pass it with -o RUN_DIR."
        )
    return found[0]


def _refuse_overwrite(run_dir: Path, folds: Sequence[int | str], cfg: Config) -> None:
    """A run folder may get more folds, but only with the same config, and no fold is trained twice."""
    saved = run_dir / "config.yaml"
    if saved.is_file():
        a, b = _flat(load_config(saved)), _flat(cfg)
        diffs = [f"{k}: {a[k]!r} (run) != {b[k]!r} (now)" for k in a if a[k] != b[k] and k not in RESUMABLE_CHANGES]
        if diffs:
            raise ConfigError(
                f"{run_dir} holds a run with another config ({'; '.join(diffs)}); use -o NEW_RUN_DIR for this one."
            )
    for k in folds:
        if (run_dir / f"fold_{k}" / CHECKPOINT_LAST).exists():
            raise ConfigError(
                f"{run_dir / f'fold_{k}'} already holds a trained fold; pass --resume to continue it "
                "or -o NEW_RUN_DIR for a new run."
            )


def _check_run_dir(
    run_dir: Path, dataset_dir: Path, cfg: Config, folds: Sequence[int | str], *, init_from: str | Path | None
) -> None:
    """Refuse run and cache folders inside the dataset (before anything is written); clear killed saves' leftovers.

    The run folder may hold the dataset (files are only added to it), but it may not be
    the dataset or lie inside it, nor hold the ``--init-from`` model (a fold's model
    folder would replace it). Leftover temporary files of a killed save (medseg's own
    names only, see :func:`~medseg.io.atomic.clean_stale_temps`) are removed from the
    run folder and the folders of the folds to train.

    Raises:
        OutputExistsError: naming the run (or cache) folder and the input it overlaps.
    """
    from medseg.training.distributed import dist_info_from_env

    refuse_output_over_inputs(run_dir, {"dataset folder": dataset_dir}, what="run folder", around=False)
    if init_from is not None:
        refuse_output_over_inputs(run_dir, {"--init-from model": init_from}, what="run folder")
    if cfg.data.cache_dir:
        refuse_output_over_inputs(cfg.data.cache_dir, {"dataset folder": dataset_dir}, what="cache folder", around=False)
    if dist_info_from_env().is_main:
        for folder in [run_dir, *(run_dir / f"fold_{k}" for k in folds)]:
            clean_stale_temps(folder)


def _plan(
    index: DatasetIndex, cfg: Config, run_dir: Path | None, *, resume: bool, device_type: str
) -> tuple[Plan, Any]:
    """The run's saved plan (resume, or more folds of an existing run), else a new one with its fingerprint."""
    from medseg.data.plan import load_plan

    if run_dir is not None and (run_dir / "plan.json").is_file():
        saved = load_plan(run_dir / "plan.json")
        if resume:
            return saved, None
        if saved.configuration:  # more folds of a run whose configuration a time budget chose: keep it
            pinned = dataclasses.replace(
                cfg.data, spatial_dims=saved.spatial_dims, slice_context=saved.slice_context
            )
            cfg = dataclasses.replace(cfg, data=pinned)
        fresh, fingerprint = _make_plan(index, cfg, device_type)
        diffs = saved.diff(fresh)
        if diffs:
            raise ConfigError(
                f"{run_dir} holds a run with another plan ({'; '.join(diffs[:5])}); use -o NEW_RUN_DIR, "
                "or --resume to continue that run."
            )
        return saved, fingerprint
    return _make_plan(index, cfg, device_type)


def plan_from_config(fingerprint: Any, cfg: Config, device_type: str = "cpu") -> Plan:
    """:func:`medseg.data.plan.make_plan` with the settings a config pins (``data``, ``loss.class_weights``
    when a list, ``loss.ignore_label``)."""
    from medseg.data.plan import make_plan

    weights = cfg.loss.class_weights if isinstance(cfg.loss.class_weights, list) else None
    return make_plan(fingerprint, cfg.data, class_weights=weights, ignore_label=cfg.loss.ignore_label,
                     device_type=device_type)


def _make_plan(index: DatasetIndex, cfg: Config, device_type: str) -> tuple[Plan, Any]:
    from medseg.data.fingerprint import compute_fingerprint
    from medseg.training.budget import parse_duration

    log.info("fingerprinting %d cases ...", len(index.cases))
    fingerprint = compute_fingerprint(index, ignore_label=cfg.loss.ignore_label)
    plan = plan_from_config(fingerprint, cfg, device_type)
    budget_s = parse_duration(cfg.train.time_budget)
    if budget_s is not None and cfg.data.spatial_dims is None and plan.spatial_dims == 3:
        plan = _choose_configuration(fingerprint, cfg, plan, budget_s, device_type)
    log.info(
        "plan: %dD, spacing %s mm, patch %s, batch %d, %d classes (%s)",
        plan.spatial_dims, [round(s, 3) for s in plan.target_spacing], plan.patch_size, plan.batch_size,
        plan.num_classes, ", ".join(plan.label_names),
    )
    return plan, fingerprint


def _choose_configuration(fingerprint: Any, cfg: Config, plan3d: Plan, budget_s: float, device_type: str) -> Plan:
    """3D or 2.5D, whichever the budget trains better (rule: medseg.training.budget.choose_configuration)."""
    import torch

    from medseg.losses import build_loss
    from medseg.models import create_model_from_plan
    from medseg.training.budget import choose_configuration, time_training_step

    context = cfg.data.slice_context or 1
    cfg2d = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, spatial_dims=2, slice_context=context))
    plan2d = plan_from_config(fingerprint, cfg2d, device_type)
    options = {**cfg.model.options, "deep_supervision": cfg.model.deep_supervision}
    device = torch.device(device_type)
    seconds = []
    for candidate in (plan3d, plan2d):
        torch.manual_seed(0)
        model = create_model_from_plan(cfg.model.name, candidate, **options)
        seconds.append(time_training_step(
            model, build_loss(cfg.loss, candidate), batch_size=candidate.batch_size,
            in_channels=candidate.in_channels, patch_size=candidate.patch_size,
            num_classes=candidate.num_classes, device=device,
        ))
        del model
    choice = choose_configuration(budget_s, step_s_3d=seconds[0], step_s_2d=seconds[1], slice_context=context)
    log.info("configuration: %s", choice.reason)
    return dataclasses.replace(plan3d if choice.spatial_dims == 3 else plan2d, configuration=choice.reason)


def _splits(index: DatasetIndex, cfg: Config, run_dir: Path, *, resume: bool) -> list[dict[str, list[str]]]:
    from medseg.data.splits import load_splits, make_splits

    saved = run_dir / "splits.json"
    if saved.is_file():
        return load_splits(saved, case_ids=index.case_ids)
    if cfg.data.splits_file:
        return load_splits(cfg.data.splits_file, case_ids=index.case_ids)
    return make_splits(
        index, num_folds=cfg.data.num_folds, seed=cfg.data.split_seed, group_by_patient=cfg.data.group_by_patient
    )


def _write_run_files(
    run_dir: Path, cfg: Config, plan: Plan, splits: list[dict[str, list[str]]], fingerprint: Any
) -> None:
    from medseg.data.plan import save_plan
    from medseg.data.splits import save_splits

    make_folder(run_dir, "run folder")
    save_config(cfg, run_dir / "config.yaml")
    save_plan(plan, run_dir / "plan.json")
    save_splits(splits, run_dir / "splits.json")
    labels = {str(v): n for v, n in zip(plan.label_values, plan.label_names)}
    _write_json(run_dir / "labels.json", labels)
    if fingerprint is not None:
        _write_json(run_dir / "fingerprint.json", fingerprint.to_dict())


def _write_json(path: Path, data: Any) -> None:
    write_json_atomic(data, path, overwrite=True)


# --------------------------------------------------------------------------- one fold


def _train_fold(
    index: DatasetIndex,
    cfg: Config,
    plan: Plan,
    splits: list[dict[str, list[str]]],
    fold: int | str,
    *,
    run_dir: Path,
    resume: bool,
    init_from: str | Path | None,
    device: torch.device,
    info: DistInfo,
) -> FoldResult:
    from medseg.data.splits import select_split
    from medseg.losses import build_loss
    from medseg.model_folder import transfer_weights
    from medseg.models import create_model_from_plan, encoder_parameter_names
    from medseg.training.distributed import seed_everything
    from medseg.training.trainer import Trainer

    fold_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fold=fold))
    split = select_split(splits, fold)
    fold_dir = run_dir / f"fold_{fold}"
    if info.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
    log.info("fold %s: %d training and %d validation cases", fold, len(split["train"]), len(split["val"]))
    seed_everything(cfg.train.seed)
    model_options = {**cfg.model.options, "deep_supervision": cfg.model.deep_supervision}
    model = create_model_from_plan(cfg.model.name, plan, **model_options)
    has_checkpoint = (fold_dir / CHECKPOINT_LAST).is_file()
    notes = []
    if init_from is not None and not (resume and has_checkpoint):
        notes.append(transfer_weights(model, init_from, label_names=plan.label_names).summary())
    loss_fn = build_loss(cfg.loss, plan)
    if hasattr(loss_fn, "to"):
        loss_fn = loss_fn.to(device)
    data = _fold_data(index, fold_cfg, plan, split, run_dir=run_dir, info=info)
    trainer = Trainer(
        model=model,
        loss_fn=loss_fn,
        plan=plan,
        train=fold_cfg.train,
        infer=fold_cfg.infer,
        config_record=fold_cfg.to_dict(),
        fold_dir=fold_dir,
        batches=data.batches,
        val_cases=data.val_cases,
        device=device,
        fold=fold,
        model_name=cfg.model.name,
        model_options=model_options,
        dist=info,
        generators=data.generators,
        encoder_parameter_names=encoder_parameter_names(model) if cfg.train.freeze_encoder_epochs > 0 else (),
        notes=notes,
    )
    if resume and has_checkpoint:
        trainer.resume()
    result = trainer.fit()
    return FoldResult(
        fold=fold,
        fold_dir=fold_dir,
        model_dir=result.model_dir,
        status=result.status,
        epochs=result.epochs,
        best_epoch=result.best_epoch,
        val_dice=result.val_dice,
        mean_fg_dice=result.best_metric,
    )


@dataclass
class _FoldData:
    batches: Any
    val_cases: list[Any]
    generators: dict[str, Any]


def _fold_data(
    index: DatasetIndex, cfg: Config, plan: Plan, split: dict[str, list[str]], *, run_dir: Path, info: DistInfo
) -> _FoldData:
    """The fold's loader (per-rank seed) and its validation cases, preprocessed once into the cache."""
    from medseg.data.cache import PreprocessedCache
    from medseg.data.loaders import build_train_loader
    from medseg.training.distributed import barrier
    from medseg.training.trainer import ValCase

    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir.parent / ".cache"
    cache = PreprocessedCache(cache_dir, plan, dataset_root=index.root)
    by_id = {c.case_id: c for c in index.cases}
    needed = [by_id[i] for i in dict.fromkeys([*split["train"], *split["val"]])]
    if info.is_main:  # rank 0 preprocesses, the others then find every case in the cache
        cache.prepare(needed)
    barrier()
    cache.prepare(needed)
    # a time budget sizes the trainer's epochs (chunks) at run time: an endless stream numbered from
    # (epoch, start), so a chunk longer than train.iterations_per_epoch never runs the loader dry
    budget = cfg.train.time_budget is not None
    loader = build_train_loader(
        index, plan, cache=cache, data=cfg.data, augmentation=cfg.augment, split=split,
        seed=cfg.train.seed + RANK_SEED_STRIDE * info.rank,
        iterations_per_epoch=None if budget else cfg.train.iterations_per_epoch,
    )

    def batches(epoch: int, start: int) -> Any:
        if budget:
            loader.batch_sampler.set_epoch(0, offset=epoch * BUDGET_EPOCH_STRIDE + start)
        else:
            loader.batch_sampler.set_epoch(epoch, offset=start)
        return loader

    val_cases = []
    for case_id in split["val"]:
        cached = cache.load(case_id)
        val_cases.append(ValCase(case_id, cached.image, cached.label))
    return _FoldData(batches=batches, val_cases=val_cases, generators={"loader": loader.generator})


# --------------------------------------------------------------------------- summary


def _summarise(run_dir: Path, cfg: Config, plan: Plan, results: list[FoldResult], *, write: bool) -> Run:
    status = "interrupted" if any(r.status == "interrupted" for r in results) else "completed"
    if len(results) == 1:
        r = results[0]
        metrics: dict[str, Any] = {"val_dice": r.val_dice, "mean_fg_dice": r.mean_fg_dice}
        model_dir = r.model_dir
    else:
        per_fold = {str(r.fold): {"val_dice": r.val_dice, "mean_fg_dice": r.mean_fg_dice, "best_epoch": r.best_epoch,
                                  "epochs": r.epochs, "status": r.status} for r in results}
        names = list(plan.label_names[1:])
        mean_dice = {}
        for name in names:
            values = [r.val_dice.get(name) for r in results]
            values = [v for v in values if v is not None and not math.isnan(v)]
            mean_dice[name] = sum(values) / len(values) if values else float("nan")
        fg = [r.mean_fg_dice for r in results if r.mean_fg_dice is not None]
        metrics = {"val_dice": mean_dice, "mean_fg_dice": sum(fg) / len(fg) if fg else None, "per_fold": per_fold}
        model_dir = run_dir
        if write:
            _write_json(run_dir / "cv_summary.json", json_safe({"folds": [str(r.fold) for r in results], **metrics}))
    return Run(run_dir=run_dir, model_dir=model_dir, status=status, folds=results, metrics=metrics, config=cfg, plan=plan)
