// Live updates: the server sends rendered fragments over server-sent events; each replaces the
// element with the same id (or, for a new node card, is appended to #cards).
(function () {
  var src = document.body.getAttribute("data-live");
  if (!src || !window.EventSource) return;
  var opened = false;
  var es;
  // After the stream was lost (a controller restart, a replica taking over as leader), events
  // may have been missed: once it opens again, the page is loaded afresh. A stream the browser
  // gave up on (an error answer while no replica led) is opened again after a few seconds.
  function connect() {
    es = new EventSource(src);
    es.onopen = function () {
      if (opened) location.reload();
      opened = true;
    };
    es.onerror = function () {
      if (es.readyState === EventSource.CLOSED) {
        setTimeout(connect, 2000 + Math.random() * 3000);
      }
    };
    listen(es);
  }
  function place(html, container) {
    var t = document.createElement("template");
    t.innerHTML = html.trim();
    var el = t.content.firstElementChild;
    if (!el || !el.id) return;
    var old = document.getElementById(el.id);
    if (old) old.replaceWith(el);
    else if (container) {
      var c = document.getElementById(container);
      if (c) c.appendChild(el);
      var empty = document.getElementById("no-" + container);
      if (empty) empty.remove();
    }
  }
  function listen(es) {
    es.addEventListener("node", function (e) { place(e.data, "cards"); });
    es.addEventListener("gone", function (e) {
      var el = document.getElementById(e.data);
      if (el) el.remove();
    });
    es.addEventListener("fragment", function (e) { place(e.data, null); });
    // After events were missed, the server lists the node cards there are: others are gone.
    es.addEventListener("present", function (e) {
      var keep = {};
      e.data.split(" ").forEach(function (id) { keep[id] = true; });
      var cards = document.getElementById("cards");
      if (!cards) return;
      Array.prototype.slice.call(cards.children).forEach(function (c) {
        if (c.id && c.id.indexOf("node-") === 0 && !keep[c.id]) c.remove();
      });
    });
    es.addEventListener("log", function (e) {
      var pre = document.getElementById("log");
      if (!pre) return;
      var line = JSON.parse(e.data);
      pre.appendChild(document.createTextNode(line.line + "\n"));
    });
    es.addEventListener("end", function (e) {
      var s = document.getElementById("job-state");
      var rec = JSON.parse(e.data);
      if (s) { s.textContent = rec.state; s.className = "badge " + rec.state; }
      opened = false;
      es.close();
    });
  }
  connect();
})();
