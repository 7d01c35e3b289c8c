// Cleanroom FL dashboards: what both pages share (sign-in, API calls, DOM helpers).
//
// The token lives in this tab's sessionStorage only and travels as an Authorization header
// of fetch() calls to the page's own origin: never in a URL, a cookie or the page's HTML.
// Everything the API returns is put into the page as text (textContent), never as HTML.
"use strict";

const CR = (() => {
  const KEY = "cleanroom.token";
  const REFRESH_MS = 4000;
  let role = null;
  let timer = null;
  let tick = null;

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function token() {
    return sessionStorage.getItem(KEY);
  }

  async function api(path, options = {}) {
    const headers = { Accept: "application/json" };
    const current = token();
    if (current) headers.Authorization = "Bearer " + current;
    let body;
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(options.body);
    }
    const response = await fetch(path, {
      method: options.method || "GET", headers, body,
      credentials: "omit", cache: "no-store", redirect: "error",
    });
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (!response.ok) {
      const message = (data && typeof data.error === "string") ? data.error : response.statusText;
      if (response.status === 401 && !options.quiet) signOut("The token was refused: " + message);
      throw new ApiError(response.status, message);
    }
    return data;
  }

  // h("td", {class: "x", title: "y"}, "text", child, ...): children are nodes or text.
  function h(tag, attrs, ...children) {
    const svg = ["svg", "g", "line", "polyline", "circle", "rect", "text", "path", "title"];
    const node = svg.includes(tag)
      ? document.createElementNS("http://www.w3.org/2000/svg", tag)
      : document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "href" && !String(value).startsWith("#")) continue;  // in-page links only
      if (name.startsWith("on") && typeof value === "function") {
        node.addEventListener(name.slice(2), value);
      } else {
        node.setAttribute(name, value === true ? "" : String(value));
      }
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(id, ...children) {
    const target = document.getElementById(id);
    if (target) target.replaceChildren(...children.flat().filter((c) => c !== null));
    return target;
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  function time(epoch) {
    if (typeof epoch !== "number" || !epoch) return "—";
    const d = new Date(epoch * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function ago(epoch) {
    if (typeof epoch !== "number" || !epoch) return "never";
    const s = Math.max(0, Date.now() / 1000 - epoch);
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} days ago`;
  }

  function short(hex, n = 16) {
    if (typeof hex !== "string") return "—";
    return hex.length > n ? hex.slice(0, n) + "…" : hex;
  }

  function num(value, digits = 3) {
    return typeof value === "number" && isFinite(value) ? value.toFixed(digits) : "—";
  }

  function badge(kind, text) {
    return h("span", { class: "badge " + kind }, text);
  }

  function table(headers, rows, attrs) {
    return h("table", attrs || {},
      h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
      h("tbody", {}, rows.length ? rows
        : h("tr", {}, h("td", { colspan: headers.length, class: "empty" }, "none"))));
  }

  function showError(message) {
    const box = document.getElementById("error");
    if (!box) return;
    box.textContent = message || "";
    box.hidden = !message;
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY);
    role = null;
    if (timer) clearInterval(timer);
    timer = null;
    document.body.classList.remove("signed-in", "role-operator", "role-auditor");
    document.getElementById("app").hidden = true;
    document.getElementById("login").hidden = false;
    const note = document.getElementById("login-error");
    note.textContent = message || "";
    note.hidden = !message;
  }

  async function enter(render) {
    const who = await api("/whoami", { quiet: true });
    role = who.role;
    document.body.classList.add("signed-in", "role-" + role);
    document.getElementById("login").hidden = true;
    document.getElementById("app").hidden = false;
    fill("role", badge(role === "operator" ? "ok" : "info", role));
    const first = tick === null;
    tick = async () => {
      try {
        await render(role);
        showError("");
        fill("updated", "updated " + time(Date.now() / 1000));
      } catch (e) {
        if (e instanceof ApiError && e.status === 401) return;
        showError("Could not refresh: " + e.message);
      }
    };
    await tick();
    if (timer) clearInterval(timer);
    timer = setInterval(tick, REFRESH_MS);
    if (first) window.addEventListener("hashchange", () => role && tick && tick());
  }

  // Wire the sign-in form and the sign-out button; call render(role) every few seconds.
  function start(render) {
    const form = document.getElementById("login-form");
    const input = document.getElementById("token");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();  // never submitted: the token must not reach a URL
      const value = input.value.trim();
      input.value = "";
      if (!value) return;
      sessionStorage.setItem(KEY, value);
      try {
        await enter(render);
      } catch (e) {
        signOut(e.status === 401 ? "This token is not valid here." : "Sign-in failed: " + e.message);
      }
    });
    document.getElementById("sign-out").addEventListener("click", () => signOut(""));
    if (token()) {
      enter(render).catch((e) => signOut("Please sign in again (" + e.message + ")."));
    } else {
      signOut("");
    }
  }

  return { api, h, fill, time, ago, short, num, badge, table, start, signOut, showError, ApiError,
    role: () => role };
})();
