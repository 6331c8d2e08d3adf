"""Shared fixtures: tiny volumes with non-trivial geometry, and the real scans in ../shared/data."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA_ENV = "MEDSEG_SHARED_DATA"
"""Tests only: where the real scans are, instead of ../shared/data beside the repository."""

SHARED_DATA = Path(os.environ.get(SHARED_DATA_ENV) or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def in_ci() -> bool:
    """True when ``CI`` is set to anything but an empty string, 0, false or no (CI=true on GitHub, GitLab, ...)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_shared_data(*parts: str) -> Path:
    """``SHARED_DATA / parts``; when it is missing: fail under CI (the scans ship with CI), else skip with the reason.

    Every test that needs the real scans goes through here (the ``shared_data`` fixture or a direct call), so a
    CI machine without them reports failures instead of a green run that tested nothing.
    """
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        reason = (
            f"real scans not found at {path} (they ship with the project's CI, not with the package; "
            f"set {SHARED_DATA_ENV} to their folder)"
        )
        if in_ci():
            pytest.fail(f"{reason}; CI is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``gpu`` when torch sees no CUDA device (the default run stays CPU-only)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs a CUDA device: torch {torch.__version__} sees none (benchmarks/gpu_check.sh runs these on a GPU)"
    )
    for item in gpu_items:
        item.add_marker(skip)


# Orientations every geometry round trip is parametrized over (design §8).
ORIENTATIONS = ["RAS", "LPS", "PIR", "oblique", "left_handed"]


def make_affine(kind: str, spacing=(0.8, 1.1, 2.5), origin=(-12.3, 40.5, 7.25)) -> np.ndarray:
    """A voxel->RAS affine of the given kind with anisotropic spacing and an offset origin.

    kinds: RAS, LPS, PIR (axis permutations/flips), oblique (rotated ~25/15/10 deg),
    left_handed (qfac -1: one axis mirrored relative to a rotation).
    """
    spacing = np.asarray(spacing, dtype=float)
    if kind == "RAS":
        rot = np.eye(3)
    elif kind == "LPS":
        rot = np.diag([-1.0, -1.0, 1.0])
    elif kind == "PIR":
        # i -> Posterior, j -> Inferior, k -> Right
        rot = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    elif kind in ("oblique", "left_handed"):
        a, b, c = np.radians([25.0, 15.0, 10.0])
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
        rot = rz @ ry @ rx
        if kind == "left_handed":
            rot = rot @ np.diag([1.0, 1.0, -1.0])
    else:
        raise ValueError(f"unknown affine kind {kind}")
    affine = np.eye(4)
    affine[:3, :3] = rot * spacing[np.newaxis, :]
    affine[:3, 3] = origin
    return affine


def sphere_mask(shape=(24, 20, 16), center=None, radius=5.0, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Boolean ball (radius in mm) on a grid of the given spacing."""
    center = np.asarray(center if center is not None else [(s - 1) / 2 for s in shape], dtype=float)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    dist2 = sum(((g - c) * sp) ** 2 for g, c, sp in zip(grids, center, spacing))
    return dist2 <= radius**2


def sha256(path: Path) -> str:
    """Hash of a file, or of every file below a folder (to prove inputs are never modified)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def shared_data() -> Path:
    """The real scans' folder (see :func:`require_shared_data`: fails under CI when missing, skips elsewhere)."""
    return require_shared_data()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
