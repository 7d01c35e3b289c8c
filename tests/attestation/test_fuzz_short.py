"""CI's short run of ``python -m benchmarks fuzz``: a few thousand inputs per parser.

The runs of a million inputs per target are not in CI's time budget (docs/benchmarks.md). This
keeps the harness honest: every target runs clean, the inputs the long runs found crashing
(kept in ``tests/vectors/fuzz-regressions``) now raise typed errors, and the harness itself
does report an exception that is not a CleanroomError.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import fuzz

REGRESSIONS = sorted((Path(__file__).resolve().parents[1] / "vectors" / "fuzz-regressions")
                     .glob("*.bin"))
SHORT_EXECS = 3000


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_short_fuzz_run_is_clean(target: str, tmp_path: Path) -> None:
    stats = fuzz.fuzz(target, SHORT_EXECS, engine="mutate", seed=1, crash_dir=tmp_path)
    assert stats.crashes == [], stats.crashes
    assert stats.execs == SHORT_EXECS
    # Both ways out were exercised: some inputs parse, others are refused with typed errors.
    assert stats.parsed > 0 and sum(stats.exceptions.values()) > 0, stats
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_inputs_that_once_crashed_now_fail_typed(path: Path, tmp_path: Path) -> None:
    target = fuzz.BUILDERS[path.name.split("-", 1)[0]]()
    stats = fuzz.Stats(target.name, "regression")
    outcome = fuzz.one_input(target, path.read_bytes(), stats, tmp_path)
    assert stats.crashes == [] and outcome != "crash", stats.crashes


def test_regressions_cover_every_bug_found() -> None:
    assert {p.name.split("-", 1)[0] for p in REGRESSIONS} >= {"tdx", "certtable", "collateral"}


def test_harness_reports_an_exception_that_is_not_a_cleanroom_error(tmp_path: Path) -> None:
    def fragile(data: bytes) -> None:
        if len(data) % 3 == 0:
            raise IndexError("boom")
        if len(data) % 3 == 1:
            from cleanroom.errors import ParseError

            raise ParseError("x", "typed")

    target = fuzz.Target("fragile", (fuzz.Seed(b"abcd"),), fragile)
    stats = fuzz.run_mutate(target, 200, seed=3, crash_dir=tmp_path)
    assert stats.crashes and stats.crashes[0].startswith("IndexError: boom")
    assert list(tmp_path.glob("fragile-*.bin"))
    assert stats.exceptions.get("ParseError", 0) > 0
