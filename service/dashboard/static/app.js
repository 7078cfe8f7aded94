// The dashboard's entry: the token box, what this session may do, and hash routing:
//   #/ or #/runs?label=k:v&status=s   the runs page
//   #/runs/<run_id>                   one run
//   #/designer                        the schedule designer

import { probeSession, token } from "./api.js";
import { designerPage } from "./designer.js";
import { runPage } from "./run.js";
import { runsPage } from "./runs.js";

const view = document.getElementById("view");
const banner = document.getElementById("banner");
const badge = document.getElementById("session-badge");
const tokenInput = document.getElementById("token-input");
let session = { reads: false, admin: false, open: false, name: "", role: "", message: "" };
let page = null;

function showSession() {
  badge.textContent = !session.reads ? "signed out" : session.open ? "open server" : session.admin ? "admin" : "read-only";
  badge.className = `badge session ${session.admin ? "admin" : session.reads ? "reader" : "none"}`;
  badge.dataset.role = session.role || "none";
  badge.title = session.name ? `token: ${session.name} (${session.role})` : "";
  tokenInput.placeholder = token.get() ? "token set (enter another to switch)" : "API token";
  banner.hidden = session.reads;
  banner.textContent = session.message;
}

function route() {
  const hash = window.location.hash || "#/";
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", hash.startsWith("#/designer") ? link.dataset.nav === "designer" : link.dataset.nav === "runs");
  }
  if (page) page.stop();
  page = null;
  view.replaceChildren();
  if (!session.reads) return; // the banner says why: no (valid) token
  const runMatch = hash.match(/^#\/runs\/([^?]+)/);
  if (runMatch) page = runPage(view, session, decodeURIComponent(runMatch[1]));
  else if (hash.startsWith("#/designer")) page = designerPage(view, session);
  else page = runsPage(view, session);
}

async function start() {
  session = await probeSession();
  showSession();
  route();
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const value = tokenInput.value.trim();
  if (!value) return;
  token.set(value);
  tokenInput.value = "";
  start();
});
document.getElementById("token-forget").addEventListener("click", () => { token.clear(); start(); });
window.addEventListener("hashchange", route);
start();
