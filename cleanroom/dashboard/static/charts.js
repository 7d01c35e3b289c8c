// Small SVG charts drawn with the DOM (no library): line charts per site and a bar chart.
// Colours are SVG attributes (no inline style: the Content-Security-Policy forbids it).
"use strict";

const Charts = (() => {
  const { h } = CR;
  const W = 560, H = 260, L = 56, R = 16, T = 16, B = 42;
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#d62728"];

  function colorOf(name, names) {
    const i = names.indexOf(name);
    return PALETTE[(i < 0 ? 0 : i) % PALETTE.length];
  }

  function ticks(lo, hi, count = 5) {
    if (hi <= lo) return [lo];
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      out.push(Math.round(v / step) * step);
    }
    return out;
  }

  function label(v) {
    const a = Math.abs(v);
    return a !== 0 && (a < 0.01 || a >= 1e5) ? v.toExponential(1) : String(+v.toFixed(3));
  }

  function frame(opts, xs, yLo, yHi, discrete) {
    const xLo = discrete ? -0.5 : Math.min(...xs) - (xs.length === 1 ? 0.5 : 0);
    const xHi = discrete ? xs.length - 0.5 : Math.max(...xs) + (xs.length === 1 ? 0.5 : 0);
    const x = (v) => L + ((v - xLo) / (xHi - xLo)) * (W - L - R);
    const y = (v) => H - B - ((v - yLo) / (yHi - yLo || 1)) * (H - T - B);
    const g = h("g", {});
    for (const t of ticks(yLo, yHi)) {
      g.append(h("line", { x1: L, x2: W - R, y1: y(t), y2: y(t), class: "grid" }),
        h("text", { x: L - 6, y: y(t) + 4, "text-anchor": "end", class: "tick" }, label(t)));
    }
    g.append(h("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }),
      h("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }),
      h("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle", class: "axis-label" },
        opts.xLabel || ""),
      h("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "axis-label",
        transform: `rotate(-90 14 ${(T + H - B) / 2})` }, opts.yLabel || ""));
    return { g, x, y };
  }

  function legend(entries) {
    return h("div", { class: "legend" }, entries.map(([name, color, kind]) =>
      h("span", { class: "legend-item" },
        h("svg", { width: 22, height: 12, viewBox: "0 0 22 12", "aria-hidden": "true" },
          kind === "mark"
            ? h("text", { x: 11, y: 11, "text-anchor": "middle", fill: color, class: "mark" }, "×")
            : kind === "bar" ? h("rect", { x: 4, y: 1, width: 14, height: 10, fill: color })
              : h("line", { x1: 1, x2: 21, y1: 6, y2: 6, stroke: color, "stroke-width": 3,
                "stroke-dasharray": kind === "dash" ? "4 3" : null })),
        name)));
  }

  function range(values, opts) {
    const finite = values.filter((v) => typeof v === "number" && isFinite(v));
    let lo = opts.yMin !== undefined ? opts.yMin : Math.min(...finite, 0);
    let hi = opts.yMax !== undefined ? opts.yMax : Math.max(...finite, lo + 1e-9);
    if (opts.yMax === undefined) hi += (hi - lo) * 0.08 || 1;
    if (!isFinite(lo)) lo = 0;
    if (!isFinite(hi) || hi <= lo) hi = lo + 1;
    return [lo, hi];
  }

  // series: [{name, points: [[x, y|null]], color?, width?, dash?}];
  // marks: [{x, label}] (drawn as red × at the bottom: quarantines); hline: {y, label}.
  function line(opts) {
    const names = opts.names || opts.series.map((s) => s.name);
    const xs = [...new Set(opts.series.flatMap((s) => s.points.map((p) => p[0])))];
    if (!xs.length) return h("p", { class: "empty" }, opts.empty || "no data yet");
    xs.sort((a, b) => a - b);
    const values = opts.series.flatMap((s) => s.points.map((p) => p[1]));
    if (opts.hline) values.push(opts.hline.y);
    const [lo, hi] = range(values, opts);
    const { g, x, y } = frame(opts, xs, lo, hi, false);
    for (const t of xs) {
      g.append(h("text", { x: x(t), y: H - B + 16, "text-anchor": "middle", class: "tick" },
        String(t)));
    }
    const svg = h("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
      "aria-label": opts.title || "chart" }, g);
    const marksByX = {};
    for (const mark of opts.marks || []) (marksByX[mark.x] = marksByX[mark.x] || []).push(mark);
    for (const [mx, list] of Object.entries(marksByX)) {
      svg.append(h("rect", { x: x(+mx) - 9, y: T, width: 18, height: H - T - B, class: "band" }));
      list.forEach((mark, i) => svg.append(h("text", { x: x(+mx), y: H - B - 6 - 14 * i,
        "text-anchor": "middle", class: "mark", fill: mark.color || "#d62728" },
      h("title", {}, mark.label), "×")));
    }
    if (opts.hline) {
      svg.append(h("line", { x1: L, x2: W - R, y1: y(opts.hline.y), y2: y(opts.hline.y),
        class: "hline" }));
    }
    for (const s of opts.series) {
      const color = s.color || colorOf(s.name, names);
      let run = [];
      const flush = () => {
        if (run.length > 1) {
          svg.append(h("polyline", { points: run.map(([a, b]) => `${x(a)},${y(b)}`).join(" "),
            fill: "none", stroke: color, "stroke-width": s.width || 2,
            "stroke-dasharray": s.dash ? "5 4" : null }));
        }
        run = [];
      };
      for (const [px, py] of s.points) {
        if (typeof py !== "number" || !isFinite(py)) { flush(); continue; }
        run.push([px, py]);
        svg.append(h("circle", { cx: x(px), cy: y(py), r: s.width > 2 ? 0 : 3.5, fill: color },
          h("title", {}, `${s.name}, ${opts.xLabel || "x"} ${px}: ${label(py)}`)));
      }
      flush();
    }
    const entries = opts.series.map((s) => [s.name, s.color || colorOf(s.name, names),
      s.dash ? "dash" : "line"]);
    if (opts.hline) entries.push([opts.hline.label, "#666", "dash"]);
    if ((opts.marks || []).length) entries.push(["quarantined", "#d62728", "mark"]);
    return h("figure", { class: "figure" }, opts.title ? h("figcaption", {}, opts.title) : null,
      svg, legend(entries));
  }

  // bars: [{label, value, title}]; over: {name, values} (a line over the bars);
  // hline: {y, label}.
  function bars(opts) {
    if (!opts.bars.length) return h("p", { class: "empty" }, opts.empty || "no data yet");
    const idx = opts.bars.map((_, i) => i);
    const values = opts.bars.map((b) => b.value).concat(opts.over ? opts.over.values : []);
    if (opts.hline) values.push(opts.hline.y);
    const [lo, hi] = range(values, { yMin: 0 });
    const { g, x, y } = frame(opts, idx, lo, hi, true);
    const svg = h("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
      "aria-label": opts.title || "chart" }, g);
    const width = Math.min(48, ((W - L - R) / opts.bars.length) * 0.6);
    opts.bars.forEach((b, i) => {
      svg.append(h("rect", { x: x(i) - width / 2, y: y(b.value), width,
        height: Math.max(0, y(lo) - y(b.value)), fill: PALETTE[0], class: "bar" },
      h("title", {}, b.title || `${b.label}: ${label(b.value)}`)));
      svg.append(h("text", { x: x(i), y: H - B + 16, "text-anchor": "middle", class: "tick" },
        b.label));
    });
    if (opts.hline) {
      svg.append(h("line", { x1: L, x2: W - R, y1: y(opts.hline.y), y2: y(opts.hline.y),
        class: "hline" }));
    }
    if (opts.over) {
      svg.append(h("polyline", { points: opts.over.values.map((v, i) => `${x(i)},${y(v)}`)
        .join(" "), fill: "none", stroke: PALETTE[1], "stroke-width": 2.5 }));
      opts.over.values.forEach((v, i) => svg.append(h("circle", { cx: x(i), cy: y(v), r: 4,
        fill: PALETTE[1] }, h("title", {}, `${opts.over.name} after ${opts.bars[i].label}: ${label(v)}`))));
    }
    const entries = [[opts.barName || "value", PALETTE[0], "bar"]];
    if (opts.over) entries.push([opts.over.name, PALETTE[1], "line"]);
    if (opts.hline) entries.push([opts.hline.label, "#666", "dash"]);
    return h("figure", { class: "figure" }, opts.title ? h("figcaption", {}, opts.title) : null,
      svg, legend(entries));
  }

  return { line, bars, colorOf, PALETTE };
})();
