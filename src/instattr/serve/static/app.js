// instattr serve: progressive enhancement only; every page works without this script.
// Nothing here builds markup from data: it submits forms, and swaps in fragments that the server
// rendered with its escaping templates.
//
// The script is loaded in <head> without `defer` and listens on `document` (event delegation), so
// its handlers exist before the first control of the page is parsed: a choice made while the page
// is still loading is never lost (a deferred script attaching on DOMContentLoaded missed them).
"use strict";

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

// The examples table: filter as soon as a choice changes (typing waits for a pause).
const typed = new WeakMap();      // form -> its debounced submit
function autosubmit(form, event) {
  const el = event.target;
  if (event.type === "change" && el.matches("select")) {
    form.requestSubmit();
  } else if (event.type === "input" && el.matches("input[type=search], input[type=number]")) {
    if (!typed.has(form)) typed.set(form, debounce(() => form.requestSubmit(), 600));
    typed.get(form)();
  }
}

// The explain page: re-explain while the user types; stale answers are dropped.
const explainers = new WeakMap(); // form -> {soon, run}
function explainer(form) {
  if (explainers.has(form)) return explainers.get(form);
  let seq = 0;
  let pending = null;
  const run = async () => {
    const result = document.getElementById("result");
    const status = document.getElementById("status");
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
  const made = { soon: debounce(run, 300), run };
  explainers.set(form, made);
  return made;
}

function dispatch(event) {
  const form = event.target instanceof Element ? event.target.closest("form") : null;
  if (!form) return;
  if (form.matches("[data-autosubmit]") && event.type !== "submit") {
    autosubmit(form, event);
  } else if (form.matches("[data-live]")) {
    if (event.type === "submit") {
      event.preventDefault();
      explainer(form).run();
    } else {
      explainer(form).soon();
    }
  }
}

for (const type of ["change", "input", "submit"]) document.addEventListener(type, dispatch);
