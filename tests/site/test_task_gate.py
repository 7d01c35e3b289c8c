"""The site's gate on a task's FAB, as a pure function: approved by policy or by a per-run
approval, refused (``task-not-approved:``) for anything else, including FABs that are not what
Flower would install and load."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from cleanroom.site_agent.task_gate import REFUSED, RunClaim, decide, resumed_run
from cleanroom.task import build_fab, fab_digest, task_digest

HEART = Path(__file__).resolve().parents[2] / "models" / "heart_disease"

ROGUE_PYPROJECT = """
[project]
name = "rogue"
version = "1.0.0"
[tool.flwr.app]
publisher = "mallory"
[tool.flwr.app.components]
serverapp = "server_app:app"
clientapp = "client_app:app"
"""


@pytest.fixture(scope="module")
def heart() -> bytes:
    return build_fab(HEART)


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("rogue")
    (folder / "pyproject.toml").write_text(ROGUE_PYPROJECT)
    (folder / "server_app.py").write_text("app = None\n")
    (folder / "client_app.py").write_text("open('/tmp/pwned', 'w')\napp = None\n")
    return build_fab(folder)


def claim(fab: bytes, run_id: int = 7, app: tuple[str, str] = ("cleanroom/cleanroom-heart-disease",
                                                                "1.0.0"), **kw) -> RunClaim:
    return RunClaim(run_id=run_id, fab_id=app[0], fab_version=app[1],
                    fab_hash=kw.pop("fab_hash", hashlib.sha256(fab).hexdigest()),
                    run_config=kw.pop("run_config", {}))


def gate(fab: bytes, c: RunClaim, *, tasks=(), require_approval=False, approvals=None):
    return decide(fab, c, site="cleveland", policy_tasks=list(tasks),
                  require_approval=require_approval, approvals=approvals or {})


def test_the_fab_digest_is_the_task_digest_sites_approve(heart):
    assert fab_digest(heart) == task_digest(HEART)


def test_a_task_in_the_site_policy_runs(heart):
    decision = gate(heart, claim(heart), tasks=[task_digest(HEART)])
    assert decision.approved and decision.how == "policy"
    assert decision.task_digest == task_digest(HEART)


def test_a_task_approved_for_this_run_runs(heart):
    digest = task_digest(HEART)
    decision = gate(heart, claim(heart, run_id=7), approvals={"7": digest})
    assert decision.approved and decision.how == "run 7"


def test_an_unlisted_task_is_refused_with_a_readable_reason(rogue):
    decision = gate(rogue, claim(rogue, app=("mallory/rogue", "1.0.0")),
                    tasks=["ab" * 32], approvals={"7": "cd" * 32})
    assert not decision.approved
    assert decision.reason.startswith(f"{REFUSED}: task mallory/rogue 1.0.0 (digest ")
    assert fab_digest(rogue) in decision.reason
    assert "cleanroom site approve 7 --task" in decision.reason
    assert "nothing of it was installed or imported" in decision.reason


def test_an_approval_counts_only_for_its_run_and_its_digest(heart):
    digest = task_digest(HEART)
    assert not gate(heart, claim(heart, run_id=8), approvals={"7": digest}).approved
    assert not gate(heart, claim(heart, run_id=7), approvals={"7": "ab" * 32}).approved


def test_require_approval_lets_a_policy_task_load_and_the_runtime_asks_for_the_run(heart):
    """The gate keeps unapproved code out; the per-run approval of a policy task is the
    runtime's (its typed approval-required refusal is what receipts and dashboards show)."""
    digest = task_digest(HEART)
    passed = gate(heart, claim(heart), tasks=[digest], require_approval=True)
    assert passed.approved and "still needs this site's approval" in passed.reason
    refused = gate(heart, claim(heart), require_approval=True)  # not in the policy
    assert not refused.approved and "approves every run" in refused.reason
    assert refused.reason.startswith("task-not-approved:")
    assert gate(heart, claim(heart), tasks=[digest], require_approval=True,
                approvals={"7": digest}).approved


def test_a_resumed_run_is_covered_by_the_approval_of_the_run_it_continues(heart):
    digest = task_digest(HEART)
    resumed = claim(heart, run_id=99, run_config={"options": json.dumps({"resume_run": "7"})})
    assert gate(heart, resumed, approvals={"7": digest}).approved
    # ...but only with the approved digest
    assert not gate(heart, resumed, approvals={"7": "ab" * 32}).approved


@pytest.mark.parametrize(("options", "expected"), [
    ('{"resume_run": "123"}', "123"),
    ('{"resume_run": ""}', None),
    ('{"resume_run": "12a"}', None),
    ('{"resume_run": 123}', None),
    ('{"rounds": 3}', None),
    ("[1, 2]", None),
    ("not json", None),
    ('{"resume_run": "1"}' + " " * 5000, None),  # oversized options are not parsed
    (7, None),
])
def test_resumed_run_is_read_strictly(options, expected):
    assert resumed_run({"options": options}) == expected


def test_the_fab_must_be_the_one_the_superlink_announced(heart):
    digest = task_digest(HEART)
    forged = claim(heart, fab_hash="0" * 64)
    decision = gate(heart, forged, tasks=[digest])
    assert not decision.approved and "not the FAB the SuperLink announced" in decision.reason


def test_the_fab_must_be_the_app_the_run_names(heart):
    """Flower installs under the FAB's own name and loads under the run's: they must agree."""
    digest = task_digest(HEART)
    other = claim(heart, app=("cleanroom/other-app", "1.0.0"))
    decision = gate(heart, other, tasks=[digest])
    assert not decision.approved and "declares app cleanroom/cleanroom-heart-disease" in \
        decision.reason
    assert not gate(heart, claim(heart, app=("cleanroom/cleanroom-heart-disease", "2.0.0")),
                    tasks=[digest]).approved


def _rezip(fab: bytes, change) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(fab))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = change(info.filename, source.read(info))
            if data is not None:
                target.writestr(info, data)
    return out.getvalue()


@pytest.mark.parametrize("mangle", [
    lambda fab: b"",
    lambda fab: b"not a zip at all",
    lambda fab: fab[: len(fab) // 2],  # truncated
    lambda fab: _rezip(fab, lambda name, data: data + b"\n# extra" if name.endswith(
        "client_app.py") else data),  # a file changed after the manifest
    lambda fab: _rezip(fab, lambda name, data: None if name == ".info/CONTENT" else data),
    lambda fab: _rezip(fab, lambda name, data: b"[project\n" if name == "pyproject.toml"
                       else data),
])
def test_broken_or_tampered_fabs_are_refused_not_raised(heart, mangle):
    bad = mangle(heart)
    decision = gate(bad, claim(bad), tasks=[task_digest(HEART)], approvals={"7": fab_digest(
        heart)})
    assert not decision.approved and decision.reason.startswith(f"{REFUSED}:")


def test_an_approved_digest_cannot_be_borrowed_by_another_fab(heart, rogue):
    """The digest is computed from the bytes, never taken from what the run claims."""
    digest = task_digest(HEART)
    disguised = claim(rogue, app=("mallory/rogue", "1.0.0"))
    assert not gate(rogue, disguised, tasks=[digest], approvals={"7": digest}).approved
