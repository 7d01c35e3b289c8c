"""The report plot stays readable with many sites: one legend entry per site only up to
LEGEND_SITES; beyond, grey lines and quarantine counts."""

from __future__ import annotations

import random

import pytest

from cleanroom.coordinator import report as report_mod


def _report(n_sites: int, rounds: int = 4) -> dict:
    rng = random.Random(n_sites)
    sites = [f"site-{i:03d}" for i in range(n_sites)]
    out = []
    for r in range(1, rounds + 1):
        quarantined = {sites[(r * 7) % n_sites]: "attestation: expired"} if r % 2 else {}
        attested = [s for s in sites if s not in quarantined]
        out.append({"round": r, "attested": attested, "quarantined": quarantined,
                    "metrics": {s: {"accuracy": rng.uniform(0.5, 0.8)} for s in attested},
                    "epsilon": {s: 0.2 * r for s in attested},
                    "means": {"accuracy": 0.65}})
    return {"rounds": out, "task": {"metrics": ["accuracy"]},
            "privacy": {"epsilon_target_per_run": 1.0}}


@pytest.mark.parametrize("n_sites", [3, 60])
def test_legend_is_bounded(n_sites, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    legends: list[int] = []
    real = Axes.legend

    def counting(self, *args, **kwargs):
        handles, _ = self.get_legend_handles_labels()
        legends.append(len(handles))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "legend", counting)
    path = report_mod.plot_report(_report(n_sites), tmp_path / "report.png")
    assert path.stat().st_size > 10_000
    if n_sites > report_mod.LEGEND_SITES:
        assert max(legends) <= 4  # lines, average, target: not one entry per site
    else:
        assert max(legends) >= n_sites  # each site named
