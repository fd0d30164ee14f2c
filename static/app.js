"use strict";
// Browser client for the wsapp rooms protocol on /ws.
// Everything that came over the socket reaches the page through textContent only: message text,
// names and error messages are data, never markup.
// Opened as `/#token=<jwt>`, it signs in with that token: the fragment never reaches a server or its
// logs, and the socket carries the token as a `bearer.<jwt>` subprotocol entry, not in its URL.
(() => {
  const PING_MS = 25000; // below common proxy idle cuts (Heroku: 55 s)
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const MAX_LOG_ITEMS = 500; // keeps a long-open tab from growing without bound
  const ROOM_RE = /^[A-Za-z0-9_.:-]{1,64}$/;
  const JWT_RE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/; // base64url: valid in a subprotocol

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    joinForm: $("join-form"),
    name: $("name"),
    room: $("room"),
    joinBtn: $("join-btn"),
    error: $("error"),
    members: $("members"),
    memberCount: $("member-count"),
    roomTitle: $("room-title"),
    log: $("log"),
    sendForm: $("send-form"),
    text: $("text"),
    sendBtn: $("send-btn"),
  };

  const state = {
    token: "", // from #token=; the server then names us after the token's subject
    ws: null,
    wanted: false, // the user asked to be in a room; false after Leave
    joined: false,
    name: "", // what we asked for
    myName: "", // what the server calls us (welcome.name)
    room: "",
    limits: {},
    lastSeq: null, // highest seq seen in the room; `since` on re-join
    epoch: null, // the room's numbering life (joined.epoch); sent with `since` so a restart is told apart
    roomRestarted: false,
    seen: new Set(), // seqs already shown, so a replay never shows a message twice
    members: new Map(), // name -> connection count: one name may be connected twice
    pending: new Map(), // publish id -> list item, until its ack
    unconfirmed: [], // own messages whose ack was lost with the connection
    nextId: 1,
    pingId: 0,
    attempt: 0,
    retryTimer: 0,
    pingTimer: 0,
    lastRx: 0, // when the last frame arrived
    lastPingAt: 0,
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(kind, text) {
    ui.status.dataset.state = kind;
    ui.status.textContent = text;
  }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.hidden = true;
    ui.error.textContent = "";
  }

  // ---- rendering -------------------------------------------------------------------------------

  function appendToLog(item) {
    const log = ui.log;
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.append(item);
    while (log.childElementCount > MAX_LOG_ITEMS) log.firstElementChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function timeElement(ts) {
    const when = typeof ts === "number" ? new Date(ts) : new Date();
    const node = el("time", "time", when.toLocaleTimeString());
    node.dateTime = when.toISOString();
    return node;
  }

  function textOf(data) {
    if (data && typeof data === "object" && typeof data.text === "string") return data.text;
    return JSON.stringify(data); // another kind of client: show its payload, still as text
  }

  function renderMessage(from, ts, text, own) {
    const item = el("li", own ? "msg own" : "msg");
    const meta = el("div", "meta");
    meta.append(el("span", "from", from), " ", timeElement(ts));
    item.append(meta, el("p", "text", text));
    appendToLog(item);
    return item;
  }

  function setDelivery(item, kind, label) {
    item.dataset.state = kind;
    let badge = item.querySelector(".delivery");
    if (!badge) {
      badge = el("span", "delivery");
      item.querySelector(".meta").append(" ", badge);
    }
    badge.textContent = label;
  }

  function notice(text) {
    appendToLog(el("li", "notice", text));
  }

  function renderMembers() {
    const names = [...state.members.keys()].sort((a, b) => a.localeCompare(b));
    ui.members.replaceChildren(
      ...names.map((name) => {
        const item = el("li", name === state.myName ? "me" : "", name);
        if (name === state.myName) item.append(el("span", "you", " (you)"));
        return item;
      }),
    );
    ui.memberCount.textContent = names.length ? `(${names.length})` : "";
  }

  function addMember(name) {
    state.members.set(name, (state.members.get(name) || 0) + 1);
  }

  function removeMember(name) {
    const left = (state.members.get(name) || 0) - 1;
    if (left > 0) state.members.set(name, left);
    else state.members.delete(name);
  }

  function setJoinedUi(joined) {
    ui.text.disabled = !joined;
    ui.sendBtn.disabled = !joined;
  }

  function setFormLocked(locked) {
    ui.name.disabled = locked || Boolean(state.token);
    ui.room.disabled = locked;
    ui.joinBtn.textContent = locked ? "Leave" : "Join";
  }

  // ---- connection ------------------------------------------------------------------------------

  function send(obj) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) {
      state.ws.send(JSON.stringify(obj));
      return true;
    }
    return false;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    // With a token, offer "wsapp" (which the server answers) beside it: the browser fails a connection
    // whose offered protocols get no answer, and the server never picks the bearer entry.
    const ws = state.token
      ? new WebSocket(`${proto}//${location.host}/ws`, ["wsapp", `bearer.${state.token}`])
      : new WebSocket(`${proto}//${location.host}/ws?name=${encodeURIComponent(state.name)}`);
    state.ws = ws;
    setStatus("connecting", state.attempt ? `Reconnecting (attempt ${state.attempt + 1})…` : "Connecting…");
    ws.onopen = () => {
      state.lastRx = Date.now();
      state.lastPingAt = 0;
      state.pingTimer = setInterval(heartbeat, PING_MS);
    };
    ws.onmessage = (event) => {
      state.lastRx = Date.now();
      if (typeof event.data !== "string") return; // the rooms protocol is text only
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        return;
      }
      if (msg && typeof msg === "object") handle(msg);
    };
    ws.onclose = (event) => {
      if (state.ws !== ws) return;
      const normal = event.code === 1000 || event.code === 1005;
      const reason = event.reason ? `: ${event.reason}` : "";
      if (event.code === 1008 && state.token) {
        // Policy, e.g. the token expired: the same token would only be refused again.
        stop();
        showError(`The server ended the session${reason}. Open the page with a new token.`);
        return;
      }
      disconnected(normal ? "Disconnected" : `Disconnected (code ${event.code}${reason})`);
    };
  }

  function heartbeat() {
    // Nothing at all since the previous ping, a whole interval ago: the connection is dead, and a
    // half-open TCP connection may never fire `close`, so stop waiting for it. (Comparing with the
    // previous ping rather than the clock keeps throttled timers in background tabs from tripping this.)
    if (state.lastPingAt && state.lastRx < state.lastPingAt) {
      const ws = state.ws;
      state.ws = null;
      if (ws) ws.close();
      disconnected("Connection timed out");
      return;
    }
    state.lastPingAt = Date.now();
    send({ type: "ping", id: ++state.pingId });
  }

  function disconnected(reason) {
    clearInterval(state.pingTimer);
    state.ws = null;
    state.joined = false;
    setJoinedUi(false);
    state.members.clear();
    renderMembers();
    // Their acks are lost: if the server did take them, the replay after re-join confirms them.
    for (const item of state.pending.values()) {
      setDelivery(item, "unconfirmed", "not confirmed");
      state.unconfirmed.push(item);
    }
    state.pending.clear();
    if (!state.wanted) {
      setStatus("idle", "Not connected");
      return;
    }
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** state.attempt);
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    state.attempt += 1;
    setStatus("reconnecting", `${reason}. Retrying in ${Math.ceil(delay / 1000)} s…`);
    state.retryTimer = setTimeout(connect, delay);
  }

  // ---- protocol --------------------------------------------------------------------------------

  function handle(msg) {
    switch (msg.type) {
      case "welcome":
        state.myName = String(msg.name || state.name);
        if (state.token) ui.name.value = state.myName;
        state.limits = msg.limits && typeof msg.limits === "object" ? msg.limits : {};
        send(
          state.lastSeq === null
            ? { type: "join", room: state.room }
            : state.epoch === null
              ? { type: "join", room: state.room, since: state.lastSeq }
              : { type: "join", room: state.room, since: state.lastSeq, epoch: state.epoch },
        );
        break;
      case "joined":
        if (msg.room !== state.room) break;
        onJoined(msg);
        break;
      case "message":
        if (msg.room === state.room) onMessage(msg);
        break;
      case "presence":
        if (msg.room !== state.room) break;
        if (msg.event === "join") {
          addMember(String(msg.who));
          notice(`${msg.who} joined`);
        } else if (msg.event === "leave") {
          removeMember(String(msg.who));
          notice(`${msg.who} left`);
        }
        renderMembers();
        break;
      case "ack":
        onAck(msg);
        break;
      case "error":
        onError(msg);
        break;
      default:
        break; // pong, left, and anything newer than this page
    }
  }

  function onJoined(msg) {
    state.joined = true;
    state.attempt = 0;
    const seq = typeof msg.seq === "number" ? msg.seq : 0;
    const epoch = typeof msg.epoch === "string" ? msg.epoch : null;
    // Another epoch (or, from a server without epochs, a seq below what we saw): the room's history
    // was lost (a restart, a flushed broker) and it numbers anew; our `since` meant nothing there.
    const otherEpoch = state.epoch !== null && epoch !== null && epoch !== state.epoch;
    state.roomRestarted = state.lastSeq !== null && (otherEpoch || seq < state.lastSeq);
    state.epoch = epoch;
    if (state.roomRestarted) notice("The server restarted the room; older messages are gone.");
    if (state.lastSeq === null || state.roomRestarted) {
      state.lastSeq = seq;
      state.seen.clear();
    }
    state.members.clear();
    for (const name of Array.isArray(msg.members) ? msg.members : []) addMember(String(name));
    renderMembers();
    setJoinedUi(true);
    setStatus("connected", `Connected as ${state.myName} in ${state.room}`);
  }

  function markSeen(seq) {
    state.seen.add(seq);
    if (seq > state.lastSeq) state.lastSeq = seq;
    if (state.seen.size > 2 * MAX_LOG_ITEMS) {
      for (const old of state.seen) if (old < state.lastSeq - MAX_LOG_ITEMS) state.seen.delete(old);
    }
  }

  function onMessage(msg) {
    if (typeof msg.seq === "number") {
      if (state.seen.has(msg.seq)) return;
      markSeen(msg.seq);
    }
    const text = textOf(msg.data);
    const from = String(msg.from);
    if (from === state.myName) {
      // Our own message coming back in a replay: confirm the copy already on screen.
      const index = state.unconfirmed.findIndex((item) => item.querySelector(".text").textContent === text);
      if (index !== -1) {
        const [item] = state.unconfirmed.splice(index, 1);
        setDelivery(item, "delivered", "delivered");
        return;
      }
    }
    renderMessage(from, msg.ts, text, from === state.myName);
  }

  function onAck(msg) {
    const item = state.pending.get(msg.id);
    if (!item) return;
    state.pending.delete(msg.id);
    // A seq of another epoch (the room's numbering restarted; its history_gone may still be on its
    // way) says nothing about the numbering this page follows.
    if (typeof msg.seq === "number" && (msg.epoch === undefined || msg.epoch === state.epoch)) markSeen(msg.seq);
    setDelivery(item, "delivered", "delivered");
  }

  function onError(msg) {
    const code = String(msg.code || "error");
    if (code === "history_gone") {
      if (state.joined && typeof msg.epoch === "string" && msg.epoch !== state.epoch) {
        // Told while in the room: its numbering restarted under us; the next message is seq 1 again.
        Object.assign(state, { epoch: msg.epoch, lastSeq: 0 });
        state.seen.clear();
        notice("The room's history was lost on the server; numbering starts again.");
        return;
      }
      // Not a failure: the re-join worked, only part of what was missed can be replayed.
      if (!state.roomRestarted) notice("Some messages sent while you were away are no longer kept.");
      return;
    }
    showError(`${code}: ${msg.message || "the server refused a request"}`);
    const item = msg.id !== undefined && msg.id !== null ? state.pending.get(msg.id) : undefined;
    if (item) {
      state.pending.delete(msg.id);
      setDelivery(item, "failed", "not delivered");
    }
  }

  // ---- user actions ----------------------------------------------------------------------------

  function start() {
    const name = ui.name.value.trim();
    const room = ui.room.value.trim();
    if ((!name && !state.token) || !ROOM_RE.test(room)) {
      ui.joinForm.reportValidity();
      return;
    }
    if (!state.token) {
      try {
        localStorage.setItem("wsapp.name", name);
      } catch {
        // storage may be off (private mode); the name is only a convenience
      }
    }
    clearError();
    Object.assign(state, { wanted: true, name, room, myName: name, lastSeq: null, epoch: null, attempt: 0, unconfirmed: [] });
    state.seen.clear();
    ui.log.replaceChildren();
    ui.roomTitle.textContent = `in ${room}`;
    setFormLocked(true);
    connect();
  }

  function stop() {
    state.wanted = false;
    clearTimeout(state.retryTimer);
    const ws = state.ws;
    if (ws) {
      send({ type: "leave", room: state.room });
      state.ws = null;
      ws.close(1000);
    }
    disconnected("Left");
    setFormLocked(false);
  }

  ui.joinForm.addEventListener("submit", (event) => {
    event.preventDefault();
    if (state.wanted) stop();
    else start();
  });

  ui.sendForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = ui.text.value;
    if (!text.trim() || !state.joined) return;
    clearError();
    const id = `m${state.nextId++}`;
    const frame = { type: "publish", room: state.room, data: { text }, id };
    const max = state.limits.max_message_bytes;
    if (typeof max === "number" && new Blob([JSON.stringify(frame)]).size > max) {
      showError(`Message too long (the server takes at most ${max} bytes).`);
      return;
    }
    if (!send(frame)) return;
    const item = renderMessage(state.myName, Date.now(), text, true);
    setDelivery(item, "pending", "sending…");
    state.pending.set(id, item);
    ui.text.value = "";
    ui.text.focus();
  });

  window.addEventListener("online", () => {
    if (state.wanted && !state.ws) connect();
  });

  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token") || "";
  if (fragment.has("token")) {
    // Out of the address bar and this history entry: a token is not for bookmarks or screenshots.
    fragment.delete("token");
    const rest = fragment.toString();
    history.replaceState(null, "", `${location.pathname}${location.search}${rest ? `#${rest}` : ""}`);
  }
  if (JWT_RE.test(token)) {
    state.token = token;
    ui.name.required = false;
    ui.name.disabled = true;
    ui.name.placeholder = "from your token";
  } else if (token) {
    showError("The token in the page address is not a JWT; joining without it.");
  }

  const params = new URLSearchParams(location.search);
  let savedName = "";
  try {
    savedName = localStorage.getItem("wsapp.name") || "";
  } catch {
    // see above
  }
  if (!state.token) ui.name.value = params.get("name") || savedName;
  if (params.get("room")) ui.room.value = params.get("room");
})();
