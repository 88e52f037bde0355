// The console's live parts: one EventSource on /console/events feeds the Fleet page, the
// Models page's "where" cells and the Traffic page's charts. Everything is built with DOM
// calls and textContent (never innerHTML), so no name a neuron reports can become markup.
"use strict";
(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    for (const kid of kids) if (kid != null) e.append(kid);
    return e;
  };
  const GiB = 1024 ** 3;
  const gib = (b) => (b / GiB).toFixed(1) + " GiB";
  const pct = (x) => Math.round(x * 100) + "%";
  const live = $("#live");

  function meter(fraction, label) {
    const bar = el("span");
    bar.style.width = Math.max(0, Math.min(100, fraction * 100)).toFixed(1) + "%";
    return el("div", { class: "meter", role: "meter", "aria-label": label, "aria-valuemin": "0", "aria-valuemax": "100",
                       "aria-valuenow": String(Math.round(fraction * 100)) }, bar);
  }

  function neuronCard(n) {
    const card = el("article", { class: "neuron", "data-node": n.id, "aria-labelledby": "n-" + n.id });
    card.append(el("h2", { id: "n-" + n.id }, el("span", { text: n.id }),
      el("span", { class: "health health-" + n.health, "data-field": "health", text: n.health })));
    const dl = el("dl");
    const row = (k, v, field, bar) => {
      dl.append(el("dt", { text: k }), el("dd", {}, el("span", { text: v, "data-field": field || "" }), bar || null));
    };
    row("heartbeat", n.heartbeat_age + " s ago", "heartbeat");
    row("version", n.version || "?", "version");
    row("identity key", n.key || "none", "key");
    row("CPU", (n.cpu == null ? "?" : n.cpu.toFixed(0)) + "% of " + n.cores + " cores", "cpu");
    row("RAM", gib(n.ram_used) + " / " + gib(n.ram_total), "ram",
        meter(n.ram_total ? n.ram_used / n.ram_total : 0, "RAM used on " + n.id));
    for (const g of n.gpus) {
      const total = g.used + g.free;
      row("GPU " + g.index, g.name + ": " + gib(g.used) + " / " + gib(total) + " VRAM", "gpu" + g.index,
          meter(total ? g.used / total : 0, "VRAM used on GPU " + g.index + " of " + n.id));
    }
    row("in flight", String(n.in_flight), "in_flight");
    card.append(dl);
    const ul = el("ul", { "aria-label": "models on " + n.id });
    for (const m of n.models) {
      let state = m.state;
      if (m.state === "loading" && m.progress != null) state += " " + pct(m.progress);
      if (m.in_flight) state += " · " + m.in_flight + " in flight";
      if (m.pinned) state += " · pinned";
      ul.append(el("li", { "data-model": m.id }, el("span", { text: m.id }),
        el("span", { class: "state state-" + m.state, "data-field": "state", text: state })));
      if (m.state === "loading" && m.progress != null) ul.append(meter(m.progress, "loading " + m.id + " on " + n.id));
    }
    if (!n.models.length) ul.append(el("li", { class: "muted", text: "no models" }));
    card.append(ul);
    return card;
  }

  function renderFleet(doc) {
    const root = $("#fleet");
    if (root) {
      const grid = el("div", { class: "neurons" });
      for (const n of doc.neurons) grid.append(neuronCard(n));
      if (!doc.neurons.length) grid.append(el("p", { class: "muted", text: "No neuron has joined yet." }));
      root.replaceChildren(grid);
      const age = $("#fleet-age");
      if (age) age.textContent = doc.neurons.length + " neurons, updated " + new Date(doc.at * 1000).toLocaleTimeString();
    }
    const models = $("#models");
    if (models) {
      for (const tr of models.querySelectorAll("tbody tr[data-model]")) {
        const id = tr.dataset.model;
        const cell = $(".where", tr);
        const spans = [];
        for (const n of doc.neurons) {
          const m = n.models.find((x) => x.id === id);
          if (!m) continue;
          let text = n.id + ": " + m.state;
          if (m.state === "loading" && m.progress != null) text += " " + pct(m.progress);
          if (m.pinned) text += ", pinned";
          spans.push(el("span", { class: "state state-" + m.state, "data-node": n.id, text: text }), " ");
        }
        for (const n of doc.neurons) {  // in its model cache only (a restarted neuron): a load there uses it
          if ((n.cached || []).includes(id) && !n.models.some((x) => x.id === id)) {
            spans.push(el("span", { class: "state state-cached", "data-node": n.id, text: n.id + ": cached" }), " ");
          }
        }
        if (!spans.length) spans.push(el("span", { class: "muted", text: "not loaded" }));
        cell.replaceChildren(...spans);
      }
    }
  }

  function chart(title, values, unit, labels) {
    const w = 720, h = 90, max = Math.max(1e-9, ...values.filter((v) => v != null));
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    const last = values.filter((v) => v != null).slice(-1)[0];
    svg.setAttribute("aria-label", title + ": peak " + max.toFixed(2) + " " + unit + ", latest " + (last == null ? "none" : last.toFixed(2)));
    // One bar per 10-second bucket: sparse traffic stays visible, and a gap is a gap.
    const step = w / values.length;
    values.forEach((v, i) => {
      if (v == null || v <= 0) return;
      const bh = Math.max(1.5, (v / max) * (h - 6));
      const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
      r.setAttribute("x", (i * step).toFixed(2));
      r.setAttribute("y", (h - bh).toFixed(2));
      r.setAttribute("width", Math.max(1, step * 0.9).toFixed(2));
      r.setAttribute("height", bh.toFixed(2));
      svg.append(r);
    });
    const axis = document.createElementNS("http://www.w3.org/2000/svg", "line");
    axis.setAttribute("x1", "0"); axis.setAttribute("x2", String(w));
    axis.setAttribute("y1", String(h - 0.5)); axis.setAttribute("y2", String(h - 0.5));
    axis.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(axis);
    return el("div", {}, el("div", { class: "legend", text: title + " (peak " + max.toFixed(2) + " " + unit + ")" }), svg);
  }

  function renderTraffic(doc) {
    const root = $("#traffic");
    if (!root) return;
    const out = [];
    for (const s of doc.series) {
      const box = el("section", { class: "chart", "aria-label": "traffic of " + s.model + " on " + s.portal });
      box.append(el("h2", { text: s.portal + " · " + s.model + " — " + s.totals.requests + " requests, " +
        s.totals.tokens + " tokens, " + s.totals.errors + " errors" + (s.totals.ttft != null ? ", TTFT " + (s.totals.ttft * 1000).toFixed(0) + " ms" : "") }));
      box.append(chart("requests/s", s.requests_per_s, "/s"));
      box.append(chart("tokens/s", s.tokens_per_s, "/s"));
      box.append(chart("time to first token", s.ttft.map((v) => (v == null ? null : v * 1000)), "ms"));
      box.append(chart("errors per 10 s", s.errors, ""));
      box.append(el("div", { class: "legend axis", text: "an hour ago … now" }));
      out.push(box);
    }
    if (!out.length) out.push(el("p", { class: "muted", text: "No requests in the last hour." }));
    root.replaceChildren(...out);
  }

  for (const [id, fn] of [["fleet", renderFleet], ["traffic", renderTraffic]]) {
    const node = document.getElementById(id);
    if (node && node.dataset.initial) {
      try { fn(JSON.parse(node.dataset.initial)); } catch (e) { /* the stream brings the next state */ }
    }
  }

  // The browser retries a dropped stream by itself, but gives up for good on an answer that
  // is not the stream (401 once the session is over: a sign-out, a rotated admin token, a
  // restarted cortex). Then this page asks itself again: sent to the login page, it goes
  // there; otherwise (the pages still starting, a network error) it opens a new stream.
  let source = null;
  const interrupted = () => { if (live) live.textContent = "Live updates interrupted: reconnecting…"; };
  async function recover() {
    interrupted();
    try {
      const resp = await fetch(location.pathname, { redirect: "manual", cache: "no-store" });
      if (resp.type === "opaqueredirect" || resp.status === 401) {
        location.assign("/console/login");
        return;
      }
    } catch (e) { /* not answering yet */ }
    setTimeout(connect, 2000);
  }
  function connect() {
    source = new EventSource("/console/events");
    source.addEventListener("fleet", (ev) => renderFleet(JSON.parse(ev.data)));
    source.addEventListener("traffic", (ev) => renderTraffic(JSON.parse(ev.data)));
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) recover(); else interrupted();
    };
    source.onopen = () => { if (live) live.textContent = ""; };
  }
  if ($("#fleet") || $("#models") || $("#traffic")) {
    connect();
    window.addEventListener("beforeunload", () => source && source.close());
  }
})();
