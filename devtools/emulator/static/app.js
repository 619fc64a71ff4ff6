// The sandbox page: polls the emulator's timeline and draws the chat and the side panel from it.
"use strict";

const TYPING_SECONDS = 20;  // Messenger switches the indicator off by itself after about 20 s
const state = { seq: 0, events: [], users: [], selected: null, info: null, open: new Set() };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function poll() {
  try {
    const response = await fetch(`/api/state?after=${state.seq}`);
    const data = await response.json();
    const first = state.info === null;
    state.info = data;
    state.users = data.users;
    if (state.selected === null && state.users.length) state.selected = state.users[0].psid;
    if (data.events.length) {
      state.events.push(...data.events);
      state.seq = data.events[data.events.length - 1].seq;
    }
    if (first) renderHeader();
    render();
  } catch (error) {
    $("webhook").textContent = "sandbox not reachable: " + error;
  }
  setTimeout(poll, 300);
}

function renderHeader() {
  const info = state.info;
  $("page-name").textContent = `${info.page.name} (page id ${info.page.id})`;
  $("model-label").textContent = info.model.label;
  $("model-label").classList.toggle("offline", info.model.mode === "offline");
  $("webhook").textContent = `bot webhook: ${info.webhook}`;
}

function eventsOf(psid) {
  return state.events.filter((e) => e.psid === psid);
}

function render() {
  renderUsers();
  const mine = eventsOf(state.selected);
  renderThread(mine);
  renderPanel(mine);
}

function renderUsers() {
  const nav = $("users");
  nav.replaceChildren(...state.users.map((user) => {
    const messages = eventsOf(user.psid).filter((e) => e.kind === "message");
    const last = messages[messages.length - 1];
    const button = el("button", { class: "user" + (user.psid === state.selected ? " selected" : ""),
                                  "data-psid": user.psid, type: "button" },
      el("span", { class: "avatar" }, user.name[0]),
      el("span", {}, el("div", {}, user.name), el("div", { class: "preview" }, last ? preview(last) : "")));
    button.addEventListener("click", () => { state.selected = user.psid; render(); $("text").focus(); });
    return button;
  }));
  const user = state.users.find((u) => u.psid === state.selected);
  $("chat-title").textContent = user ? `${user.name} \u2194 ${state.info.page.name}` : "";
}

function preview(message) {
  const who = message.sender === "user" ? "" : "Page: ";
  return who + (message.text || (message.type === "image" ? "[image]" : ""));
}

function renderThread(mine) {
  const thread = $("thread");
  const atBottom = thread.scrollHeight - thread.scrollTop - thread.clientHeight < 40;
  const lastSeen = mine.filter((e) => e.kind === "action" && e.action === "mark_seen").pop();
  const userMessages = mine.filter((e) => e.kind === "message" && e.sender === "user");
  const seenAt = lastSeen ? userMessages.filter((m) => m.seq < lastSeen.seq).pop() : null;
  const nodes = [];
  for (const event of mine) {
    if (event.kind !== "message") continue;
    nodes.push(bubble(event));
    if (event.by === "inbox") nodes.push(el("div", { class: "by" }, "a person, from the Page inbox"));
    if (seenAt && event.seq === seenAt.seq) nodes.push(el("div", { class: "seen", id: "seen" }, "Seen"));
  }
  if (isTyping(mine)) {
    nodes.push(el("div", { id: "typing", "aria-label": "typing" }, el("span"), el("span"), el("span")));
  }
  thread.replaceChildren(...nodes);
  if (atBottom) thread.scrollTop = thread.scrollHeight;
}

function bubble(event) {
  const classes = ["bubble", event.sender];
  if (event.by === "inbox") classes.push("inbox");
  if (event.type === "postback") classes.push("postback");
  const node = el("div", { class: classes.join(" "), "data-mid": event.mid });
  if (event.type === "image") node.append(el("img", { src: event.image_url, alt: "image attachment" }));
  else node.append(event.text);
  return node;
}

function isTyping(mine) {
  let on = null;
  for (const event of mine) {
    if (event.kind === "action" && event.action === "typing_on") on = event;
    else if ((event.kind === "action" && event.action === "typing_off") ||
             (event.kind === "message" && event.sender === "page")) on = null;
  }
  return on !== null && Date.now() - on.at < TYPING_SECONDS * 1000;
}

function renderPanel(mine) {
  const steps = $("steps");
  const turns = [];
  for (const event of mine) {
    if (event.kind === "message" && (event.sender === "user" || event.by === "inbox")) {
      const who = event.sender === "user" ? userName(event.psid) : "Page inbox (a person)";
      const said = event.text || `[${event.type}]`;
      turns.push(el("div", { class: "turn" }, el("h3", {}, `${who}: \u201c${said}\u201d`)));
    } else if (turns.length && ["webhook", "webhook_failed", "graph", "model"].includes(event.kind)) {
      turns[turns.length - 1].append(step(event));
    }
  }
  const atBottom = steps.parentElement.scrollHeight - steps.parentElement.scrollTop
                   - steps.parentElement.clientHeight < 40;
  steps.replaceChildren(...turns);
  if (atBottom) steps.parentElement.scrollTop = steps.parentElement.scrollHeight;
}

function userName(psid) {
  const user = state.users.find((u) => u.psid === psid);
  return user ? user.name : psid;
}

function step(event) {
  const ok = event.status === 200 || event.status === "200";
  const node = el("div", { class: "step " + event.kind + (ok ? "" : " error"), "data-kind": event.kind });
  let title = "", detail = null;
  if (event.kind === "webhook") {
    const echo = JSON.stringify(event.body).includes('"is_echo":true');
    title = `${echo ? "echo " : ""}POST /webhook \u2192 ${event.status} in ${event.ms} ms (attempt ${event.attempt})`;
    detail = event.body;
    node.prepend(el("span", { class: "kind" }, "Webhook"));
  } else if (event.kind === "webhook_failed") {
    title = `gave up after ${event.attempts} attempts; Meta would disable the webhook`;
    node.prepend(el("span", { class: "kind" }, "Webhook"));
  } else if (event.kind === "graph") {
    const action = event.request.body && event.request.body.sender_action;
    const what = event.path.endsWith("/conversations") ? "history" : action || "send";
    title = `${event.method} ${event.path.replace(/^\/v[\d.]+/, "")} (${what}) \u2192 ${event.status} in ${event.ms} ms`;
    detail = { request: event.request, response: event.response };
    node.prepend(el("span", { class: "kind" }, "Graph"));
  } else if (event.kind === "model") {
    title = `${event.mode === "offline" ? "offline stand-in" : "model"} \u2192 ${event.status} in ${event.ms} ms`;
    node.prepend(el("span", { class: "kind" }, "Model"));
    const list = el("ol", { class: "model-messages" });
    for (const message of event.messages || []) {
      list.append(el("li", { "data-role": message.role }, el("span", { class: "role" }, message.role), message.content));
    }
    if (event.reply != null) {
      list.append(el("li", { "data-role": "reply" }, el("span", { class: "role" }, "\u2192 reply"), event.reply));
    }
    node.append(title, list);
    return node;
  }
  node.append(title);
  if (detail) {
    const details = el("details", {}, el("summary", {}, "details"),
                       el("pre", {}, JSON.stringify(detail, null, 2)));
    if (state.open.has(event.seq)) details.open = true;
    details.addEventListener("toggle", () => {
      if (details.open) state.open.add(event.seq); else state.open.delete(event.seq);
    });
    node.append(details);
  }
  return node;
}

async function act(action, body) {
  if (!state.selected) return;
  const response = await fetch(`/api/users/${state.selected}/${action}`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!response.ok) alert((await response.json()).error);
}

function sendsText(formId, inputId, action) {
  $(formId).addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $(inputId).value.trim();
    if (!text) return;
    $(inputId).value = "";
    act(action, { text });
  });
}

sendsText("composer", "text", "messages");
sendsText("inbox", "inbox-text", "inbox");
$("image").addEventListener("click", () => act("image", {}));
for (const chip of document.querySelectorAll("#shortcuts .chip")) {
  chip.addEventListener("click", () => {
    if (chip.dataset.postback) act("postback", { text: chip.textContent, payload: chip.dataset.postback });
    else act("messages", { text: chip.textContent, quick_reply: chip.dataset.quick });
  });
}
poll();
