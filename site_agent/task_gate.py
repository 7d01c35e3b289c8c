"""The site's gate in front of Flower: may this task's FAB be installed and run here at all?

Every message a deployed site answers arrives as a Flower task whose app is a FAB (a zip of
the run's Flower App). The site's executor (:mod:`cleanroom.site_agent.executor`) pulls the
task's inputs and asks :func:`decide` BEFORE anything of the FAB is unpacked, installed or
imported. The answer depends on the FAB's bytes and the site's own decisions only:

* the task digest is computed here from the FAB's bytes (:func:`cleanroom.task.fab_digest`,
  the digest sites approve, docs/tasks.md); what the SuperLink announces is only compared;
* the task must be listed in the site's policy (``[[policy.tasks]]``, any run) or approved
  for this run (``cleanroom site approve RUN --task DIGEST --epsilon E``). A site with
  ``require_approval`` lets a policy task's code load, and its runtime then refuses a run
  without a per-run approval with its typed, signed ``approval-required`` refusal (what the
  coordinator's receipts and dashboard show); a task in neither place never loads;
* the FAB must be what Flower will install and load: its SHA-256 is the hash the SuperLink
  announced (Flower names the install folder after it) and its ``pyproject.toml`` names the
  app id and version the run names (Flower loads the app from the folder those name).

A refusal is typed: its reason starts with ``task-not-approved:`` (the error reply the
coordinator files as this site's quarantine reason, and the site's activity log). The
coordinator restriction of a policy task (``coordinators = [...]``) is checked with the
signed challenge before any training (:mod:`cleanroom.site_agent.settings`); this gate only
keeps code nobody at the site approved from ever loading.

Pure functions, no I/O: the executor hands in the bytes, the policy and the approvals.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cleanroom.errors import SiteRefusal, TaskError

REFUSED = "task-not-approved"
ERROR_CODE = 403  # of the error reply; Flower's own error codes are 0..8
_RUN_ID = re.compile(r"^[0-9]{1,20}$")


@dataclass(frozen=True)
class RunClaim:
    """What the SuperLink says about the task: run id, app id/version, FAB hash, options."""

    run_id: int
    fab_id: str
    fab_version: str
    fab_hash: str
    run_config: Mapping[str, object]


@dataclass(frozen=True)
class GateDecision:
    approved: bool
    task_digest: str  # "" when the FAB is not even a valid task
    reason: str  # why (for the activity log); a refusal starts with "task-not-approved:"
    how: str = ""  # "policy" or "run <id>" for an approval


def resumed_run(run_config: Mapping[str, object]) -> str | None:
    """The run a resumed run continues (``options.resume_run``, digits), if any: its
    per-run approval also covers the continuation (same task digest required)."""
    raw = run_config.get("options")
    if not isinstance(raw, str) or len(raw) > 4096:
        return None
    try:
        options = json.loads(raw)
    except ValueError:
        return None
    value = options.get("resume_run") if isinstance(options, dict) else None
    return value if isinstance(value, str) and _RUN_ID.match(value) else None


def fab_identity(files: Mapping[str, bytes]) -> tuple[str, str]:
    """(app id, version) the FAB's ``pyproject.toml`` declares, as Flower reads them."""
    import tomllib

    try:
        doc = tomllib.loads(files["pyproject.toml"].decode("utf-8"))
        publisher = doc["tool"]["flwr"]["app"]["publisher"]
        name, version = doc["project"]["name"], doc["project"]["version"]
    except (KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise TaskError("task-invalid", "the FAB's pyproject.toml does not name "
                        "[tool.flwr.app] publisher, [project] name and version") from None
    return f"{publisher}/{name}", str(version)


def _refuse(digest: str, detail: str) -> GateDecision:
    return GateDecision(False, digest, str(SiteRefusal(REFUSED, detail)))


def decide(fab: bytes, claim: RunClaim, *, site: str, policy_tasks: Iterable[str],
           require_approval: bool, approvals: Mapping[str, str]) -> GateDecision:
    """Whether this site runs the task ``fab`` is, for the run ``claim`` describes.

    ``policy_tasks``: task digests of ``[[policy.tasks]]``; ``approvals``: run id -> task
    digest of the per-run approvals in force. Never raises for bad input: a FAB that is not
    a valid task is refused like an unapproved one."""
    from cleanroom.task import fab_digest, fab_files

    try:
        digest = fab_digest(fab)
        app_id, version = fab_identity(fab_files(fab))
    except TaskError as exc:
        return _refuse("", f"the run's app is not a valid task FAB ({exc}); nothing of it "
                       f"was installed at site {site}")
    sha256 = hashlib.sha256(fab).hexdigest()
    if claim.fab_hash != sha256:
        return _refuse(digest, f"the FAB's bytes (sha256 {sha256[:16]}...) are not the FAB "
                       f"the SuperLink announced ({claim.fab_hash[:16]}...)")
    if (app_id, version) != (claim.fab_id, claim.fab_version):
        return _refuse(digest, f"the FAB declares app {app_id} {version} but the run names "
                       f"{claim.fab_id} {claim.fab_version}")
    runs = [str(claim.run_id)]
    earlier = resumed_run(claim.run_config)
    if earlier is not None:
        runs.append(earlier)
    for run in runs:
        if approvals.get(run) == digest:
            return GateDecision(True, digest, f"task {digest[:16]}... approved for run {run}",
                                f"run {run}")
    how = (f"approve it with 'cleanroom site approve {claim.run_id} --task {digest} "
           "--epsilon E'")
    if digest in set(policy_tasks):
        checked = (f"; run {claim.run_id} still needs this site's approval (the runtime "
                   "refuses it with approval-required)" if require_approval else "")
        return GateDecision(True, digest, f"task {digest[:16]}... listed in the site "
                            f"policy{checked}", "policy")
    if require_approval:
        return _refuse(digest, f"run {claim.run_id} of task {claim.fab_id} (digest {digest}) "
                       f"is not approved at site {site}, which approves every run: {how}; "
                       "nothing of it was installed or imported")
    return _refuse(digest, f"task {claim.fab_id} {claim.fab_version} (digest {digest}) is "
                   f"not approved at site {site}: {how}, or list it in [[policy.tasks]]; "
                   "nothing of it was installed or imported")
