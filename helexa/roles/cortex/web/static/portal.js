// A portal's pages: the key lives in this tab's sessionStorage and is sent only to this
// portal's own API (/v1/usage to check it, /v1/models, /v1/chat/completions streamed).
"use strict";
(function () {
  const $ = (sel) => document.querySelector(sel);
  const bar = $(".portal-bar");
  const keyed = bar && bar.dataset.keyed === "true";
  // --- copy buttons ---
  for (const b of document.querySelectorAll("button.copy")) {
    b.addEventListener("click", async () => {
      const text = document.getElementById(b.dataset.copy).textContent;
      try { await navigator.clipboard.writeText(text); b.textContent = "Copied"; }
      catch (e) { b.textContent = "Select and copy"; }
    });
  }

  // A portal without the OpenAI API: its pages say so and use no key (there is none to check).
  if (bar && bar.dataset.openai === "false") return;
  const STORE = "helexa-key:" + (bar ? bar.dataset.portal : "");
  const key = () => sessionStorage.getItem(STORE);
  const headers = (extra) => {
    const h = Object.assign({}, extra || {});
    if (key()) h.Authorization = "Bearer " + key();
    return h;
  };
  const onSignin = location.pathname === "/portal/" || location.pathname === "/portal";
  if (keyed && !key() && !onSignin) { location.replace("/portal/"); return; }

  const signout = $("#signout");
  if (signout) {
    if (!key()) signout.hidden = true;
    signout.addEventListener("click", () => { sessionStorage.removeItem(STORE); location.replace("/portal/"); });
  }

  async function errorText(resp) {
    try { const body = await resp.json(); return (body.error && body.error.message) || resp.statusText; }
    catch (e) { return resp.status + " " + resp.statusText; }
  }

  // --- sign-in ---
  const form = $("#signin");
  if (form) {
    if (key()) location.replace("/portal/playground");
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const candidate = $("#api-key").value.trim();
      const err = $("#signin-error");
      let resp;
      try {
        resp = await fetch("/v1/usage", { headers: { Authorization: "Bearer " + candidate } });
      } catch (e) {  // a character no header can carry (a pasted "…"), or no answer at all
        err.textContent = e instanceof TypeError && !/^[\x20-\x7e]*$/.test(candidate)
          ? "That key is not valid on this portal (it has characters no key has)."
          : "The portal did not answer: " + e.message;
        err.hidden = false;
        $("#api-key").focus();
        return;
      }
      if (resp.ok) {
        sessionStorage.setItem(STORE, candidate);
        location.replace("/portal/playground");
      } else {
        err.textContent = resp.status === 401 ? "That key is not valid on this portal." : await errorText(resp);
        err.hidden = false;
        $("#api-key").focus();
      }
    });
  }

  // --- model names (playground picker, snippets) ---
  async function models() {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (resp.status === 401 && keyed) {  // revoked or expired since sign-in
      sessionStorage.removeItem(STORE);
      location.replace("/portal/");
      return [];
    }
    if (!resp.ok) return [];
    return (await resp.json()).data.map((m) => m.id);
  }
  const picker = $("#model");
  const names = document.querySelectorAll(".model-name");
  if (picker || names.length) {
    models().then((ids) => {
      if (picker) {
        picker.replaceChildren(...ids.map((id) => { const o = document.createElement("option"); o.value = o.textContent = id; return o; }));
        if (!ids.length) $("#chat-status").textContent = "No model is available on this portal right now.";
      }
      if (ids.length) for (const n of names) n.textContent = ids[0];
    });
  }

  // --- playground ---
  const chat = $("#chat");
  if (chat) {
    const answer = $("#answer"), status = $("#chat-status"), send = $("#send"), stop = $("#stop");
    const temp = $("#temperature"), tempOut = $("#temperature-out");
    temp.addEventListener("input", () => { tempOut.value = temp.value; });
    let controller = null;
    stop.addEventListener("click", () => { if (controller) controller.abort(); });
    chat.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const messages = [];
      const system = $("#system").value.trim();
      if (system) messages.push({ role: "system", content: system });
      messages.push({ role: "user", content: $("#prompt").value });
      const body = { model: picker.value, messages, stream: true, temperature: parseFloat(temp.value),
                     max_tokens: parseInt($("#max-tokens").value, 10) || undefined };
      answer.textContent = "";
      status.textContent = "Generating…";
      send.disabled = true; stop.disabled = false;
      controller = new AbortController();
      let tokens = 0;
      try {
        const resp = await fetch("/v1/chat/completions", { method: "POST", signal: controller.signal,
          headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
        if (!resp.ok) { status.textContent = "Refused: " + await errorText(resp); return; }
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "", finish = null, failure = null;
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
            for (const line of event.split("\n")) {
              if (!line.startsWith("data:")) continue;
              const data = line.slice(5).trim();
              if (data === "[DONE]") continue;
              const chunk = JSON.parse(data);
              if (chunk.error) { failure = chunk.error.message; status.textContent = "Error: " + failure; continue; }
              for (const c of chunk.choices || []) {
                if (c.delta && c.delta.content) { answer.append(c.delta.content); tokens++; }
                if (c.finish_reason) finish = c.finish_reason;
              }
            }
          }
        }
        // A stream that failed part-way (its neuron gone...) says so; it is not "done".
        status.textContent = failure != null ? "Error: " + failure : "Done (" + (finish || "end") + ").";
      } catch (e) {
        status.textContent = e.name === "AbortError" ? "Stopped." : "Failed: " + e.message;
      } finally {
        send.disabled = false; stop.disabled = true; controller = null;
      }
    });
  }

  // --- usage ---
  const usage = $("#usage");
  if (usage && keyed) {
    fetch("/v1/usage", { headers: headers() }).then(async (resp) => {
      const mk = (tag, text) => { const e = document.createElement(tag); if (text != null) e.textContent = text; return e; };
      if (!resp.ok) { usage.replaceChildren(mk("p", await errorText(resp))); return; }
      const u = await resp.json();
      const dl = mk("dl");
      const row = (k, v) => dl.append(mk("dt", k), mk("dd", v));
      row("Key", u.name + " (" + u.key_id + ")");
      row("Period", u.period.name + (u.period.start ? " from " + new Date(u.period.start * 1000).toISOString().slice(0, 10) : ""));
      // Money with six decimals, as the ledger's reports print it (per-million prices make
      // a request cost millionths).
      row("Spent", u.spent.money.toFixed(6) + " " + u.currency + ", " + u.spent.tokens + " tokens");
      row("Remaining budget", u.remaining_budget == null ? "no budget" : (u.limits.budget_unit === "tokens"
        ? Math.floor(u.remaining_budget) + " tokens" : u.remaining_budget.toFixed(6) + " " + u.currency));
      row("In flight", String(u.in_flight));
      const table = mk("table");
      const head = mk("tr");
      for (const h of ["Model", "Requests", "Prompt tokens", "Completion tokens", "Cost"]) { const th = mk("th", h); th.scope = "col"; head.append(th); }
      table.append(mk("thead"), mk("tbody"));
      table.tHead.append(head);
      for (const m of u.models) {
        const tr = mk("tr");
        for (const v of [m.model, m.requests, m.prompt_tokens, m.completion_tokens, m.cost.toFixed(6)]) tr.append(mk("td", String(v)));
        table.tBodies[0].append(tr);
      }
      const frame = mk("div");  // the table scrolls in it: a phone's page stays as wide as the phone
      frame.className = "table-wrap";
      frame.append(table);
      usage.replaceChildren(dl, mk("h2", "This period, per model"), frame);
    });
  }

})();
