// The sandbox page: polls the emulator's timeline and draws the chat and the side panel from it.
// Drawing is incremental: each event is added once, to its user's view, and nothing already on the
// page is rebuilt, so a selection, an open "details" or a scroll position survives every poll.
"use strict";

const TYPING_SECONDS = 20;  // Messenger switches the indicator off by itself after about 20 s
const POLL_MS = 300;
// Exchange-log outcomes that leave the user without an ordinary answer, as a note in the chat.
const NOTES = {
  "paused": "The bot stays quiet: a person answers from the Page inbox (HUMAN_PAUSE).",
  "rate-limited": "Rate limited: more messages than RATE_LIMIT allows. No model call.",
  "reset": "Conversation reset: the bot forgets what came before (RESET_WORD).",
  "over-budget": "Over DAILY_TOKEN_BUDGET for today. No model call.",
  "fallback": "The model failed: the fallback reply was sent (see the Model step).",
  "unsupported": "Not text: the unsupported-message reply was sent.",
  "failed": "The reply failed: nothing more will be sent for this message.",
  "window-closed": "Meta's messaging window is closed: the reply was dropped, nothing was sent.",
  "unknown": "Nothing in the knowledge base answers this (KNOWLEDGE_MODE=only): KNOWLEDGE_UNKNOWN_REPLY was sent. " +
             "No model call.",
};
const EXCERPT_SHOWN = 240;  // characters of an excerpt shown before "more"
// What Meta's side did to the conversation, as a note in the chat.
const THREAD_NOTES = {
  passed: "The bot passed the conversation to the Page inbox (pass_thread_control): a person answers from here.",
  back: "The Page inbox passed the conversation back to the bot (pass_thread_control): the bot answers again.",
  window: "Meta's messaging window for this user is closed: the Send API refuses the next reply (10/2018278).",
};
const STEPS = ["webhook", "webhook_failed", "graph", "download", "transcription", "model", "outcome", "webchat"];
// The website visitor: one view for every web conversation (the exchange log's psid "web:<conversation>").
const WEB = "web";
const SAID = { image: "[photo]", audio: "[voice note]", sticker: "[sticker]", video: "[video]", file: "[file]" };
const LIKE_STICKER_ID = 369239263222822;
// One account is shown at a time (a Page's Messenger, or its Instagram): its users, each user's own view.
const state = { seq: 0, info: null, account: null, selected: null, chosen: new Map(), views: new Map() };
const $ = (id) => document.getElementById(id);
const typing = el("div", { id: "typing", "aria-label": "typing" }, el("span"), el("span"), el("span"));

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
    if (state.info === null) renderHeader(data);
    state.info = data;
    for (const user of data.users) viewOf(user.psid, user.name, user.account).withPerson = user.with_person;
    if (data.webchat && !state.views.has(WEB)) viewOf(WEB, data.webchat.name, data.webchat.account).web = true;
    const thread = $("thread"), panel = $("panel");
    const stick = [thread, panel].map(atBottom);
    for (const event of data.events) {
      state.seq = Math.max(state.seq, event.seq);
      if (event.psid) add(viewOf(event.psid.startsWith("web:") ? WEB : event.psid, null, event.account), event);
    }
    if (state.account === null && data.accounts.length) showAccount(data.accounts[0].id);
    refresh();
    [thread, panel].forEach((box, i) => { if (stick[i]) box.scrollTop = box.scrollHeight; });
  } catch (error) {
    $("webhook").textContent = "sandbox not reachable: " + error;
  }
  setTimeout(poll, POLL_MS);
}

function atBottom(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 40;
}

function renderHeader(info) {
  for (const account of info.accounts) $("account").append(el("option", { value: account.id }, account.label));
  $("account").addEventListener("change", () => showAccount($("account").value));
  $("model-label").textContent = info.model.label;
  $("model-label").classList.toggle("offline", info.model.mode === "offline");
  $("webhook").textContent = `bot webhook: ${info.webhook}`;
  const knowledge = info.knowledge || {};
  $("knowledge-label").textContent = knowledge.mode === "off" ? "knowledge base: off"
    : knowledge.sources != null ? `knowledge base: ${knowledge.sources} documents, ${knowledge.chunks} chunks ` +
                                  `(${knowledge.page})` : "knowledge base: empty";
}

function accountOf(id) {
  return state.info.accounts.find((account) => account.id === id) || state.info.accounts[0];
}

// The users and conversations of one account; the user chosen there last (or its first) is selected.
function showAccount(id) {
  const account = accountOf(id);
  state.account = account.id;
  $("account").value = account.id;
  document.body.dataset.platform = account.platform;
  $("page-name").textContent = account.platform === "instagram"
    ? `Instagram account ${account.id}, linked to Page ${account.page_id}` : `Page id ${account.id}`;
  const views = [...state.views.values()].filter((view) => view.account === account.id);
  for (const view of state.views.values()) view.button.hidden = view.account !== account.id;
  const chosen = state.chosen.get(account.id) || (views[0] && views[0].psid);
  if (chosen) return select(chosen);
  state.selected = null;
  $("chat-name").textContent = `${account.label}: no users yet`;
  $("thread").replaceChildren();
  $("steps").replaceChildren();
}

// -- one view per user: their bubbles, their turns in the panel, their entry in the list --------
function viewOf(psid, name, account) {
  let view = state.views.get(psid);
  if (view) return view;
  name = name || `User ${psid.slice(-4)}`;
  account = accountOf(account).id;
  const preview = el("div", { class: "preview" });
  const button = el("button", { class: "user", "data-psid": psid, type: "button" },
    el("span", { class: "avatar" }, name[0]),
    el("span", { class: "who" }, el("div", { class: "name" }, name), preview));
  button.addEventListener("click", () => { select(psid); $("text").focus(); });
  button.hidden = state.account !== null && account !== state.account;
  $("users").append(button);
  view = { psid, name, account, button, preview, thread: el("div", { class: "messages" }), turns: el("div"),
           seen: el("div", { class: "seen", id: "seen" }, "Seen"), turn: null, lastUser: null, last: null,
           userMessages: 0, typingAt: null, quick: new Map(), withPerson: false,
           replayed: new Map() };
  state.views.set(psid, view);
  return view;
}

function select(psid) {
  if (state.selected === psid) return;
  state.selected = psid;
  const view = state.views.get(psid);
  state.chosen.set(view.account, psid);
  for (const other of state.views.values()) other.button.classList.toggle("selected", other === view);
  $("chat-name").textContent = view.web
    ? `${view.name} \u2194 ${accountOf(view.account).name}'s website chat (WEBCHAT): the bubble, bottom right`
    : `${view.name} \u2194 ${accountOf(view.account).label}`;
  document.body.dataset.channel = view.web ? "web" : "messenger";
  if (view.web && !view.thread.childElementCount) view.thread.append(website());
  $("thread").replaceChildren(view.thread);
  $("steps").replaceChildren(view.turns);
  refresh();
  $("thread").scrollTop = $("thread").scrollHeight;
  $("panel").scrollTop = $("panel").scrollHeight;
}

// The bot's widget demo page (/webchat/demo, from its website-chat listener), as a visitor sees the site.
function website() {
  return el("iframe", { id: "website", src: state.info.webchat.demo,
                        title: "A website with the bot's chat widget (the website chat's demo page)" });
}

function add(view, event) {
  if (event.kind === "webchat" && event.phase === "request") {
    view.turn = el("div", { class: "turn" }, el("h3", {}, `${view.name}: \u201c${event.text || ""}\u201d`));
    view.turns.append(view.turn);
    view.preview.textContent = event.text || "";
  } else if (view.web) {
    // The widget in the page says what happened in words; the panel shows the steps.
  } else if (event.kind === "message") {
    view.thread.append(bubble(event));
    if (event.by === "inbox") view.thread.append(el("div", { class: "by" }, "a person, from the Page inbox"));
    view.last = event;
    view.preview.textContent = preview(event);
    if (event.sender === "user") { view.lastUser = view.thread.lastChild; view.userMessages += 1; }
    if (event.sender === "page") view.typingAt = null;
    if (event.sender === "user" || event.by === "inbox") {
      const who = event.sender === "user" ? view.name : "Page inbox (a person)";
      view.turn = el("div", { class: "turn" }, el("h3", {}, `${who}: \u201c${said(event)}\u201d`));
      view.turns.append(view.turn);
    }
  } else if (event.kind === "action") {
    if (event.action === "typing_on") view.typingAt = event.at;
    else if (event.action === "typing_off") view.typingAt = null;
    else if (event.action === "mark_seen" && view.lastUser) view.lastUser.after(view.seen);
  } else if (event.kind === "outcome" && NOTES[event.outcome]) {
    view.thread.append(el("div", { class: "note", "data-outcome": event.outcome }, NOTES[event.outcome]));
  } else if (event.kind === "graph" && event.path.endsWith("/pass_thread_control") && event.status === 200) {
    view.thread.append(el("div", { class: "note", "data-thread": "passed" }, THREAD_NOTES.passed));
  } else if (event.kind === "handover") {
    view.thread.append(el("div", { class: "note", "data-thread": "back" }, THREAD_NOTES.back));
    view.turn = el("div", { class: "turn" }, el("h3", {}, "Page inbox (a person): passed the thread back to the bot"));
    view.turns.append(view.turn);
  } else if (event.kind === "window") {
    view.thread.append(el("div", { class: "note", "data-thread": "window" }, THREAD_NOTES.window));
  }
  if (event.kind === "graph") rememberQuickReplies(view, event);
  if (view.turn && STEPS.includes(event.kind)) {
    view.turn.append(forgetReplayedTwin(view, event, step(event)));
    if (event.kind === "outcome" && event.knowledge) view.turn.knowledge = event.knowledge;
    if (event.kind === "outcome" || event.kind === "model") showScores(view.turn);
  }
}

// What changes with time or with the selected user; each part is touched only when it changes.
function refresh() {
  const view = state.views.get(state.selected);
  if (!view) return;
  const typingOn = view.typingAt !== null && Date.now() - view.typingAt < TYPING_SECONDS * 1000;
  if (typingOn && !typing.isConnected) $("thread").append(typing);
  if (!typingOn && typing.isConnected) typing.remove();
  $("get-started").hidden = view.userMessages > 0;
  $("with-person").hidden = !view.withPerson;
  for (const other of state.views.values()) other.button.classList.toggle("with-person", other.withPerson);
  const offered = view.last && view.last.sender === "page" ? view.last.quick_replies || [] : [];
  const key = view.psid + "\n" + offered.join("\n");
  if ($("quick").dataset.key !== key) {
    $("quick").dataset.key = key;
    const mid = view.last && view.last.mid;
    // A tap sends the title as text and the payload the bot gave it (read from its Send API call,
    // which may reach the page a poll after the message itself), as Messenger does.
    $("quick").replaceChildren(...offered.map((title) => chip(title, () => {
      const payload = (view.quick.get(mid) || {})[title];
      act("messages", { text: title, quick_reply: payload || title });
    })));
  }
}

// devtools/replayed.py takes the emulator's own deliveries without a message id (a handover, a
// reaction) for replays and shows them a second time: the emulator's step replaces its twin.
function forgetReplayedTwin(view, event, node) {
  if (event.kind !== "webhook") return node;
  const body = JSON.stringify(event.body);
  if (event.replayed) view.replayed.set(body, node);
  else if (view.replayed.has(body)) { view.replayed.get(body).remove(); view.replayed.delete(body); }
  return node;
}

function rememberQuickReplies(view, event) {
  const message = event.request.body && event.request.body.message;
  const mid = event.response && event.response.message_id;
  if (!mid || !message || !message.quick_replies) return;
  view.quick.set(mid, Object.fromEntries(message.quick_replies.map((q) => [q.title, q.payload])));
}

function preview(message) {
  return (message.sender === "user" ? "" : "Page: ") + said(message);
}

function said(message) {
  return message.text || SAID[message.type] || `[${message.type || "attachment"}]`;
}

function bubble(event) {
  const classes = ["bubble", event.sender];
  if (event.by === "inbox") classes.push("inbox");
  if (event.type === "postback") classes.push("postback");
  if (event.attachments && !event.text) classes.push("bare");  // a photo or sticker alone: no bubble around it
  const node = el("div", { class: classes.join(" "), "data-mid": event.mid, "data-type": event.type || "text" });
  const media = (event.attachments || [])[0];
  if (event.image_url) node.append(el("img", { src: event.image_url, alt: "photo sent by the user" }));
  else if (event.type === "audio") {
    node.append(el("audio", { src: media.payload.url, controls: "", "aria-label": "voice note" }));
  }
  else if (event.type === "sticker") node.append(sticker(media.payload));
  else if (!event.text) node.append(said(event));
  if (event.text) node.append(event.text);
  return node;
}

// The like sticker drawn as the composer's thumbs-up (headless browsers may lack an emoji font).
function sticker(payload) {
  if (payload.sticker_id !== LIKE_STICKER_ID) {
    return el("img", { src: payload.url, alt: `sticker ${payload.sticker_id}` });
  }
  const like = $("like").querySelector("svg").cloneNode(true);
  like.setAttribute("role", "img");
  like.setAttribute("aria-label", "like sticker");
  like.removeAttribute("aria-hidden");
  like.classList.add("like");
  return like;
}

function step(event) {
  const failed = event.kind === "webhook_failed" || ("status" in event && String(event.status) !== "200");
  const node = el("div", { class: "step " + event.kind + (failed ? " error" : ""), "data-kind": event.kind });
  let kind = "", title = "", detail = null;
  if (event.kind === "webhook") {
    const body = JSON.stringify(event.body);
    const echo = body.includes('"is_echo":true');
    const handover = ["pass_thread_control", "take_thread_control"].find((name) => body.includes(`"${name}":`));
    const standby = body.includes('"standby":') ? "standby " : "";  // a thread the inbox owns: only watched
    const how = event.replayed ? "replayed " : standby + (echo ? "echo " : handover ? `${handover} ` : "");
    kind = "Webhook";
    title = `${how}POST /webhook (object ${event.body.object}) \u2192 ${event.status} in ${event.ms} ms` +
            (event.replayed ? "" : ` (attempt ${event.attempt})`);
    detail = event.body;
  } else if (event.kind === "webhook_failed") {
    kind = "Webhook";
    title = `gave up after ${event.attempts} attempts; Meta would disable the webhook`;
  } else if (event.kind === "graph") {
    const action = event.request.body && event.request.body.sender_action;
    const name = event.path.split("/").pop();
    const what = name === "conversations" ? " (history)" : name === "messages" ? ` (${action || "send"})` : "";
    kind = "Graph";
    title = `${event.method} ${event.path.replace(/^\/v[\d.]+/, "")}${what} \u2192 ${event.status} in ${event.ms} ms`;
    detail = { request: event.request, response: event.response };
  } else if (event.kind === "outcome") {
    const about = [event.channel === "web" && "channel web", event.model,
                   event.total_tokens != null && `${event.total_tokens} tokens`].filter(Boolean);
    kind = "Exchange log";
    node.dataset.outcome = event.outcome;
    title = event.outcome + (about.length ? ` (${about.join(", ")})` : "") +
            (event.latency_ms != null ? ` in ${event.latency_ms} ms` : "");
    if (event.knowledge) node.append(el("div", { class: "knowledge-note" }, knowledgeNote(event.knowledge)));
  } else if (event.kind === "model") {
    kind = "Model";
    title = `${event.mode === "offline" ? "offline stand-in" : "model"} \u2192 ${event.status} in ${event.ms} ms` +
            (event.stream ? " (streamed)" : "");
  } else if (event.kind === "webchat") {
    kind = "Website chat";
    title = webchatTitle(event);
    if (event.phase === "answer" && (event.message || event.left)) {
      node.classList.add("error");
      node.append(el("div", { class: "reason" }, event.message || "the visitor left before the end"));
    }
  } else if (event.kind === "download") {
    kind = "Download";
    const size = event.size != null ? `, ${Math.max(1, Math.round(event.size / 1024))} KB` : "";
    const file = event.path.split("/").pop();
    title = `${event.method} ${file} from Meta's CDN \u2192 ${event.status}${size} in ${event.ms} ms`;
  } else if (event.kind === "transcription") {
    kind = "Transcription";
    const length = event.seconds != null ? ` (${event.seconds.toFixed(1)} s of audio)` : "";
    title = `${event.model || "?"}${length} \u2192 ${event.status} in ${event.ms} ms`;
  }
  node.append(el("span", { class: "kind" }, kind), title);
  if (event.account) node.prepend(el("span", { class: "account" }, accountOf(event.account).label));
  if (event.kind === "download" && event.had_token) {
    node.classList.add("error");
    node.append(el("div", { class: "reason" },
                   "the request carried a token: Meta's CDN needs none, never send the Page token"));
  }
  if (event.kind === "transcription") {
    if (event.error) node.append(el("div", { class: "reason" }, errorText(event.error)));
    if (event.text != null) node.append(el("div", { class: "transcript" }, `\u201c${event.text}\u201d`));
  }
  if (event.kind === "model") {
    if (event.error) node.append(el("div", { class: "reason" }, errorText(event.error)));
    const list = el("ol", { class: "model-messages" });
    for (const [i, message] of (event.messages || []).entries()) {
      if (event.knowledge && event.knowledge.at === i) { list.append(knowledgeBlock(event.knowledge)); continue; }
      list.append(el("li", { "data-role": message.role }, el("span", { class: "role" }, message.role),
                     ...contentNodes(message.content)));
    }
    if (event.reply != null) {
      list.append(el("li", { "data-role": "reply" }, el("span", { class: "role" }, "\u2192 reply"), event.reply));
    }
    node.append(list);
  }
  if (detail) {
    node.append(el("details", {}, el("summary", {}, "details"), el("pre", {}, JSON.stringify(detail, null, 2))));
  }
  return node;
}

// The knowledge base's excerpts (the system message after the prompt) as a block of their own: each
// excerpt's number, title and source, its text (folded when long), its score once the exchange log has it.
function knowledgeBlock(knowledge) {
  const block = el("li", { "data-role": "knowledge", class: "knowledge" }, el("span", { class: "role" }, "Knowledge"),
                   el("span", { class: "header" }, knowledge.header));
  for (const excerpt of knowledge.excerpts) {
    const label = el("div", { class: "label" }, el("span", { class: "number" }, `[${excerpt.number}]`),
                     el("span", { class: "title" }, excerpt.title), el("span", { class: "source" }, excerpt.source),
                     el("span", { class: "score" }));
    block.append(el("div", { class: "excerpt", "data-number": excerpt.number }, label, excerptText(excerpt.text)));
  }
  return block;
}

function excerptText(text) {
  if (text.length <= EXCERPT_SHOWN) return el("div", { class: "text" }, text);
  const start = text.slice(0, EXCERPT_SHOWN).replace(/\s+\S*$/, "");
  return el("details", { class: "text" }, el("summary", {}, el("span", { class: "start" }, start + " \u2026"),
                                             el("span", { class: "less" }, "less")), text);
}

// The exchange log's [chunk, score] pairs are in the excerpts' order: [1] first. Either may come first.
function showScores(turn) {
  const blocks = turn.querySelectorAll(".knowledge");
  if (!turn.knowledge || !blocks.length) return;
  turn.knowledge.forEach((logged, i) => {
    const excerpt = blocks[blocks.length - 1].querySelector(`.excerpt[data-number="${i + 1}"]`);
    if (!excerpt) return;
    excerpt.dataset.chunk = logged.chunk_id;
    const score = excerpt.querySelector(".score");
    score.textContent = `score ${Number(logged.score).toFixed(3)}`;
    score.title = `chunk ${logged.chunk_id}` + (logged.title ? ` of \u201c${logged.title}\u201d (${logged.source})`
                                                             : ", removed from the knowledge base since");
  });
}

function knowledgeNote(logged) {
  if (!logged.length) return "knowledge: nothing relevant";
  const chunks = logged.map((item, i) => `[${i + 1}] chunk ${item.chunk_id}, ${Number(item.score).toFixed(3)}`);
  return `knowledge: ${chunks.join("; ")}`;
}

// POST /api/chat as the sandbox saw it pass: the request, then how the answer came (streamed or whole).
function webchatTitle(event) {
  const how = event.stream ? "text/event-stream" : "JSON";
  if (event.phase === "request") return `POST /api/chat \u2192 ${event.status} (${how})`;
  const streamed = event.stream
    ? `${event.deltas} delta${event.deltas === 1 ? "" : "s"}, the first after ${event.first_delta_ms} ms, ` : "";
  return `${event.outcome || event.error || event.status}: ${streamed}all in ${event.ms} ms`;
}

// A message's content: a string, or OpenAI's parts (text, and images shown as thumbnails when small).
function contentNodes(content) {
  if (!Array.isArray(content)) return [content == null ? "" : String(content)];
  return content.map((part) => {
    if (part.type === "text") return el("span", { class: "part" }, part.text);
    if (part.type === "image_url" && part.image_url && part.image_url.url) {
      const about = part.about || "";
      return el("img", { class: "thumbnail", src: part.image_url.url, alt: `image sent to the model: ${about}`,
                         title: about });
    }
    return el("span", { class: "part image" }, `[image: ${part.about || part.type}]`);
  });
}

// OpenAI's error object (or a proxy's): type, code and param first, then the message.
function errorText(error) {
  if (typeof error !== "object") return String(error);
  const named = [error.type, error.code, error.param && `param ${error.param}`].filter(Boolean).join(" / ");
  return [named, error.message].filter(Boolean).join(": ") || JSON.stringify(error);
}

function chip(text, onClick) {
  const button = el("button", { type: "button", class: "chip" }, text);
  button.addEventListener("click", onClick);
  return button;
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
$("handback").addEventListener("click", () => act("handback", {}));
$("close-window").addEventListener("click", () => act("close-window", {}));
for (const action of ["image", "voice", "like"]) $(action).addEventListener("click", () => act(action, {}));
for (const button of document.querySelectorAll("#shortcuts [data-postback], #shortcuts [data-quick]")) {
  button.addEventListener("click", () => {
    if (button.dataset.postback) act("postback", { text: button.textContent, payload: button.dataset.postback });
    else act("messages", { text: button.textContent, quick_reply: button.dataset.quick });
  });
}
setInterval(refresh, 1000);  // the typing indicator times out by itself
poll();
