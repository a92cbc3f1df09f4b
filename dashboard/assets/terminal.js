// A terminal in a container: xterm.js (from Debian's packages, bundled into the binary) over
// a WebSocket to the controller. Binary messages carry bytes (output tagged 1 stdout,
// 2 stderr); text messages carry the window size one way and the exit status the other.
(function () {
  var box = document.getElementById("terminal");
  var open = document.getElementById("terminal-open");
  var status = document.getElementById("terminal-status");
  if (!box || !open || !window.Terminal || !window.WebSocket) return;
  open.addEventListener("click", function () {
    open.disabled = true;
    box.textContent = "";
    var term = new Terminal({ cursorBlink: true, rendererType: "dom", rows: 24, cols: 80 });
    term.open(box);
    try { Terminal.fit(term); } catch (e) { /* keep 24x80 */ }
    var cmd = document.getElementById("terminal-cmd").value || "sh";
    var url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host +
      box.getAttribute("data-src") + "?cmd=" + encodeURIComponent(cmd) +
      "&rows=" + term.rows + "&cols=" + term.cols;
    var ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    var enc = new TextEncoder(), dec = new TextDecoder();
    status.textContent = "connecting…";
    ws.onopen = function () { status.textContent = "connected"; term.focus(); };
    ws.onmessage = function (e) {
      if (typeof e.data === "string") {
        var m = JSON.parse(e.data);
        if (m.error) status.textContent = m.error;
        else if ("exit" in m) status.textContent = "exited with status " + m.exit;
        return;
      }
      term.write(dec.decode(new Uint8Array(e.data).subarray(1), { stream: true }));
    };
    ws.onclose = function () {
      if (status.textContent === "connected" || status.textContent === "connecting…") {
        status.textContent = "closed";
      }
      open.disabled = false;
    };
    term.on("data", function (d) { if (ws.readyState === 1) ws.send(enc.encode(d)); });
    term.on("resize", function (s) {
      if (ws.readyState === 1) ws.send(JSON.stringify({ resize: { rows: s.rows, cols: s.cols } }));
    });
    window.addEventListener("resize", function () {
      try { Terminal.fit(term); } catch (e) { /* unchanged */ }
    });
  });
})();
