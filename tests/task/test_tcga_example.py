"""The Fed-TCGA-BRCA example task: FLamby's split, a decomposable loss, the C-index."""

from __future__ import annotations

import secrets
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch

from cleanroom.models import get_parameters
from cleanroom.site_agent.datasets import DataRoom
from cleanroom.site_agent.trainer import check_loss, evaluate_task, train_task
from cleanroom.site_agent.training import TrainSettings
from cleanroom.task import LoadedTask, load_task

FOLDER = Path(__file__).resolve().parents[2] / "examples" / "fed_tcga_brca"
FLAMBY_COUNTS = [(248, 63), (156, 40), (164, 42), (129, 33), (129, 33), (40, 11)]
FLAMBY_TEST_EVENTS = [14, 4, 8, 3, 2, 1]


@pytest.fixture(scope="module")
def tcga() -> LoadedTask:
    return load_task(FOLDER)


def test_it_loads_through_the_public_api(tcga: LoadedTask) -> None:
    assert tcga.name == "fed-tcga-brca" and (tcga.n_features, tcga.n_targets) == (39, 2)
    assert set(tcga.task.metrics) == {"c_index"} and tcga.task.dataset_name == "tcga-brca"
    source = (FOLDER / "task.py").read_text()
    assert "cleanroom.site_agent" not in source and "cleanroom.models" not in source


def test_simulate_gives_flambys_centres(tcga: LoadedTask) -> None:
    seen: set[str] = set()
    for k, (n_train, n_test) in enumerate(FLAMBY_COUNTS):
        train, test = tcga.task.simulate(k, 6)  # type: ignore[misc]
        assert (len(train), len(test)) == (n_train, n_test), k
        assert int(test["E"].sum()) == FLAMBY_TEST_EVENTS[k]
        pids = set(train["pid"]) | set(test["pid"])
        assert not pids & seen and not set(train["pid"]) & set(test["pid"])
        seen |= pids
    assert len(seen) == 1088  # FLamby's 1088 patients (8 of brca.csv are in no centre)
    with pytest.raises(ValueError, match="6 regions"):
        tcga.task.simulate(0, 4)  # type: ignore[misc]


def test_the_data_room_flags_the_barcode_and_never_serves_it(tcga: LoadedTask,
                                                            tmp_path: Path) -> None:
    room = DataRoom(tmp_path, secrets.token_bytes(32))
    record = room.register_simulated(tcga.task, 5, 6)
    assert record.identifying == ("pid",)
    data = room.serve(tcga.task)
    assert data.train_x.shape == (40, 39) and data.train_y.shape == (40, 2)
    assert data.features[0] == "age_at_index" and data.targets == ("E", "T")


def test_the_loss_is_per_example_and_decomposable(tcga: LoadedTask, tmp_path: Path) -> None:
    room = DataRoom(tmp_path, secrets.token_bytes(32))
    room.register_simulated(tcga.task, 0, 6)
    data = room.serve(tcga.task)
    model = tcga.task.model()
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    check_loss(tcga.task, model, x, y)  # does not raise
    settings = TrainSettings(local_steps=3, sample_rate=0.5, lr=0.1, optimizer="sgd",
                             momentum=0.0, max_grad_norm=1.0, noise_multiplier=2.0)
    torch.manual_seed(0)
    start = get_parameters(tcga.task.model())
    res = train_task(tcga, start, data, settings, seed=0)
    assert res.steps == 3 and res.noise_multiplier == 2.0
    assert 0.0 <= evaluate_task(tcga, res.parameters, data)["c_index"] <= 1.0


def _brute_force_c(t: np.ndarray, s: np.ndarray, e: np.ndarray) -> float:
    num = den = 0.0
    for i, j in combinations(range(len(t)), 2):
        for a, b in ((i, j), (j, i)):
            if e[a] and (t[a] < t[b] or (t[a] == t[b] and not e[b])):
                den += 1
                num += 1.0 if s[a] < s[b] else 0.5 if s[a] == s[b] else 0.0
    return num / den


def test_concordance_index_counts_pairs_like_harrell(tcga: LoadedTask) -> None:
    module = __import__(tcga.module + ".task", fromlist=["concordance_index"])
    ci = module.concordance_index
    assert ci([1, 2, 3], [1, 2, 3], [1, 1, 1]) == 1.0  # longer survival predicted longer
    assert ci([1, 2, 3], [3, 2, 1], [1, 1, 1]) == 0.0
    assert ci([1, 2], [5, 5], [1, 0]) == 0.5
    assert np.isnan(ci([1, 2], [1, 2], [0, 0]))  # no event: no comparable pair
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = rng.integers(0, 15, 30).astype(float)  # ties in time
        s = rng.integers(0, 6, 30).astype(float)   # ties in score
        e = rng.random(30) < 0.4
        if e.any():
            assert ci(t, s, e) == pytest.approx(_brute_force_c(t, s, e))
