// keyplane dashboard: dialogs, copy buttons, confirmations. Everything works without it except these niceties.
(function () {
  "use strict";
  function toast(text) {
    var el = document.getElementById("toast");
    if (!el) return;
    el.textContent = text;
    el.classList.add("show");
    setTimeout(function () { el.classList.remove("show"); }, 2000);
  }
  document.addEventListener("click", function (event) {
    var target = event.target.closest("[data-open],[data-close],[data-copy]");
    if (!target) return;
    if (target.hasAttribute("data-open")) {
      var dialog = document.getElementById(target.getAttribute("data-open"));
      if (dialog) { dialog.showModal(); var first = dialog.querySelector("input:not([type=hidden]),select,textarea,button"); if (first) first.focus(); }
    } else if (target.hasAttribute("data-close")) {
      target.closest("dialog").close();
    } else {
      var source = document.querySelector(target.getAttribute("data-copy"));
      var text = source ? source.textContent.trim() : "";
      var done = function () { target.setAttribute("data-copied", "true"); toast("Copied"); };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
      } else { fallback(text); done(); }
    }
  });
  function fallback(text) {
    var area = document.createElement("textarea");
    area.value = text; area.setAttribute("readonly", ""); area.style.position = "fixed"; area.style.opacity = "0";
    document.body.appendChild(area); area.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing else to try */ }
    document.body.removeChild(area);
  }
  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) event.preventDefault();
  });
  function openModals() {
    document.querySelectorAll("dialog[data-modal][open]").forEach(function (d) { d.close(); d.showModal(); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    openModals();
    if (window.htmx) {
      // Show refusals (4xx) in place instead of silently ignoring them.
      htmx.config.responseHandling = [
        { code: "204", swap: false }, { code: "[23]..", swap: true },
        { code: "[4]..", swap: true, error: true }, { code: "[5]..", swap: false, error: true }];
    }
  });
})();
