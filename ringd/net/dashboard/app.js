// ringd dashboard: polls this node's /ringd/status, draws the ring, and chats through the
// ring's own /v1/chat/completions. No build step, no dependencies.
"use strict";

const KEY = "ringd.api_key"; // sessionStorage: this tab only
const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";

const ui = {};
const state = {
  status: null,
  waitingForKey: false,
  pollTimer: null,
  chat: [], // {role, content} sent to the API
  abort: null,
};

// ------------------------------------------------------------------------ helpers
function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function size(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function ms(v) {
  if (v === null || v === undefined) return "–";
  if (v >= 10) return `${v.toFixed(0)} ms`;
  if (v >= 0.1) return `${Number(v.toPrecision(2))} ms`;
  return `${(v * 1000).toFixed(0)} µs`;
}

function layersText(layers) {
  if (!layers) return "none";
  return `${layers[0]}-${layers[1] - 1} (${layers[1] - layers[0]})`;
}

function short(text, n) {
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    const e = body.error || body;
    return e.message || `HTTP ${resp.status}`;
  } catch (_) {
    return `HTTP ${resp.status}`;
  }
}

// ------------------------------------------------------------------------ API key
function askForKey(message) {
  state.waitingForKey = true;
  ui.keyError.textContent = message || "";
  ui.keyInput.value = "";
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
}

function onKeySubmit(ev) {
  ev.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  ui.keyDialog.close();
  state.waitingForKey = false;
  poll();
}

async function unauthorized(resp) {
  const had = sessionStorage.getItem(KEY);
  sessionStorage.removeItem(KEY);
  const why = await errorText(resp);
  askForKey(had ? `${why}: try again` : "");
}

// ------------------------------------------------------------------------ polling
async function poll() {
  clearTimeout(state.pollTimer);
  if (state.waitingForKey) return;
  try {
    const resp = await fetch("/ringd/status", { headers: authHeaders(), cache: "no-store" });
    if (resp.status === 401) { await unauthorized(resp); return; }
    if (!resp.ok) throw new Error(await errorText(resp));
    const st = await resp.json();
    state.status = st;
    render(st);
    ui.updated.textContent = `updated ${new Date().toLocaleTimeString()} from ` +
      `${st.node.name || st.node.id}`;
    document.body.dataset.connection = "ok";
  } catch (e) {
    document.body.dataset.connection = "lost";
    setBadge("lost", `no answer from this node (${e.message || e})`);
  }
  state.pollTimer = setTimeout(poll, POLL_MS);
}

function setBadge(kind, text) {
  ui.badge.dataset.kind = kind;
  ui.badge.textContent = text;
}

// ------------------------------------------------------------------------ rendering
function membersById(st) {
  const out = new Map();
  for (const m of st.members || []) out.set(m.id, m);
  return out;
}

function nameOf(m, id) { return (m && m.name) || (id || "").slice(0, 8); }

/** The ring in ring order: [{member, assignment}] of the committed plan (or the live
 *  members, unplaced, when there is none). */
function ringOrder(st) {
  const byId = membersById(st);
  if (st.plan && st.plan.assignments && st.plan.assignments.length) {
    return st.plan.assignments.map(a => ({ id: a.node_id, m: byId.get(a.node_id), a }));
  }
  return (st.members || []).filter(m => m.state === "alive" || m.state === "suspect")
    .map(m => ({ id: m.id, m, a: null }));
}

/** Round trip (ms) from ring[i] to ring[i+1]: what ring[i] gossips, or this node's probes. */
function linkRtt(st, ring, i) {
  const from = ring[i], to = ring[(i + 1) % ring.length];
  const t = from.m && from.m.timings;
  if (t && t.next_rtt_ms !== null && t.next_rtt_ms !== undefined) return t.next_rtt_ms;
  if (from.m && from.m.self && to.m) return to.m.rtt_ms;
  if (to.m && to.m.self && from.m) return from.m.rtt_ms;
  return null;
}

function selfMember(st) {
  return (st.members || []).find(m => m.self || m.id === st.node.id) || null;
}

function recentTps(st) {
  const me = selfMember(st);
  const step = me && me.timings && me.timings.decode_step_ms;
  if (step && step.p50) return 1000 / step.p50;
  return st.ceiling ? st.ceiling.measured_tps : null;
}

function phaseOf(m) {
  if (!m) return "unknown";
  if ((m.state === "dead" || m.state === "left") && !m.self) return m.state;
  let p = m.phase || "unknown";
  if (m.fetch && m.fetch[1]) p += ` ${Math.floor(100 * m.fetch[0] / m.fetch[1])}%`;
  return p;
}

function phaseKind(m) {
  if (!m) return "unknown";
  if ((m.state === "dead" || m.state === "left") && !m.self) return "gone";
  if (m.refusal) return "bad";
  return m.phase || "unknown";
}

function render(st) {
  const ring = ringOrder(st);
  if (st.ready) setBadge("ready", "ring ready");
  else setBadge("notready", "ring not ready");
  ui.reason.hidden = !!st.ready;
  ui.reason.textContent = st.ready ? "" : `not ready: ${st.reason || "no reason given"}`;

  const model = st.model;
  ui.model.textContent = model
    ? `${model.name}, ${model.num_layers} layers, ${size(model.total_bytes)}` : "none";
  ui.plan.textContent = st.plan ? `epoch ${st.plan.epoch}` +
    (st.plan.hash ? `, ${st.plan.hash.slice(0, 12)}` : "") : "none committed";
  ui.fingerprint.textContent = st.fingerprint ? st.fingerprint.slice(0, 16) : "–";
  ui.fingerprint.title = st.fingerprint || "";
  const tps = recentTps(st);
  const ceiling = st.ceiling && st.ceiling.single_stream_tps;
  ui.tps.textContent = (tps ? tps.toFixed(1) : "–") +
    (ceiling ? ` (ceiling ${ceiling.toFixed(1)})` : "");
  const runner = (st.stats && st.stats.runner) || {};
  ui.requests.textContent = `${runner.active_entries ?? 0} running, ${runner.queued ?? 0} queued`;

  drawRing(st, ring);
  renderSlowest(st, ring);
  renderFetch(st);
  renderTable(st, ring);
}

function drawRing(st, ring) {
  const nodes = ui.ringNodes, links = ui.ringLinks;
  nodes.replaceChildren();
  links.replaceChildren();
  const n = ring.length;
  const cx = 320, cy = 240, r = n > 1 ? Math.min(170, 60 + 40 * n) : 0;
  const w = n > 6 ? 128 : 156, h = 92;
  const pos = ring.map((_, i) => {
    const ang = -Math.PI / 2 + 2 * Math.PI * i / Math.max(n, 1);
    return [cx + r * Math.cos(ang), cy + r * Math.sin(ang)];
  });
  const slow = slowestStage(st, ring);
  const planned = !!(st.plan && st.plan.assignments && st.plan.assignments.length);
  if (planned && n > 1) {
    for (let i = 0; i < n; i++) {
      const [x1, y1] = pos[i], [x2, y2] = pos[(i + 1) % n];
      // a chord bent outwards (two nodes: each link to its own side), box edge to box edge
      const mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
      let ox = mx - cx, oy = my - cy;
      if (n === 2) { ox = y1 - y2; oy = x2 - x1; }
      const d = Math.hypot(ox, oy) || 1, bend = n === 2 ? 70 : 40;
      const qx = mx + ox / d * bend, qy = my + oy / d * bend;
      const a = edgePoint(x1, y1, qx, qy, w, h), b = edgePoint(x2, y2, qx, qy, w, h);
      const rtt = linkRtt(st, ring, i);
      const from = nameOf(ring[i].m, ring[i].id), to = nameOf(ring[(i + 1) % n].m,
        ring[(i + 1) % n].id);
      const g = svg("g", { class: "link", "data-from": from, "data-to": to });
      g.append(svg("path", { d: `M ${a[0]} ${a[1]} Q ${qx} ${qy} ${b[0]} ${b[1]}`,
        "marker-end": "url(#arrow)" }));
      const lx = 0.25 * a[0] + 0.5 * qx + 0.25 * b[0], ly = 0.25 * a[1] + 0.5 * qy + 0.25 * b[1];
      g.append(svg("text", { x: lx, y: ly, class: "link-label", "text-anchor": "middle" },
        rtt === null || rtt === undefined ? "? ms" : ms(rtt)));
      g.append(svg("title", {}, `${from} → ${to}: round trip ${ms(rtt)}`));
      links.append(g);
    }
  }
  ring.forEach((node, i) => {
    const m = node.m, [x, y] = pos[i];
    const name = nameOf(m, node.id);
    const g = svg("g", {
      class: "node" + (slow && slow.id === node.id ? " slowest" : "") +
        (m && m.self ? " self" : ""),
      "data-node": name, "data-state": m ? m.state : "unknown", "data-phase": phaseKind(m),
      transform: `translate(${x - w / 2} ${y - h / 2})` });
    g.append(svg("rect", { class: "box", width: w, height: h, rx: 8 }));
    g.append(svg("rect", { class: "stripe", width: 6, height: h, rx: 3 }));
    g.append(svg("text", { x: 14, y: 20, class: "name" },
      short(name, 16) + (m && m.self ? " •" : "")));
    g.append(svg("text", { x: 14, y: 38, class: "layers" },
      node.a ? `layers ${layersText([node.a.start, node.a.end])}` : "no layers"));
    g.append(svg("text", { x: 14, y: 56, class: "phase" }, phaseOf(m)));
    memoryBar(g, st, node, 14, 66, w - 24, 10);
    const t = m && m.timings && m.timings.compute_ms;
    if (t && t.p50 !== null) {
      g.append(svg("text", { x: w - 10, y: 20, class: "compute", "text-anchor": "end" },
        ms(t.p50)));
    }
    g.append(svg("title", {}, nodeTitle(st, node)));
    nodes.append(g);
  });
  const describe = (node, i) => {
    const layers = node.a ? layersText([node.a.start, node.a.end]) : "none";
    const next = planned && n > 1 ? `, round trip to next ${ms(linkRtt(st, ring, i))}` : "";
    return `${nameOf(node.m, node.id)} layers ${layers}, ${phaseOf(node.m)}${next}`;
  };
  ui.ringDesc.textContent = n ? `Ring of ${n} node(s) in ring order: ` +
    ring.map(describe).join("; ") : "No node in the ring yet.";
}

/** Where the line from the box centre (cx, cy) towards (tx, ty) leaves the box. */
function edgePoint(cx, cy, tx, ty, w, h) {
  const dx = tx - cx, dy = ty - cy;
  const sx = dx ? (w / 2 + 4) / Math.abs(dx) : Infinity;
  const sy = dy ? (h / 2 + 4) / Math.abs(dy) : Infinity;
  const s = Math.min(sx, sy, 1);
  return [cx + dx * s, cy + dy * s];
}

function shardBytes(st, id) {
  const c = st.ceiling && (st.ceiling.stages || []).find(s => s.node_id === id);
  return c ? c.shard_bytes : null;
}

function memoryBar(g, st, node, x, y, w, h) {
  const m = node.m;
  const usable = m && m.usable_memory;
  g.append(svg("rect", { class: "mem free", x, y, width: w, height: h, rx: 2 }));
  if (!usable || !node.a) return;
  const weights = shardBytes(st, node.id) ?? 0;
  const share = node.a.bytes ?? weights;
  const kv = Math.max(0, share - weights);
  const ww = Math.min(w, w * weights / usable), kw = Math.min(w - ww, w * kv / usable);
  g.append(svg("rect", { class: "mem weights", x, y, width: ww, height: h }));
  g.append(svg("rect", { class: "mem kv", x: x + ww, y, width: kw, height: h }));
}

function nodeTitle(st, node) {
  const m = node.m;
  if (!m) return node.id;
  const weights = shardBytes(st, node.id);
  const share = node.a && node.a.bytes;
  const t = m.timings;
  const lines = [
    `${nameOf(m, node.id)} (${m.id}) at ${m.addr || "?"}`,
    `state ${m.state}, phase ${phaseOf(m)}`,
    `offers ${size(m.usable_memory)} of ${size(m.total_memory)}`,
    `weights ${size(weights)}, KV cache and the rest ` +
      (share && weights !== null ? size(share - weights) : "–"),
  ];
  if (t) {
    lines.push(`compute p50 ${ms(t.compute_ms.p50)}, p99 ${ms(t.compute_ms.p99)}`);
    lines.push(`queued p50 ${ms(t.queued_ms.p50)}, handoff p50 ${ms(t.handoff_ms.p50)}`);
  }
  if (m.refusal) lines.push(`refuses to serve: ${m.refusal}`);
  return lines.join("\n");
}

function slowestStage(st, ring) {
  let best = null;
  for (const node of ring) {
    const t = node.m && node.m.timings && node.m.timings.compute_ms;
    if (t && t.p50 !== null && (!best || t.p50 > best.ms)) {
      best = { id: node.id, ms: t.p50, m: node.m };
    }
  }
  return best;
}

function renderSlowest(st, ring) {
  const parts = [];
  const stage = slowestStage(st, ring);
  if (stage) parts.push(`slowest stage: ${nameOf(stage.m, stage.id)}, compute ${ms(stage.ms)}`);
  let link = null;
  if (ring.length > 1) {
    ring.forEach((node, i) => {
      const rtt = linkRtt(st, ring, i);
      if (rtt !== null && rtt !== undefined && (!link || rtt > link.rtt)) link = { i, rtt };
    });
  }
  if (link) {
    const a = ring[link.i], b = ring[(link.i + 1) % ring.length];
    parts.push(`slowest link: ${nameOf(a.m, a.id)} → ${nameOf(b.m, b.id)}, ` +
      `${ms(link.rtt)} round trip`);
  }
  ui.slowest.textContent = parts.join(" · ");
}

function renderFetch(st) {
  const rows = [];
  for (const m of st.members || []) {
    const gone = (m.state === "dead" || m.state === "left") && !m.self;
    if (!m.fetch || !m.fetch[1] || gone) continue;
    const [done, total] = m.fetch;
    const bar = el("progress", { max: total, value: done });
    bar.setAttribute("aria-label", `${nameOf(m, m.id)} fetching weights`);
    rows.push(el("div", { class: "fetch-row", "data-node": nameOf(m, m.id) },
      el("span", { class: "fetch-name" }, nameOf(m, m.id)), bar,
      el("span", {}, `${Math.floor(100 * done / total)}% (${size(done)} of ${size(total)})`)));
  }
  const f = st.stats && st.stats.fetch;
  if (f && f.fetching) {
    rows.push(el("p", { class: "fetch-detail" },
      `this node fetches ${f.fetching}` + (f.rate ? ` at ${size(f.rate)}/s` : "")));
  }
  ui.fetch.replaceChildren(...(rows.length ? [el("h3", {}, "Fetching weights"), ...rows] : []));
}

function renderTable(st, ring) {
  const byId = membersById(st);
  const inRing = new Set(ring.map(n => n.id));
  const rows = [];
  const order = ring.map(n => n.id).concat((st.members || []).map(m => m.id)
    .filter(id => !inRing.has(id)));
  const excluded = new Map(((st.plan && st.plan.excluded) || []).map(e => [e.node_id, e.reason]));
  for (const id of order) {
    const m = byId.get(id);
    if (!m) continue;
    const a = st.plan && (st.plan.assignments || []).find(x => x.node_id === id);
    const t = m.timings && m.timings.compute_ms;
    const gone = (m.state === "dead" || m.state === "left") && !m.self;
    const phase = gone ? m.state : phaseOf(m) + (m.state === "suspect" ? " (suspect)" : "");
    const tr = el("tr", { "data-node": nameOf(m, id), "data-state": m.state },
      el("th", { scope: "row" }, nameOf(m, id) + (m.self ? " (this node)" : "")),
      el("td", {}, phase),
      el("td", {}, a ? layersText([a.start, a.end]) : excluded.has(id) ? "outside the plan"
        : "none"),
      el("td", {}, size(m.usable_memory)),
      el("td", {}, t ? `${ms(t.p50)} / ${ms(t.p99)}` : "–"),
      el("td", {}, m.self ? "–" : ms(m.rtt_ms)),
      el("td", { title: pathTitle(m) }, pathText(m)));
    if (excluded.has(id)) tr.title = excluded.get(id);
    rows.push(tr);
  }
  ui.tbody.replaceChildren(...rows);
}

function pathText(m) {
  if (m.self) return "–";
  const p = m.path;
  if (p && p.interface) {
    const others = (p.options || []).filter(o => o.address !== p.address && o.up).length;
    return `${p.interface} (${p.kind})` +
      (p.throughput ? `, ${size(p.throughput)}/s` : "") + (p.pinned ? ", pinned" : "") +
      (others ? `, +${others} other` : "") + (m.channel === "tcp" ? ", tcp" : "");
  }
  return m.channel || "–";
}

function pathTitle(m) {
  const p = m.path;
  if (!p) return "";
  return [`${p.reason}`].concat((p.options || []).map(o =>
    `${o.address} via ${o.interface} (${o.kind}): ${o.up ? ms(o.rtt_ms) : "down"}` +
    (o.throughput ? `, ${size(o.throughput)}/s` : ""))).join("\n");
}

// ------------------------------------------------------------------------ chat
function chatMessage(role, text) {
  const body = el("div", { class: "text" });
  body.append(document.createTextNode(text));
  const msg = el("div",
    { class: `msg ${role}`, "data-state": role === "user" ? "done" : "streaming" },
    el("div", { class: "who" }, role === "user" ? "you" : "ring"), body,
    el("div", { class: "meta" }));
  ui.chatLog.append(msg);
  msg.scrollIntoView({ block: "end" });
  return msg;
}

async function sendChat(ev) {
  ev.preventDefault();
  const text = ui.chatInput.value;
  if (!text.trim() || state.abort) return;
  ui.chatInput.value = "";
  state.chat.push({ role: "user", content: text });
  chatMessage("user", text);
  const msg = chatMessage("assistant", "");
  const out = msg.querySelector(".text").firstChild;
  const meta = msg.querySelector(".meta");
  const abort = new AbortController();
  state.abort = abort;
  ui.chatStop.disabled = false;
  ui.chatSend.disabled = true;
  let chunks = 0, finish = null, usage = null, failed = null;
  const started = performance.now();
  let firstAt = null;
  try {
    const body = {
      messages: state.chat, stream: true, stream_options: { include_usage: true },
      temperature: Number(ui.chatTemperature.value || 0),
      max_tokens: Number(ui.chatMaxTokens.value || 512),
    };
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(body), signal: abort.signal });
    if (resp.status === 401) {
      failed = "this node needs its API key: send the message again once it is given";
      await unauthorized(resp);
    } else if (!resp.ok) {
      failed = await errorText(resp);
    } else {
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const obj = JSON.parse(data);
            if (obj.error) { failed = obj.error.message; continue; }
            if (obj.usage) usage = obj.usage;
            for (const c of obj.choices || []) {
              const piece = c.delta && c.delta.content;
              if (piece) {
                if (firstAt === null) firstAt = performance.now();
                out.appendData(piece);
                chunks++;
                msg.dataset.chunks = String(chunks);
              }
              if (c.finish_reason) finish = c.finish_reason;
            }
          }
        }
      }
    }
  } catch (e) {
    failed = e.name === "AbortError" ? "stopped" : (e.message || String(e));
  }
  state.abort = null;
  ui.chatStop.disabled = true;
  ui.chatSend.disabled = false;
  const answer = out.data;
  if (answer) state.chat.push({ role: "assistant", content: answer });
  msg.dataset.state = failed ? "error" : "done";
  if (finish) msg.dataset.finish = finish;
  const seconds = (performance.now() - (firstAt ?? started)) / 1000;
  const n = usage ? usage.completion_tokens : chunks;
  meta.textContent = failed ? `error: ${failed}` :
    `${n} tokens (${finish || "?"})` +
    (n > 1 && seconds > 0 ? `, ${((n - 1) / seconds).toFixed(1)} tokens/s` : "");
  msg.scrollIntoView({ block: "end" });
}

function newChat() {
  if (state.abort) state.abort.abort();
  state.chat = [];
  ui.chatLog.replaceChildren();
  ui.chatInput.focus();
}

// ------------------------------------------------------------------------ start
function start() {
  Object.assign(ui, {
    badge: $("ring-state"), reason: $("reason"), model: $("model"), plan: $("plan"),
    fingerprint: $("fingerprint"), tps: $("tps"), requests: $("requests"),
    ringNodes: $("ring-nodes"), ringLinks: $("ring-links"), ringDesc: $("ring-desc"),
    slowest: $("slowest"), fetch: $("fetch"), tbody: document.querySelector("#nodes tbody"),
    updated: $("updated"), chatLog: $("chat-log"), chatForm: $("chat-form"),
    chatInput: $("chat-input"), chatSend: $("chat-send"), chatStop: $("chat-stop"),
    chatNew: $("chat-new"), chatTemperature: $("chat-temperature"),
    chatMaxTokens: $("chat-max-tokens"), keyDialog: $("key-dialog"), keyForm: $("key-form"),
    keyInput: $("key-input"), keyError: $("key-error"),
  });
  ui.keyForm.addEventListener("submit", onKeySubmit);
  ui.keyDialog.addEventListener("cancel", ev => ev.preventDefault()); // nothing works without it
  ui.chatForm.addEventListener("submit", sendChat);
  ui.chatStop.addEventListener("click", () => state.abort && state.abort.abort());
  ui.chatNew.addEventListener("click", newChat);
  ui.chatInput.addEventListener("keydown", ev => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); ui.chatForm.requestSubmit(); }
  });
  poll();
}

document.addEventListener("DOMContentLoaded", start);
