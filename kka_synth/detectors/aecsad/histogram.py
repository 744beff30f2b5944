"""The patch histogram: class shares of a segmentation map on a P x P grid, scored by Mahalanobis distance.

CSAD (Hsieh and Lai, "CSAD: Unsupervised Component Segmentation for Logical Anomaly Detection", BMVC 2024)
and AeCSAD (Amjad, MSc thesis, Ontario Tech University, 2025) detect logical anomalies from the component
segmentation: a missing, extra or misplaced component changes how often each class appears
in each part of the image. Two histograms are kept per image, each over the foreground classes (the
background is left out, as in CSAD): the whole image's class shares, and the class shares of every cell of a
P x P grid, concatenated. A Gaussian is fitted to each over the training normals, and an image scores the
Mahalanobis distance to it.

With a few hundred normals and ``P * P * (K - 1)`` dimensions the sample covariance is singular, so it is
regularised by shrinkage toward a scaled identity (Ledoit and Wolf's target):
``S = (1 - a) * C + a * (trace(C) / d) * I``, plus ``1e-6 * trace(C) / d`` on the diagonal.
"""

from __future__ import annotations

import numpy as np

JITTER = 1e-6
"""Added to the shrunk covariance's diagonal, relative to its mean variance."""


def grid_histograms(maps: np.ndarray, num_classes: int, grid: int) -> np.ndarray:
    """(N, grid * grid * (num_classes - 1)) share of each cell's pixels per foreground class.

    Cells split the rows and columns as evenly as ``np.array_split`` does; they are ordered row by row,
    and each cell lists classes 1..K-1.
    """
    count = len(maps)
    out = np.zeros((count, grid, grid, max(num_classes - 1, 0)), dtype=np.float64)
    if num_classes < 2:
        return out.reshape(count, 0)
    rows = np.array_split(np.arange(maps.shape[1]), grid)
    cols = np.array_split(np.arange(maps.shape[2]), grid)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            cell = maps[:, r[0] : r[-1] + 1, c[0] : c[-1] + 1].reshape(count, -1).astype(np.int64)
            counts = np.stack([np.bincount(row, minlength=num_classes)[1:num_classes] for row in cell])
            out[:, i, j] = counts / cell.shape[1]
    return out.reshape(count, -1)


class Gaussian:
    """Mean and shrunk precision of feature vectors; :meth:`distance` is the Mahalanobis distance."""

    def __init__(self, shrinkage: float):
        self.shrinkage = shrinkage
        self.mean = np.zeros(0)
        self.precision = np.zeros((0, 0))

    def fit(self, features: np.ndarray) -> Gaussian:
        """Fit to (N, d) features (N >= 1)."""
        if features.ndim != 2 or len(features) < 1:
            raise ValueError(f"need (N, d) features with N >= 1, got shape {features.shape}")
        dims = features.shape[1]
        self.mean = features.mean(axis=0)
        if dims == 0:
            self.precision = np.zeros((0, 0))
            return self
        centred = features - self.mean
        cov = centred.T @ centred / max(len(features) - 1, 1)
        scale = float(np.trace(cov)) / dims
        scale = scale if scale > 0 else 1.0
        shrunk = (1.0 - self.shrinkage) * cov + self.shrinkage * scale * np.eye(dims)
        shrunk += JITTER * scale * np.eye(dims)
        self.precision = np.linalg.inv(shrunk)
        return self

    def distance(self, features: np.ndarray) -> np.ndarray:
        """(N,) Mahalanobis distances of (N, d) features."""
        delta = features - self.mean
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", delta, self.precision, delta), 0.0))


class PatchHistogram:
    """Two Gaussians, on the global class histogram and on the P x P patch histogram of label maps."""

    def __init__(self, num_classes: int, grid: int, shrinkage: float):
        self.num_classes, self.grid, self.shrinkage = num_classes, grid, shrinkage
        self.gaussians = [Gaussian(shrinkage), Gaussian(shrinkage)]

    def features(self, maps: np.ndarray) -> list[np.ndarray]:
        """[global (N, K-1), patch (N, P*P*(K-1))] histograms of (N, H, W) uint8 class maps."""
        return [
            grid_histograms(maps, self.num_classes, 1),
            grid_histograms(maps, self.num_classes, self.grid),
        ]

    def fit(self, maps: np.ndarray) -> PatchHistogram:
        for gaussian, features in zip(self.gaussians, self.features(maps), strict=True):
            gaussian.fit(features)
        return self

    def score(self, maps: np.ndarray) -> np.ndarray:
        """(N, 2) Mahalanobis distances: column 0 global histogram, column 1 patch histogram."""
        columns = [g.distance(f) for g, f in zip(self.gaussians, self.features(maps), strict=True)]
        return np.stack(columns, axis=1)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to save; :meth:`from_state` rebuilds the fitted object."""
        state = {
            "meta": np.array([self.num_classes, self.grid], dtype=np.int64),
            "shrinkage": np.array([self.shrinkage]),
        }
        for index, gaussian in enumerate(self.gaussians):
            state[f"mean{index}"] = gaussian.mean
            state[f"precision{index}"] = gaussian.precision
        return state

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> PatchHistogram:
        num_classes, grid = (int(v) for v in state["meta"])
        histogram = cls(num_classes, grid, float(np.ravel(state["shrinkage"])[0]))
        for index, gaussian in enumerate(histogram.gaussians):
            gaussian.mean = np.asarray(state[f"mean{index}"], dtype=np.float64)
            gaussian.precision = np.asarray(state[f"precision{index}"], dtype=np.float64)
        return histogram
