// A container's log, live: batches of lines from server-sent events, appended to
// #container-log (the newest 5000 kept, so a long follow holds bounded memory here too),
// filtered by the search box, paused on demand (lines that come meanwhile are held, bounded).
(function () {
  var pre = document.getElementById("container-log");
  if (!pre || !window.EventSource) return;
  var search = document.getElementById("log-search");
  var pause = document.getElementById("log-pause");
  var status = document.getElementById("log-status");
  var KEEP = 5000, paused = false, held = [], count = 0;
  function matches(text) {
    var q = search.value.toLowerCase();
    return !q || text.toLowerCase().indexOf(q) >= 0;
  }
  function add(l) {
    var div = document.createElement("div");
    div.className = "line " + l.stream;
    div.textContent = l.line;
    div.title = l.t;
    div.hidden = !matches(l.line);
    pre.appendChild(div);
    count++;
    while (pre.childElementCount > KEEP) pre.removeChild(pre.firstElementChild);
  }
  function show(batch) {
    var atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    batch.forEach(add);
    if (atBottom) pre.scrollTop = pre.scrollHeight;
    status.textContent = "following · " + count + " lines";
  }
  var es = new EventSource(pre.getAttribute("data-src"));
  es.onopen = function () { status.textContent = "following"; };
  es.addEventListener("logs", function (e) {
    var batch = JSON.parse(e.data);
    if (paused) { held = held.concat(batch).slice(-KEEP); return; }
    show(batch);
  });
  es.addEventListener("end", function () {
    status.textContent = "the log ended (" + count + " lines)";
    es.close();
  });
  es.addEventListener("error", function (e) {
    // An `error` event from the server carries why; a dropped connection carries nothing.
    // Either way, stop: reconnecting would replay the tail and show lines twice.
    status.textContent = e.data ? JSON.parse(e.data).message : "disconnected; reload to follow again";
    es.close();
  });
  search.addEventListener("input", function () {
    Array.prototype.forEach.call(pre.children, function (d) { d.hidden = !matches(d.textContent); });
  });
  pause.addEventListener("click", function () {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? "Resume" : "Pause";
    if (!paused) { show(held); held = []; }
  });
})();
