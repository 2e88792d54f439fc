// The playground: a prompt box that streams from the OpenAI API, N concurrent requests, and the
// engine view fed by GET /debug/engine (server-sent events). Plain JavaScript, no build step.
"use strict";
const $ = (id) => document.getElementById(id);
let controllers = [];

function body(prompt, stream) {
  const chat = document.querySelector("input[name=mode]:checked").value === "chat";
  const b = { max_tokens: +$("max_tokens").value, temperature: +$("temperature").value, top_p: +$("top_p").value,
              top_k: +$("top_k").value, stream, stream_options: { include_usage: true } };
  if ($("seed").value !== "") b.seed = +$("seed").value;
  if ($("ignore_eos").checked) b.ignore_eos = true;
  const stop = $("stop").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) b.stop = stop;
  if (chat) b.messages = [{ role: "user", content: prompt }]; else b.prompt = prompt;
  return [chat ? "/v1/chat/completions" : "/v1/completions", b];
}

// Reads server-sent events from a fetch response, calling onData with each parsed `data:` payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) onData(line.slice(6));
    }
  }
}

// One streamed request; calls update({text, ttft, tokens, tps, done, error}) as it goes.
async function run(prompt, update) {
  const [path, b] = body(prompt, true), ctl = new AbortController();
  controllers.push(ctl);
  const t0 = performance.now(), state = { text: "", ttft: null, tokens: 0, tps: 0, done: false, error: null };
  let chunks = 0, usage = null;  // tokens: chunks while streaming (one token each, mostly), then the usage's count
  try {
    const r = await fetch(path, { method: "POST", headers: { "content-type": "application/json" },
                                  body: JSON.stringify(b), signal: ctl.signal });
    if (!r.ok) { state.error = (await r.json()).error.message; state.done = true; update(state); return state; }
    await readEvents(r, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) { state.error = chunk.error.message; return; }
      if (chunk.usage) usage = chunk.usage.completion_tokens;
      for (const c of chunk.choices) {
        const piece = c.text ?? (c.delta && c.delta.content) ?? "";
        if (piece && state.ttft === null) state.ttft = performance.now() - t0;
        state.text += piece;
        if (piece) chunks += 1;
      }
      state.tokens = usage ?? chunks;
      state.tps = state.tokens / ((performance.now() - t0) / 1000);
      update(state);
    });
  } catch (e) { if (e.name !== "AbortError") state.error = String(e); }
  state.done = true; state.tps = state.tokens / ((performance.now() - t0) / 1000); update(state);
  return state;
}

const fmt = (x, d = 0) => (x === null || x === undefined ? "–" : x.toFixed(d));

$("send").onclick = () => {
  $("output").textContent = ""; $("stats").textContent = "";
  run($("prompt").value, (s) => {
    $("output").textContent = s.text + (s.error ? `\n[error] ${s.error}` : "");
    $("stats").textContent = `TTFT ${fmt(s.ttft)} ms · ${fmt(s.tps, 1)} tok/s · ${s.tokens} tokens` +
                             (s.done ? "" : " · streaming…");
  });
};

$("fire").onclick = () => {
  const n = Math.max(1, Math.min(64, +$("concurrency").value)), tbody = document.querySelector("#requests tbody");
  tbody.innerHTML = "";
  for (let i = 0; i < n; i++) {
    const row = tbody.insertRow();
    row.innerHTML = `<td>${i + 1}</td><td></td><td></td><td></td><td class="text"></td>`;
    run(`${$("prompt").value} (${i + 1})`, (s) => {
      row.cells[1].textContent = fmt(s.ttft); row.cells[2].textContent = fmt(s.tps, 1);
      row.cells[3].textContent = s.tokens; row.cells[4].textContent = s.error ? `[error] ${s.error}` : s.text;
    });
  }
};

$("stop-all").onclick = () => { controllers.forEach((c) => c.abort()); controllers = []; };

// ---- the engine view ---------------------------------------------------------------------------
// A colour per sequence: FNV-1a of its id, spread by the golden angle so that neighbours differ.
const hue = (id) => { let h = 2166136261; for (const ch of id) h = Math.imul(h ^ ch.charCodeAt(0), 16777619) >>> 0;
                      return Math.round((h % 1000) * 137.508) % 360; };
const short = (id) => id.replace(/^(cmpl|chatcmpl)-/, "").slice(0, 8) + id.slice(id.lastIndexOf("-"));

// One sequence: its prompt (light) and output (dark) tokens on a scale shared by the whole list,
// the part already in the KV cache solid, the rest faint.
function seqRow(s, phase, stepTokens, scale, drafted) {
  const total = s.prompt_tokens + s.output_tokens, el = document.createElement("div"), h = hue(s.id);
  const pct = (n) => (100 * n / scale).toFixed(2) + "%";
  el.className = "seq";
  el.innerHTML = `<span style="color:hsl(${h},60%,40%)">■ ${short(s.id)}</span>` +
    `<span class="phase ${phase}">${phase}${stepTokens ? " +" + stepTokens : ""}` +
    `${drafted ? ` · drafts +${drafted[0]}, ${drafted[1]} kept (so far ${drafted[3]}/${drafted[2]})` : ""}</span>` +
    `<span class="bar"><span style="left:0;width:${pct(s.prompt_tokens)};background:hsl(${h},60%,80%)"></span>` +
    `<span style="left:${pct(s.prompt_tokens)};width:${pct(s.output_tokens)};background:hsl(${h},60%,50%)"></span>` +
    `<span style="left:${pct(s.computed_tokens)};width:${pct(Math.max(total - s.computed_tokens, 0))};background:#fff;opacity:.6"></span></span>` +
    `<span>${s.computed_tokens}/${total} · ${s.blocks.length} blk</span>`;
  el.title = `${s.id}: prompt ${s.prompt_tokens}, computed ${s.computed_tokens}, output ${s.output_tokens}, blocks ${s.blocks.join(" ")}`;
  return el;
}

function cell(id, owners, cached) {
  const c = document.createElement("span");
  c.className = "cell" + (owners.length ? " used" : "") + (owners.length > 1 ? " shared" : "") + (cached ? " cached" : "");
  if (owners.length) c.style.background = `hsl(${hue(owners[0])},60%,60%)`;
  c.title = `block ${id}` + (owners.length ? `: ${owners.map(short).join(", ")}` : cached ? ": cached-free" : ": free");
  return c;
}

function draw(v) {
  $("engine").hidden = false;
  if (v.status !== "ok") { $("engine-note").textContent = `engine ${v.status}`; return; }
  const last = v.last_step, tokens = (last && last.tokens) || {};
  $("engine-note").textContent = `step ${v.step}: every step the scheduler picks the running sequences' next tokens ` +
    "(one per decode, a chunk per prefill) and the model runs them as one batch.";
  $("last-step").textContent = last ? `last step: ${last.decodes} decodes + ${last.prefill_tokens} prefill tokens, ` +
    `${last.sampled} sampled, ${last.step_ms} ms (model ${last.model_ms} ms)` : "no step yet";
  $("n-running").textContent = `(${v.running.length})`; $("n-waiting").textContent = `(${v.waiting.length})`;
  const scale = Math.max(1, ...[...v.running, ...v.waiting].map((s) => s.prompt_tokens + s.output_tokens));
  const drafts = v.drafts || {};  // step 09 on: [drafted, accepted] per sequence, last step
  $("running").replaceChildren(...v.running.map((s) => seqRow(s, s.prefilling ? "prefill" : "decode", tokens[s.id], scale,
                                                              drafts[s.id])));
  $("waiting").replaceChildren(...v.waiting.map((s) => seqRow(s, "waiting", 0, scale)));
  const st = v.scheduler || {};
  $("spec").textContent = st.spec_decode_num_drafts !== undefined ? `speculation: ${st.spec_decode_num_drafts} drafts, ` +
    `${st.spec_decode_num_accepted_tokens}/${st.spec_decode_num_draft_tokens} draft tokens accepted ` +
    `(${(100 * st.spec_decode_acceptance_rate).toFixed(1)} %)` : "";
  if (v.kv) {
    $("kv-section").hidden = false;
    const k = v.kv, used = k.blocks.filter((b) => b[1].length), shared = used.filter((b) => b[1].length > 1);
    $("kv-summary").textContent = `${k.num_blocks} blocks of ${k.block_size} tokens: ${used.length} used ` +
      `(${shared.length} shared), ${k.num_cached_free} cached-free, ${k.num_free} free` +
      (k.whole_pool ? "" : " (large pool: used and cached blocks only)");
    $("kv-grid").replaceChildren(...k.blocks.filter((b) => !b[2]).map((b) => cell(...b)));
    $("kv-cached").replaceChildren(...k.blocks.filter((b) => b[2]).map((b) => cell(...b)));
  }
}

async function watch() {
  try {
    const r = await fetch("/debug/engine");
    if (r.status === 404) {
      $("engine-note").textContent = "This step has no engine loop: steps 00–03 run transformers' generate() " +
        "for each request or batch, so there are no steps, sequences or KV blocks to show. The engine view starts " +
        "at step 04 (own model, KV cache, continuous batching).";
      return;
    }
    if (!r.ok) { $("engine-note").textContent = `engine view unavailable (${r.status}); retrying`; }
    else await readEvents(r, (data) => draw(JSON.parse(data)));
  } catch (e) { $("engine-note").textContent = `engine view disconnected (${e}); retrying`; }
  setTimeout(watch, 2000);
}

fetch("/v1/models").then((r) => r.json()).then((m) => { $("model").textContent = m.data[0].id; }).catch(() => {});
watch();
