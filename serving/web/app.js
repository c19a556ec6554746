// The page of api.py: ask a question, show its subqueries (streamed for greedy decoding), keep a history
// of this browser tab. No framework, no build step; the text of answers and errors is set with
// textContent only (never parsed as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("ask"), box = $("question"), beams = $("beams"), maxTokens = $("max-tokens");
const list = $("subqueries"), answer = $("answer"), statusLine = $("status"), errorBox = $("error");
const historyList = $("history"), historyEmpty = $("history-empty");
const HISTORY_KEY = "query-reformulation.history", HISTORY_MAX = 50;

let inFlight = null; // AbortController of the question being answered: a new question cancels it

class ApiError extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status; // 0: no HTTP status (network failure, or an error event inside a stream)
    this.type = error.type || "";
  }
}

// ------------------------------------------------------------------ talking to api.py

async function errorFrom(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return new ApiError(response.status, body.error);
  } catch (_) { /* not JSON: a proxy's page, say */ }
  return new ApiError(response.status, { message: `HTTP ${response.status} ${response.statusText}`.trim() });
}

async function post(path, body, signal, accept) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST", signal, body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", Accept: accept },
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { message: "could not reach the server (is api.py still running?)", type: "network" });
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

// Beam search: /v1/reformulate, one JSON answer.
async function reformulate(body, signal) {
  const response = await post("/v1/reformulate", body, signal, "application/json");
  const result = await response.json();
  return { ...result, subqueries: result.subqueries[0] };
}

// Greedy: /v1/reformulate/stream, server-sent events "piece" {text}, then "done" (the JSON answer) or "error".
async function reformulateStreaming(body, signal, onText) {
  const response = await post("/v1/reformulate/stream", body, signal, "text/event-stream");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", text = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, { message: "the connection to the server was lost during the answer", type: "network" });
    }
    const { value, done } = chunk;
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event.type === "piece") onText((text += event.data.text));
      else if (event.type === "done") return { ...event.data, subqueries: event.data.subqueries[0] };
      else if (event.type === "error") throw new ApiError(0, event.data.error);
    }
  }
  throw new ApiError(0, { message: "the answer stream ended before the answer did", type: "network" });
}

function parseEvent(block) {
  let type = "message", data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  return { type, data: data ? JSON.parse(data) : null };
}

// ------------------------------------------------------------------ showing things

function showSubqueries(subqueries) {
  list.replaceChildren(...subqueries.map((text) => {
    const item = document.createElement("li");
    item.textContent = text;
    return item;
  }));
}

function describe(result) {
  const options = result.num_beams > 1 ? `${result.num_beams} beams` : "greedy";
  return `${Math.round(result.latency_ms)} ms · ${result.backend} · ${result.model} · ${options}, ` +
    `max ${result.max_new_tokens} tokens`;
}

function showResult(result) {
  showSubqueries(result.subqueries);
  statusLine.textContent = (result.subqueries.length ? "" : "The model wrote no subqueries. ") + describe(result);
}

const TITLES = { timeout: "Timed out", unavailable: "Server busy", too_large: "Too long", network: "No connection",
                 generation_error: "Generation failed", empty: "No question" };

function showError(err) {
  let title = TITLES[err.type] || (err.status >= 500 ? "Server error" : err.status ? "Not accepted" : "Error");
  if (err.status === 503) title = "Server busy";
  if (err.status === 504) title = "Timed out";
  const code = err.status ? ` (HTTP ${err.status})` : "";
  const retry = err.type === "unavailable" || err.status === 503 ? ". Try again in a moment" : "";
  errorBox.textContent = `${title}: ${err.message}${code}${retry}`;
  errorBox.hidden = false;
}

function clearAnswer() {
  errorBox.hidden = true;
  errorBox.textContent = "";
  list.replaceChildren();
  statusLine.textContent = "";
}

// ------------------------------------------------------------------ history (sessionStorage: this tab only)

function loadHistory() {
  try {
    const entries = JSON.parse(sessionStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(entries) ? entries : [];
  } catch (_) {
    return [];
  }
}

function saveHistory(entries) {
  try {
    sessionStorage.setItem(HISTORY_KEY, JSON.stringify(entries.slice(0, HISTORY_MAX)));
  } catch (_) { /* storage full or disabled: the history just is not kept */ }
  renderHistory();
}

function renderHistory() {
  const entries = loadHistory();
  historyEmpty.hidden = entries.length > 0;
  historyList.replaceChildren(...entries.map((entry) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link";
    button.textContent = entry.query;
    button.addEventListener("click", () => {
      box.value = entry.query;
      beams.value = entry.num_beams;
      maxTokens.value = entry.max_new_tokens;
      clearAnswer();
      showResult(entry);
      box.focus();
    });
    const answerText = document.createElement("span");
    answerText.className = "meta";
    answerText.textContent = ` → ${entry.subqueries.join(" | ") || "(none)"}`;
    item.append(button, answerText);
    return item;
  }));
}

// ------------------------------------------------------------------ the form

// questions answered or refused so far, as data-answered on the answer box (what a test waits for)
function countAnswered() {
  answer.dataset.answered = Number(answer.dataset.answered || 0) + 1;
}

function option(input) {
  const value = Number(input.value);
  // anything but a whole number goes to the API as typed, and comes back as its validation message
  return input.value.trim() !== "" && Number.isInteger(value) ? value : input.value;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  box.focus();
  const query = box.value;
  if (!query.trim()) {
    clearAnswer();
    showError({ type: "empty", status: 0, message: "type a question first" });
    countAnswered();
    return;
  }
  const body = { query, num_beams: option(beams), max_new_tokens: option(maxTokens) };
  if (inFlight) inFlight.abort();
  const controller = (inFlight = new AbortController());
  clearAnswer();
  answer.setAttribute("aria-busy", "true");
  statusLine.textContent = "Generating…";
  try {
    const result = body.num_beams === 1
      ? await reformulateStreaming(body, controller.signal, (text) => {
        showSubqueries(text.split("|").map((part) => part.trim()).filter(Boolean));
      })
      : await reformulate(body, controller.signal);
    const entry = { ...result, query, num_beams: body.num_beams, max_new_tokens: body.max_new_tokens };
    showResult(entry);
    saveHistory([entry, ...loadHistory()]);
  } catch (err) {
    if (err.name === "AbortError") return; // a newer question took over
    list.replaceChildren();
    statusLine.textContent = "";
    showError(err instanceof ApiError ? err : new ApiError(0, { message: String(err) }));
  } finally {
    if (inFlight === controller) {
      inFlight = null;
      answer.setAttribute("aria-busy", "false");
      countAnswered();
    }
  }
});

$("clear-history").addEventListener("click", () => {
  saveHistory([]);
  box.focus();
});

// What is served, and the server's limits as the inputs' bounds.
fetch("/v1/model", { headers: { Accept: "application/json" } })
  .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`HTTP ${response.status}`))))
  .then((info) => {
    $("model").textContent = `${info.model} · ${info.backend}${info.dtype ? ` · ${info.dtype}` : ""}`;
    beams.max = info.limits.max_beams;
    maxTokens.max = info.limits.max_new_tokens;
  })
  .catch((err) => { $("model").textContent = `Model information unavailable (${err.message}).`; });

renderHistory();
box.focus();
