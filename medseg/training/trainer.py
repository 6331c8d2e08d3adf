"""The training loop: nnU-Net's recipe, exact resume, validation on whole cases.

One :class:`Trainer` trains one fold. It does not know about dataset folders:
it gets a network, a loss, a function that yields the batches of an epoch and
the validation cases (already preprocessed onto the plan grid); ``run.py``
wires these from a dataset folder.

The loop
    ``max_epochs`` epochs of ``iterations_per_epoch`` optimizer steps. SGD with
    Nesterov momentum (0.99, weight decay 3e-5, lr 1e-2) and polynomial decay
    ``lr * (1 - epoch / max_epochs) ** 0.9`` set per epoch, or AdamW; gradient
    norm clipped to 12; mixed precision (float16 autocast + GradScaler) only on
    CUDA, never on the CPU. A non-finite loss stops training with a
    :class:`~medseg.errors.TrainingError`; the last checkpoint (written at the end
    of the previous epoch) is kept.

Validation
    Every ``val_every`` epochs and after the last one: sliding-window logits on
    every whole validation case (``medseg.inference.sliding_window.predict_logits``),
    argmax, per-class Dice per case, averaged over the cases where the class is
    in the reference or the prediction. The mean over foreground classes selects
    the best model (``model/``) and drives early stopping. Under DDP the cases are
    split among the ranks and the sums all-reduced.

Checkpoints and resume
    ``checkpoint_last.pt`` (see :mod:`medseg.training.checkpoint`) after every
    epoch, and mid-epoch when the run is stopped with Ctrl-C/SIGTERM. It holds
    the weights, optimizer and GradScaler states, the loop's counters and the RNG
    states of python, numpy, torch and the loader's generator at the moment of
    saving. Resuming asks for the epoch's batches from the saved step on and
    continues: with ``deterministic=True`` on the CPU the result is bitwise that
    of an uninterrupted run.

The batches of an epoch come from ``batches(epoch, start)``; for exact resume
they must be a deterministic function of ``(epoch, start)`` (medseg's loader
seeds every sample from ``(seed, sample index)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import TrainingError
from medseg.inference.quality import fingerprint_volume_ranges
from medseg.metrics import dice_per_class
from medseg.model_folder import save_model_folder
from medseg.training.budget import BudgetPlan, parse_duration, plan_budget
from medseg.training.checkpoint import (
    capture_rng_state,
    load_training_state,
    make_identity,
    restore_rng_state,
    save_checkpoint,
)
from medseg.training.distributed import DistInfo, all_reduce_sum, barrier, broadcast_flag
from medseg.training.monitor import Monitor, overlay_image, zero_class_warning

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medseg.data.plan import Plan
    from medseg.settings import InferConfig, TrainConfig

__all__ = ["CHECKPOINT_LAST", "FitResult", "Trainer", "ValCase", "learning_rate_at"]

log = logging.getLogger(__name__)

CHECKPOINT_LAST = "checkpoint_last.pt"
PROBE_WARMUP = 2  # untimed steps before the time-budget probe measures (allocations, workers starting)
PROBE_STEPS = 8  # timed probe steps (fewer when they take more than PROBE_SHARE of the budget)
PROBE_SHARE = 0.03
OPTIMIZER_STEP_FACTOR = 1.05  # the probe times forward + backward; the optimizer step adds a few per cent
VALIDATION_OVERHEAD = 1.3  # Gaussian weighting, accumulation, argmax and Dice on top of the forward passes


@dataclass
class ValCase:
    """A preprocessed validation case on the plan grid.

    Attributes:
        case_id: identifier (for logs).
        image: ``(C, *spatial)`` float32 normalised intensities.
        label: ``(*spatial)`` class indices (0..K-1) or ``(1, *spatial)``.
    """

    case_id: str
    image: Any
    label: Any


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        status: ``completed``, ``early_stopped`` or ``interrupted``.
        epochs: epochs completed.
        best_epoch: epoch (1-based) of the best validation, or ``None``.
        best_metric: best mean foreground Dice, or ``None``.
        val_dice: per-class Dice of the best validation.
        last_val_dice: per-class Dice of the last validation.
        model_dir: the model folder (best weights; last weights for fold "all"/no validation).
        checkpoint: the training-state checkpoint.
    """

    status: str
    epochs: int
    best_epoch: int | None
    best_metric: float | None
    val_dice: dict[str, float]
    last_val_dice: dict[str, float]
    model_dir: Path | None
    checkpoint: Path


def learning_rate_at(epoch: int, *, base: float, max_epochs: int, schedule: str) -> float:
    """Learning rate of an epoch (0-based): poly ``(1 - e/E) ** 0.9``, cosine, or constant."""
    frac = min(max(epoch / max_epochs, 0.0), 1.0)
    if schedule == "poly":
        return base * (1.0 - frac) ** 0.9
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * frac))
    return base


@dataclass
class _LoopState:
    epoch: int = 0  # completed epochs
    iteration: int = 0  # steps done in epoch `epoch` (mid-epoch checkpoints only)
    best_metric: float | None = None
    best_epoch: int | None = None
    best_val_dice: dict[str, float] = field(default_factory=dict)
    last_val_dice: dict[str, float] = field(default_factory=dict)
    bad_validations: int = 0
    validations: int = 0
    loss_sum: float = 0.0
    data_s: float = 0.0
    compute_s: float = 0.0
    epoch_s: float = 0.0
    stopped_early: bool = False
    elapsed_s: float = 0.0  # wall time of this fold so far (time budget; kept across resumes)
    budget_total_steps: int = 0  # time budget: the schedule's length in steps (0: no budget plan yet)
    budget_chunk_steps: int = 0  # time budget: steps between validations
    budget_validations: int = 0  # time budget: validation passes planned for the fold
    budget_exhausted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second Ctrl-C aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step (Ctrl-C again to abort)", self.signal_name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
    """Trains one fold.

    Args:
        model: the network (its ``state_dict`` keys must not depend on the device).
        loss_fn: ``loss_fn(logits_or_list, target (B, 1, *patch) int64) -> scalar``.
        plan: the plan (labels, patch size, sliding-window settings).
        train: the ``train`` section (the loop, optimizer, budget, device settings).
        infer: the ``infer`` section (sliding-window settings of validation and the model folder).
        config_record: the whole resolved config as a dict, kept in checkpoints for reference
            (default: the two sections).
        fold_dir: where checkpoints, logs and model folders are written.
        batches: ``batches(epoch, start) -> iterable of {"image": (B, C, *patch), "label": (B, 1, *patch)}``:
            the epoch's batches from step ``start`` on (``iterations_per_epoch - start`` or more),
            a deterministic function of ``(epoch, start)`` and the RNG states.
        val_cases: preprocessed whole cases to validate on (may be empty).
        device: where to train.
        fold: fold index or ``"all"`` (recorded in the model folder).
        model_name, model_options: how to rebuild the network (``create_model_from_plan``).
        dist: this process's place in a torchrun job.
        generators: ``torch.Generator`` objects whose state belongs in the checkpoint.
        encoder_parameter_names: parameters to freeze for ``train.freeze_encoder_epochs``.
        predict: ``predict(network, image, plan, *, overlap, batch_size, device) -> (K, *spatial)`` logits;
            default: medseg's sliding window.
        notes: lines for the fold's log (e.g. what ``--init-from`` loaded).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        plan: Plan,
        train: TrainConfig,
        infer: InferConfig,
        config_record: Mapping[str, Any] | None = None,
        fold_dir: str | Path,
        batches: Callable[[int, int], Iterable[dict[str, torch.Tensor]]],
        val_cases: Sequence[ValCase],
        device: torch.device,
        fold: int | str,
        model_name: str,
        model_options: dict[str, Any],
        dist: DistInfo | None = None,
        generators: dict[str, torch.Generator] | None = None,
        encoder_parameter_names: Sequence[str] = (),
        predict: Callable[..., torch.Tensor] | None = None,
        notes: Sequence[str] = (),
    ) -> None:
        import torch

        self.model = model.to(device)
        self.loss_fn = loss_fn
        self.plan = plan
        self.cfg = train
        self.infer = infer
        self.config_record = dict(config_record) if config_record is not None else {
            "train": dataclasses.asdict(train), "infer": dataclasses.asdict(infer)}
        if self.cfg.compile and device.type == "cpu" and not any(
            shutil.which(c) for c in ("c++", "g++", "clang++", "cl")
        ):
            raise TrainingError(
                "train.compile: true needs a C++ compiler on CPU (torch.compile's inductor builds C++ kernels) "
                "and none was found on PATH; install one (e.g. apt install g++) or set train.compile: false."
            )
        self.fold_dir = Path(fold_dir)
        # training volume range per label (run's fingerprint.json; None outside a run), kept in model.json
        self.volume_ranges = fingerprint_volume_ranges(self.fold_dir / "model", plan)
        self.batches = batches
        self.val_cases = list(val_cases)
        self.device = device
        self.fold = fold
        self.model_name = model_name
        self.model_options = dict(model_options)
        self.dist = dist or DistInfo()
        self.generators = generators or {}
        self.encoder_names = set(encoder_parameter_names)
        self.predict = predict
        self.notes = list(notes)
        self.amp = device.type == "cuda" and self.cfg.mixed_precision == "auto"
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.state = _LoopState()
        self.identity = make_identity(model_name=model_name, model_options=self.model_options, plan=plan)
        self.checkpoint_path = self.fold_dir / CHECKPOINT_LAST
        self.class_names = list(plan.label_names[1:])
        self._frozen: bool | None = None
        self._wrapped: nn.Module | None = None  # what training calls: DDP and/or torch.compile around model
        self._resume_rng: dict[str, Any] | None = None
        self.budget_s = parse_duration(self.cfg.time_budget)
        self._deadline: float | None = None  # perf_counter() after which no step starts
        self._clock_start = 0.0  # perf_counter() at fit() start, and the elapsed_s then
        self._elapsed_at_start = 0.0
        self._last_validation_s: float | None = None
        self._validation_s_total = 0.0
        self._speed_clock = (0.0, 0)  # (perf_counter(), steps done) when the budget plan was made

    # ----------------------------------------------------------------- setup

    def _make_optimizer(self) -> torch.optim.Optimizer:
        import torch

        params = list(self.model.parameters())
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)
        return torch.optim.SGD(
            params,
            lr=self.cfg.learning_rate,
            momentum=self.cfg.momentum,
            weight_decay=self.cfg.weight_decay,
            nesterov=self.cfg.momentum > 0,
        )

    def _network(self) -> nn.Module:
        """The module to call in training: the model, in DDP under torchrun and compiled with ``train.compile``.

        Rebuilt when encoder freezing changes (DDP and the compiled graph depend on which
        parameters train). Validation and checkpoints use ``self.model`` itself.
        """
        freeze = bool(self.encoder_names) and self.state.epoch < self.cfg.freeze_encoder_epochs
        if freeze != self._frozen:
            for name, p in self.model.named_parameters():
                if name in self.encoder_names:
                    p.requires_grad_(not freeze)
            if self._frozen is not None or freeze:
                log.info("encoder %s (%d tensors)", "frozen" if freeze else "unfrozen", len(self.encoder_names))
            self._frozen = freeze
            self._wrapped = None
        if self._wrapped is None:
            network = self.model
            if self.dist.is_distributed:
                from torch.nn.parallel import DistributedDataParallel

                ids = [self.device.index] if self.device.type == "cuda" else None
                # the U-Net's lowest deep-supervision head has loss weight 0: its parameters get no gradient
                unused = bool(getattr(self.model, "deep_supervision", False))
                network = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=unused)
            if self.cfg.compile:
                import torch

                network = torch.compile(network)
            self._wrapped = network
        return self._wrapped

    # ----------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        """Write ``checkpoint_last.pt`` (rank 0 only)."""
        self._tick()
        if self.dist.is_main:
            save_checkpoint(
                self.checkpoint_path,
                {
                    "identity": self.identity,
                    "config": self.config_record,
                    "seed": self.cfg.seed,
                    "epoch": self.state.epoch,
                    "iteration": self.state.iteration,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scaler": self.scaler.state_dict() if self.amp else None,
                    "trainer": self.state.to_dict(),
                    "rng": capture_rng_state(self.generators),
                    "medseg_version": _version(),
                },
            )
        return self.checkpoint_path

    def resume(self, path: str | Path | None = None) -> None:
        """Restore everything from a checkpoint (refused if it was made for another model/labels/plan)."""
        path = Path(path) if path is not None else self.checkpoint_path
        ckpt = load_training_state(
            path, identity=self.identity, model=self.model, optimizer=self.optimizer, loop_state=_LoopState
        )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.amp and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state = _LoopState(**ckpt["trainer"])
        self._resume_rng = ckpt["rng"]
        log.info("resumed from %s at epoch %d, step %d", path, self.state.epoch, self.state.iteration)

    # ----------------------------------------------------------------- loop

    def fit(self) -> FitResult:
        """Train until ``max_epochs``, early stopping, or an interrupt (then a resumable checkpoint is saved)."""
        cfg = self.cfg
        start_epoch = self.state.epoch
        monitor = Monitor(self.fold_dir, self.class_names, enabled=self.dist.is_main, start_epoch=start_epoch)
        status = "early_stopped" if self.state.stopped_early else "completed"
        resume_rng = self._resume_rng
        self._resume_rng = None
        trained = False
        for note in self.notes:
            log.info("%s", note)
        self._clock_start = time.perf_counter()
        self._elapsed_at_start = self.state.elapsed_s
        if self.budget_s is not None and not self.state.stopped_early:
            self.state.budget_exhausted = False  # re-sized from the time left (a resume may bring a larger budget)
            self._plan_budget()
            cfg = self.cfg
        try:
            with _StopRequest() as stop:
                if self.state.stopped_early or self.state.budget_exhausted or self.state.epoch >= cfg.max_epochs:
                    log.info("nothing to do: fold finished after %d epochs (%s)", self.state.epoch, status)
                while self.state.epoch < self.cfg.max_epochs and not self.state.stopped_early:
                    trained = True
                    if resume_rng is not None and self.state.iteration == 0:
                        restore_rng_state(resume_rng, self.generators)
                        resume_rng = None
                    interrupted = self._train_epoch(stop, monitor, resume_rng)
                    resume_rng = None
                    if interrupted:
                        status = "interrupted"
                        break
                    if self.state.budget_exhausted:  # the time kept for the last validation is still there
                        log.warning(
                            "time budget reached after %d of %d steps: validating and writing the model",
                            self._steps_done(), self.state.budget_total_steps,
                        )
                        self._end_epoch(monitor)
                        break
                    if self._end_epoch(monitor):
                        status = "early_stopped"
                        break
                    self._resize_budget()
                    if broadcast_flag(stop.requested, self.device) and self.state.epoch < self.cfg.max_epochs:
                        log.warning("stopped after epoch %d; checkpoint saved to %s", self.state.epoch, self.checkpoint_path)
                        status = "interrupted"
                        break
        finally:
            monitor.close()
        self._tick()
        model_dir = self.fold_dir / "model"
        if status != "interrupted" and trained:
            if self.dist.is_main:
                self._save_model(self.fold_dir / "model_last", last=True)
                if self.state.best_epoch is None:  # no validation cases: the last weights are the model
                    self._save_model(model_dir, last=True)
            barrier()
        return FitResult(
            status=status,
            epochs=self.state.epoch,
            best_epoch=self.state.best_epoch,
            best_metric=self.state.best_metric,
            val_dice=dict(self.state.best_val_dice),
            last_val_dice=dict(self.state.last_val_dice),
            model_dir=model_dir if (model_dir / "model.json").exists() else None,
            checkpoint=self.checkpoint_path,
        )

    def _train_epoch(self, stop: _StopRequest, monitor: Monitor, resume_rng: dict[str, Any] | None) -> bool:
        """One epoch (or its remainder after a mid-epoch resume). Returns True when interrupted."""
        import torch
        from tqdm.auto import tqdm

        cfg = self.cfg
        epoch = self.state.epoch
        lr = learning_rate_at(epoch, base=cfg.learning_rate, max_epochs=cfg.max_epochs, schedule=cfg.lr_schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        budget = self.state.budget_total_steps > 0
        network = self._network()
        network.train()
        start_step = self.state.iteration
        if start_step == 0:
            self.state.loss_sum = self.state.data_s = self.state.compute_s = self.state.epoch_s = 0.0
        stream: Iterator[dict[str, torch.Tensor]] = iter(self.batches(epoch, start_step))
        if resume_rng is not None:  # mid-epoch resume: the RNG states at the moment of the interrupt
            restore_rng_state(resume_rng, self.generators)
        bar = tqdm(
            total=cfg.iterations_per_epoch,
            initial=start_step,
            desc=f"epoch {epoch + 1}/{cfg.max_epochs}",
            unit="it",
            disable=None if self.dist.is_main else True,  # None: off when stderr is not a terminal
            leave=False,
            dynamic_ncols=True,
        )
        sync = self.device.type == "cuda"
        t_epoch = time.perf_counter()
        try:
            for step in range(start_step, cfg.iterations_per_epoch):
                if budget:  # the schedule runs over steps and ends at the budget; no step starts past the deadline
                    if self._past_deadline():
                        self.state.budget_exhausted = True
                        return False
                    lr = learning_rate_at(
                        epoch * cfg.iterations_per_epoch + step, base=cfg.learning_rate,
                        max_epochs=self.state.budget_total_steps, schedule=cfg.lr_schedule,
                    )
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                t0 = time.perf_counter()
                try:
                    batch = next(stream)
                except StopIteration:
                    raise TrainingError(
                        f"the training loader ran out after {step} of {cfg.iterations_per_epoch} steps in epoch "
                        f"{epoch + 1}; it must yield at least train.iterations_per_epoch batches."
                    ) from None
                x = batch["image"].to(self.device, non_blocking=True)
                y = batch["label"].to(self.device, non_blocking=True)
                t1 = time.perf_counter()
                loss_value = self._step(network, x, y, stop)
                if sync:
                    torch.cuda.synchronize(self.device)
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"the training loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; training "
                        f"stopped. The last good checkpoint is kept: {self.checkpoint_path} (epoch {self.state.epoch}). "
                        "Try a lower train.learning_rate, train.grad_clip, or check the data (medseg check)."
                    )
                t2 = time.perf_counter()
                self.state.loss_sum += loss_value
                self.state.data_s += t1 - t0
                self.state.compute_s += t2 - t1
                self.state.iteration = step + 1
                bar.update(1)
                if self.dist.is_main and (step % 5 == 0 or step + 1 == cfg.iterations_per_epoch):
                    total = self.state.data_s + self.state.compute_s
                    bar.set_postfix(
                        loss=f"{self.state.loss_sum / self.state.iteration:.4f}",
                        lr=f"{lr:.2e}",
                        wait=f"{100 * self.state.data_s / total:.0f}%" if total else "0%",
                        refresh=False,
                    )
                if stop.requested and self.state.iteration < cfg.iterations_per_epoch:
                    self.state.epoch_s += time.perf_counter() - t_epoch
                    self.save()
                    barrier()
                    log.warning(
                        "stopped by %s at epoch %d, step %d; checkpoint saved to %s",
                        stop.signal_name or "request", epoch + 1, self.state.iteration, self.checkpoint_path,
                    )
                    return True
        finally:
            bar.close()
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        self.state.epoch_s += time.perf_counter() - t_epoch
        return False

    def _step(self, network: nn.Module, x: torch.Tensor, y: torch.Tensor, stop: _StopRequest) -> float:
        """One optimizer step; returns the loss (averaged over ranks), without stepping if it is not finite."""
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        with ctx:
            out = network(x)
            loss = self.loss_fn(out, y)
        value = float(loss.detach())
        if self.dist.is_distributed:  # every rank must agree on "non-finite" and "stop" before backward
            flags = torch.tensor([value, 1.0 if stop.requested else 0.0], dtype=torch.float64, device=self.device)
            all_reduce_sum(flags)
            value = float(flags[0]) / self.dist.world_size
            stop.requested = stop.requested or bool(flags[1] > 0)
        if not math.isfinite(value):
            return value
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value

    def _end_epoch(self, monitor: Monitor) -> bool:
        """Validate if due, record, checkpoint, keep the best model. Returns True to stop early."""
        cfg = self.cfg
        epoch = self.state.epoch + 1  # 1-based number of the epoch just finished
        lr = self.optimizer.param_groups[0]["lr"]
        val_dice = None
        stop_early = False
        due = epoch % cfg.val_every == 0 or epoch == cfg.max_epochs
        if due and self.val_cases:
            t0 = time.perf_counter()
            val_dice, overlay = self.validate()
            self._last_validation_s = time.perf_counter() - t0
            self._validation_s_total += self._last_validation_s
            self.state.validations += 1
            self.state.last_val_dice = val_dice
            mean = _mean(val_dice)
            improved = mean is not None and (self.state.best_metric is None or mean > self.state.best_metric)
            if improved:
                self.state.best_metric = mean
                self.state.best_epoch = epoch
                self.state.best_val_dice = dict(val_dice)
                self.state.bad_validations = 0
            else:
                self.state.bad_validations += 1
            log.info(
                "epoch %d validation (%d cases, %.1f s): mean Dice %s%s [%s]",
                epoch, len(self.val_cases), time.perf_counter() - t0,
                "n/a" if mean is None else f"{mean:.4f}", " (best)" if improved else "",
                ", ".join(f"{k} {v:.3f}" for k, v in val_dice.items()),
            )
            if (unlearned := zero_class_warning(val_dice, epoch / cfg.max_epochs)) is not None:
                log.warning(unlearned)
            if overlay is not None and (self.state.validations - 1) % max(1, cfg.log_images_every) == 0:
                monitor.image("val/overlay", overlay, epoch)
            patience = cfg.early_stopping_patience
            if patience is not None and self.state.bad_validations >= patience and epoch < cfg.max_epochs:
                log.info("early stopping: no improvement in %d validations (best epoch %s)", patience, self.state.best_epoch)
                stop_early = True
                self.state.stopped_early = True
            if improved and self.dist.is_main:
                self._save_model(self.fold_dir / "model", last=False)
        train_loss = self.state.loss_sum / max(1, cfg.iterations_per_epoch)
        monitor.epoch_end(
            epoch,
            train_loss=train_loss,
            lr=lr,
            val_dice=val_dice,
            data_wait_s=self.state.data_s,
            compute_s=self.state.compute_s,
            epoch_s=self.state.epoch_s,
            steps=cfg.iterations_per_epoch,
        )
        total = self.state.data_s + self.state.compute_s
        remaining = (cfg.max_epochs - epoch) * self.state.epoch_s
        log.info(
            "epoch %d/%d: loss %.4f, lr %.2e, %.1f s (data wait %.0f%%), ETA %s",
            epoch, cfg.max_epochs, train_loss, lr, self.state.epoch_s,
            100 * self.state.data_s / total if total else 0.0, _duration(remaining),
        )
        self.state.epoch = epoch
        self.state.iteration = 0
        self.save()
        barrier()
        return stop_early

    # ----------------------------------------------------------------- time budget

    def _tick(self) -> None:
        """Bring ``state.elapsed_s`` (the fold's wall time, across resumes) up to now."""
        if self._clock_start:
            self.state.elapsed_s = self._elapsed_at_start + (time.perf_counter() - self._clock_start)

    def _agreed(self, *values: float) -> list[float]:
        """The ranks' mean of each value, so that every rank sizes the run the same way."""
        if not self.dist.is_distributed:
            return list(values)
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        all_reduce_sum(t)
        return [float(v) / self.dist.world_size for v in t.cpu()]

    def _past_deadline(self) -> bool:
        late = self._deadline is not None and time.perf_counter() >= self._deadline
        return broadcast_flag(late, self.device) if self.dist.is_distributed else late

    def _steps_done(self) -> int:
        per_epoch = self.state.budget_chunk_steps or self.cfg.iterations_per_epoch
        return self.state.epoch * per_epoch + self.state.iteration

    def _apply_budget(self, plan: BudgetPlan) -> None:
        self.state.budget_total_steps = plan.total_steps
        self.state.budget_chunk_steps = plan.chunk_steps
        # validate after every chunk, or every k-th when re-sizing added chunks: the validations stay as planned
        planned = self.state.budget_validations or plan.chunks
        self.cfg = dataclasses.replace(
            self.cfg, max_epochs=plan.chunks, iterations_per_epoch=plan.chunk_steps,
            val_every=max(1, math.ceil(plan.chunks / max(1, planned))),
        )
        # no step starts later than this: the last validation and the model write still fit
        left = plan.budget_s - self.state.elapsed_s - plan.reserve_s - plan.validation_s
        self._deadline = time.perf_counter() + left

    def _plan_budget(self) -> None:
        """Probe the step and validation time, then size the fold to the budget (docs: medseg.training.budget)."""
        assert self.budget_s is not None
        steps_done = self._steps_done()
        step_s, validation_s = self._probe()
        self._tick()
        step_s, validation_s, spent = self._agreed(step_s, validation_s, self.state.elapsed_s)
        plan = plan_budget(
            self.budget_s,
            step_s=step_s,
            validation_s=validation_s,
            spent_s=spent,
            steps_done=steps_done,
            validations_done=self.state.validations,
            validations=self.state.budget_validations or None,
            chunk_steps=self.state.budget_chunk_steps or None,
            has_validation=bool(self.val_cases),
        )
        if not self.state.budget_validations:
            self.state.budget_validations = plan.chunks if self.val_cases else 0
        self._apply_budget(plan)
        self._speed_clock = (time.perf_counter(), self._steps_done())
        self._validation_s_total = 0.0
        log.info("%s", plan.describe(self.plan.batch_size, resumed_after_s=self._elapsed_at_start))

    def _resize_budget(self) -> None:
        """After a chunk: re-size the remaining steps from the speed measured so far (machine load changes)."""
        if not self.state.budget_total_steps or self.budget_s is None:
            return
        self._tick()
        chunk = self.cfg.iterations_per_epoch
        # wall time per step since the plan, checkpoints and logging included, validations excluded
        t_plan, steps_at_plan = self._speed_clock
        steps = self._steps_done() - steps_at_plan
        if steps <= 0:
            return
        measured = max(1e-6, time.perf_counter() - t_plan - self._validation_s_total) / steps
        step_s, validation_s, spent = self._agreed(
            measured, self._last_validation_s or 0.0, self.state.elapsed_s
        )
        plan = plan_budget(  # min_steps=0: re-sizing never refuses, it only shortens or extends
            self.budget_s, step_s=step_s, validation_s=validation_s, spent_s=spent,
            steps_done=self.state.epoch * chunk, validations_done=self.state.validations,
            validations=self.state.budget_validations, chunk_steps=chunk,
            has_validation=bool(self.val_cases), min_steps=0,
        )
        if plan.chunks != self.cfg.max_epochs:
            log.info(
                "budget: re-sized to %d steps (%d chunks; measured %.2g s/step, %.0f s per validation)",
                plan.total_steps, plan.chunks, step_s, validation_s,
            )
        self._apply_budget(plan)

    def _probe(self) -> tuple[float, float]:
        """Seconds per optimizer step on real batches, and per validation pass; the model is left unchanged."""
        import torch

        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        rng = capture_rng_state(self.generators)
        network = self._network()
        network.train()
        sync = self.device.type == "cuda"
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()
        cap = max(10.0, PROBE_SHARE * (self.budget_s or 0.0))
        stream: Iterator[dict[str, torch.Tensor]] = iter(self.batches(self.state.epoch, self.state.iteration))
        times: list[float] = []
        t_start = t_last = time.perf_counter()
        try:
            for i in range(PROBE_WARMUP + PROBE_STEPS):
                batch = next(stream, None)
                if batch is None:
                    break
                x = batch["image"].to(self.device, non_blocking=True)
                y = batch["label"].to(self.device, non_blocking=True)
                self.optimizer.zero_grad(set_to_none=True)
                with ctx:
                    loss = self.loss_fn(network(x), y)
                self.scaler.scale(loss).backward()
                if sync:
                    torch.cuda.synchronize(self.device)
                now = time.perf_counter()
                if i >= PROBE_WARMUP:
                    times.append(now - t_last)
                t_last = now
                if len(times) >= 2 and now - t_start > cap:
                    break
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            self.optimizer.zero_grad(set_to_none=True)
            self.model.load_state_dict(saved)
            restore_rng_state(rng, self.generators)
        step_s = (float(np.median(times)) if times else t_last - t_start) * OPTIMIZER_STEP_FACTOR
        return step_s, self._estimate_validation()

    def _estimate_validation(self) -> float:
        """Seconds of one validation pass: windows to run x the time of one inference batch."""
        if not self.val_cases:
            return 0.0
        import torch

        from medseg.inference.sliding_window import plan_windows

        overlap = self.infer.overlap
        mine = self.val_cases[self.dist.rank :: self.dist.world_size] or self.val_cases[:1]
        windows = sum(plan_windows(tuple(np.shape(c.image)[1:]), self.plan, overlap).num_windows for c in mine)
        batch = max(1, int(self.infer.batch_size))
        x = torch.zeros((batch, self.plan.in_channels, *self.plan.patch_size), device=self.device)
        self.model.eval()
        with torch.inference_mode():
            self.model(x)
            t0 = time.perf_counter()
            self.model(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t_forward = time.perf_counter() - t0
        self.model.train()
        return math.ceil(windows / batch) * t_forward * VALIDATION_OVERHEAD + 0.05 * len(mine)

    # ----------------------------------------------------------------- validation

    def validate(self) -> tuple[dict[str, float], np.ndarray | None]:
        """Per-class Dice over the validation cases (this rank's share, all-reduced), and an overlay image."""
        import torch

        k = self.plan.num_classes
        sums = torch.zeros(2, k - 1, dtype=torch.float64)
        overlay = None
        self.model.eval()
        predict = self.predict or _default_predict
        with torch.inference_mode():
            for i in range(self.dist.rank, len(self.val_cases), self.dist.world_size):
                case = self.val_cases[i]
                image = case.image if isinstance(case.image, torch.Tensor) else torch.from_numpy(np.array(case.image))
                logits = predict(
                    self.model,
                    image,
                    self.plan,
                    overlap=self.infer.overlap,
                    batch_size=self.infer.batch_size,
                    device=self.device,
                )
                pred = logits.argmax(0).cpu().numpy()
                label = np.asarray(case.label)
                if label.ndim == pred.ndim + 1:
                    label = label[0]
                dice = dice_per_class(pred, label, k)
                present = ~np.isnan(dice)
                sums[0] += torch.from_numpy(np.where(present, dice, 0.0))
                sums[1] += torch.from_numpy(present.astype(np.float64))
                if i == 0 and self.dist.is_main:
                    overlay = _overlay(image, label, pred)
        self.model.train()
        if self.dist.is_distributed:
            moved = sums.to(self.device)
            all_reduce_sum(moved)
            sums = moved.cpu()
        dice = {
            name: float(sums[0, c] / sums[1, c]) if sums[1, c] > 0 else float("nan")
            for c, name in enumerate(self.class_names)
        }
        return dice, overlay

    def _save_model(self, model_dir: Path, *, last: bool) -> None:
        save_model_folder(
            model_dir,
            model=self.model,
            model_name=self.model_name,
            model_options=self.model_options,
            plan=self.plan,
            infer_config=self.infer,
            fold=self.fold,
            volume_ranges=self.volume_ranges,
            training_info={
                "epoch": self.state.epoch if last else self.state.epoch + 1,
                "best_epoch": self.state.best_epoch,
                "val_dice": {
                    k: (None if math.isnan(v) else v)
                    for k, v in (self.state.last_val_dice if last else self.state.best_val_dice).items()
                },
                "seed": self.cfg.seed,
                "weights": "last" if last else "best",
            },
        )


def _default_predict(
    network: nn.Module, image: Any, plan: Plan, *, overlap: float, batch_size: int, device: Any
) -> torch.Tensor:
    from medseg.inference.sliding_window import WindowOptions, predict_logits

    return predict_logits(network, image, plan, WindowOptions(overlap=overlap, batch_size=batch_size), device=device)


def _overlay(image: Any, label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """TensorBoard overlay of a validation case on the plan grid, shown as the preview PNG shows it.

    3D cases are in RAS (``plan.orientation``): the axial slice through the reference's
    largest cross-section (else the middle one), anterior up and the patient's right on
    the left. 2D cases (not re-oriented): axis 0 across, axis 1 down, as an image is read.
    """
    img = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    img = img[0]
    if img.ndim == 3:
        area = (label > 0).sum(axis=(0, 1))
        z = int(area.argmax()) if area.max() > 0 else img.shape[2] // 2
        img, label, pred = (a[..., z].T[::-1, ::-1] for a in (img, label, pred))
        return overlay_image(img, label, pred)
    return overlay_image(img.T, label.T, pred.T)


def _mean(dice: dict[str, float]) -> float | None:
    values = [v for v in dice.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else None


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _version() -> str:
    from medseg.version import __version__

    return __version__
