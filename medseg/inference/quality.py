"""Quality-control flags of a prediction: how a researcher finds the 5 suspect cases in 500.

Each check returns ``None`` (nothing suspect) or one line saying what differs.
``medseg infer`` records the flags in its run manifest (``infer_manifest.csv``/``.json``,
:mod:`medseg.inference.jobs`) and logs one warning per flagged case. A flag is a
reason to look at the case, not an error: the mask is written either way.

``border``
    A structure touches the first or last slice of a scan axis: it probably
    continues outside the field of view, so its volume is cut off.
``volume``
    A structure's volume lies outside the range seen in training, widened by
    :data:`VOLUME_TOLERANCE` (below ``min / 1.5`` or above ``1.5 * max`` mL over
    the training cases that hold it), or it is absent although every training
    case holds it. Training stores the ranges in the model folder's
    ``model.json`` (``volume_ranges``), so a copied model folder keeps the
    check; for a model folder written before that, they come from the run's
    ``fingerprint.json`` (per-case voxel counts and spacings) beside it
    (``RUN/fold_K/model`` -> ``RUN/fingerprint.json``). A model folder with
    neither has no ranges and this check is skipped.
``low_confidence``
    The mean, over the voxels predicted as foreground (on the network's grid),
    of the largest softmax probability is below :data:`CONFIDENCE_THRESHOLD`
    (0.7): the network hesitated between classes over much of what it marked.
``intensity``
    The scan's intensities do not look like the training data (:func:`intensity_finding`):
    for a CT model, no air below -500 HU (an MR scan, or CT values without the
    rescale slope/intercept), more than 1 % of voxels above 3100 HU, or the
    median inside the predicted foreground outside the training foreground's
    [p0.5, p99.5] window widened by :data:`INTENSITY_MARGIN` of its width on each
    side; for an MR model, more than 1 % of voxels below -500 (a CT in HU).
    Models whose channels are z-scored per image record no absolute training
    intensities, so only the CT-versus-MR test applies to them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from medseg.data.plan import Plan

__all__ = [
    "CONFIDENCE_THRESHOLD",
    "INTENSITY_MARGIN",
    "QC_FLAGS",
    "VOLUME_TOLERANCE",
    "assess_prediction",
    "border_finding",
    "confidence_finding",
    "fingerprint_volume_ranges",
    "foreground_confidence",
    "intensity_finding",
    "parse_volume_ranges",
    "training_volume_ranges",
    "volume_finding",
]

log = logging.getLogger(__name__)

#: Flag names, in the order the manifest lists them.
QC_FLAGS = ("border", "volume", "low_confidence", "intensity")
#: Mean max-probability inside the predicted foreground below this is flagged.
CONFIDENCE_THRESHOLD = 0.7
#: Training volume range [min, max] (mL) is widened to [min / 1.5, 1.5 * max].
VOLUME_TOLERANCE = 1.5
#: The training foreground's [p0.5, p99.5] window is widened by this share of its width on each side.
INTENSITY_MARGIN = 0.25
#: A CT in HU holds air (about -1000 HU); a scan with nothing below this is not a CT in HU.
CT_AIR_HU = -500.0
#: HU above this (dense metal aside) do not occur in CT; more than :data:`CT_OUTSIDE_SHARE` of them is suspect.
CT_MAX_HU = 3100.0
CT_OUTSIDE_SHARE = 0.01
#: Voxels sampled (evenly strided) for intensity shares: exact enough, and fast on a 512 x 512 x 1000 CT.
INTENSITY_SAMPLES = 1 << 21


def foreground_confidence(scores: torch.Tensor, kind: str) -> float | None:
    """Mean over the voxels whose argmax is not background of the largest class probability.

    Args:
        scores: ``(K, *spatial)`` plan-grid logits (``kind="logits"``) or mean
            probabilities (``kind="probs"``, a fold ensemble).
        kind: ``"logits"`` or ``"probs"``.

    Returns:
        The mean in [1/K, 1], or None when nothing is predicted as foreground.
        Computed in slabs along the first spatial axis (no full-size float32 copy).
    """
    import torch

    total, count = 0.0, 0
    step = max(1, (1 << 22) // max(1, int(np.prod(scores.shape[2:])) * scores.shape[0]))
    for start in range(0, scores.shape[1], step):
        slab = scores[:, start : start + step].float()
        top, arg = slab.max(dim=0)
        probs = top if kind == "probs" else 1.0 / torch.exp(slab - top).sum(dim=0)
        fg = arg != 0
        total += float(probs[fg].double().sum())
        count += int(fg.sum())
    return total / count if count else None


def confidence_finding(confidence: float | None) -> str | None:
    """``low_confidence`` line, or None (no foreground, or confident enough)."""
    if confidence is None or confidence >= CONFIDENCE_THRESHOLD:
        return None
    return (
        f"mean max-probability inside the predicted foreground is {confidence:.2f} "
        f"(< {CONFIDENCE_THRESHOLD}): the network was unsure"
    )


def border_finding(mask: np.ndarray, labels: dict[int, str]) -> str | None:
    """``border`` line naming each structure that touches a face of the scan, or None."""
    touching: dict[int, list[str]] = {}
    for axis, size in enumerate(mask.shape):
        for end, index in (("first", 0), ("last", size - 1)):
            face = np.take(mask, index, axis=axis)
            for value in np.unique(face[face != 0]).tolist():
                touching.setdefault(int(value), []).append(f"axis {axis} {end} slice")
    if not touching:
        return None
    parts = [f"{labels.get(v, f'label {v}')} ({', '.join(faces)})" for v, faces in sorted(touching.items())]
    return "touches the scan border, likely cut off: " + "; ".join(parts)


def training_volume_ranges(model_dir: str | Path, plan: Plan) -> dict[int, dict[str, float]] | None:
    """Per label value: ``{"min_ml", "max_ml", "present", "cases"}`` over the training cases.

    Read from the model folder's ``model.json`` (``volume_ranges``, written by
    training since model folders carry them), else from the run's
    ``fingerprint.json`` (:func:`fingerprint_volume_ranges`: an older model folder
    still inside its run). Returns None when neither has them (the check is then
    skipped); a damaged ``volume_ranges`` is logged and the fingerprint tried.
    """
    path = Path(model_dir) / "model.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8")).get("volume_ranges")
    except FileNotFoundError:
        stored = None
    except (OSError, ValueError, AttributeError) as err:
        log.warning("cannot read %s (%s): volume ranges are looked for in the run's fingerprint", path, err)
        stored = None
    if stored is not None:
        try:
            return parse_volume_ranges(stored, plan)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("%s has damaged volume_ranges (%s): the run's fingerprint is tried instead", path, err)
    return fingerprint_volume_ranges(model_dir, plan)


def parse_volume_ranges(stored: dict[str, Any], plan: Plan) -> dict[int, dict[str, float]]:
    """``model.json``'s ``volume_ranges`` (label value as a string -> range) with int keys, checked.

    Raises:
        ValueError: a label value the plan does not have, or a range with min > max or present > cases.
        KeyError, TypeError: a missing or non-numeric field.
    """
    known = {int(v) for v in plan.label_values}
    ranges = {}
    for key, entry in stored.items():
        value = int(key)
        if value not in known or value == 0:
            raise ValueError(f"label {value} is not a foreground label of the plan {sorted(known)}")
        item = {
            "min_ml": float(entry["min_ml"]), "max_ml": float(entry["max_ml"]),
            "present": int(entry["present"]), "cases": int(entry["cases"]),
        }
        if not 0 <= item["min_ml"] <= item["max_ml"] or not 0 < item["present"] <= item["cases"]:
            raise ValueError(f"label {value}: inconsistent range {entry}")
        ranges[value] = item
    return ranges


def fingerprint_volume_ranges(model_dir: str | Path, plan: Plan) -> dict[int, dict[str, float]] | None:
    """Volume ranges from the run's ``fingerprint.json`` (``RUN/fold_K/model`` -> ``RUN``; the
    model folder itself and its parent are tried too), or None when there is none, it
    cannot be read, or its labels differ from the plan's.
    """
    model_dir = Path(model_dir)
    for folder in (model_dir, model_dir.parent, model_dir.parent.parent):
        path = folder / "fingerprint.json"
        if path.is_file():
            break
    else:
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        values = [int(v) for v in record["label_values"]]
        voxels = np.asarray(record["class_voxels"], dtype=np.float64)
        spacings = np.asarray(record["spacings"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("cannot read %s (%s): the volume check is skipped", path, err)
        return None
    if sorted(values) != sorted(int(v) for v in plan.label_values) or voxels.shape != (len(spacings), len(values)):
        return None
    unit_ml = np.prod(spacings, axis=1) / 1000.0
    ranges = {}
    for j, value in enumerate(values):
        if value == 0:
            continue
        ml = voxels[:, j] * unit_ml
        present = ml[voxels[:, j] > 0]
        if present.size:
            ranges[value] = {
                "min_ml": float(present.min()), "max_ml": float(present.max()),
                "present": int(present.size), "cases": len(ml),
            }
    return ranges


def volume_finding(statistics: list[dict[str, Any]], ranges: dict[int, dict[str, float]] | None) -> str | None:
    """``volume`` line for structures outside the widened training range (see module doc), or None."""
    if not ranges:
        return None
    problems = []
    for row in statistics:
        seen = ranges.get(int(row["label"]))
        if seen is None:
            continue
        ml = float(row["volume_ml"])
        low, high = seen["min_ml"] / VOLUME_TOLERANCE, seen["max_ml"] * VOLUME_TOLERANCE
        window = f"training {seen['min_ml']:.4g}-{seen['max_ml']:.4g} mL"
        if ml == 0 and seen["present"] == seen["cases"]:
            problems.append(f"{row['name']} absent, but present in all {seen['cases']} training cases ({window})")
        elif ml > 0 and not low <= ml <= high:
            problems.append(f"{row['name']} {ml:.4g} mL ({window})")
    return "volume outside the training range: " + "; ".join(problems) if problems else None


def _sample(channel: np.ndarray) -> np.ndarray:
    flat = channel.reshape(-1)
    step = max(1, flat.size // INTENSITY_SAMPLES)
    return flat[::step]


def intensity_finding(image: np.ndarray, mask: np.ndarray, plan: Plan) -> str | None:
    """``intensity`` line when the scan does not look like the training data (module doc), or None.

    Args:
        image: the scan, channel-first ``(C, *spatial)`` as read (HU for CT).
        mask: the predicted labels on the scan's grid (its foreground is where the median is taken).
        plan: the model's plan (``normalization`` holds the CT training window).
    """
    problems = []
    foreground = mask != 0
    for c, norm in enumerate(plan.normalization):
        if c >= image.shape[0]:
            break
        channel = image[c]
        name = plan.channel_names[c] if c < len(plan.channel_names) else f"channel {c}"
        sample = _sample(channel).astype(np.float32, copy=False)
        if norm.scheme == "ct":
            lowest = float(channel.min())
            if lowest > CT_AIR_HU:
                problems.append(
                    f"{name}: no air (nothing below {CT_AIR_HU:g} HU, minimum {lowest:.4g}): not a CT in HU "
                    "(an MR scan, or CT values stored without the rescale slope/intercept?)"
                )
            high = float(np.mean(sample > CT_MAX_HU))
            if high > CT_OUTSIDE_SHARE:
                problems.append(f"{name}: {100 * high:.1f}% of voxels above {CT_MAX_HU:g} HU (CT stays below)")
            window = norm.knee if norm.knee is not None else norm.clip
            if window is not None and foreground.any():
                lo, hi = float(window[0]), float(window[1])
                margin = INTENSITY_MARGIN * (hi - lo)
                median = float(np.median(channel[foreground]))
                if not lo - margin <= median <= hi + margin:
                    problems.append(
                        f"{name}: median {median:.4g} inside the predicted foreground, outside the training "
                        f"foreground's [p0.5, p99.5] = [{lo:.4g}, {hi:.4g}] widened by {margin:.4g}"
                    )
        elif plan.modality == "MR":
            low = float(np.mean(sample < CT_AIR_HU))
            if low > CT_OUTSIDE_SHARE:
                problems.append(
                    f"{name}: {100 * low:.1f}% of voxels below {CT_AIR_HU:g} (CT air in HU?) but the model "
                    "was trained on MR"
                )
    return "intensities unlike the training data: " + "; ".join(problems) if problems else None


def assess_prediction(
    image: np.ndarray,
    mask: np.ndarray,
    statistics: list[dict[str, Any]],
    plan: Plan,
    *,
    confidence: float | None,
    volume_ranges: dict[int, dict[str, float]] | None,
) -> dict[str, str]:
    """Every QC flag of one prediction: flag name (:data:`QC_FLAGS`) -> what differs."""
    findings = {
        "border": border_finding(mask, plan.labels),
        "volume": volume_finding(statistics, volume_ranges),
        "low_confidence": confidence_finding(confidence),
        "intensity": intensity_finding(image, mask, plan),
    }
    return {flag: line for flag, line in findings.items() if line is not None}
