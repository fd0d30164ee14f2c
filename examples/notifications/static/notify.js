"use strict";
// The notifications page: joins its user's room (and announcements) over wsapp's rooms protocol on /ws,
// catches up with `since` after every drop, and shows notifications through textContent only: what
// arrives over the socket is data, never markup.
(() => {
  const PING_MS = 25000; // below common proxy idle cuts
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const MAX_ITEMS = 200;

  const $ = (id) => document.getElementById(id);
  const body = document.body.dataset;
  const myRoom = `user:${body.user}`;
  const rooms = [myRoom, "announcements"];
  const ui = {
    status: $("status"),
    list: $("notifications"),
    result: $("result"),
    sendForm: $("send-form"),
    to: $("to"),
    text: $("text"),
    announceForm: $("announce-form"),
    announceText: $("announce-text"),
  };

  let ws = null;
  let opened = false;
  let attempt = 0;
  let retryTimer = 0;
  let pingTimer = 0;
  let lastRx = 0;
  let lastPingAt = 0;
  let nextId = 1;
  // Per room: the highest seq shown (`since` on the next join) and the seqs already shown, so a
  // replay after a reconnect never shows a notification twice.
  const lastSeq = new Map(rooms.map((room) => [room, 0]));
  const seen = new Map(rooms.map((room) => [room, new Set()]));

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text;
  }

  function say(text, isError) {
    ui.result.textContent = text;
    ui.result.classList.toggle("error", Boolean(isError));
  }

  function prepend(item) {
    ui.list.prepend(item);
    while (ui.list.childElementCount > MAX_ITEMS) ui.list.lastElementChild.remove();
  }

  function show(msg) {
    const shown = seen.get(msg.room);
    if (!shown) return;
    if (typeof msg.seq === "number") {
      if (shown.has(msg.seq)) return;
      shown.add(msg.seq);
      if (msg.seq > lastSeq.get(msg.room)) lastSeq.set(msg.room, msg.seq);
    }
    const data = msg.data && typeof msg.data === "object" ? msg.data : {};
    const text = typeof data.text === "string" ? data.text : JSON.stringify(msg.data);
    const item = el("li", msg.room === myRoom ? "note" : "note announcement");
    item.dataset.room = msg.room;
    item.dataset.seq = String(msg.seq);
    const when = typeof msg.ts === "number" ? new Date(msg.ts) : new Date();
    const time = el("time", "", when.toLocaleString());
    time.dateTime = when.toISOString();
    const meta = el("div", "meta");
    const label = msg.room === myRoom ? `from ${msg.from}` : `announcement by ${msg.from}`;
    meta.append(el("span", "from", label), " · ", time);
    item.append(meta, el("p", "text", text));
    prepend(item);
  }

  // ---- connection ------------------------------------------------------------------------------

  function send(obj) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(obj));
    return true;
  }

  function connect() {
    clearTimeout(retryTimer);
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    // No credentials in the URL: the browser sends the session cookie with the upgrade request.
    const socket = new WebSocket(`${proto}//${location.host}/ws`);
    ws = socket;
    opened = false;
    setStatus("connecting", attempt ? `Reconnecting (attempt ${attempt + 1})…` : "Connecting…");
    socket.onopen = () => {
      opened = true;
      lastRx = Date.now();
      lastPingAt = 0;
      pingTimer = setInterval(heartbeat, PING_MS);
    };
    socket.onmessage = (event) => {
      lastRx = Date.now();
      let msg;
      try {
        msg = JSON.parse(event.data);
      } catch {
        return;
      }
      if (msg && typeof msg === "object") handle(msg);
    };
    socket.onclose = () => {
      if (ws === socket) disconnected();
    };
  }

  function heartbeat() {
    // Nothing at all since the previous ping: a half-open connection may never fire `close`.
    if (lastPingAt && lastRx < lastPingAt) {
      const dead = ws;
      ws = null;
      if (dead) dead.close();
      disconnected();
      return;
    }
    lastPingAt = Date.now();
    send({ type: "ping" });
  }

  function disconnected() {
    clearInterval(pingTimer);
    const neverOpened = !opened;
    ws = null;
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt);
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    attempt += 1;
    setStatus("reconnecting", `Disconnected. Retrying in ${Math.ceil(delay / 1000)} s…`);
    retryTimer = setTimeout(connect, delay);
    // A refused upgrade looks like any failed connection to a page; ask whether the session is gone.
    if (neverOpened) {
      fetch(body.meUrl, { credentials: "same-origin" })
        .then((response) => {
          if (response.status === 401) location.assign(body.loginUrl);
        })
        .catch(() => {}); // offline: the retries carry on
    }
  }

  function handle(msg) {
    switch (msg.type) {
      case "welcome":
        // The first join asks for everything still kept (since 0); later ones for what was missed.
        for (const room of rooms) send({ type: "join", room, since: lastSeq.get(room), echo: true });
        break;
      case "joined":
        if (!seen.has(msg.room)) break;
        // A seq below what we saw: the server forgot the room (a restart without Redis) and numbers it anew.
        if (typeof msg.seq === "number" && msg.seq < lastSeq.get(msg.room)) {
          lastSeq.set(msg.room, msg.seq);
          seen.get(msg.room).clear();
        }
        if (msg.room === myRoom) {
          attempt = 0;
          setStatus("connected", "Connected");
        }
        break;
      case "message":
        show(msg);
        break;
      case "ack":
        say("Announced.");
        break;
      case "error":
        // history_gone: older notifications are no longer kept; what is kept was replayed.
        if (msg.code !== "history_gone") say(`${msg.code}: ${msg.message}`, true);
        break;
      default:
        break; // pong, presence, and anything newer than this page
    }
  }

  // ---- forms -----------------------------------------------------------------------------------

  ui.sendForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const to = ui.to.value.trim();
    say("Sending…");
    try {
      const response = await fetch(`/send/${encodeURIComponent(to)}`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ text: ui.text.value }),
      });
      const answer = await response.json().catch(() => ({}));
      if (response.ok) {
        say(`Sent to ${to}.`);
        ui.text.value = "";
      } else {
        say(answer.error || `The server answered ${response.status}.`, true);
      }
    } catch {
      say("Could not reach the server.", true);
    }
  });

  if (ui.announceForm) {
    ui.announceForm.addEventListener("submit", (event) => {
      event.preventDefault();
      const frame = { type: "publish", room: "announcements", data: { text: ui.announceText.value }, id: nextId++ };
      if (send(frame)) {
        ui.announceText.value = "";
        say("Announcing…");
      } else {
        say("Not connected; try again in a moment.", true);
      }
    });
  }

  window.addEventListener("online", () => {
    if (!ws) connect();
  });

  connect();
})();
