// Live events: GET /v1/events read with fetch (an EventSource cannot send the token) and
// parsed as Server-Sent Events. After a drop, or an "overflow" cut-off, it reconnects with
// Last-Event-ID, so no event is missed or shown twice (docs/events.md).

import { token } from "./api.js";

const FIRST_RETRY_MS = 1000;
const MAX_RETRY_MS = 30000;

/**
 * Follow the events matching `query` ({run_id, label, kind}) from now on.
 * `onEvent(event)` gets each event's JSON (with its global `id`); `onState(state)` gets
 * "live" or "reconnecting". Returns {stop}.
 */
export function liveEvents(query, onEvent, onState = () => {}) {
  let stopped = false;
  let lastId = null;
  let controller = null;
  let retryMs = FIRST_RETRY_MS;

  const url = new URL("/v1/events", window.location.origin);
  for (const [key, value] of Object.entries(query || {})) {
    for (const v of [].concat(value)) if (v !== undefined && v !== null && v !== "") url.searchParams.append(key, v);
  }

  function dispatch(message) {
    if (message.id !== null) lastId = message.id;
    if (message.event === "message" && message.data.length) onEvent(JSON.parse(message.data.join("\n")));
    // "overflow": the server ends the stream after it; the loop reconnects from lastId
  }

  async function readOnce() {
    controller = new AbortController();
    const headers = { accept: "text/event-stream" };
    const secret = token.get();
    if (secret) headers.authorization = `Bearer ${secret}`;
    if (lastId !== null) headers["last-event-id"] = lastId;
    const response = await fetch(url, { headers, signal: controller.signal, cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    onState("live");
    retryMs = FIRST_RETRY_MS;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let message = { event: "message", id: null, data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line === "") {
          dispatch(message);
          message = { event: "message", id: null, data: [] };
        } else if (!line.startsWith(":")) { // ": ping" heartbeats are comments
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") message.data.push(text);
          else if (field === "event") message.event = text;
          else if (field === "id") message.id = text;
        }
      }
    }
  }

  (async () => {
    while (!stopped) {
      try {
        await readOnce();
      } catch {
        // dropped, refused or aborted: wait, then resume after lastId
      }
      if (stopped) return;
      onState("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, retryMs));
      retryMs = Math.min(retryMs * 2, MAX_RETRY_MS);
    }
  })();

  return {
    stop() {
      stopped = true;
      if (controller) controller.abort();
    },
  };
}
