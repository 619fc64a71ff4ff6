/* The website chat widget: <script src="https://bot.example/webchat.js" data-title="Ask us" data-color="#0b5fff"></script>
 * A chat bubble in a Shadow DOM (the host page's styles and scripts stay out), keyboard and screen-reader
 * usable, full screen on a phone. Answers stream in (server-sent events over fetch) and are only ever set
 * as text, never as HTML. The conversation and its messages are kept in localStorage: a reload shows them.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.__webchatLoaded) return;
  window.__webchatLoaded = true;
  var api = (script.getAttribute("data-api") || new URL(script.src, location.href).origin).replace(/\/$/, "");
  var title = script.getAttribute("data-title") || "Chat with us";
  var color = /^#[0-9a-fA-F]{3,8}$|^[a-zA-Z]+$/.test(script.getAttribute("data-color") || "") ?
    script.getAttribute("data-color") : "#0b5fff";
  var storeKey = "webchat:" + api;
  var state = load();

  var host = document.createElement("div");
  host.setAttribute("data-webchat", "");
  var root = host.attachShadow({ mode: "open" });
  root.innerHTML =
    '<style>' +
    ':host{all:initial}*{box-sizing:border-box;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}' +
    '.bubble{position:fixed;right:20px;bottom:20px;width:56px;height:56px;border-radius:50%;border:0;cursor:pointer;' +
    'background:var(--c);color:#fff;box-shadow:0 4px 14px rgba(0,0,0,.25);z-index:2147483000;font-size:26px}' +
    '.bubble:focus-visible,button:focus-visible,textarea:focus-visible{outline:3px solid #ffbf47;outline-offset:2px}' +
    '.panel{position:fixed;right:20px;bottom:88px;width:360px;max-width:calc(100vw - 24px);height:520px;' +
    'max-height:calc(100vh - 110px);display:flex;flex-direction:column;background:#fff;color:#111;border-radius:12px;' +
    'box-shadow:0 8px 30px rgba(0,0,0,.3);z-index:2147483000;overflow:hidden}' +
    '.panel[hidden]{display:none}' +
    'header{background:var(--c);color:#fff;padding:12px 14px;display:flex;align-items:center;justify-content:space-between}' +
    'header h2{font-size:16px;margin:0}header button{background:none;border:0;color:#fff;font-size:22px;cursor:pointer}' +
    '.log{flex:1;overflow-y:auto;padding:12px;display:flex;flex-direction:column;gap:8px;font-size:15px}' +
    '.msg{max-width:85%;padding:8px 11px;border-radius:14px;white-space:pre-wrap;overflow-wrap:anywhere;line-height:1.35}' +
    '.me{align-self:flex-end;background:var(--c);color:#fff}.bot{align-self:flex-start;background:#eef0f3}' +
    '.note{align-self:center;color:#8a1c1c;font-size:13px;text-align:center}' +
    'form{display:flex;gap:6px;padding:10px;border-top:1px solid #ddd}' +
    'textarea{flex:1;resize:none;font-size:15px;padding:8px;border:1px solid #bbb;border-radius:8px;height:42px}' +
    'form button{background:var(--c);color:#fff;border:0;border-radius:8px;padding:0 14px;font-size:15px;cursor:pointer}' +
    'form button:disabled{opacity:.5;cursor:default}' +
    '.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}' +
    '@media (max-width:480px){.panel{right:0;bottom:0;width:100vw;max-width:100vw;height:100%;max-height:100%;border-radius:0}}' +
    '</style>' +
    '<button class="bubble" type="button" aria-haspopup="dialog" aria-expanded="false"><span aria-hidden="true">\u{1F4AC}</span>' +
    '<span class="sr"></span></button>' +
    '<section class="panel" role="dialog" aria-modal="false" hidden>' +
    '<header><h2></h2><button type="button" class="close" aria-label="Close the chat">\u00d7</button></header>' +
    '<div class="log" role="log" aria-live="polite" aria-relevant="additions text"></div>' +
    '<form><label class="sr" for="webchat-text">Your message</label>' +
    '<textarea id="webchat-text" rows="1" placeholder="Write a message\u2026"></textarea>' +
    '<button type="submit">Send</button></form></section>';
  host.style.setProperty("--c", color);
  var bubble = root.querySelector(".bubble"), panel = root.querySelector(".panel"), log = root.querySelector(".log");
  var form = root.querySelector("form"), input = root.querySelector("textarea"), send = root.querySelector("form button");
  root.querySelector(".bubble .sr").textContent = "Open the chat: " + title;
  root.querySelector("h2").textContent = title;
  panel.setAttribute("aria-label", title);
  state.messages.forEach(function (m) { add(m.who, m.text); });

  function load() {
    try {
      var saved = JSON.parse(localStorage.getItem(storeKey) || "null");
      if (saved && Array.isArray(saved.messages)) return saved;
    } catch (e) { /* private mode, or damaged: start afresh */ }
    return { conversation: null, messages: [] };
  }
  function save() {
    state.messages = state.messages.slice(-50);
    try { localStorage.setItem(storeKey, JSON.stringify(state)); } catch (e) { /* storage full or off */ }
  }
  function add(who, text) {
    var item = document.createElement("div");
    item.className = "msg " + (who === "note" ? "note" : who);
    item.textContent = text;  // text only: an answer holding <img onerror=...> stays words
    log.appendChild(item);
    log.scrollTop = log.scrollHeight;
    return item;
  }
  function open(yes) {
    panel.hidden = !yes;
    bubble.setAttribute("aria-expanded", String(yes));
    (yes ? input : bubble).focus();
  }
  bubble.addEventListener("click", function () { open(panel.hidden); });
  root.querySelector(".close").addEventListener("click", function () { open(false); });
  panel.addEventListener("keydown", function (e) { if (e.key === "Escape") open(false); });
  input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); }
  });
  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var text = input.value.trim();
    if (!text || send.disabled) return;
    input.value = "";
    add("me", text);
    state.messages.push({ who: "me", text: text });
    save();
    ask(text, true);
  });

  function ask(text, retryUnknown) {
    send.disabled = true;
    var reply = null, shown = "";
    var body = { message: text };
    if (state.conversation) body.conversation = state.conversation;
    return fetch(api + "/api/chat", {
      method: "POST", headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      body: JSON.stringify(body)
    }).then(function (response) {
      var type = response.headers.get("Content-Type") || "";
      if (type.indexOf("text/event-stream") !== 0) {
        return response.json().then(function (error) {
          if (error.error === "unknown_conversation" && retryUnknown) {
            state.conversation = null; save();
            return ask(text, false);
          }
          add("note", error.message || "The chat is not available right now.");
        });
      }
      return readEvents(response.body.getReader(), function (name, data) {
        if (name === "start") { state.conversation = data.conversation; save(); }
        else if (name === "delta") {
          if (!reply) reply = add("bot", "");
          shown += data.text; reply.textContent = shown;
          log.scrollTop = log.scrollHeight;
        } else if (name === "done") {
          if (!reply) reply = add("bot", "");
          reply.textContent = data.answer;
          state.conversation = data.conversation;
          state.messages.push({ who: "bot", text: data.answer }); save();
        } else if (name === "error") {
          add("note", data.message || "No answer this time. Please try again.");
        }
      });
    }).catch(function () {
      add("note", "The chat could not be reached. Check your connection and try again.");
    }).then(function () { send.disabled = false; });
  }

  function readEvents(reader, onEvent) {
    var decoder = new TextDecoder(), buffer = "";
    function pump() {
      return reader.read().then(function (chunk) {
        if (chunk.done) return;
        buffer += decoder.decode(chunk.value, { stream: true });
        var parts = buffer.split("\n\n");
        buffer = parts.pop();
        parts.forEach(function (block) {
          var name = "message", data = "";
          block.split("\n").forEach(function (line) {
            if (line.indexOf("event: ") === 0) name = line.slice(7);
            else if (line.indexOf("data: ") === 0) data += line.slice(6);
          });
          try { onEvent(name, JSON.parse(data)); } catch (e) { /* a line that is not ours */ }
        });
        return pump();
      });
    }
    return pump();
  }

  (document.body || document.documentElement).appendChild(host);
})();
