// instattr serve: progressive enhancement only; every page works without this script.
// Nothing here builds markup from data: it submits forms, and swaps in fragments that the server
// rendered with its escaping templates.
"use strict";

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

// The examples table: filter as soon as a choice changes (typing waits for a pause).
function autosubmit(form) {
  const submit = () => form.requestSubmit();
  form.querySelectorAll("select").forEach((el) => el.addEventListener("change", submit));
  form.querySelectorAll("input[type=search], input[type=number]").forEach((el) =>
    el.addEventListener("input", debounce(submit, 600)));
}

// The explain page: re-explain while the user types; stale answers are dropped.
function live(form) {
  const result = document.getElementById("result");
  const status = document.getElementById("status");
  let seq = 0;
  let pending = null;
  const run = async () => {
    const data = new FormData(form);
    if (!String(data.get("text") || "").trim()) return;
    if (form.querySelector("[name=query]") && !String(data.get("query") || "").trim()) return;
    const params = new URLSearchParams(data);
    const mine = ++seq;
    if (pending) pending.abort();
    pending = new AbortController();
    result.classList.add("busy");
    status.textContent = "explaining…";
    const started = performance.now();
    try {
      const response = await fetch("/explain?fragment=1&" + params.toString(), { signal: pending.signal });
      const html = await response.text();
      if (mine !== seq) return;
      result.innerHTML = html;            // server-rendered, escaped fragment
      history.replaceState(null, "", "/explain?" + params.toString());
      status.textContent = response.ok
        ? "explained in " + Math.round(performance.now() - started) + " ms"
        : "could not explain (" + response.status + ")";
    } catch (err) {
      if (err.name !== "AbortError") status.textContent = "could not reach the server";
    } finally {
      if (mine === seq) result.classList.remove("busy");
    }
  };
  const soon = debounce(run, 300);
  form.addEventListener("input", soon);
  form.addEventListener("change", soon);
  form.addEventListener("submit", (event) => { event.preventDefault(); run(); });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("form[data-autosubmit]").forEach(autosubmit);
  document.querySelectorAll("form[data-live]").forEach(live);
});
