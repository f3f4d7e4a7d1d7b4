"""Backdoor detection from the model and a few clean images: per-class evidence, a target, a verdict.

    from ulrl.detection import scan
    result = scan(model, x_clean, y_clean)
    result.verdict, result.p_value, result.suspected

One file per signal (``universal.py``, ``margin.py``, ``weight_change.py``); ``stats.py`` turns
per-class statistics into calibrated p-values, and ``scan.py`` runs the signals and combines
them into a verdict. ``reference.py`` compares each class with the same class on clean reference
models of the same recipe (a profile: ``ulrl profile``, or shipped in ``profiles/``). No signal
reads test data or the trigger.
"""

from .scan import SCHEMA_VERSION, ScanConfig, ScanResult, scan

__all__ = ["SCHEMA_VERSION", "ScanConfig", "ScanResult", "scan"]
