"""Fed-TCGA-BRCA (FLamby) as a Cleanroom FL task: survival of breast-cancer patients, 6 regions.

Written against the public API only (``cleanroom.task``). FLamby trains a linear Cox model with
the Cox partial likelihood; that loss couples every patient of a batch through its risk sets,
so DP-SGD's per-example clipping would not bound its sensitivity (the site's trainer refuses it
under DP). This task keeps FLamby's linear risk score and replaces the loss by a per-example
one: the log-likelihood of a **Weibull proportional-hazards** model,

    h(t | x) = k t^(k-1) exp(eta),  eta = beta . x + b,  H(t | x) = t^k exp(eta)
    loss_i = -[E_i (log k + (k - 1) log t_i + eta_i) - t_i^k exp(eta_i)]

(t in years, ``k = exp(log_shape)`` learned with the model). The hazard ratio between two
patients is ``exp(eta_i - eta_j)`` as in Cox's model, so ``eta`` is the risk score the
C-index ranks. Each patient's loss depends only on that patient: decomposable.

Features: FLamby's 39 covariates in FLamby's column order; ``age_at_index`` is centred and
scaled inside the model by fixed public constants (no statistic of any site's data), the other
38 are 0/1. Targets: ``E`` (event observed) and ``T`` (days). Metric ``c_index``: Harrell's
concordance index of ``(T, -eta, E)``, as lifelines' ``concordance_index`` that FLamby uses.

``simulate(k, 6)`` gives simulated site ``k`` FLamby's centre ``k`` (0 Northeast, 1 South,
2 West, 3 Midwest, 4 Europe, 5 Canada) with FLamby's train/test split, from the vendored
files in ``data/`` (see ``data/README.md`` for provenance and terms). The frames also hold the
patient barcode ``pid``, as a hospital's export would: the site's identifier scan flags it and
the task never asks for it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cleanroom.task import Field, Task

DATA = Path(__file__).resolve().parent / "data"
AGE = "age_at_index"
AGE_CENTRE, AGE_SCALE = 60.0, 15.0
"""Fixed, public constants (typical age at breast-cancer diagnosis): not estimated from data."""
DAYS_PER_YEAR = 365.25
MIN_YEARS = 1.0 / DAYS_PER_YEAR  # a follow-up of 0 days counts as one day
REGIONS: tuple[str, ...] = ("Northeast", "South", "West", "Midwest", "Europe", "Canada")
FEATURES: tuple[str, ...] = (
    "age_at_index", "ethnicity_not hispanic or latino", "ethnicity_not reported", "race_asian",
    "race_black or african american", "race_not reported", "race_white",
    "ajcc_pathologic_m_MX", "ajcc_pathologic_n_N0 (i-)", "ajcc_pathologic_n_N1",
    "ajcc_pathologic_n_N1a", "ajcc_pathologic_n_N2", "ajcc_pathologic_n_N2a",
    "ajcc_pathologic_stage_Stage IA", "ajcc_pathologic_stage_Stage IIA",
    "ajcc_pathologic_stage_Stage IIB", "ajcc_pathologic_stage_Stage IIIA",
    "ajcc_pathologic_stage_Stage IIIC", "ajcc_pathologic_t_T1c", "ajcc_pathologic_t_T2",
    "ajcc_pathologic_t_T3", "ajcc_staging_system_edition_5th", "ajcc_staging_system_edition_6th",
    "ajcc_staging_system_edition_7th", "icd_10_code_C50.9", "morphology_8500/3",
    "morphology_8520/3", "primary_diagnosis_Infiltrating duct carcinoma, NOS",
    "primary_diagnosis_Lobular carcinoma, NOS", "prior_malignancy_yes",
    "synchronous_malignancy_Not Reported", "treatment_or_therapy_not reported",
    "treatment_or_therapy_yes", "tumor_stage_stage i", "tumor_stage_stage ia",
    "tumor_stage_stage iia", "tumor_stage_stage iib", "tumor_stage_stage iiia",
    "tumor_stage_stage iiic")


class WeibullRisk(nn.Module):
    """Linear risk score ``eta`` (39 -> 1) and a shared Weibull shape; outputs ``(n, 2)``:
    ``[eta, log_shape]``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(len(FEATURES), 1)
        self.log_shape = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        age = (x[:, :1] - AGE_CENTRE) / AGE_SCALE
        eta = self.linear(torch.cat([age, x[:, 1:]], dim=1))
        return torch.cat([eta, self.log_shape.expand(x.shape[0], 1)], dim=1)


def model() -> nn.Module:
    return WeibullRisk()


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-patient negative log-likelihood of the Weibull PH model (see the docstring)."""
    eta, log_k = outputs[:, 0], outputs[:, 1]
    event = targets[:, 0]
    years = (targets[:, 1] / DAYS_PER_YEAR).clamp(min=MIN_YEARS)
    k = log_k.exp()
    log_t = years.log()
    cumulative_hazard = (k * log_t + eta).exp()
    return cumulative_hazard - event * (log_k + (k - 1) * log_t + eta)


def concordance_index(times: np.ndarray, scores: np.ndarray, events: np.ndarray) -> float:
    """Harrell's C of predicted survival ``scores`` (higher = longer survival).

    A pair (i, j) is comparable when i had an event and ``T_i < T_j``, or ``T_i == T_j`` and
    j is censored; it is concordant when ``scores_i < scores_j``, and counts one half when the
    scores tie. NaN if no pair is comparable (lifelines raises there)."""
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    e = np.asarray(events, dtype=np.float64).reshape(-1) > 0.5
    earlier = (t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :])
    comparable = earlier & e[:, None]
    n_pairs = int(comparable.sum())
    if n_pairs == 0:
        return float("nan")
    concordant = (s[:, None] < s[None, :]) & comparable
    tied = (s[:, None] == s[None, :]) & comparable
    return float((concordant.sum() + 0.5 * tied.sum()) / n_pairs)


def c_index(outputs: np.ndarray, targets: np.ndarray) -> float:
    """FLamby's metric: ``concordance_index(T, -risk, E)``."""
    return concordance_index(targets[:, 1], -outputs[:, 0], targets[:, 0])


def _regions() -> dict[str, int]:
    """TSS code (characters 5:7 of a TCGA barcode) -> FLamby centre index, from centers.csv."""
    with (DATA / "centers.csv").open(newline="", encoding="utf-8") as fh:
        return {row["TSS Code"]: REGIONS.index(row["Region"]) for row in csv.DictReader(fh)
                if row["Region"] in REGIONS}


def simulate(partition_id: int, num_partitions: int):  # -> tuple[DataFrame, DataFrame]
    """FLamby centre ``partition_id`` of 6: its train and test rows (pid, 39 features, E, T)."""
    import pandas as pd

    if num_partitions != len(REGIONS) or not 0 <= partition_id < len(REGIONS):
        raise ValueError(f"Fed-TCGA-BRCA has {len(REGIONS)} regions; got partition "
                         f"{partition_id} of {num_partitions}")
    table = pd.read_csv(DATA / "brca.csv")
    if list(table.columns[1:40]) != list(FEATURES) or list(table.columns[40:42]) != ["E", "T"]:
        raise ValueError("data/brca.csv does not have FLamby's columns")
    split = pd.read_csv(DATA / "train_test_split.csv")
    region = _regions()
    centre = split["pid"].str[5:7].map(region)
    # FLamby's own split file names the centre too (fold2 = train_k / test_k): they must agree.
    named = split["fold2"].str.rsplit("_", n=1).str[1].astype(int)
    if centre.isna().any() or not (centre.astype(int) == named).all():
        raise ValueError("data/centers.csv and data/train_test_split.csv disagree on centres")
    frames = []
    for fold in ("train", "test"):
        pids = split.loc[(centre == partition_id) & (split["fold"] == fold), "pid"]
        rows = table[table["pid"].isin(set(pids))].reset_index(drop=True)
        frames.append(rows[["pid", *FEATURES, "E", "T"]])
    return frames[0], frames[1]


task = Task(
    name="fed-tcga-brca",
    features=tuple(Field(name) for name in FEATURES),
    targets=(Field("E", "bool"), Field("T")),
    model=model,
    loss=loss,
    metrics={"c_index": c_index},
    dataset="tcga-brca",
    description="FLamby Fed-TCGA-BRCA: linear risk score on 39 clinical covariates, Weibull "
    "proportional-hazards log-likelihood (per patient), concordance index",
    simulate=simulate,
    sites=tuple(region.lower() for region in REGIONS),
    # the plans measured in docs/benchmarks.md (tune.py): FedAdam without DP; few full-batch
    # DP-SGD steps with FedAvg under DP (FedAdam's normalisation amplifies the noise)
    plan={"strategy": "fedadam", "rounds": 50, "local_steps": 5, "lr": 0.03,
          "sample_rate": 1.0, "strategy_options": {"eta": 0.1, "tau": 1e-9},
          "dp": {"strategy": "fedavg", "rounds": 10, "local_steps": 1, "lr": 2.0,
                 "max_grad_norm": 1.0, "strategy_options": {}}},
)
