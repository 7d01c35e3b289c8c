// The consortium dashboard: sites and their latest verdicts, runs with their metric and
// privacy curves, the audit chain and its signed round receipts. Read-only.
"use strict";

(() => {
  const { api, h, fill, time, ago, short, num, badge, table } = CR;
  const MAX_RUNS = 20;
  let shownReceipt = null;

  function route() {
    const m = location.hash.match(/^#run\/(\d{1,24})(?:\/receipt\/(\d{1,12}))?$/);
    return m ? { run: m[1], seq: m[2] } : {};
  }

  function tcbText(tcb, status) {
    const parts = Object.entries(tcb || {}).map(([k, v]) => `${k} ${v}`);
    if (status) parts.push(`status ${status}`);
    return parts.length ? parts.map((part) => h("span", {}, part)) : "—";
  }

  function verdictOf(site) {
    const r = site.last_receipt;
    if (r) return r.admitted ? badge("ok", "attested") : badge("bad", "quarantined");
    const latest = site.latest_attestation;
    if (latest) return latest.admitted ? badge("ok", "attested") : badge("bad", "quarantined");
    return badge("muted", "not seen yet");
  }

  function siteRow(site) {
    const r = site.last_receipt || {};
    const reason = r.reason || (site.latest_attestation || {}).reason || "—";
    const waiting = site.awaiting_approval;
    const online = site.status === "online" ? badge("ok", "online") : badge("muted", site.status);
    return h("tr", { "data-site": site.site, class: r.admitted === false ? "quarantined" : null },
      h("td", { class: "name" }, site.site),
      h("td", { class: "mono", title: String(site.node_id ?? "") }, short(String(site.node_id ?? "—"), 10)),
      h("td", {}, online),
      h("td", { class: "verdict" }, verdictOf(site)),
      h("td", { class: "reason" }, reason),
      h("td", { class: "mono", title: r.measurement || "" }, short(r.measurement, 16)),
      h("td", { class: "tcb" }, tcbText(r.tcb, r.tcb_status)),
      h("td", { title: time(site.last_seen) },
        site.last_seen ? [ago(site.last_seen), h("br", {}),
          h("span", { class: "muted small" }, `run ${short(String(r.run_id), 10)} round ${r.round}`)]
          : "never"),
      h("td", { class: "approval" }, waiting
        ? badge("warn", `waiting for approval of run ${short(String(waiting.run_id), 12)}`)
        : "—"));
  }

  function runRow(run, current) {
    const planned = run.rounds_planned || run.rounds_done || 1;
    const statusKind = { completed: "ok", running: "info", finishing: "info", paused: "warn", failed: "bad" };
    const last = run.last_round || {};
    const quarantined = Object.keys(last.quarantined || {});
    return h("tr", { "data-run": run.run_id, class: run.run_id === current ? "selected" : null },
      h("td", {}, h("a", { href: `#run/${run.run_id}`, class: "mono" }, short(run.run_id, 12))),
      h("td", {}, run.task || "—"),
      h("td", { class: "status" }, badge(statusKind[run.status] || "muted", run.status)),
      h("td", {}, h("progress", { max: planned, value: Math.min(run.rounds_done, planned) }),
        ` ${run.rounds_done} / ${run.rounds_planned ?? "?"}`),
      h("td", {}, run.final_metric !== undefined
        ? `${run.metric} ${num(run.final_metric)}` : `accuracy ${num(last.accuracy_mean)}`),
      h("td", {}, `${(last.attested || []).length} attested`,
        quarantined.length ? [", ", h("span", { class: "bad-text" },
          `${quarantined.length} quarantined`)] : ""),
      h("td", { title: time(run.updated) }, ago(run.updated)));
  }

  function charts(detail) {
    const report = detail.report || null;
    const rounds = report ? report.rounds : (detail.rounds || []);
    const metric = detail.metric || ((report && report.task && (report.task.metrics || [])[0])
      || "accuracy");
    const names = [...new Set(rounds.flatMap((r) => [...(r.attested || []),
      ...Object.keys(r.quarantined || {})]))].sort();
    const perSite = names.map((site) => ({ name: site, points: rounds.map((r) =>
      [r.round, ((r.metrics || {})[site] || {})[metric] ?? null]) }));
    perSite.push({ name: "client average", color: "#111", width: 3,
      points: rounds.map((r) => [r.round, (r.means || {})[metric] ?? r[`${metric}_mean`] ?? null]) });
    const marks = rounds.flatMap((r) => Object.entries(r.quarantined || {}).map(([site, why]) =>
      ({ x: r.round, color: Charts.colorOf(site, names),
        label: `${site} quarantined in round ${r.round}: ${why}` })));
    const eps = names.map((site) => ({ name: site, points: rounds.map((r) =>
      [r.round, (r.epsilon || {})[site] ?? null]) }));
    const target = report && report.privacy ? report.privacy.epsilon_target_per_run : null;
    return [
      Charts.line({ title: `${metric} per site and round (× = quarantined)`, xLabel: "round",
        yLabel: metric, series: perSite, names, marks,
        yMin: metric === "loss" ? undefined : 0, yMax: metric === "loss" ? undefined : 1 }),
      Charts.line({ title: "privacy spent per site (cumulative ε in this run; lines overlap when sites spend alike)", xLabel: "round",
        yLabel: "ε", series: eps, names, yMin: 0, empty: "no ε reported (DP off?)",
        hline: target ? { y: target, label: `target ε ${target}` } : null }),
    ];
  }

  function quarantineTable(detail) {
    const rounds = detail.report ? detail.report.rounds : (detail.rounds || []);
    const rows = rounds.flatMap((r) => Object.entries(r.quarantined || {}).map(([site, why]) =>
      h("tr", { "data-site": site, "data-round": r.round }, h("td", {}, String(r.round)),
        h("td", { class: "name" }, site), h("td", { class: "reason" }, why))));
    return [h("h3", {}, "Quarantines"), table(["round", "site", "reason"], rows,
      { id: "quarantine-table" })];
  }

  async function renderRun(runId, summary) {
    const [detail, receipts] = await Promise.all([api(`/runs/${runId}`),
      api(`/runs/${runId}/receipts`)]);
    let audit;
    try {
      audit = await api(`/runs/${runId}/audit`);
    } catch (e) {
      audit = { ok: null, reason: e.message };
    }
    fill("run-title", h("span", { class: "mono" }, runId),
      detail.protocol_run_id && detail.protocol_run_id !== runId
        ? h("span", { class: "muted small" }, ` (protocol run ${detail.protocol_run_id}, resumed)`)
        : null);
    fill("run-summary", h("p", {}, `status ${detail.status}, ${detail.rounds_done} of `
      + `${detail.rounds_planned ?? "?"} rounds`, detail.task ? `, task ${detail.task}` : "",
      detail.final_metric !== undefined ? `, ${detail.status === "completed" ? "final" : "latest"} `
        + `${detail.metric} ${num(detail.final_metric)}` : ""));
    fill("run-charts", charts(detail));
    fill("quarantines", quarantineTable(detail));
    const head = summary ? summary.audit_head : null;
    const verdict = audit.ok === true ? badge("ok", "verified") : audit.ok === false
      ? badge("bad", "BROKEN") : badge("muted", "not verified");
    fill("audit", h("dl", { class: "facts", id: "audit-status" },
      h("dt", {}, "chain"), h("dd", {}, verdict, audit.ok === false
        ? ` at entry ${audit.first_bad_entry}: ${audit.reason}` : (audit.ok === null ? ` ${audit.reason}` : "")),
      h("dt", {}, "entries"), h("dd", {}, String(audit.entries ?? receipts.entries)),
      h("dt", {}, "head"), h("dd", { class: "mono" }, audit.head || "—"),
      h("dt", {}, "report.json head"), h("dd", {}, head
        ? (head === audit.head ? badge("ok", "matches") : badge("bad", "differs: " + short(head)))
        : "— (run not finished)")));
    const rows = receipts.receipts.slice().reverse().map((e) => h("tr", { "data-seq": e.seq },
      h("td", {}, String(e.seq)), h("td", {}, e.kind), h("td", {}, e.round ?? "—"),
      h("td", {}, time(e.time)),
      h("td", {}, (e.attested || []).join(", ") || (e.kind === "round-receipt" ? "none" : "")),
      h("td", { class: "bad-text" }, Object.keys(e.quarantined || {}).join(", ")),
      h("td", {}, h("a", { href: `#run/${runId}/receipt/${e.seq}`, class: "receipt-link" },
        e.kind === "round-receipt" ? `round ${e.round} receipt` : "entry"))));
    fill("receipts", table(["seq", "kind", "round", "time", "attested", "quarantined", ""], rows,
      { id: "receipt-table" }));
  }

  async function renderReceipt(runId, seq) {
    const view = document.getElementById("receipt-view");
    if (!seq) {
      view.hidden = true;
      shownReceipt = null;
      return;
    }
    const key = `${runId}/${seq}`;
    if (shownReceipt === key) return;  // signed entries never change
    const entry = await api(`/runs/${runId}/receipts/${seq}`);
    fill("receipt-title", `${entry.kind} ${entry.body.round !== undefined ? "round " + entry.body.round : ""}`
      + ` (run ${short(runId, 12)}, entry ${seq})`);
    document.getElementById("receipt-body").textContent = JSON.stringify(entry, null, 2);
    document.getElementById("receipt-close").setAttribute("href", `#run/${runId}`);
    view.hidden = false;
    shownReceipt = key;
    view.scrollIntoView();
  }

  async function render() {
    const [sites, runs] = await Promise.all([api("/sites"), api("/runs")]);
    fill("sites", table(["site", "node id", "connection", "latest verdict", "reason",
      "measurement", "TCB", "last seen", "approval"], sites.sites.map(siteRow),
    { id: "site-table" }), sites.superlink_error
      ? h("p", { class: "error" }, "SuperLink: " + sites.superlink_error) : null);
    const list = runs.runs.slice().reverse().slice(0, MAX_RUNS);
    const wanted = route();
    const current = wanted.run || (list[0] && list[0].run_id);
    fill("runs", table(["run", "task", "status", "rounds", "metric", "last round", "updated"],
      list.map((r) => runRow(r, current)), { id: "run-table" }));
    document.getElementById("run-detail").hidden = !current;
    if (current) {
      await renderRun(current, list.find((r) => r.run_id === current));
      await renderReceipt(current, wanted.seq);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    fetch("/health", { credentials: "omit", cache: "no-store" }).then((r) => r.json())
      .then((health) => fill("name", health.name || "")).catch(() => {});
    CR.start(render);
  });
})();
