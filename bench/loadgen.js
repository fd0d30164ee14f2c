'use strict';
// Load generator for bench/run.py: one Node process drives N WebSocket clients against one server.
//
// Usage: node bench/loadgen.js '<json spec>'   (bench/run.py builds the spec; see DEFAULTS below)
// Talks to the orchestrator in JSON lines: events and the final result on stdout, "go" on stdin.
//   {"event":"ready"}          all clients connected (and, in rooms mode, joined, presence drained)
//   <- "go"                    orchestrator took its baseline samples
//   {"event":"window_start"}   the measured window begins (after warm-up)
//   {"event":"window_end"}     it ends; sending stops
//   {"event":"result", ...}    counts, latency percentiles, own CPU use
//
// Every message carries its sender, a per-sender sequence number and the send time (performance.now
// in microseconds), so fan-out latency is receive time minus send time in this same process, and
// each delivery is attributed to its message: lost = expected deliveries - deliveries received.
//
// Two client implementations, chosen by spec.client:
//   raw (default): a minimal RFC 6455 client on net sockets (its own handshake; reads into one shared
//     buffer through net's `onread`, frames parsed in place, numbers read straight from the bytes, no
//     UTF-8 validation).
//   ws: the `ws` package's client. It costs about the same per delivery when every read brings one
//     frame (Node's per-read socket work dominates), about 20% more when reads bring many, as they do
//     from wsapp, whose writes are coalesced. Kept to cross-check the raw client's figures, and the
//     client of the permessage-deflate cases (spec.deflate): it offers what `ws` offers by default
//     ("permessage-deflate; client_max_window_bits") and inflates what arrives, as a browser would.
//
// Payloads (spec.payload): "pad" (default) is the three numbers padded with 'x' to payloadBytes;
// "json" is JSON-like chat/feed text of payloadBytes, different in every message (seeded, so every
// run sends the same bytes), compressible about as much as real chat or feed JSON. Relay frames are
// then the JSON object itself, {"s":..,"n":..,"t":..,"items":[...]}.
//
// Bytes on the wire: the load generator sums its sockets' bytesRead/bytesWritten (bytes of TCP
// payload: WebSocket frames with their headers, compressed or not) at the window's start and end.
const crypto = require('node:crypto');
const net = require('node:net');
const path = require('node:path');
const readline = require('node:readline');
const { performance } = require('node:perf_hooks');
const { createRequire } = require('node:module');

// `ws` is installed by `npm ci --prefix bench/node`, next to the reference server.
const WebSocket = createRequire(path.join(__dirname, 'node', 'package.json'))('ws');

const DEFAULTS = {
  url: 'ws://127.0.0.1:8080/',
  client: 'raw', // raw | ws (see above)
  mode: 'relay', // relay: raw text frames on `/`; rooms: wsapp's JSON protocol on `/ws`
  room: 'bench',
  rooms: 1, // rooms mode: clients i*clients/rooms .. (i+1)*clients/rooms-1 share room `<room>-<i>` (1: all in `room`)
  urls: null, // several servers (processes sharing Redis): client i connects to one of them, spread at random
  clients: 100,
  senders: 1, // the first `senders` clients send; every client (senders too) receives the others'
  pattern: 'closed', // closed: window of outstanding messages per sender; open: fixed rate; idle: none;
  // connect: as idle, but the result follows at once (the opening itself is what is measured)
  window: 4, // closed loop: messages per sender not yet delivered to every receiver
  rate: 200, // open loop: messages per second, all senders together
  payloadBytes: 64, // relay frame size; rooms frames carry the same fields inside JSON
  payload: 'pad', // pad | json (see above)
  deflate: false, // offer permessage-deflate (ws client only)
  warmupSeconds: 1,
  durationSeconds: 5,
  drainSeconds: 3, // after the window: how long to wait for deliveries still in flight
  connectConcurrency: 200, // handshakes in flight at once
  connectTimeoutSeconds: 20,
  setupTimeoutSeconds: 60, // connecting plus, in rooms mode, the presence flood of the joins
};

const spec = { ...DEFAULTS, ...JSON.parse(process.argv[2] || '{}') };
if (spec.deflate && spec.client !== 'ws') {
  // The raw client does not inflate; only `ws`'s does.
  process.stdout.write(`${JSON.stringify({ event: 'result', ok: false, error: 'deflate needs client "ws"' })}\n`);
  process.exit(1);
}
const N = spec.clients;
const IDLE = spec.pattern === 'idle' || spec.pattern === 'connect'; // no messages sent
if (spec.mode === 'rooms' && N % spec.rooms !== 0) throw new Error('clients must be a multiple of rooms');
const roomSize = spec.mode === 'rooms' ? N / spec.rooms : N;
const receiversPerMessage = roomSize - 1;
const roomOf = (index) => (spec.rooms > 1 ? `${spec.room}-${Math.floor(index / roomSize)}` : spec.room);
// Client i's server: a fixed pseudo-random spread (like a load balancer's), so members of one room land
// on the same process 1/len(urls) of the time.
const urlOf = (index) => {
  const urls = spec.urls || [spec.url];
  const mixed = Math.imul(index + 1, 2654435761) >>> 0;
  return urls[(mixed >>> 8) % urls.length];
};

const nowUs = () => Math.round(performance.now() * 1000);
const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

// Counters. "Window" figures only count deliveries received inside the measured window.
const stats = {
  deliveries: 0,
  windowDeliveries: 0,
  duplicates: 0,
  unknown: 0, // frames that parse as none of ours
  typeMismatches: 0, // relay: a text message that arrived as a binary frame
  serverErrors: [], // rooms: {"type":"error"} frames, first few
  serverErrorCount: 0,
  unexpectedCloses: 0,
  closeCodes: {},
  socketErrors: [],
  presence: 0,
  deflateNegotiated: 0, // clients whose handshake answer accepted permessage-deflate
  extensions: {}, // what each client saw negotiated (raw: the 101's Sec-WebSocket-Extensions; ws: the names), how many
  windowPayloadBytes: 0, // message bytes (uncompressed) of the deliveries in the window
};

// Latencies (microseconds) of deliveries inside the window; grown by doubling, sorted once at the end.
let latencies = new Float64Array(1 << 16);
let latencyCount = 0;
function recordLatency(us) {
  if (latencyCount === latencies.length) {
    const bigger = new Float64Array(latencies.length * 2);
    bigger.set(latencies);
    latencies = bigger;
  }
  latencies[latencyCount++] = us;
}

// Per sender: how many receivers got each of its messages so far.
class Sender {
  constructor(index, client) {
    this.index = index;
    this.client = client;
    this.sent = 0;
    this.completed = 0;
    this.received = new Uint32Array(1024);
    this.room = roomOf(client.index);
  }

  countDelivery(seq) {
    if (seq >= this.sent) {
      stats.unknown++;
      return false;
    }
    const n = ++this.received[seq];
    if (n > receiversPerMessage) stats.duplicates++;
    if (n === receiversPerMessage) {
      this.completed++;
      return true;
    }
    return false;
  }

  send() {
    const seq = this.sent++;
    if (seq === this.received.length) {
      const bigger = new Uint32Array(this.received.length * 2);
      bigger.set(this.received);
      this.received = bigger;
    }
    this.client.send(encode(this.index, seq, nowUs(), this.room));
  }
}

// JSON-like text: chat/feed records drawn from a seeded generator (mulberry32), words Zipf-like from
// a small vocabulary, so that a message compresses on its own about as real JSON traffic does.
let seed = 0x9e3779b9;
function random() {
  seed = (seed + 0x6d2b79f5) | 0;
  let x = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
  return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
}
const WORDS = ('the a to and of is in it you that for on this be with are have not we can at was but just ' +
  'so if my will what all get do about one like out up your from they there more now when how time ' +
  'know think see good new want go back see work day make today meeting update deploy build release ' +
  'server client message queue latency error fixed merged review ticket customer order price stock ' +
  'market report dashboard alert metrics page team call lunch tomorrow weekend thanks great sure ok ' +
  'sounds please check link shared doc draft final numbers chart graph london paris berlin tokyo').split(' ');
const USERS = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank', 'grace', 'heidi', 'ivan', 'judy', 'mallory',
  'niaj', 'olivia', 'peggy', 'rupert', 'sybil', 'trent', 'victor', 'walter', 'yolanda'];
const ROOMS = ['general', 'random', 'engineering', 'support', 'sales', 'ops'];
const pick = (list) => list[Math.floor(list.length * random() ** 3)]; // skewed to the front, Zipf-like
// Records as a feed has them: ids and times climbing, a user's id and name going together.
let recordId = 1000000;
let clock = 1764700000000;
function record() {
  const words = Array.from({ length: 4 + Math.floor(random() * 14) }, () => pick(WORDS)).join(' ');
  const who = Math.floor(USERS.length * random() * random());
  clock += Math.floor(random() * 5000);
  const rec = {
    id: recordId++,
    ts: clock,
    user: { id: 10000 + who * 37, name: USERS[who], online: random() < 0.8 },
    room: pick(ROOMS),
    text: words,
    reactions: random() < 0.3 ? { '+1': Math.floor(random() * 9) + 1 } : {},
    edited: random() < 0.1,
  };
  if (random() < 0.2) rec.price = Math.round(random() * 1e6) / 100;
  return JSON.stringify(rec);
}
// `{"s":..,"n":..,"t":..,"items":[records]}` (or, in rooms mode, the `data` object) of length `bytes`,
// the last record's text trimmed or padded with words so the total comes out exact.
function jsonPayload(head, bytes) {
  let out = `${head},"items":[`;
  for (;;) {
    const rec = record();
    if (out.length + 1 + rec.length + 2 > bytes) {
      if (out.endsWith('[')) return `${out}]}`; // head alone is already too long
      break;
    }
    out += `${out.endsWith('[') ? '' : ','}${rec}`;
  }
  // Fill what is left with one more record whose text is cut to fit exactly.
  const left = bytes - out.length - 2 - (out.endsWith('[') ? 0 : 1);
  const shell = JSON.stringify({ id: recordId++, user: pick(USERS), text: '' });
  let text = '';
  while (text.length < left - shell.length) text += `${pick(WORDS)} `;
  text = text.slice(0, Math.max(0, left - shell.length));
  if (left >= shell.length) {
    out += `${out.endsWith('[') ? '' : ','}${shell.slice(0, -2)}${text}"}`;
  }
  return `${out}${' '.repeat(Math.max(0, bytes - out.length - 2))}]}`; // JSON whitespace, when short
}

let padding = '';
function encode(sender, seq, t, room) {
  if (spec.payload === 'json') {
    if (spec.mode === 'rooms') {
      const data = jsonPayload(`{"s":${sender},"n":${seq},"t":${t}`, spec.payloadBytes);
      return `{"type":"publish","room":${JSON.stringify(room)},"data":${data}}`;
    }
    return jsonPayload(`{"s":${sender},"n":${seq},"t":${t}`, spec.payloadBytes);
  }
  if (spec.mode === 'rooms') {
    return JSON.stringify({ type: 'publish', room, data: { s: sender, n: seq, t, p: padding } });
  }
  const head = `${sender} ${seq} ${t} `;
  return head.length >= spec.payloadBytes ? head : head + 'x'.repeat(spec.payloadBytes - head.length);
}
if (spec.mode === 'rooms') {
  // Pad so the `data` object is about as long as a relay frame.
  padding = 'x'.repeat(Math.max(0, spec.payloadBytes - 40));
}

let senders = [];
let sending = false;
let measuring = false;
let stalledAt = null;

// Deliveries that belong to a message we sent, each counted once.
const counted = () => stats.deliveries - stats.duplicates - stats.unknown;
let drainWaiter = null; // {target, resolve}: set once sending has stopped

function onDelivery(s, seq, t, bytes) {
  const now = nowUs();
  stats.deliveries++;
  if (measuring) {
    stats.windowDeliveries++;
    stats.windowPayloadBytes += bytes;
    recordLatency(now - t);
  }
  const sender = senders[s];
  if (sender === undefined) stats.unknown++;
  else if (sender.countDelivery(seq) && spec.pattern === 'closed' && sending) pump(sender);
  if (drainWaiter && counted() >= drainWaiter.target) drainWaiter.resolve();
}

function pump(sender) {
  while (sending && sender.sent - sender.completed < spec.window) sender.send();
}

// Digits of a non-negative integer at buf[i..end); the index after them is left in `intEnd`.
let intEnd = 0;
function readInt(buf, i, end) {
  let v = 0;
  const first = i;
  for (; i < end; i++) {
    const c = buf[i];
    if (c < 48 || c > 57) break;
    v = v * 10 + (c - 48);
  }
  intEnd = i === first ? -1 : i;
  return v;
}

// The three numbers at the start of a JSON payload, {"s":<sender>,"n":<seq>,"t":<time µs>,...}, read
// from `at` (just after `"s":`); false when the bytes are laid out otherwise.
function onJsonNumbers(buf, at, end, bytes) {
  const s = readInt(buf, at, end);
  if (intEnd > 0 && buf[intEnd + 1] === 0x22 && buf[intEnd + 2] === 0x6e) { // ,"n":
    const n = readInt(buf, intEnd + 5, end);
    if (intEnd > 0 && buf[intEnd + 2] === 0x74) { // ,"t":
      const t = readInt(buf, intEnd + 5, end);
      if (intEnd > 0) {
        onDelivery(s, n, t, bytes);
        return true;
      }
    }
  }
  return false;
}

// Relay frame payload: "<sender> <seq> <time µs> xxxx..." or {"s":<sender>,"n":<seq>,"t":<time µs>,...}.
function onRelayMessage(buf, start, end, isBinary) {
  if (isBinary) stats.typeMismatches++;
  if (buf[start] === 0x7b) { // '{'
    if (!onJsonNumbers(buf, start + 5, end, end - start)) stats.unknown++;
    return;
  }
  const s = readInt(buf, start, end);
  if (intEnd < 0) return void stats.unknown++;
  const n = readInt(buf, intEnd + 1, end);
  if (intEnd < 0) return void stats.unknown++;
  const t = readInt(buf, intEnd + 1, end);
  if (intEnd < 0) return void stats.unknown++;
  onDelivery(s, n, t, end - start);
}

// Rooms mode. Each client goes welcome -> join -> joined; presence frames from later joiners follow.
// A `message` frame is read in place (its `data` is ours: {"s":..,"n":..,"t":..,"p":..}); anything
// else, or a message laid out otherwise, goes through JSON.parse.
const MESSAGE_PREFIX = Buffer.from('{"type":"message"');
const DATA_MARK = Buffer.from('"data":{"s":');
let presenceExpected = 0;
let presenceWaiter = null;

function onRoomsMessage(client, buf, start, end) {
  if (end - start > MESSAGE_PREFIX.length && buf.compare(MESSAGE_PREFIX, 0, MESSAGE_PREFIX.length, start,
    start + MESSAGE_PREFIX.length) === 0) {
    const at = buf.indexOf(DATA_MARK, start);
    if (at >= 0 && at < end && onJsonNumbers(buf, at + DATA_MARK.length, end, end - start)) return;
  }
  let msg;
  try {
    msg = JSON.parse(buf.toString('utf8', start, end));
  } catch {
    stats.unknown++;
    return;
  }
  switch (msg.type) {
    case 'message':
      if (msg.data && typeof msg.data === 'object') onDelivery(msg.data.s, msg.data.n, msg.data.t, end - start);
      else stats.unknown++;
      break;
    case 'presence':
      stats.presence++;
      if (presenceWaiter && stats.presence >= presenceExpected) presenceWaiter();
      break;
    case 'welcome':
      // Idle connections stay out of rooms: 10,000 joins of one room would flood 50 million presence frames.
      if (IDLE) client.onReady();
      else client.send(JSON.stringify({ type: 'join', room: roomOf(client.index) }));
      break;
    case 'joined':
      // Members already there when we joined; every later joiner will announce itself to us.
      presenceExpected += roomSize - (Array.isArray(msg.members) ? msg.members.length : 1);
      client.onReady();
      break;
    case 'error':
      stats.serverErrorCount++;
      if (stats.serverErrors.length < 5) stats.serverErrors.push(msg);
      break;
    default:
      stats.unknown++;
  }
}

function onMessage(client, buf, start, end, isBinary) {
  if (spec.mode === 'rooms') onRoomsMessage(client, buf, start, end);
  else onRelayMessage(buf, start, end, isBinary);
}

function onClosed(code, reason) {
  if (finished) return;
  stats.unexpectedCloses++;
  const key = `${code}${reason ? ` ${reason}` : ''}`;
  stats.closeCodes[key] = (stats.closeCodes[key] || 0) + 1;
}

function onSocketError(index, err) {
  if (stats.socketErrors.length < 5) stats.socketErrors.push(`client ${index}: ${err.message}`);
}

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
// Per handshake, a `randomBytes(16)` call and a URL parse were ~6 % of this process's CPU over an
// opening (node --cpu-prof): keys come from one block of randomness, each URL is parsed once.
let keyPool = Buffer.alloc(0);
let keyPoolOffset = 0;
function handshakeKey() {
  if (keyPoolOffset + 16 > keyPool.length) {
    keyPool = crypto.randomBytes(16 * 4096);
    keyPoolOffset = 0;
  }
  keyPoolOffset += 16;
  return keyPool.toString('base64', keyPoolOffset - 16, keyPoolOffset);
}
const parsedUrls = new Map();
function parsedUrl(url) {
  const q = url.indexOf('?'); // rooms clients differ by their query only
  const base = q < 0 ? url : url.slice(0, q);
  let u = parsedUrls.get(base);
  if (u === undefined) {
    const { hostname, port, host, pathname } = new URL(base);
    u = { hostname, port: Number(port), host, path: pathname };
    parsedUrls.set(base, u);
  }
  return q < 0 ? u : { ...u, path: u.path + url.slice(q) };
}
const READ_BUFFER = Buffer.allocUnsafe(256 * 1024); // every RawClient's reads (see connect)
const maskKey = Buffer.alloc(4);

// A client frame: FIN set, masked as RFC 6455 requires of clients.
function clientFrame(opcode, payload) {
  const len = payload.length;
  const ext = len < 126 ? 0 : len < 65536 ? 2 : 8;
  const frame = Buffer.allocUnsafe(2 + ext + 4 + len);
  frame[0] = 0x80 | opcode;
  if (ext === 0) frame[1] = 0x80 | len;
  else if (ext === 2) {
    frame[1] = 0x80 | 126;
    frame.writeUInt16BE(len, 2);
  } else {
    frame[1] = 0x80 | 127;
    frame.writeBigUInt64BE(BigInt(len), 2);
  }
  crypto.randomFillSync(maskKey);
  const at = 2 + ext;
  maskKey.copy(frame, at);
  for (let i = 0; i < len; i++) frame[at + 4 + i] = payload[i] ^ maskKey[i & 3];
  return frame;
}

class RawClient {
  constructor(index) {
    this.index = index;
    this.socket = null;
    this.pending = null; // bytes of an incomplete frame
    this.fragments = null; // [opcode, ...buffers] of a fragmented message
    this.closing = false;
  }

  // The handshake is written and its 101 read here, and every read lands in one buffer shared by all
  // clients (net's `onread`): no node:http request and parser per connection, no stream 'data' event
  // and Buffer per read. Node's per-read socket machinery was most of this process's CPU per delivery.
  connect(url, onOpen, onFail) {
    const u = parsedUrl(url);
    const key = handshakeKey();
    const accept = crypto.createHash('sha1').update(key + GUID).digest('base64');
    let head = null; // the response so far, until its blank line (then null again and `opened`)
    let opened = false;
    let failed = false;
    const fail = (err) => {
      if (failed || opened) return;
      failed = true;
      socket.destroy();
      onFail(err);
    };
    const socket = net.connect({
      host: u.hostname, port: u.port, noDelay: true,
      onread: {
        buffer: READ_BUFFER,
        callback: (n, buf) => {
          if (opened) {
            this.onData(buf.subarray(0, n));
            return;
          }
          head = head ? Buffer.concat([head, buf.subarray(0, n)]) : Buffer.from(buf.subarray(0, n));
          const end = head.indexOf('\r\n\r\n');
          if (end < 0) {
            if (head.length > 16384) fail(new Error('response headers too long'));
            return;
          }
          const lines = head.toString('latin1', 0, end).split('\r\n');
          if (!/^HTTP\/1\.1 101 /.test(lines[0])) return fail(new Error(`${lines[0]} instead of 101`));
          const headers = {};
          for (const line of lines.slice(1)) {
            const colon = line.indexOf(':');
            if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
          }
          if (headers['sec-websocket-accept'] !== accept) return fail(new Error('bad Sec-WebSocket-Accept'));
          const rest = head.subarray(end + 4);
          head = null;
          opened = true;
          socket.setTimeout(0);
          this.socket = socket;
          this.extensions = headers['sec-websocket-extensions'] || '';
          onOpen();
          if (rest.length) this.onData(rest);
        },
      },
    });
    socket.setTimeout(spec.connectTimeoutSeconds * 1000, () => fail(new Error('handshake timed out')));
    socket.on('connect', () => {
      socket.write(`GET ${u.path} HTTP/1.1\r\nHost: ${u.host}\r\nConnection: Upgrade\r\n`
        + `Upgrade: websocket\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
    });
    socket.on('error', (err) => {
      if (!opened) fail(err);
      else onSocketError(this.index, err);
    });
    socket.on('close', () => {
      if (!opened) return fail(new Error('closed before the 101'));
      if (!this.closing) onClosed(1006, 'connection dropped');
      if (this.onDrop) this.onDrop(new Error('closed during setup'));
    });
  }

  send(text) {
    this.socket.write(clientFrame(1, Buffer.from(text)));
  }

  bytes() {
    return this.socket ? [this.socket.bytesRead, this.socket.bytesWritten] : [0, 0];
  }

  onData(chunk) {
    const buf = this.pending ? Buffer.concat([this.pending, chunk]) : chunk;
    let off = 0;
    for (;;) {
      const avail = buf.length - off;
      if (avail < 2) break;
      const b0 = buf[off];
      let len = buf[off + 1] & 0x7f;
      let head = 2;
      if (len === 126) {
        if (avail < 4) break;
        len = buf.readUInt16BE(off + 2);
        head = 4;
      } else if (len === 127) {
        if (avail < 10) break;
        len = Number(buf.readBigUInt64BE(off + 2));
        head = 10;
      }
      if (buf[off + 1] & 0x80) head += 4; // servers must not mask; tolerate it for counting's sake
      if (avail < head + len) break;
      const start = off + head;
      off = start + len;
      this.onFrame(b0 & 0x80, b0 & 0x0f, buf, start, off);
    }
    // A copy: `buf` may be the shared read buffer, which the next read overwrites.
    this.pending = off < buf.length ? Buffer.from(buf.subarray(off)) : null;
  }

  onFrame(fin, opcode, buf, start, end) {
    if (opcode === 1 || opcode === 2) {
      if (fin) onMessage(this, buf, start, end, opcode === 2);
      else this.fragments = [opcode, Buffer.from(buf.subarray(start, end))];
    } else if (opcode === 0 && this.fragments) {
      this.fragments.push(Buffer.from(buf.subarray(start, end)));
      if (fin) {
        const [op, ...parts] = this.fragments;
        this.fragments = null;
        const whole = Buffer.concat(parts);
        onMessage(this, whole, 0, whole.length, op === 2);
      }
    } else if (opcode === 8) {
      const code = end - start >= 2 ? buf.readUInt16BE(start) : 1005;
      if (!this.closing) {
        this.closing = true;
        onClosed(code, buf.toString('utf8', start + 2, end));
        this.socket.end(clientFrame(8, buf.subarray(start, Math.min(end, start + 2))));
      }
    } else if (opcode === 9) {
      this.socket.write(clientFrame(10, buf.subarray(start, end)));
    } else if (opcode !== 10) {
      stats.unknown++;
    }
  }
}

// The same interface over the `ws` package's client.
class WsClient {
  constructor(index) {
    this.index = index;
    this.ws = null;
  }

  connect(url, onOpen, onFail) {
    // permessage-deflate only when the case asks for it (then with ws's default offer and settings).
    const ws = new WebSocket(url, { perMessageDeflate: !!spec.deflate, handshakeTimeout: spec.connectTimeoutSeconds * 1000 });
    this.ws = ws;
    let opened = false;
    ws.on('open', () => {
      opened = true;
      this.extensions = ws.extensions;
      onOpen();
    });
    ws.on('error', (err) => {
      onSocketError(this.index, err);
      if (!opened) onFail(err);
    });
    ws.on('close', (code, reason) => {
      onClosed(code, reason.toString());
      if (this.onDrop) this.onDrop(new Error(`closed during setup (${code})`));
    });
    ws.on('message', (data, isBinary) => onMessage(this, data, 0, data.length, isBinary));
  }

  send(text) {
    this.ws.send(text);
  }

  bytes() {
    const socket = this.ws && this.ws._socket; // ws keeps its net.Socket there
    return socket ? [socket.bytesRead, socket.bytesWritten] : [0, 0];
  }
}

// Resolves with the client once it is open (relay) or has joined the room (rooms).
function openClient(index) {
  return new Promise((resolve, reject) => {
    const client = spec.client === 'ws' ? new WsClient(index) : new RawClient(index);
    let settled = false;
    const fail = (err) => {
      if (settled) return;
      settled = true;
      reject(new Error(`client ${index}: ${err.message}`));
    };
    client.onDrop = fail;
    client.onReady = () => {
      if (settled) return;
      settled = true;
      client.onDrop = null;
      const ext = client.extensions || '';
      stats.extensions[ext] = (stats.extensions[ext] || 0) + 1;
      if (/(^|,)\s*permessage-deflate\b/.test(ext)) stats.deflateNegotiated++;
      resolve(client);
    };
    const url = spec.mode === 'rooms' ? `${urlOf(index)}?name=b${index}` : urlOf(index);
    client.connect(url, () => {
      if (spec.mode === 'relay') client.onReady();
    }, fail);
  });
}

async function connectAll() {
  const clients = new Array(N);
  let next = 0;
  const worker = async () => {
    while (next < N) {
      const i = next++;
      clients[i] = await openClient(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(spec.connectConcurrency, N) }, worker));
  if (spec.mode === 'rooms' && stats.presence < presenceExpected) {
    // The presence flood of N joins (N*(N-1)/2 frames) must be over before anything is measured.
    await new Promise((resolve) => {
      presenceWaiter = resolve;
    });
  }
  return clients;
}

function withTimeout(promise, seconds, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took over ${seconds} s`)), seconds * 1000);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function waitForGo() {
  return new Promise((resolve) => {
    const rl = readline.createInterface({ input: process.stdin });
    rl.on('line', (line) => {
      if (line.trim() === 'go') {
        rl.close();
        resolve();
      }
    });
    // Run standalone (stdin a terminal or at end of file): start at once.
    rl.on('close', resolve);
    if (process.stdin.isTTY) rl.close();
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Open loop: messages go out on a fixed schedule whatever the server does; lateness is reported.
let maxSendLagMs = 0;
function startOpenLoop() {
  const start = performance.now();
  const periodMs = 1000 / spec.rate;
  let sent = 0;
  const tick = () => {
    if (!sending) return;
    const now = performance.now();
    const due = Math.floor((now - start) / periodMs) + 1;
    if (due > sent + 1) maxSendLagMs = Math.max(maxSendLagMs, now - (start + sent * periodMs));
    while (sent < due) {
      senders[sent % senders.length].send();
      sent++;
    }
    setTimeout(tick, Math.max(0, start + sent * periodMs - performance.now()));
  };
  tick();
}

function percentile(sorted, count, p) {
  if (count === 0) return null;
  const i = Math.min(count - 1, Math.ceil((p / 100) * count) - 1);
  return sorted[Math.max(0, i)] / 1000;
}

let finished = false;

async function main() {
  const setupStart = performance.now();
  const setupCpuStart = process.cpuUsage();
  let clients;
  try {
    clients = await withTimeout(connectAll(), spec.setupTimeoutSeconds, 'setup');
  } catch (err) {
    emit({ event: 'result', ok: false, error: `setup failed: ${err.message}`, stats });
    process.exit(1);
  }
  const setupSeconds = (performance.now() - setupStart) / 1000;
  const setupCpu = process.cpuUsage(setupCpuStart);
  const setupCpuSeconds = (setupCpu.user + setupCpu.system) / 1e6;
  senders = clients.slice(0, spec.senders).map((c, i) => new Sender(i, c));
  emit({ event: 'ready', setupSeconds, setupCpuSeconds, presence: stats.presence });
  await waitForGo();

  // Warm-up, then the measured window; sending runs through both.
  let progressCheck = null;
  if (!IDLE) {
    sending = true;
    if (spec.pattern === 'closed') senders.forEach(pump);
    else startOpenLoop();
    // A closed loop that stops completing messages has lost deliveries: say so instead of idling.
    let lastCompleted = -1;
    progressCheck = setInterval(() => {
      const completed = senders.reduce((a, s) => a + s.completed, 0);
      if (completed === lastCompleted && stalledAt === null) stalledAt = performance.now();
      lastCompleted = completed;
    }, 1000);
  }
  await sleep(spec.warmupSeconds * 1000);
  const wire = () => clients.reduce((acc, c) => {
    const [r, w] = c.bytes();
    return [acc[0] + r, acc[1] + w];
  }, [0, 0]);
  const wireStart = wire();
  const cpuStart = process.cpuUsage();
  const windowStart = performance.now();
  measuring = true;
  emit({ event: 'window_start' });
  await sleep(spec.durationSeconds * 1000);
  measuring = false;
  sending = false;
  const windowSeconds = (performance.now() - windowStart) / 1000;
  const cpu = process.cpuUsage(cpuStart);
  const wireEnd = wire();
  emit({ event: 'window_end' });
  if (progressCheck) clearInterval(progressCheck);

  // Drain: wait for every message sent so far to reach every receiver, or give up after drainSeconds.
  const sentTotal = () => senders.reduce((a, s) => a + s.sent, 0);
  const expectedTotal = () => sentTotal() * receiversPerMessage;
  const drainStart = performance.now();
  if (counted() < expectedTotal()) {
    await withTimeout(new Promise((resolve) => {
      drainWaiter = { target: expectedTotal(), resolve };
    }), spec.drainSeconds, 'drain').catch(() => {}); // what is still missing then counts as lost
  }
  const drainSeconds = (performance.now() - drainStart) / 1000;
  finished = true;

  const sorted = latencies.subarray(0, latencyCount).sort();
  const result = {
    event: 'result',
    ok: true,
    spec,
    setupSeconds,
    setupCpuSeconds,
    windowSeconds,
    drainSeconds,
    connected: clients.length,
    sent: sentTotal(),
    expected: expectedTotal(),
    received: counted(),
    lost: Math.max(0, expectedTotal() - counted()),
    deliveriesPerSec: stats.windowDeliveries / windowSeconds,
    messagesPerSec: stats.windowDeliveries / windowSeconds / receiversPerMessage,
    latencyMs: {
      p50: percentile(sorted, latencyCount, 50),
      p90: percentile(sorted, latencyCount, 90),
      p99: percentile(sorted, latencyCount, 99),
      max: percentile(sorted, latencyCount, 100),
      samples: latencyCount,
    },
    // Bytes the clients' sockets read (server to clients) and wrote in the window; per delivery.
    wireBytesIn: wireEnd[0] - wireStart[0],
    wireBytesOut: wireEnd[1] - wireStart[1],
    wireBytesPerDelivery: stats.windowDeliveries ? (wireEnd[0] - wireStart[0]) / stats.windowDeliveries : null,
    payloadBytesPerDelivery: stats.windowDeliveries ? stats.windowPayloadBytes / stats.windowDeliveries : null,
    stalled: stalledAt !== null,
    maxSendLagMs,
    loadgenCpuPct: ((cpu.user + cpu.system) / 1e6 / windowSeconds) * 100,
    loadgenSysPct: (cpu.system / 1e6 / windowSeconds) * 100, // of it, in the kernel (reads, writes, epoll)
    stats,
  };
  emit(result);
  // Abrupt close on exit: the servers' disconnect handling is not part of any measurement.
  process.exit(0);
}

main().catch((err) => {
  emit({ event: 'result', ok: false, error: err.stack || String(err), stats });
  process.exit(1);
});
