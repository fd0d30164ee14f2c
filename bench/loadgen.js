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
const path = require('node:path');
const readline = require('node:readline');
const { performance } = require('node:perf_hooks');
const { createRequire } = require('node:module');

// `ws` is installed by `npm ci --prefix bench/node`, next to the reference server.
const WebSocket = createRequire(path.join(__dirname, 'node', 'package.json'))('ws');

const DEFAULTS = {
  url: 'ws://127.0.0.1:8080/',
  mode: 'relay', // relay: raw text frames on `/`; rooms: wsapp's JSON protocol on `/ws`
  room: 'bench',
  clients: 100,
  senders: 1, // the first `senders` clients send; every client (senders too) receives the others'
  pattern: 'closed', // closed: window of outstanding messages per sender; open: fixed rate; idle: none
  window: 4, // closed loop: messages per sender not yet delivered to every receiver
  rate: 200, // open loop: messages per second, all senders together
  payloadBytes: 64, // relay frame size; rooms frames carry the same fields inside JSON
  warmupSeconds: 1,
  durationSeconds: 5,
  drainSeconds: 3, // after the window: how long to wait for deliveries still in flight
  connectConcurrency: 200, // handshakes in flight at once
  connectTimeoutSeconds: 20,
  setupTimeoutSeconds: 60, // connecting plus, in rooms mode, the presence flood of the joins
};

const spec = { ...DEFAULTS, ...JSON.parse(process.argv[2] || '{}') };
const N = spec.clients;
const receiversPerMessage = N - 1;

const nowUs = () => Math.round(performance.now() * 1000);
const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const log = (msg) => process.stderr.write(`loadgen: ${msg}\n`);

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
    this.client.ws.send(encode(this.index, seq, nowUs()));
  }
}

let padding = '';
function encode(sender, seq, t) {
  if (spec.mode === 'rooms') {
    return JSON.stringify({ type: 'publish', room: spec.room, data: { s: sender, n: seq, t, p: padding } });
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

function onDelivery(s, seq, t) {
  const now = nowUs();
  stats.deliveries++;
  if (measuring) {
    stats.windowDeliveries++;
    recordLatency(now - t);
  }
  const sender = senders[s];
  if (sender === undefined) {
    stats.unknown++;
    return;
  }
  if (sender.countDelivery(seq) && spec.pattern === 'closed' && sending) pump(sender);
}

function pump(sender) {
  while (sending && sender.sent - sender.completed < spec.window) sender.send();
}

function onRelayFrame(data, isBinary) {
  if (isBinary) stats.typeMismatches++;
  const head = data.toString('latin1', 0, 40).split(' ', 3);
  if (head.length < 3) {
    stats.unknown++;
    return;
  }
  onDelivery(Number(head[0]), Number(head[1]), Number(head[2]));
}

// Rooms mode. Each client goes welcome -> join -> joined; presence frames from later joiners follow.
let presenceExpected = 0;
let presenceWaiter = null;
function onRoomsFrame(client, data) {
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    stats.unknown++;
    return;
  }
  switch (msg.type) {
    case 'message':
      if (msg.data && typeof msg.data === 'object') onDelivery(msg.data.s, msg.data.n, msg.data.t);
      else stats.unknown++;
      break;
    case 'presence':
      stats.presence++;
      if (presenceWaiter && stats.presence >= presenceExpected) presenceWaiter();
      break;
    case 'welcome':
      client.ws.send(JSON.stringify({ type: 'join', room: spec.room }));
      break;
    case 'joined':
      // Members already there when we joined; every later joiner will announce itself to us.
      presenceExpected += N - (Array.isArray(msg.members) ? msg.members.length : 1);
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

function openClient(index) {
  return new Promise((resolve, reject) => {
    const url = spec.mode === 'rooms' ? `${spec.url}?name=b${index}` : spec.url;
    // No permessage-deflate: the reference server does not negotiate it, so neither may the bench.
    const ws = new WebSocket(url, { perMessageDeflate: false, handshakeTimeout: spec.connectTimeoutSeconds * 1000 });
    const client = { index, ws, ready: false };
    let settled = false;
    client.onReady = () => {
      if (settled) return;
      settled = true;
      client.ready = true;
      resolve(client);
    };
    ws.on('error', (err) => {
      if (stats.socketErrors.length < 5) stats.socketErrors.push(`client ${index}: ${err.message}`);
      if (!settled) {
        settled = true;
        reject(new Error(`client ${index}: ${err.message}`));
      }
    });
    ws.on('close', (code, reason) => {
      if (!finished) {
        stats.unexpectedCloses++;
        const key = `${code}${reason.length ? ` ${reason.toString()}` : ''}`;
        stats.closeCodes[key] = (stats.closeCodes[key] || 0) + 1;
      }
      if (!settled) {
        settled = true;
        reject(new Error(`client ${index}: closed during setup (${code})`));
      }
    });
    if (spec.mode === 'rooms') {
      ws.on('message', (data) => onRoomsFrame(client, data));
    } else {
      ws.on('message', onRelayFrame);
      ws.on('open', client.onReady);
    }
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
    // Run standalone (no orchestrator on stdin): start at once.
    if (process.stdin.isTTY) {
      rl.close();
      resolve();
    }
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
  let clients;
  try {
    clients = await withTimeout(connectAll(), spec.setupTimeoutSeconds, 'setup');
  } catch (err) {
    emit({ event: 'result', ok: false, error: `setup failed: ${err.message}`, stats });
    process.exit(1);
  }
  const setupSeconds = (performance.now() - setupStart) / 1000;
  senders = clients.slice(0, spec.senders).map((c, i) => new Sender(i, c));
  emit({ event: 'ready', setupSeconds, presence: stats.presence });
  await waitForGo();

  // Warm-up, then the measured window; sending runs through both.
  let progressCheck = null;
  if (spec.pattern !== 'idle') {
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
  const deliveriesBefore = stats.deliveries;
  const cpuStart = process.cpuUsage();
  const windowStart = performance.now();
  measuring = true;
  emit({ event: 'window_start' });
  await sleep(spec.durationSeconds * 1000);
  measuring = false;
  sending = false;
  const windowSeconds = (performance.now() - windowStart) / 1000;
  const cpu = process.cpuUsage(cpuStart);
  emit({ event: 'window_end' });
  if (progressCheck) clearInterval(progressCheck);

  // Drain: wait for every message sent so far to reach every receiver, or give up after drainSeconds.
  const sentTotal = () => senders.reduce((a, s) => a + s.sent, 0);
  const expectedTotal = () => sentTotal() * receiversPerMessage;
  const drainDeadline = performance.now() + spec.drainSeconds * 1000;
  while (stats.deliveries - stats.duplicates < expectedTotal() && performance.now() < drainDeadline) {
    await sleep(20);
  }
  const drainSeconds = (performance.now() - windowStart) / 1000 - windowSeconds;
  finished = true;

  const sorted = latencies.subarray(0, latencyCount).sort();
  const counted = stats.deliveries - stats.duplicates - stats.unknown;
  const result = {
    event: 'result',
    ok: true,
    spec,
    setupSeconds,
    windowSeconds,
    drainSeconds,
    connected: clients.length,
    sent: sentTotal(),
    expected: expectedTotal(),
    received: counted,
    lost: Math.max(0, expectedTotal() - counted),
    deliveriesPerSec: stats.windowDeliveries / windowSeconds,
    messagesPerSec: stats.windowDeliveries / windowSeconds / receiversPerMessage,
    latencyMs: {
      p50: percentile(sorted, latencyCount, 50),
      p90: percentile(sorted, latencyCount, 90),
      p99: percentile(sorted, latencyCount, 99),
      max: percentile(sorted, latencyCount, 100),
      samples: latencyCount,
    },
    stalled: stalledAt !== null,
    maxSendLagMs,
    loadgenCpuPct: ((cpu.user + cpu.system) / 1e6 / windowSeconds) * 100,
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
