"""What a site reports with its update and its evaluation: typed, bounded, transport-free.

Site and coordinator agree on these once, here. The coordinator never believes a number that
is not in one of these reports (a metric a Flower reply carries beside the envelope is
ignored), and the Flower adapter derives the inner strategy's ``MetricRecord`` from them
(:data:`NUM_EXAMPLES` is the key Flower's strategies weight by).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

NUM_EXAMPLES = "num-examples"  # Flower's default ``weighted_by_key``
MAX_EXAMPLES = 10**9
MAX_METRICS = 32
MetricName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be finite")
    return value


class PrivacySpend(_Report):
    """The privacy cost of one round's update, as the site's sealed ledger recorded it."""

    noise_multiplier: float = Field(ge=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0, le=10**7)
    epsilon_round: float = Field(ge=0)
    epsilon_run: float = Field(ge=0)
    epsilon_lifetime: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)
    ledger_records: int = Field(ge=0, le=2**63 - 1, description="records in the site's ledger "
                                "after this round's charge")

    _check = field_validator("noise_multiplier", "epsilon_round", "epsilon_run",
                             "epsilon_lifetime")(_finite)


class TrainReport(_Report):
    """Site -> coordinator with the update (inside the authenticated envelope)."""

    num_examples: int = Field(ge=0, le=MAX_EXAMPLES)
    steps: int = Field(ge=0, le=10**7, description="optimiser steps taken")
    privacy: PrivacySpend | None = Field(None, description="None: the run trains without DP")
    train_loss: float | None = Field(None, description="only without DP: the raw training "
                                     "loss is not privatised")

    _check = field_validator("train_loss")(_finite)


class EvaluateReport(_Report):
    """Site -> coordinator after evaluating the global model on its test split."""

    num_examples: int = Field(ge=0, le=MAX_EXAMPLES)
    share: bool = Field(True, description="the site's policy lets the coordinator operator "
                        "see these metrics per site (else the aggregator releases only the "
                        "client average)")
    metrics: dict[MetricName, float | None] = Field(
        default_factory=dict, max_length=MAX_METRICS,
        description="by name; None: undefined on this split (e.g. a C-index without a "
        "comparable pair)")

    @field_validator("metrics")
    @classmethod
    def _finite_metrics(cls, metrics: dict[str, float | None]) -> dict[str, float | None]:
        for name, value in metrics.items():
            if value is not None and not math.isfinite(value):
                raise ValueError(f"metric {name} is not finite")
        return metrics


def metric_means(reports: Iterable[EvaluateReport], *, weighted: bool) -> dict[str, float]:
    """Each metric averaged over the sites that defined it: the client average (every site
    counts once, as reports show it) or, ``weighted``, by example count (as Flower's
    strategies aggregate)."""
    reports = list(reports)
    out: dict[str, float] = {}
    for name in sorted({k for r in reports for k, v in r.metrics.items() if v is not None}):
        pairs = [(float(v), r.num_examples if weighted else 1) for r in reports
                 if (v := r.metrics.get(name)) is not None]
        weight = sum(w for _, w in pairs)
        if weight:
            out[name] = sum(v * w for v, w in pairs) / weight
    return out
