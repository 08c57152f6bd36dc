// gptlab playground: stream a completion token by token and show, for each step, how temperature,
// top-k and top-p reshaped the next-token distribution the token was drawn from.
//
// Talks only to the same-origin API that `gptlab serve` provides (see NOTES.md for the contract):
//   GET  /v1/models        the model's name and context length
//   POST /v1/completions   SSE stream; each chunk carries `explain` (the step's distribution)
//   POST /v1/explain       the distribution for a context under other settings ("what if")
"use strict";

(() => {
  const N_CANDIDATES = 10;      // candidates asked for, per step and per explain request
  const EXPLAIN_DELAY_MS = 200; // debounce: one explain request per pause in typing
  const BYTE_DISPLAY = /^<[0-9A-F]{2}( [0-9A-F]{2})*>$/; // how the server shows a partial UTF-8 token

  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $("form"), prompt: $("prompt"), temperature: $("temperature"), slider: $("temperature-slider"),
    topK: $("top-k"), topP: $("top-p"), maxTokens: $("max-tokens"), seed: $("seed"),
    generate: $("generate"), stop: $("stop"), status: $("status"), progress: $("progress"),
    modelName: $("model-name"),
    output: $("output"), chart: $("chart"),
  };

  const state = {
    model: null,            // {id, context_length, ...} from /v1/models
    run: null,              // the generation shown in Output (see startRun)
    streamAbort: null,      // AbortController of the completion stream in flight, if any
    selected: null,         // step shown in the chart; null = follow the latest step
    explainTimer: 0,
    explainAbort: null,     // AbortController of the explain request in flight, if any
    explainSeq: 0,          // only the newest explain response may draw the chart
    lastGoodStatus: { text: "Ready.", kind: "" },
  };

  // ---------------------------------------------------------------------------------------------
  // Small helpers

  class ApiError extends Error {}

  /** Percent text that stays informative for tiny values: "42.1%", "0.50%", "0.0031%", "<0.0001%". */
  function formatPercent(p) {
    if (!(p > 0)) return "0%";
    const pct = p * 100;
    if (pct >= 100) return "100%";
    if (pct < 0.0001) return "<0.0001%";
    // one decimal from 1% up, two significant digits below
    let digits = pct >= 1 ? 1 : Math.min(6, 1 - Math.floor(Math.log10(pct)));
    let text = pct.toFixed(digits);
    while (Number(text) >= 100 && digits < 6) text = pct.toFixed(++digits); // 99.97% is not "100.0%"
    return text + "%";
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** A token's display text with its spaces made visible (␣), or its bytes as a byte badge. */
  function tokenLabel(display) {
    if (BYTE_DISPLAY.test(display) || display === "<|endoftext|>") return el("span", "tok-bytes", display);
    const wrap = el("span", "tok-label");
    // GPT-2 tokens usually carry their leading space (" the"); show it, or " the" and "the" look alike
    for (const part of display.split(/( +)/)) {
      if (!part) continue;
      wrap.append(part[0] === " " ? el("span", "ws", "␣".repeat(part.length)) : document.createTextNode(part));
    }
    return wrap;
  }

  function describeSettings(s) {
    if (s.greedy || s.temperature === 0) return "T = 0 (greedy)";
    const parts = [`T = ${s.temperature}`];
    parts.push(s.top_k == null ? "top-k off" : `top-k ${s.top_k}`);
    parts.push(s.top_p == null ? "top-p off" : `top-p ${s.top_p}`);
    return parts.join(" · ");
  }

  function sameSettings(a, b) {
    return a.temperature === b.temperature && (a.top_k ?? null) === (b.top_k ?? null)
      && (a.top_p ?? null) === (b.top_p ?? null);
  }

  // ---------------------------------------------------------------------------------------------
  // Status line

  function setStatus(text, kind = "") {
    ui.progress.textContent = "";
    ui.status.textContent = text;
    ui.status.className = "status" + (kind ? " " + kind : "");
    if (kind !== "error") state.lastGoodStatus = { text, kind };
  }

  /**
   * A successful request after an error (say the user fixed a negative temperature) puts back the
   * status from before the error: the error no longer applies.
   */
  function clearError() {
    if (ui.status.classList.contains("error")) setStatus(state.lastGoodStatus.text, state.lastGoodStatus.kind);
  }

  // ---------------------------------------------------------------------------------------------
  // Settings

  /** A number field's value: `empty` when blank; an ApiError when the browser could not parse it. */
  function numberField(input, name, empty) {
    const raw = input.value.trim();
    if (raw === "") {
      if (input.validity.badInput) throw new ApiError(`${name} is not a number.`);
      return empty;
    }
    const value = Number(raw);
    if (!Number.isFinite(value)) throw new ApiError(`${name} is not a number.`);
    return value; // ranges are the server's to check: its error message is shown as is
  }

  function readSettings() {
    return {
      temperature: numberField(ui.temperature, "Temperature", 1),
      top_k: numberField(ui.topK, "Top-k", null),
      top_p: numberField(ui.topP, "Top-p", null),
      max_tokens: numberField(ui.maxTokens, "Max new tokens", 40),
      seed: numberField(ui.seed, "Seed", null),
    };
  }

  // ---------------------------------------------------------------------------------------------
  // API

  async function errorFrom(response) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: keep the HTTP status */ }
    return new ApiError(message);
  }

  async function postJson(path, body, signal) {
    const response = await fetch(path, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
    });
    if (!response.ok) throw await errorFrom(response);
    return response;
  }

  /** The `data:` payloads of a server-sent-events response body, one string per event. */
  async function* sseData(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5)).join("\n");
        if (data) yield data;
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Generation

  function startRun(prompt, settings) {
    state.run = {
      prompt, settings,
      promptIds: null,       // from the first chunk (return_prompt_ids): needed to re-explain a step
      steps: [],             // {index, token, text, explain, span}
      started: performance.now(),
      finish: null,
    };
    state.selected = null;
    ui.output.replaceChildren(el("span", "prompt-text", prompt));
  }

  function tokensPerSecond(run) {
    const seconds = (performance.now() - run.started) / 1000;
    return { seconds, rate: seconds > 0 ? run.steps.length / seconds : 0 };
  }

  function progressText(run, verb) {
    const { seconds, rate } = tokensPerSecond(run);
    const n = run.steps.length;
    return `${verb} ${n} token${n === 1 ? "" : "s"} in ${seconds.toFixed(1)} s (${rate.toFixed(1)} tokens/s)`;
  }

  async function generate() {
    if (state.streamAbort) return;
    let settings;
    try {
      settings = readSettings();
    } catch (err) {
      setStatus(err.message, "error");
      return;
    }
    if (!state.model) {
      setStatus("No model: the server did not answer GET /v1/models.", "error");
      return;
    }
    cancelExplain();
    const prompt = ui.prompt.value;
    startRun(prompt, settings);
    const run = state.run;
    const abort = new AbortController();
    state.streamAbort = abort;
    setBusy(true);
    setStatus("Generating…", "busy");

    try {
      const response = await postJson("/v1/completions", {
        model: state.model.id, prompt, max_tokens: settings.max_tokens, temperature: settings.temperature,
        top_k: settings.top_k, top_p: settings.top_p, seed: settings.seed, stream: true,
        explain: N_CANDIDATES, return_prompt_ids: true,
      }, abort.signal);
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.message); // an error after the stream began
        if (chunk.prompt_token_ids) run.promptIds = chunk.prompt_token_ids;
        const choice = chunk.choices[0];
        addStep(run, choice);
        if (choice.finish_reason) run.finish = choice.finish_reason;
        ui.progress.textContent = progressText(run, "").trim();
      }
      const why = run.finish === "stop" ? "end of text" : run.finish === "length" ? "max new tokens" : "stream ended";
      setStatus(`Done: ${progressText(run, "").trim()} · ${why}.`, "done");
    } catch (err) {
      if (err.name === "AbortError") {
        setStatus(`Stopped: ${progressText(run, "").trim()}.`, "stopped");
      } else {
        state.lastGoodStatus = run.steps.length
          ? { text: `Interrupted: ${progressText(run, "").trim()}.`, kind: "stopped" } : { text: "Ready.", kind: "" };
        setStatus(err instanceof ApiError ? err.message : `Request failed: ${err.message}`, "error");
      }
    } finally {
      state.streamAbort = null;
      setBusy(false);
      if (run.steps.length === 0) showPreviewPlaceholder();
    }
  }

  function stop() {
    // Aborting the fetch closes the connection; the server cancels the generation when it notices.
    if (state.streamAbort) state.streamAbort.abort();
  }

  function setBusy(busy) {
    ui.generate.disabled = busy;
    ui.stop.disabled = !busy;
    ui.output.setAttribute("aria-busy", String(busy));
  }

  function addStep(run, choice) {
    const explain = choice.explain || null;
    const step = {
      index: run.steps.length, token: explain ? explain.token : null, text: choice.text || "",
      explain, finish: choice.finish_reason || null,
    };
    step.span = tokenSpan(step);
    run.steps.push(step);
    // keep the newest token in view, unless the user scrolled up to read
    const out = ui.output;
    const atBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 24;
    out.append(step.span);
    if (atBottom) out.scrollTop = out.scrollHeight;
    if (state.selected === null) showStep(step.index); // follow the stream unless a step was clicked
  }

  /** One generated token as a span: its text, or its bytes when it is only part of a character. */
  function tokenSpan(step) {
    const span = el("span", "tok " + (step.index % 2 ? "odd" : "even"));
    span.dataset.step = String(step.index);
    const tok = step.token;
    if (!tok) { // a server that sent no explain: only the text is known
      span.textContent = step.text;
      return span;
    }
    let title = `token id ${tok.id} · step ${step.index + 1}`;
    if (tok.bytes) title += ` · bytes ${tok.bytes}`;
    if (!tok.partial && tok.text === "") { // <|endoftext|>: a token without text
      span.classList.add("special");
      span.textContent = tok.display;
      if (step.finish === "stop") title += " · end of text: generation stops here";
    } else if (tok.partial) {
      span.classList.add("partial");
      span.append(el("span", "tok-bytes", tok.display));
      title += "\nOnly part of a UTF-8 character: not text on its own.";
      // The bytes this token completed are decoded now: show the finished character(s) too.
      if (step.text) {
        span.append(el("span", "joined", step.text));
        title += `\nWith the bytes before it, this completes “${step.text}”.`;
      }
    } else {
      // Pending bytes of an unfinished character may be flushed (as �) before this token's text.
      if (step.text !== tok.text && step.text.endsWith(tok.text) && step.text.length > tok.text.length) {
        span.append(el("span", "joined", step.text.slice(0, step.text.length - tok.text.length)));
      }
      span.append(document.createTextNode(tok.text));
      if (tok.text.includes("\n")) span.classList.add("newline");
    }
    span.title = title;
    return span;
  }

  // ---------------------------------------------------------------------------------------------
  // Selecting a step and drawing its distribution

  function shownStepIndex() {
    const run = state.run;
    if (!run || run.steps.length === 0) return null;
    return state.selected ?? run.steps.length - 1;
  }

  /** Show step `index` as it was drawn (its recorded explain) and mark its token in Output. */
  function showStep(index) {
    const step = state.run.steps[index];
    for (const old of ui.output.querySelectorAll(".tok.shown")) old.classList.remove("shown");
    step.span.classList.add("shown");
    if (step.explain) {
      drawChart(step.explain, { step, whatIf: false });
    } else {
      ui.chart.replaceChildren(el("p", "placeholder", "The server sent no distribution for this step."));
    }
  }

  function selectStep(index) {
    const run = state.run;
    if (!run || index < 0 || index >= run.steps.length) return;
    cancelExplain();
    state.selected = index;
    showStep(index);
    run.steps[index].span.scrollIntoView({ block: "nearest" });
  }

  /** Text before a step, for the chart's heading: "…moves you the". */
  function contextTail(run, index, max = 48) {
    let text = run.prompt + run.steps.slice(0, index).map((s) => s.text).join("");
    text = text.replace(/\n/g, "↵");
    return text.length > max ? "…" + text.slice(-max) : text;
  }

  /**
   * Draw an explain object as a table: one row per candidate with three percentages (T = 1, the
   * chosen T, after top-k/top-p) and bars, an "(all others)" row, and the drawn token marked.
   * `step` is the generated step it belongs to (null: the token after the prompt, not yet drawn).
   */
  function drawChart(ex, { step = null, whatIf = false } = {}) {
    const run = state.run;
    const drawnId = step && step.token ? step.token.id : null;

    const where = el("p", "chart-context");
    if (step) {
      where.append(el("strong", "", `Step ${step.index + 1} of ${run.steps.length}`),
        ` · next token after “${contextTail(run, step.index)}”`);
    } else {
      const prompt = ui.prompt.value.replace(/\n/g, "↵");
      where.append(el("strong", "", "Preview"),
        ` · next token after “${prompt.length > 36 ? "…" + prompt.slice(-36) : prompt}”`);
    }

    const info = el("p", "chart-settings");
    info.append(el("span", "settings-text", describeSettings(ex)));
    if (step && step.explain && whatIf && !sameSettings(ex, step.explain)) {
      info.append(el("span", "what-if", `what if · drawn with ${describeSettings(step.explain)}`));
    } else if (step) {
      info.append(el("span", "as-drawn", "as drawn"));
    } else {
      info.append(el("span", "as-drawn", "not drawn yet"));
    }

    const table = el("table", "dist");
    const head = table.createTHead().insertRow();
    const tempHeading = ex.greedy ? "T = 0" : `T = ${ex.temperature}`;
    const masks = [];
    if (ex.top_k != null) masks.push(`top-k ${ex.top_k}`);
    if (ex.top_p != null) masks.push(`top-p ${ex.top_p}`);
    const finalHeading = ex.greedy ? "greedy: argmax" : (masks.length ? masks.join(" + ") : "no masking");
    for (const [text, cls, sub] of [["Token", "col-token", ""], ["T = 1", "col-num", "raw logits"],
      [tempHeading, "col-num", ex.greedy ? "one-hot" : "logits ÷ T"], ["Final", "col-num", finalHeading]]) {
      const th = el("th", cls, text);
      th.scope = "col";
      if (sub) th.append(el("small", "", sub));
      head.append(th);
    }

    const body = table.createTBody();
    let drawnShown = false;
    ex.candidates.forEach((c, rank) => {
      const row = body.insertRow();
      if (!c.kept) row.className = "masked";
      const cell = row.insertCell();
      cell.className = "col-token";
      cell.append(el("span", "rank", String(rank + 1)), tokenLabel(c.display));
      cell.title = `token id ${c.id}`;
      if (c.id === drawnId) {
        drawnShown = true;
        row.classList.add("drawn");
        cell.append(el("span", "badge drawn-badge", "drawn"));
      }
      if (!c.kept) cell.append(el("span", "badge masked-badge", ex.greedy ? "not argmax" : "masked"));
      for (const [p, kind] of [[c.p_base, "base"], [c.p_temp, "temp"], [c.p_final, "final"]]) {
        row.append(probabilityCell(p, kind));
      }
    });

    const others = ex.others || { p_base: 0, p_temp: 0, p_final: 0 };
    const row = body.insertRow();
    row.className = "others";
    const cell = row.insertCell();
    cell.className = "col-token";
    cell.append(el("span", "rank", "·"), el("span", "tok-label", "(all others)"));
    cell.title = "the probability of every token not listed above, added up";
    if (drawnId !== null && !drawnShown) {
      row.classList.add("drawn");
      cell.append(el("span", "badge drawn-badge", "drawn"));
    }
    for (const [p, kind] of [[others.p_base, "base"], [others.p_temp, "temp"], [others.p_final, "final"]]) {
      row.append(probabilityCell(p, kind));
    }

    const nodes = [where, info, table];
    if (drawnId !== null && !drawnShown) {
      const note = el("p", "chart-note");
      note.append("The drawn token ", tokenLabel(step.token.display),
        ` (id ${drawnId}) is not among the ${ex.candidates.length} most likely: it came from “(all others)”.`);
      nodes.push(note);
    }
    ui.chart.replaceChildren(...nodes);
  }

  function probabilityCell(p, kind) {
    const td = el("td", "col-num " + kind);
    const clamped = Math.min(1, Math.max(0, p || 0)); // float sums can stray just outside [0, 1]
    td.append(el("span", "pct", formatPercent(clamped)));
    const track = el("div", "track");
    const fill = el("div", "fill");
    // a nonzero probability keeps a 1px sliver (min-width in CSS): tiny is not zero
    if (clamped > 0) fill.classList.add("nonzero");
    fill.style.width = (clamped * 100).toFixed(3) + "%";
    track.append(fill);
    td.append(track);
    return td;
  }

  function showPreviewPlaceholder() {
    if (state.run && state.run.steps.length) return;
    ui.output.replaceChildren(el("span", "placeholder", "The generated tokens appear here."));
    state.run = null;
    scheduleExplain();
  }

  // ---------------------------------------------------------------------------------------------
  // "What if": re-explain the shown step (or the prompt) under the current settings

  function cancelExplain() {
    clearTimeout(state.explainTimer);
    if (state.explainAbort) state.explainAbort.abort();
    state.explainAbort = null;
    state.explainSeq++;
  }

  function scheduleExplain() {
    clearTimeout(state.explainTimer);
    state.explainTimer = setTimeout(explainNow, EXPLAIN_DELAY_MS);
  }

  async function explainNow() {
    if (state.streamAbort || !state.model) return; // while streaming the chart follows the stream
    let settings;
    try {
      settings = readSettings();
    } catch (err) {
      setStatus(err.message, "error");
      return;
    }
    const run = state.run;
    const index = shownStepIndex();
    let prompt;
    if (index !== null) {
      if (!run.promptIds) {
        setStatus("The server did not return the prompt's token ids, so this step cannot be re-explained.", "error");
        return;
      }
      // step i's context: the prompt's ids and the ids generated before step i, cut to the window
      const ids = run.promptIds.concat(run.steps.slice(0, index).map((s) => s.token.id));
      prompt = ids.slice(-state.model.context_length);
    } else {
      prompt = ui.prompt.value;
      if (!prompt) {
        ui.chart.replaceChildren(el("p", "placeholder", "Type a prompt to see which token the model would pick next."));
        return;
      }
    }

    cancelExplain();
    const seq = state.explainSeq;
    const abort = new AbortController();
    state.explainAbort = abort;
    try {
      const response = await postJson("/v1/explain", {
        model: state.model.id, prompt, temperature: settings.temperature, top_k: settings.top_k,
        top_p: settings.top_p, candidates: N_CANDIDATES,
      }, abort.signal);
      const ex = await response.json();
      if (seq !== state.explainSeq) return; // a newer request (or a generation) took over
      clearError();
      drawChart(ex, { step: index === null ? null : run.steps[index], whatIf: true });
    } catch (err) {
      if (err.name === "AbortError" || seq !== state.explainSeq) return;
      setStatus(err instanceof ApiError ? err.message : `Request failed: ${err.message}`, "error");
    } finally {
      if (state.explainAbort === abort) state.explainAbort = null;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Wiring

  async function loadModel() {
    try {
      const response = await fetch("/v1/models");
      if (!response.ok) throw await errorFrom(response);
      const model = (await response.json()).data[0];
      state.model = model;
      ui.modelName.textContent = model.id;
      ui.modelName.title = `context ${model.context_length} tokens · vocabulary ${model.vocab_size} tokens`;
      scheduleExplain();
    } catch (err) {
      ui.modelName.textContent = "unavailable";
      setStatus(`Cannot reach the server: ${err.message}`, "error");
    }
  }

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  ui.stop.addEventListener("click", stop);

  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.streamAbort) stop();
  });

  // The distribution depends on temperature, top-k and top-p only: re-draw on any change.
  for (const input of [ui.temperature, ui.topK, ui.topP]) input.addEventListener("input", scheduleExplain);
  ui.temperature.addEventListener("input", () => {
    const t = Number(ui.temperature.value);
    if (ui.temperature.value !== "" && Number.isFinite(t)) ui.slider.value = String(t);
  });
  ui.slider.addEventListener("input", () => {
    ui.temperature.value = String(Number(ui.slider.value));
    scheduleExplain();
  });
  // Before anything is generated, the chart previews the token after the prompt as it is typed.
  ui.prompt.addEventListener("input", () => {
    if (!state.run) scheduleExplain();
  });

  // Clicking a token (or the character it completed) shows the distribution it was drawn from.
  ui.output.addEventListener("click", (event) => {
    const span = event.target.closest(".tok");
    if (span) selectStep(Number(span.dataset.step));
  });
  // Keyboard: the Output box is focusable; the arrow keys move the selected step.
  ui.output.tabIndex = 0;
  ui.output.addEventListener("keydown", (event) => {
    const index = shownStepIndex();
    if (index === null) return;
    if (event.key === "ArrowLeft") selectStep(index - 1);
    else if (event.key === "ArrowRight") selectStep(index + 1);
    else return;
    event.preventDefault();
  });

  loadModel();
})();
