// The API as the page uses it: the token (kept in sessionStorage only, so it dies with the
// tab), fetch with the error shape {detail, code, errors: [{field, message}]}, and the role.

const TOKEN_KEY = "lrserve.token";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY) || "",
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** A non-2xx answer; `errors` is the body's field list (possibly empty). */
export class ApiError extends Error {
  constructor(status, body) {
    const detail = (body && body.detail) || `HTTP ${status}`;
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.code = body && body.code;
    this.errors = (body && Array.isArray(body.errors) && body.errors) || [];
  }
}

/** Call the API; returns the parsed body or throws ApiError (network errors: status 0). */
export async function api(path, { method = "GET", body, query } = {}) {
  const url = new URL(path, window.location.origin);
  for (const [key, value] of Object.entries(query || {})) {
    for (const v of [].concat(value)) if (v !== undefined && v !== null && v !== "") url.searchParams.append(key, v);
  }
  const headers = { accept: "application/json" };
  const secret = token.get();
  if (secret) headers.authorization = `Bearer ${secret}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, { detail: `the server did not answer (${err.message})`, code: "network" });
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text.slice(0, 200) }; }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/**
 * What this session may do: {reads, admin, open, name, role, message}, from GET /v1/whoami
 * (the token's name and role; any valid token may ask). An open server (no tokens) answers
 * admin to everyone.
 */
export async function probeSession() {
  const session = { reads: false, admin: false, open: false, name: "", role: "", message: "" };
  let me;
  try {
    me = await api("/v1/whoami");
  } catch (err) {
    session.message = err.status === 401
      ? (token.get() ? "This token is not accepted." : "This server needs a token: enter it above.")
      : err.message;
    return session;
  }
  session.name = me.name;
  session.role = me.role;
  session.reads = true;
  session.admin = me.role === "admin";
  session.open = !token.get() && session.admin;
  return session;
}

/** Run `fn` over `items` with at most `limit` calls in flight (the runs page's fan-out). */
export async function mapLimited(items, limit, fn) {
  const out = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

/**
 * Wrap an async refresh so calls never overlap: a call made while one is in flight runs
 * once more after it (a filter changed mid-refresh is not lost, timers do not pile up).
 */
export function coalesced(fn) {
  let busy = false;
  let queued = false;
  const run = async () => {
    if (busy) { queued = true; return; }
    busy = true;
    try {
      await fn();
    } finally {
      busy = false;
      if (queued) { queued = false; run(); }
    }
  };
  return run;
}
