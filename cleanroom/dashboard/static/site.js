// The site dashboard (hospital IT and privacy officers): the enclave and budget, the privacy
// ledger, approvals (operators approve and revoke; auditors only read), the policy, the
// registered datasets and the recent activity with its refusals.
"use strict";

(() => {
  const { api, h, fill, time, ago, short, num, badge, table } = CR;
  const APPROVAL_REFUSALS = ["approval-required", "task-not-approved"];
  let canWrite = false;

  function setResult(kind, message) {
    const box = document.getElementById("approve-result");
    box.className = kind;
    box.textContent = message;
    box.hidden = !message;
  }

  function setWritable(role) {
    canWrite = role === "operator";
    document.getElementById("approve-fields").disabled = !canWrite;
    fill("approve-note", canWrite
      ? "Approving lets this run train here, for this task only and up to this ε; it takes "
        + "effect at the run's next round."
      : "Read-only: you signed in with an auditor token. Approving and revoking need this "
        + "site's operator token.");
  }

  async function revoke(runId) {
    if (!canWrite) return;
    try {
      await api(`/approvals/${encodeURIComponent(runId)}`, { method: "DELETE" });
      setResult("ok-text", `Approval of run ${runId} revoked.`);
    } catch (e) {
      setResult("error", `Revoking run ${runId} failed: ${e.message}`);
    }
    await render(CR.role());
  }

  async function approve(event) {
    event.preventDefault();
    if (!canWrite) return;
    const runId = document.getElementById("approve-run").value.trim();
    const digest = document.getElementById("approve-task").value.trim().toLowerCase();
    const epsilon = Number(document.getElementById("approve-epsilon").value);
    try {
      const answer = await api("/approvals", { method: "POST",
        body: { run_id: runId, task_digest: digest, epsilon } });
      setResult("ok-text", `Run ${answer.approved.run_id} approved for task `
        + `${short(answer.approved.task_digest)} up to ε ${answer.approved.epsilon}.`);
      document.getElementById("approve-run").value = "";
    } catch (e) {
      setResult("error", `Not approved: ${e.message}`);
    }
    await render(CR.role());
  }

  function prefill(runId) {
    document.getElementById("approve-run").value = runId;
    document.getElementById("approve-epsilon").focus();
  }

  function overview(status, ledger) {
    const budget = status.budget;
    const used = ledger.lifetime_epsilon ? ledger.spent_epsilon / ledger.lifetime_epsilon : 0;
    return h("dl", { class: "facts", id: "overview-facts" },
      h("dt", {}, "enclave"), h("dd", {}, status.provider),
      h("dt", {}, "launch measurement"), h("dd", { class: "mono" }, status.measurement || "—",
        status.provider === "simulated" ? [h("br", {}), h("span", { class: "muted small" },
          "of the site agent; a simulated enclave launched for a task folds in the task's "
          + "digest (the measurement the coordinator sees)")] : null),
      h("dt", {}, "up for"), h("dd", {}, `${Math.round(status.uptime_seconds)} s`),
      h("dt", {}, "lifetime ε"), h("dd", { id: "budget" },
        h("progress", { max: 1, value: Math.min(1, used) }),
        ` spent ${num(ledger.spent_epsilon)} of ${budget.lifetime_epsilon}, `,
        h("strong", { id: "budget-left" }, `${num(ledger.remaining_epsilon)} left`),
        ` (δ ${budget.delta})`),
      h("dt", {}, "per-run cap"), h("dd", {}, budget.max_epsilon_per_run !== null
        ? `ε ${budget.max_epsilon_per_run}` : "none"));
  }

  function ledgerViews(ledger) {
    const runs = ledger.runs;
    const chart = Charts.bars({
      title: "ε spent per run, and the site's lifetime ε after it",
      xLabel: "run (in the order first charged)", yLabel: "ε", barName: "ε of the run",
      bars: runs.map((r) => ({ label: short(r.run_id, 8), value: r.epsilon,
        title: `run ${r.run_id}: ε ${num(r.epsilon)} over ${r.rounds} round(s)` })),
      over: { name: "lifetime ε after the run", values: runs.map((r) => r.lifetime_epsilon_after) },
      hline: { y: ledger.lifetime_epsilon, label: `lifetime budget ε ${ledger.lifetime_epsilon}` },
      empty: "No charge yet: no run has trained here.",
    });
    const rows = runs.slice().reverse().map((r) => h("tr", { "data-run": r.run_id },
      h("td", { class: "mono" }, r.run_id), h("td", {}, String(r.rounds)),
      h("td", {}, `${r.committed} committed` + (r.reserved ? `, ${r.reserved} reserved` : "")),
      h("td", {}, String(r.steps)), h("td", { class: "eps" }, num(r.epsilon)),
      h("td", {}, num(r.lifetime_epsilon_after)), h("td", {}, time(r.last_charged_at))));
    return [chart, table(["run", "rounds", "charges", "DP steps", "ε of the run",
      "lifetime ε after", "last charge"], rows, { id: "ledger-table" })];
  }

  function approvalsTable(approvals) {
    const rows = approvals.approvals.map((a) => h("tr", { "data-run": a.run_id },
      h("td", { class: "mono" }, a.run_id), h("td", { class: "mono", title: a.task_digest },
        short(a.task_digest, 20)), h("td", {}, String(a.epsilon)), h("td", {}, a.by),
      h("td", {}, time(a.at)),
      h("td", {}, h("button", { type: "button", class: "revoke", disabled: !canWrite,
        title: canWrite ? "withdraw this approval" : "needs the operator token",
        onclick: () => revoke(a.run_id) }, "Revoke"))));
    return table(["run", "task digest", "at most ε", "by", "at", ""], rows,
      { id: "approval-table" });
  }

  function policyView(policy) {
    const p = policy.policy;
    const tasks = (p.tasks || []).map((t) => h("tr", {},
      h("td", {}, t.name || "—"), h("td", { class: "mono", title: t.digest }, short(t.digest, 20)),
      h("td", {}, (t.coordinators || []).length ? t.coordinators.map((c) => short(c, 12)).join(", ")
        : "any allowed coordinator"),
      h("td", {}, t.max_epsilon_per_run ?? "—")));
    return [
      h("dl", { class: "facts" },
        h("dt", {}, "every run needs approval"), h("dd", { id: "require-approval" },
          p.require_approval ? badge("warn", "yes") : badge("muted", "no")),
        h("dt", {}, "allowed coordinators"), h("dd", {}, (p.coordinators || []).length
          ? p.coordinators.join(", ") : "any"),
        h("dt", {}, "allowed model architectures"), h("dd", {}, (p.models || []).length
          ? p.models.map((m) => short(m)).join(", ") : "any"),
        h("dt", {}, "privacy"), h("dd", {}, `lifetime ε ${policy.privacy.lifetime_epsilon}, `
          + `per run ε ${policy.privacy.max_epsilon_per_run ?? "no cap"}, δ ${policy.privacy.delta}`)),
      h("h3", {}, "Approved tasks (any run)"),
      table(["task", "digest", "for", "ε cap per run"], tasks, { id: "task-table" }),
    ];
  }

  function datasetsView(datasets) {
    const rows = datasets.datasets.map((d) => h("tr", { "data-dataset": d.name },
      h("td", { class: "name" }, d.name), h("td", { class: "mono", title: d.digest }, short(d.digest, 20)),
      h("td", {}, String(d.train_rows)), h("td", {}, String(d.test_rows)),
      h("td", {}, time(d.registered_at)),
      h("td", { class: "columns" }, d.columns.map((c) => h("span", {
        class: c.identifying ? "col identifying" : "col",
        title: c.identifying ? "marked identifying: never served to a task" : "" }, c.name)))));
    return table(["dataset", "digest", "train rows", "test rows", "registered", "columns"],
      rows, { id: "dataset-table" });
  }

  function detailOf(event) {
    if (event.event === "refused") return `${event.code}: ${event.detail}`;
    if (event.event === "trained") {
      return `${event.steps} DP steps` + (event.epsilon_run != null
        ? `, run ε ${num(event.epsilon_run)}` : "");
    }
    if (event.event === "attested") {
      return `task ${event.task || "?"}, evidence ${short(event.evidence_sha256, 12)}`;
    }
    return "";
  }

  function activityView(events) {
    const rows = events.slice().reverse().map((e) => h("tr", {
      class: e.event === "refused" ? "refused" : null, "data-event": e.event,
      "data-run": e.run_id },
    h("td", { title: time(e.at) }, ago(e.at)),
    h("td", {}, e.event === "refused" ? badge("bad", "refused") : badge("muted", e.event)),
    h("td", { class: "mono" }, short(String(e.run_id), 14)), h("td", {}, String(e.round)),
    h("td", { class: "detail" }, detailOf(e),
      e.event === "refused" && APPROVAL_REFUSALS.includes(e.code) && canWrite
        ? [" ", h("button", { type: "button", class: "small prefill",
          onclick: () => prefill(String(e.run_id)) }, "approve this run…")] : null)));
    return table(["when", "event", "run", "round", "detail"], rows, { id: "activity-table" });
  }

  async function render(role) {
    setWritable(role);
    const [status, policy, approvals, datasets, ledger, activity] = await Promise.all([
      api("/status"), api("/policy"), api("/approvals"), api("/datasets"), api("/ledger"),
      api("/activity?limit=100")]);
    fill("name", status.site);
    fill("overview", overview(status, ledger));
    const [chart, ledgerTable] = ledgerViews(ledger);
    fill("ledger-chart", chart);
    fill("ledger", ledgerTable);
    fill("approvals", approvalsTable(approvals));
    fill("known-tasks", (policy.policy.tasks || []).map((t) =>
      h("option", { value: t.digest }, t.name || "")));
    const taskInput = document.getElementById("approve-task");
    if (!taskInput.value && (policy.policy.tasks || []).length === 1) {
      taskInput.value = policy.policy.tasks[0].digest;
    }
    fill("policy", policyView(policy));
    fill("datasets", datasetsView(datasets));
    fill("activity", activityView(activity.events));
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.getElementById("approve-form").addEventListener("submit", approve);
    CR.start(render);
  });
})();
