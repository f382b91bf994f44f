"""Islet equivalents (IEQ): the volume of a cluster in units of a 150 µm diameter islet.

Two definitions are provided:

* continuous: ``IEQ = (d / 150 µm)³`` — the volume of a sphere of diameter ``d`` relative to a
  150 µm sphere. Every cluster counts, however small.
* Ricordi classes (Ricordi C., Gray D.W.R., Hering B.J. et al., "Islet isolation assessment in
  man and large animals", Acta Diabetol Lat 27:185–195, 1990): islets are sorted into 50 µm
  diameter classes and each class counts with the IEQ of its mean volume. Clusters below 50 µm
  count 0 (the scheme does not count them). Classes are half-open, ``[lower, upper)``: a cluster of
  exactly 100 µm is in the 100–150 class.

Examples
--------
>>> ieq_continuous(150.0)
1.0
>>> ieq_ricordi([40.0, 75.0, 100.0, 400.0]).tolist()
[0.0, 0.167, 0.648, 15.833]
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "IEQ_REFERENCE_DIAMETER_UM",
    "RICORDI_CLASSES",
    "ieq_continuous",
    "ieq_ricordi",
    "ricordi_class",
]

#: The diameter of one islet equivalent, µm.
IEQ_REFERENCE_DIAMETER_UM = 150.0

#: Ricordi 1990 diameter classes: (lower µm, upper µm, IEQ per islet); upper ``inf`` for > 350 µm.
RICORDI_CLASSES: tuple[tuple[float, float, float], ...] = (
    (50.0, 100.0, 0.167),
    (100.0, 150.0, 0.648),
    (150.0, 200.0, 1.685),
    (200.0, 250.0, 3.5),
    (250.0, 300.0, 6.315),
    (300.0, 350.0, 10.352),
    (350.0, float("inf"), 15.833),
)


def _as_diameters(diameter_um: npt.ArrayLike) -> np.ndarray:
    d = np.asarray(diameter_um, dtype=np.float64)
    if np.any(d < 0):
        raise ValueError("diameters must be non-negative (µm)")
    return d


def ieq_continuous(diameter_um: npt.ArrayLike) -> np.ndarray | float:
    """Continuous IEQ, ``(d / 150 µm)³``.

    Parameters
    ----------
    diameter_um : float or array
        Equivalent diameter(s) in µm. NaN gives NaN.

    Returns
    -------
    float or ndarray
        Same shape as the input.
    """
    d = _as_diameters(diameter_um)
    out = (d / IEQ_REFERENCE_DIAMETER_UM) ** 3
    return float(out) if out.ndim == 0 else out


def ricordi_class(diameter_um: npt.ArrayLike) -> np.ndarray:
    """Ricordi class label per diameter: ``"<50"``, ``"50-100"``, ..., ``">=350"``; NaN → ``""``."""
    d = _as_diameters(diameter_um)
    labels = np.full(d.shape, "", dtype=object)
    labels[d < RICORDI_CLASSES[0][0]] = "<50"
    for lo, hi, _ in RICORDI_CLASSES:
        name = f">={lo:g}" if np.isinf(hi) else f"{lo:g}-{hi:g}"
        labels[(d >= lo) & (d < hi)] = name
    return labels


def ieq_ricordi(diameter_um: npt.ArrayLike) -> np.ndarray | float:
    """IEQ by Ricordi diameter class (0 below 50 µm; NaN for NaN).

    Parameters
    ----------
    diameter_um : float or array
        Equivalent diameter(s) in µm.

    Returns
    -------
    float or ndarray
        Same shape as the input.
    """
    d = _as_diameters(diameter_um)
    out = np.where(np.isnan(d), np.nan, 0.0)
    for lo, hi, factor in RICORDI_CLASSES:
        out = np.where((d >= lo) & (d < hi), factor, out)
    return float(out) if out.ndim == 0 else out
