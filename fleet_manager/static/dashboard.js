// edgefleet dashboard: refreshes the live parts of a page and posts action forms without a reload.
// Live parts: <div class="live" data-live="URL?partial=1" data-every="MS">; the server renders the HTML.
// Action forms: <form data-async [data-confirm="question"]>; they carry the page's CSRF token.
(function () {
  "use strict";

  var lastHtml = new WeakMap();

  function toLogin() {
    window.location.href = "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
  }

  function toast(text, bad) {
    var box = document.getElementById("toast");
    if (!box) return;
    box.textContent = text;
    box.className = bad ? "bad" : "ok";
    box.hidden = false;
    clearTimeout(box._timer);
    box._timer = setTimeout(function () { box.hidden = true; }, bad ? 8000 : 3500);
  }

  function refresh(region) {
    if (region.dataset.busy) return Promise.resolve();
    region.dataset.busy = "1";
    return fetch(region.dataset.live, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { "X-Requested-With": "fetch" }
    }).then(function (response) {
      if (response.status === 401) { toLogin(); return; }
      if (!response.ok) { region.classList.add("stale"); return; }
      return response.text().then(function (html) {
        region.classList.remove("stale");
        if (lastHtml.get(region) !== html) {
          region.innerHTML = html;
          lastHtml.set(region, html);
        }
      });
    }).catch(function () {
      region.classList.add("stale");
    }).finally(function () {
      delete region.dataset.busy;
    });
  }

  function refreshAll() {
    return Promise.all(Array.prototype.map.call(document.querySelectorAll(".live[data-live]"), refresh));
  }

  function startPolling() {
    document.querySelectorAll(".live[data-live]").forEach(function (region) {
      var every = Math.max(500, parseInt(region.dataset.every || "3000", 10));
      setInterval(function () {
        if (!document.hidden) refresh(region);
      }, every);
    });
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) refreshAll();
    });
  }

  function submitAsync(form) {
    var buttons = form.querySelectorAll("button");
    buttons.forEach(function (b) { b.disabled = true; });
    return fetch(form.action, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-Requested-With": "fetch", "Accept": "application/json" },
      body: new URLSearchParams(new FormData(form))
    }).then(function (response) {
      if (response.status === 401) { toLogin(); return; }
      return response.json().then(function (body) {
        if (response.ok && body.ok) toast(body.message || "done", false);
        else toast(body.error || ("failed: HTTP " + response.status), true);
      }, function () {
        toast("failed: HTTP " + response.status, true);
      });
    }).catch(function () {
      toast("the fleet manager did not answer", true);
    }).finally(function () {
      buttons.forEach(function (b) { b.disabled = false; });
      return refreshAll();
    });
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-async")) return;
    event.preventDefault();
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    submitAsync(form);
  });

  // A form's "target_all" box greys out the narrower target fields it overrides.
  function syncTargetFields() {
    var all = document.getElementById("target_all");
    if (!all) return;
    ["groups", "tags", "device_ids"].forEach(function (id) {
      var field = document.getElementById(id);
      if (field) field.disabled = all.checked;
    });
  }
  document.addEventListener("change", function (event) {
    if (event.target && event.target.id === "target_all") syncTargetFields();
  });

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { syncTargetFields(); startPolling(); });
  } else {
    syncTargetFields();
    startPolling();
  }
})();
