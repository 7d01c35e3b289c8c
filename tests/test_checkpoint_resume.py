"""Round checkpoints: a run that dies mid-way resumes at the next round and ends exactly where
an uninterrupted run ends; broken checkpoints give typed errors; the audit chain stays whole."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from cleanroom.coordinator.audit import verify_chain
from cleanroom.coordinator.checkpoint import (
    Checkpoint,
    CheckpointError,
    append_round,
    load_checkpoint,
    write_checkpoint,
)
from cleanroom.simulations.engine import SimulationConfig, run_simulation

pytestmark = pytest.mark.slow
FAST = {"rounds": 3, "tracking": False, "progress": False}


class Crash(Exception):
    pass


def crash_after(round_: int):
    """An on_round hook that kills the run once ``round_`` is recorded (a coordinator crash)."""
    def hook(entry):
        if entry["round"] == round_:
            raise Crash("coordinator died")
    return hook


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    # No DP: training is deterministic given the seed, so both paths must agree exactly
    # (this also proves FedAdam's moments are restored, not restarted).
    whole = run_simulation(SimulationConfig(out=tmp_path / "whole", dp=False, **FAST)).report


    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        run_simulation(SimulationConfig(out=out, dp=False, **FAST), on_round=crash_after(2))
    assert load_checkpoint(out / "checkpoint").round == 2
    resumed = run_simulation(SimulationConfig(resume=out, progress=False)).report

    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    # Equal up to float summation order (replies are averaged in arrival order); a resume
    # that restarted FedAdam's moments would be off by ~1e-2.
    a, b = np.load(tmp_path / "whole" / "final_model.npz"), np.load(out / "final_model.npz")
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5)
    assert resumed["final"]["accuracy"] == whole["final"]["accuracy"]
    chain = verify_chain(out / "audit.jsonl")
    assert chain.ok, chain
    kinds = [json.loads(line)["kind"] for line in (out / "audit.jsonl").read_text().splitlines()]
    assert kinds == ["run-start", "round-receipt", "round-receipt", "run-end", "run-resume",
                     "round-receipt", "run-end"]


def test_resume_under_dp_continues_the_same_budget(tmp_path):
    """Sites see the same run id and the real round numbers: the run's epsilon ends at the
    target, not at twice it."""

    out = tmp_path / "run"
    with pytest.raises(Crash):
        run_simulation(SimulationConfig(out=out, **FAST), on_round=crash_after(1))
    report = run_simulation(SimulationConfig(resume=out, progress=False)).report
    assert [r["attested"] for r in report["rounds"][1:]] == [
        ["cleveland", "hungary", "switzerland", "va"]] * 2
    assert all(0.9 < e <= 1.0 + 1e-6 for e in report["final"]["epsilon"].values())


def test_broken_checkpoints_are_typed_errors(tmp_path):
    model = OrderedDict(w=np.arange(3, dtype=np.float32))
    append_round(tmp_path, {"round": 1})
    write_checkpoint(tmp_path, Checkpoint("7", 1, 3, model, {"m_t": {"w": np.ones(3)}}))
    append_round(tmp_path, {"round": 2})  # a round that crashed before its checkpoint
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 1 and np.array_equal(loaded.model["w"], model["w"])
    assert np.array_equal(loaded.state["m_t"]["w"], np.ones(3))
    assert loaded.meta["report_rounds"] == [{"round": 1}]
    (tmp_path / "rounds.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="holds 0 rounds, the checkpoint names 1"):
        load_checkpoint(tmp_path)

    npz = tmp_path / "checkpoint.npz"
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_checkpoint(tmp_path)
    npz.unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint\.npz is missing"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "checkpoint.json").write_text("[]")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)


def test_resume_of_a_finished_run_is_refused(tmp_path):
    from cleanroom.errors import ConfigError

    out = tmp_path / "done"
    run_simulation(SimulationConfig(out=out, **{**FAST, "rounds": 1}))
    with pytest.raises(ConfigError, match="already completed"):
        run_simulation(SimulationConfig(resume=out, progress=False))


def test_resume_refuses_a_checkpoint_the_audit_chain_does_not_name(tmp_path):
    from cleanroom.coordinator.checkpoint import CheckpointError


    out = tmp_path / "run"
    with pytest.raises(Crash):
        run_simulation(SimulationConfig(out=out, dp=False, **FAST), on_round=crash_after(1))
    ckpt = load_checkpoint(out / "checkpoint")
    ckpt.state["m_t"] = {k: v * 0 for k, v in ckpt.state["m_t"].items()}  # an edited state
    write_checkpoint(out / "checkpoint", ckpt)  # (the receipted one is kept as .prev:
    write_checkpoint(out / "checkpoint", ckpt)  # edit both, or the resume just uses it)
    with pytest.raises(CheckpointError, match="not the one the last signed round receipt"):
        run_simulation(SimulationConfig(resume=out, progress=False))
    lines = (out / "audit.jsonl").read_bytes().splitlines(keepends=True)
    (out / "audit.jsonl").write_bytes(b"".join(lines[:1] + lines[2:]))  # a receipt removed
    with pytest.raises(CheckpointError, match="audit chain is broken"):
        run_simulation(SimulationConfig(resume=out, progress=False))


def test_crash_between_checkpoint_and_receipt_resumes_from_the_receipted_one(tmp_path,
                                                                             monkeypatch):
    """The coordinator dies after writing round 2's checkpoint but before receipting round 2:
    the resume falls back to round 1's checkpoint, the last one the signed chain names."""
    import cleanroom.coordinator.checkpoint as checkpoint_module

    real_write = checkpoint_module.write_checkpoint

    def write_then_die(directory, ckpt):
        digest = real_write(directory, ckpt)
        if ckpt.round == 2:
            raise Crash("died before the receipt")
        return digest

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint_module, "write_checkpoint", write_then_die)
    with pytest.raises(Crash):
        run_simulation(SimulationConfig(out=out, dp=False, **FAST))
    monkeypatch.setattr(checkpoint_module, "write_checkpoint", real_write)
    assert load_checkpoint(out / "checkpoint").round == 2  # written, never receipted
    report = run_simulation(SimulationConfig(resume=out, progress=False)).report
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert verify_chain(out / "audit.jsonl").ok


def test_resume_after_a_crash_mid_rotation(tmp_path):
    """Died after moving the receipted checkpoint to .prev, before writing the next one."""
    out = tmp_path / "run"
    with pytest.raises(Crash):
        run_simulation(SimulationConfig(out=out, dp=False, **FAST), on_round=crash_after(2))
    folder = out / "checkpoint"
    for name in ("checkpoint.json", "checkpoint.npz"):
        (folder / name).replace(folder / (name + ".prev"))
    report = run_simulation(SimulationConfig(resume=out, progress=False)).report
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]


def test_resume_without_the_site_ledgers_is_refused(tmp_path):
    """A resume must go on spending the same ledgers; with them gone it would start afresh."""
    import shutil

    from cleanroom.errors import ConfigError

    out = tmp_path / "run"
    with pytest.raises(Crash):
        run_simulation(SimulationConfig(out=out, **FAST), on_round=crash_after(1))
    shutil.rmtree(out / "state" / "sites")
    with pytest.raises(ConfigError, match="privacy ledgers of this run are missing"):
        run_simulation(SimulationConfig(resume=out, progress=False))


def test_crash_after_the_sites_released_a_round_charges_it_once(tmp_path, monkeypatch):
    """The worst moment: every site charged its ledger for round 2 and released its update,
    then the coordinator died before receipting round 2. The resume asks for round 2 again
    (same run id, same round): each site refuses it from its sealed ledger when challenged
    (round-replayed: quarantined before any model is sent),
    so round 2 is charged once, and the run ends with the epsilon of three charged rounds,
    as an uninterrupted run does."""
    import cleanroom.coordinator.checkpoint as checkpoint_module

    real_write = checkpoint_module.write_checkpoint

    def write_then_die(directory, ckpt):
        if ckpt.round == 2:
            raise Crash("died after the sites released round 2, before its checkpoint")
        return real_write(directory, ckpt)

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint_module, "write_checkpoint", write_then_die)
    with pytest.raises(Crash):
        run_simulation(SimulationConfig(out=out, **FAST))
    monkeypatch.setattr(checkpoint_module, "write_checkpoint", real_write)
    assert load_checkpoint(out / "checkpoint").round == 1
    report = run_simulation(SimulationConfig(resume=out, progress=False)).report
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    replayed = rounds[1]
    assert replayed["attested"] == [] and replayed["aggregated"] == [], replayed
    assert sorted(replayed["quarantined"]) == sorted(rounds[0]["attested"]), replayed
    assert all(reason.startswith("round replayed: ") and "already trained" in reason
               for reason in replayed["quarantined"].values()), replayed
    assert sorted(rounds[2]["aggregated"]) == sorted(rounds[0]["aggregated"])
    whole = run_simulation(SimulationConfig(out=tmp_path / "whole", **FAST)).report
    assert report["final"]["epsilon"] == pytest.approx(whole["final"]["epsilon"], rel=1e-9)
    assert verify_chain(out / "audit.jsonl").ok
