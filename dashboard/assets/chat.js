// The chat page: sends the conversation to the gateway (as the signed-in user) and shows the
// answer as it streams, with the node that served it.
(function () {
  var form = document.getElementById("chat-form");
  if (!form) return;
  var log = document.getElementById("chat-log");
  var input = document.getElementById("chat-input");
  var model = document.getElementById("chat-model");
  var nodeEl = document.getElementById("chat-node");
  var send = document.getElementById("chat-send");
  var history = [];
  function bubble(role, text) {
    var p = document.createElement("p");
    p.className = "msg " + role;
    var who = document.createElement("strong");
    who.textContent = role === "user" ? "You: " : "Assistant: ";
    var span = document.createElement("span");
    span.textContent = text;
    p.appendChild(who);
    p.appendChild(span);
    log.appendChild(p);
    return span;
  }
  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = input.value.trim();
    if (!text || !model.value) return;
    history.push({ role: "user", content: text });
    bubble("user", text);
    input.value = "";
    send.disabled = true;
    var out = bubble("assistant", "");
    var answer = "";
    fetch("/ui/chat/send", {
      method: "POST",
      headers: { "content-type": "application/json", "x-csrf-token": form.getAttribute("data-csrf") },
      body: JSON.stringify({ model: model.value, messages: history, stream: true })
    }).then(function (resp) {
      nodeEl.textContent = resp.headers.get("x-nebula-node") ? "served by " + resp.headers.get("x-nebula-node") : "";
      if (!resp.ok) {
        return resp.text().then(function (t) {
          var msg = t;
          try { msg = JSON.parse(t).error.message; } catch (err) { /* not JSON */ }
          out.textContent = "[" + resp.status + "] " + msg;
        });
      }
      var reader = resp.body.getReader();
      var dec = new TextDecoder();
      var buf = "";
      function pump() {
        return reader.read().then(function (r) {
          if (r.done) return;
          buf += dec.decode(r.value, { stream: true });
          var i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            var ev = buf.slice(0, i);
            buf = buf.slice(i + 2);
            ev.split("\n").forEach(function (line) {
              if (line.indexOf("data: ") !== 0) return;
              var data = line.slice(6);
              if (data === "[DONE]") return;
              try {
                var v = JSON.parse(data);
                if (v.error) { answer += " [" + v.error.message + "]"; }
                var c = v.choices && v.choices[0] && v.choices[0].delta && v.choices[0].delta.content;
                if (c) answer += c;
                out.textContent = answer;
              } catch (err) { /* a partial line */ }
            });
          }
          return pump();
        });
      }
      return pump().then(function () { history.push({ role: "assistant", content: answer }); });
    }).catch(function (err) {
      out.textContent = "[error] " + err;
    }).finally(function () { send.disabled = false; input.focus(); });
  });
})();
