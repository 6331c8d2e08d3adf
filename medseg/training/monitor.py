"""What a run records: ``metrics.csv``, ``train.log`` and TensorBoard events (scalars and overlays).

Only rank 0 records; the other ranks get a :class:`Monitor` that does nothing.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.io.atomic import write_text_atomic

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ZERO_DICE_AFTER", "Monitor", "overlay_image", "zero_class_warning"]

LOGGER_NAME = "medseg"
ZERO_DICE_AFTER = 1.0 / 3.0
"""Share of the training (steps done / steps planned) after which a class still at Dice 0 is warned about."""


def zero_class_warning(class_dice: Mapping[str, float], progress_fraction: float) -> str | None:
    """The warning for classes that are still not learned after a third of the training, or ``None``.

    Args:
        class_dice: validation Dice per foreground class name (NaN: the class is
            in no validation case and is not judged).
        progress_fraction: share of the planned training done (0..1), e.g.
            steps done / total steps.

    Returns:
        ``None`` before :data:`ZERO_DICE_AFTER` of the training or when every
        class has a Dice above 0; otherwise one line naming the classes and what
        to try.

    Example::

        >>> zero_class_warning({"liver": 0.8, "spleen": 0.0}, 0.5)[:48]
        'after 50% of the training, Dice is still 0 for 1'
    """
    if progress_fraction < ZERO_DICE_AFTER:
        return None
    zero = [name for name, value in class_dice.items() if not math.isnan(value) and value <= 0.0]
    if not zero:
        return None
    return (
        f"after {100 * progress_fraction:.0f}% of the training, Dice is still 0 for {len(zero)} of "
        f"{len(class_dice)} classes ({', '.join(zero)}): they are not being learned. Check that their labels are "
        "right (`medseg check`), and give them more weight: data.class_sampling=uniform, loss.class_weights=auto, "
        "a higher data.foreground_oversample, or a longer training."
    )


class Monitor:
    """Writes metrics.csv, train.log and TensorBoard events for one fold (rank 0 only).

    Args:
        fold_dir: the fold's folder.
        class_names: foreground class names (columns ``dice_<name>``).
        enabled: False on ranks other than 0.
        start_epoch: on resume, rows of later epochs are dropped from metrics.csv.
    """

    def __init__(self, fold_dir: Path, class_names: Sequence[str], *, enabled: bool = True, start_epoch: int = 0):
        self.enabled = enabled
        self.class_names = list(class_names)
        self.columns = [
            "epoch",
            "train_loss",
            "lr",
            *[f"dice_{n}" for n in self.class_names],
            "mean_fg_dice",
            "data_wait_s",
            "compute_s",
            "epoch_s",
        ]
        self.csv_path = fold_dir / "metrics.csv"
        self._writer: Any = None
        self._handler: logging.Handler | None = None
        if not enabled:
            return
        fold_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_csv(start_epoch)
        self._handler = logging.FileHandler(fold_dir / "train.log", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger = logging.getLogger(LOGGER_NAME)
        logger.addHandler(self._handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(fold_dir / "events"), purge_step=start_epoch + 1 if start_epoch else None)

    def _prepare_csv(self, start_epoch: int) -> None:
        rows: list[dict[str, str]] = []
        if self.csv_path.is_file() and start_epoch > 0:
            with open(self.csv_path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= start_epoch]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        write_text_atomic(buf.getvalue(), self.csv_path, overwrite=True)

    def epoch_end(
        self,
        epoch: int,
        *,
        train_loss: float,
        lr: float,
        val_dice: dict[str, float] | None,
        data_wait_s: float,
        compute_s: float,
        epoch_s: float,
        steps: int = 1,
    ) -> None:
        """Append one row to metrics.csv and write the epoch's scalars (``epoch`` counts from 1).

        ``data_wait_s``/``compute_s`` are the epoch's totals over ``steps`` optimizer steps.
        """
        if not self.enabled:
            return
        mean = _mean_fg(val_dice)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": f"{train_loss:.6g}",
            "lr": f"{lr:.6g}",
            "data_wait_s": f"{data_wait_s:.3f}",
            "compute_s": f"{compute_s:.3f}",
            "epoch_s": f"{epoch_s:.3f}",
            "mean_fg_dice": "" if mean is None else f"{mean:.6f}",
        }
        for name in self.class_names:
            value = (val_dice or {}).get(name)
            row[f"dice_{name}"] = "" if value is None or math.isnan(value) else f"{value:.6f}"
        with open(self.csv_path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n").writerow(row)
        w = self._writer
        w.add_scalar("train/loss", train_loss, epoch)
        w.add_scalar("train/lr", lr, epoch)
        total = data_wait_s + compute_s
        w.add_scalar("time/data_wait_s", data_wait_s, epoch)
        w.add_scalar("time/compute_s", compute_s, epoch)
        w.add_scalar("time/data_wait_share", data_wait_s / total if total > 0 else 0.0, epoch)
        w.add_scalar("time/step_data_wait_s", data_wait_s / max(1, steps), epoch)
        w.add_scalar("time/step_compute_s", compute_s / max(1, steps), epoch)
        w.add_scalar("time/epoch_s", epoch_s, epoch)
        if val_dice is not None:
            for name, value in val_dice.items():
                if not math.isnan(value):
                    w.add_scalar(f"val/dice_{name}", value, epoch)
            if mean is not None:
                w.add_scalar("val/mean_fg_dice", mean, epoch)
        w.flush()

    def image(self, tag: str, rgb: np.ndarray, epoch: int) -> None:
        """Write an ``(H, W, 3)`` uint8 image."""
        if self.enabled:
            self._writer.add_image(tag, rgb, epoch, dataformats="HWC")
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def _mean_fg(val_dice: dict[str, float] | None) -> float | None:
    if not val_dice:
        return None
    values = [v for v in val_dice.values() if not math.isnan(v)]
    return sum(values) / len(values) if values else None


def overlay_image(image: np.ndarray, label: np.ndarray, pred: np.ndarray, *, min_height: int = 256) -> np.ndarray:
    """Side by side: the slice, the reference and the prediction (``(H, 3W + 8, 3)`` uint8).

    Each class has its colour of the preview PNG and the DICOM outputs
    (:func:`medseg.inference.dicom_outputs.structure_colour`), filled at 45 %
    opacity with an opaque outline; panels are 4 black pixels apart. Small slices
    are enlarged by an integer factor (nearest neighbour) to at least
    ``min_height`` rows, so TensorBoard shows them at a readable size.

    Args:
        image: ``(H, W)`` intensities (any range), already oriented for display.
        label, pred: ``(H, W)`` class indices.
    """
    import numpy as np

    from medseg.inference.preview import rgba_overlay

    img = image.astype(np.float32)
    lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
    gray = np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    factor = max(1, -(-min_height // max(1, gray.shape[0])))
    if factor > 1:
        gray, label, pred = (np.repeat(np.repeat(a, factor, axis=0), factor, axis=1) for a in (gray, label, pred))
    base = np.repeat(gray[..., None], 3, axis=-1)

    def tint(mask: np.ndarray) -> np.ndarray:
        overlay = rgba_overlay(mask)
        alpha = overlay[..., 3:]
        return (1 - alpha) * base + alpha * overlay[..., :3]

    gap = np.zeros((base.shape[0], 4, 3), dtype=np.float32)
    panel = np.concatenate([base, gap, tint(label), gap, tint(pred)], axis=1)
    return (panel * 255).round().astype(np.uint8)
