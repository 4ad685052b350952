// deployhook status pages: live log following (the only thing that needs JavaScript).
// The server sends each line already rendered and escaped; `id:` is the line number, so a
// reconnecting EventSource resumes after the last line it got (Last-Event-ID).
(function () {
  "use strict";
  var log = document.getElementById("log");
  if (!log || !log.dataset.follow || !window.EventSource) return;
  var state = document.getElementById("follow-state");
  var say = function (t) { if (state) { state.hidden = false; state.textContent = t; } };
  var nearBottom = function () {
    return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 80;
  };
  var es = new EventSource(log.dataset.follow);
  say("Following the log live…");
  es.addEventListener("line", function (e) {
    var stick = nearBottom();
    var empty = log.querySelector(".empty");
    if (empty) empty.remove();
    log.insertAdjacentHTML("beforeend", e.data);
    if (stick) window.scrollTo(0, document.documentElement.scrollHeight);
    say("Following the log live…");
  });
  es.addEventListener("status", function (e) {
    var summary = document.getElementById("summary");
    if (summary) summary.outerHTML = e.data;
  });
  es.addEventListener("end", function () {
    es.close();
    say("The build has stopped; the log is complete.");
  });
  es.onerror = function () {
    if (es.readyState !== EventSource.CLOSED) say("Connection lost; reconnecting…");
  };
})();
