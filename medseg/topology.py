"""U-Net topology from patch size and spacing (nnU-Net's rule, re-derived).

An axis is down-sampled at a stage only while its feature map stays at least
``2 * min_edge`` voxels and its current spacing is within 2x of the finest
current spacing; 3x3(x3) kernels are used on axes within 2x of the finest
spacing, 1 on coarser axes (thick slices), until those axes catch up. The
bottleneck always uses full 3-kernels. The patch must be divisible by the
product of the strides: :func:`fit_patch_to_topology` rounds it up.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["fit_patch_to_topology", "unet_topology"]


def unet_topology(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    *,
    min_edge: int = 4,
    max_stages: int = 6,
) -> tuple[list[list[int]], list[list[int]]]:
    """Return ``(kernel_sizes, strides)``, one entry per stage, first stride all ones.

    Example::

        >>> unet_topology([128, 128, 32], [0.8, 0.8, 3.0])[1]
        [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    """
    ndim = len(patch_size)
    if len(spacing) != ndim:
        raise ValueError(f"patch_size {list(patch_size)} and spacing {list(spacing)} must have the same length.")
    size = [float(s) for s in patch_size]
    current = [float(s) for s in spacing]
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * ndim]
    for _ in range(max_stages - 1):
        finest = min(current)
        kernels.append([3 if c <= 2 * finest else 1 for c in current])
        stride = [2 if (size[d] >= 2 * min_edge and current[d] <= 2 * finest) else 1 for d in range(ndim)]
        if not any(s == 2 for s in stride):
            break
        strides.append(stride)
        size = [s / st for s, st in zip(size, stride)]
        current = [c * st for c, st in zip(current, stride)]
    kernels.append([3] * ndim)  # bottleneck
    # len(kernels) == len(strides): one kernel per stage
    kernels = [*kernels[:len(strides) - 1], kernels[-1]]
    return kernels, strides


def fit_patch_to_topology(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[int]:
    """Round each patch axis up to a multiple of the total down-sampling factor along it."""
    factors = [1] * len(patch_size)
    for stride in strides:
        factors = [f * s for f, s in zip(factors, stride)]
    return [int(-(-p // f) * f) for p, f in zip(patch_size, factors)]
