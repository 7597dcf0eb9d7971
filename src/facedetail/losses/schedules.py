"""Decay schedule of the detail-regularisation weight (paper section 2.5.4: high early, then reduced).

Config dict (``parameters_train.yml``: ``train.detail_regularization``):

* ``start``: weight at step 0;
* ``end``: weight from ``decay_steps`` on;
* ``decay_steps``: number of steps of the decay (0: ``end`` from step 0);
* ``kind``: ``"linear"``, ``"exponential"`` (geometric interpolation ``start * (end/start)**t``; needs
  ``start, end > 0``), ``"cosine"`` (``end + (start - end) * (1 + cos(pi t)) / 2``) or ``"constant"``
  (always ``start``),

with ``t = min(step / decay_steps, 1)``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

SCHEDULE_KINDS = ("linear", "exponential", "cosine", "constant")
REQUIRED_KEYS = ("start", "end", "decay_steps", "kind")


def validate_schedule(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the problem if ``config`` is not a valid schedule."""
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"detail_regularization schedule is missing keys {missing}; expected {list(REQUIRED_KEYS)}, got {dict(config)}")
    if config["kind"] not in SCHEDULE_KINDS:
        raise ValueError(f"detail_regularization kind must be one of {SCHEDULE_KINDS}, got {config['kind']!r}")
    start, end, decay_steps = float(config["start"]), float(config["end"]), config["decay_steps"]
    if start < 0 or end < 0:
        raise ValueError(f"detail_regularization weights must be >= 0, got start={start}, end={end}")
    if int(decay_steps) != decay_steps or decay_steps < 0:
        raise ValueError(f"detail_regularization decay_steps must be an integer >= 0, got {decay_steps!r}")
    if config["kind"] == "exponential" and (start <= 0 or end <= 0):
        raise ValueError(f"exponential decay needs start > 0 and end > 0, got start={start}, end={end} (use linear or cosine)")


def weight_at(step: int, config: Mapping[str, Any]) -> float:
    """The regularisation weight at training ``step`` (>= 0) under ``config`` (see module docstring)."""
    validate_schedule(config)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    start, end, decay_steps, kind = float(config["start"]), float(config["end"]), int(config["decay_steps"]), config["kind"]
    if kind == "constant":
        return start
    progress = 1.0 if decay_steps == 0 else min(step / decay_steps, 1.0)
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "exponential":
        return start * (end / start) ** progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
