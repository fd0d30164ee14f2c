'use strict';
// The burst case of bench/run.py (issue 10): three clients on one server.
//   stalled: connects (and joins, in rooms mode), then stops reading its socket
//   reader:  the `ws` package's client, reading as fast as it can, checking every message arrives in order
//   flooder: writes `count` messages of `payloadBytes` as fast as TCP takes them (one prebuilt buffer)
// Usage: node bench/burst.js '<json spec>'   (bench/run.py builds the spec; see DEFAULTS below)
// Same conversation with the orchestrator as bench/loadgen.js: {"event":"ready"} on stdout, "go" on
// stdin, then {"event":"result", ...}. Every phase has a deadline, so it always ends by itself.
const crypto = require('node:crypto');
const http = require('node:http');
const path = require('node:path');
const readline = require('node:readline');
const { performance } = require('node:perf_hooks');
const { createRequire } = require('node:module');

const WebSocket = createRequire(path.join(__dirname, 'node', 'package.json'))('ws');

const DEFAULTS = {
  url: 'ws://127.0.0.1:8080/',
  mode: 'relay', // relay: raw text frames on `/`; rooms: wsapp's JSON protocol on `/ws`
  room: 'burst',
  count: 20000,
  payloadBytes: 1024, // the whole text payload: relay text, or the publish JSON in rooms mode
  timeoutSeconds: 30, // the reader's deadline for the whole burst
  quietSeconds: 10, // ... or this long without a message
  stalledDrainSeconds: 5, // afterwards: the stalled client reads what it was sent, up to this long
  connectTimeoutSeconds: 10,
};
const spec = { ...DEFAULTS, ...JSON.parse(process.argv[2] || '{}') };
const MESSAGE_PREFIX = '{"type":"message"';
const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const ms = (t) => Math.round((performance.now() - t) * 10) / 10;
const sleep = (n) => new Promise((resolve) => setTimeout(resolve, n));

// Message i: relay text "<6-digit i>ppp..."; rooms publish {"type":"publish",...,"data":{"i":i,"p":"ppp..."}}.
function message(i) {
  if (spec.mode === 'rooms') {
    const bare = JSON.stringify({ type: 'publish', room: spec.room, data: { i, p: '' } });
    return bare.replace('"p":""', `"p":"${'p'.repeat(Math.max(0, spec.payloadBytes - bare.length))}"`);
  }
  const head = String(i).padStart(6, '0');
  return head + 'p'.repeat(Math.max(0, spec.payloadBytes - head.length));
}

// A masked client frame with an all-zero mask: legal, and 20 MB of them cost no masking work.
function clientFrame(opcode, payload) {
  const len = payload.length;
  const ext = len < 126 ? 0 : len < 65536 ? 2 : 8;
  const frame = Buffer.alloc(2 + ext + 4 + len);
  frame[0] = 0x80 | opcode;
  if (ext === 0) frame[1] = 0x80 | len;
  else if (ext === 2) {
    frame[1] = 0x80 | 126;
    frame.writeUInt16BE(len, 2);
  } else {
    frame[1] = 0x80 | 127;
    frame.writeBigUInt64BE(BigInt(len), 2);
  }
  payload.copy(frame, 2 + ext + 4);
  return frame;
}

// The stalled client and the flooder: a bare RFC 6455 client on a net socket, so that the one can stop
// reading (socket.pause: TCP's window closes) and the other can write its whole burst in one call.
class RawClient {
  constructor(name) {
    this.name = name;
    this.socket = null;
    this.pending = null;
    this.messages = 0;
    this.closeCode = null; // from the server's close frame
    this.closeReason = '';
    this.ended = false; // the server shut the TCP connection
    this.error = null;
    this.badFrames = 0;
    this.onText = null; // (text) => void, while set up
    this.onPong = null;
  }

  connect(url) {
    return new Promise((resolve, reject) => {
      const u = new URL(url);
      const key = crypto.randomBytes(16).toString('base64');
      const req = http.request({
        host: u.hostname, port: u.port, path: u.pathname + u.search, agent: false,
        headers: { Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Key': key, 'Sec-WebSocket-Version': '13' },
        timeout: spec.connectTimeoutSeconds * 1000,
      });
      req.on('timeout', () => req.destroy(new Error('handshake timed out')));
      req.on('error', reject);
      req.on('response', (res) => reject(new Error(`${this.name}: HTTP ${res.statusCode} instead of 101`)));
      req.on('upgrade', (res, socket, head) => {
        this.socket = socket;
        socket.setNoDelay(true);
        socket.on('data', (chunk) => this.onData(chunk));
        socket.on('end', () => { this.ended = true; });
        socket.on('close', () => { this.ended = true; });
        socket.on('error', (err) => { this.error = err.code || err.message; });
        resolve(this);
        if (head.length) this.onData(head);
      });
      req.end();
    });
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
      if ((b0 & 0x70) || (buf[off + 1] & 0x80) || len > 1 << 24) { // RSV bits, a mask or nonsense: lost sync
        this.badFrames++;
        this.socket.destroy();
        return;
      }
      if (avail < head + len) break;
      const start = off + head;
      off = start + len;
      const opcode = b0 & 0x0f;
      if (opcode === 1 || opcode === 2) {
        // Burst messages only (rooms mode also sends presence and the like).
        if (spec.mode === 'relay' || buf.toString('latin1', start, start + MESSAGE_PREFIX.length) === MESSAGE_PREFIX) this.messages++;
        if (this.onText) this.onText(buf.toString('utf8', start, off));
      } else if (opcode === 8) {
        this.closeCode = len >= 2 ? buf.readUInt16BE(start) : 1005;
        this.closeReason = buf.toString('utf8', start + 2, off);
        this.socket.end(clientFrame(8, buf.subarray(start, Math.min(off, start + 2))));
      } else if (opcode === 9) {
        this.socket.write(clientFrame(10, buf.subarray(start, off)));
      } else if (opcode === 10 && this.onPong) {
        this.onPong();
      }
    }
    this.pending = off < buf.length ? buf.subarray(off) : null;
  }

  send(text) {
    this.socket.write(clientFrame(1, Buffer.from(text)));
  }

  // Rooms mode: join and wait for `joined`.
  join() {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name}: no joined`)), spec.connectTimeoutSeconds * 1000);
      this.onText = (text) => {
        if (JSON.parse(text).type === 'joined') {
          clearTimeout(timer);
          this.onText = null;
          resolve();
        }
      };
      this.send(JSON.stringify({ type: 'join', room: spec.room }));
    });
  }

  // Still open and answering? A protocol ping, and its pong within `seconds`.
  ping(seconds) {
    if (this.ended || this.closeCode !== null) return Promise.resolve(false);
    return new Promise((resolve) => {
      const timer = setTimeout(() => resolve(false), seconds * 1000);
      this.onPong = () => {
        clearTimeout(timer);
        resolve(true);
      };
      this.socket.write(clientFrame(9, Buffer.from('still there?')));
    });
  }

  state() {
    return { messages: this.messages, closeCode: this.closeCode, closeReason: this.closeReason,
      ended: this.ended, error: this.error, badFrames: this.badFrames };
  }
}

// The reader: the `ws` package's client, checking each message's number against the one expected.
function openReader() {
  return new Promise((resolve, reject) => {
    const url = spec.mode === 'rooms' ? `${spec.url}?name=reader` : spec.url;
    const ws = new WebSocket(url, { perMessageDeflate: false, handshakeTimeout: spec.connectTimeoutSeconds * 1000 });
    const r = { ws, count: 0, outOfOrder: 0, firstAt: null, lastAt: null, closeCode: null, closeReason: '',
      error: null, onProgress: null, gap: 0, gapAfter: 0 };
    const seen = (i) => {
      const now = performance.now();
      if (r.firstAt === null) r.firstAt = now;
      else if (now - r.lastAt > r.gap) {
        // The longest wait between two messages, and how many had come before it (pacing shows here).
        r.gap = now - r.lastAt;
        r.gapAfter = r.count;
      }
      r.lastAt = now;
      if (i !== r.count) r.outOfOrder++;
      r.count++;
      if (r.onProgress) r.onProgress();
    };
    ws.on('open', () => {
      if (spec.mode === 'relay') resolve(r);
      else ws.send(JSON.stringify({ type: 'join', room: spec.room }));
    });
    ws.on('message', (data) => {
      if (spec.mode === 'relay') return seen(Number(data.toString('latin1', 0, 6)));
      const msg = JSON.parse(data.toString());
      if (msg.type === 'joined') resolve(r);
      else if (msg.type === 'message') seen(msg.data.i);
    });
    ws.on('close', (code, reason) => {
      r.closeCode = code;
      r.closeReason = reason.toString();
      if (r.onProgress) r.onProgress();
    });
    ws.on('error', (err) => {
      r.error = err.message;
      reject(err);
    });
  });
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
    rl.on('close', resolve); // run standalone: start at once
    if (process.stdin.isTTY) rl.close();
  });
}

async function main() {
  const at = (suffix) => (spec.mode === 'rooms' ? `${spec.url}?name=${suffix}` : spec.url);
  // The stalled client first, so that in rooms mode the others' joins reach it too, as they would.
  const stalled = await new RawClient('stalled').connect(at('stalled'));
  if (spec.mode === 'rooms') await stalled.join();
  stalled.socket.pause();
  const flooder = await new RawClient('flooder').connect(at('flooder'));
  if (spec.mode === 'rooms') await flooder.join();
  const reader = await openReader();
  const burst = Buffer.concat(Array.from({ length: spec.count }, (_, i) => clientFrame(1, Buffer.from(message(i)))));
  emit({ event: 'ready', burstBytes: burst.length });
  await waitForGo();

  const t0 = performance.now();
  let writtenMs = null;
  flooder.socket.write(burst, () => { writtenMs = ms(t0); });
  // The reader gets all, is closed, or hears nothing for quietSeconds; timeoutSeconds in all.
  let why = await new Promise((resolve) => {
    let quiet = setTimeout(() => resolve('quiet'), spec.quietSeconds * 1000);
    const total = setTimeout(() => resolve('timeout'), spec.timeoutSeconds * 1000);
    reader.onProgress = () => {
      clearTimeout(quiet);
      quiet = setTimeout(() => resolve('quiet'), spec.quietSeconds * 1000);
      if (reader.count >= spec.count || reader.closeCode !== null) {
        clearTimeout(quiet);
        clearTimeout(total);
        resolve(reader.count >= spec.count ? 'all' : 'closed');
      }
    };
  });
  reader.onProgress = null;
  const readerMs = reader.count >= spec.count ? reader.lastAt - t0 : null;
  const flooderDuring = flooder.state();

  // Now the stalled client reads what its server kept for it: the rest of the burst, a close frame,
  // or the end of the connection.
  const resumedAt = performance.now();
  stalled.socket.resume();
  await new Promise((resolve) => {
    const poll = setInterval(() => {
      const done = stalled.messages >= spec.count || stalled.closeCode !== null || stalled.ended;
      if (done || performance.now() - resumedAt > spec.stalledDrainSeconds * 1000) {
        clearInterval(poll);
        resolve();
      }
    }, 10);
  });
  const stalledMs = ms(resumedAt);
  const flooderAnswers = await flooder.ping(2);
  if (why === 'all' && reader.outOfOrder) why = 'all, out of order';

  emit({
    event: 'result',
    ok: true,
    spec,
    burstBytes: burst.length,
    outcome: why,
    reader: { count: reader.count, outOfOrder: reader.outOfOrder, lost: spec.count - reader.count,
      allMs: readerMs === null ? null : Math.round(readerMs * 10) / 10,
      firstMs: reader.firstAt === null ? null : Math.round((reader.firstAt - t0) * 10) / 10,
      longestGapMs: Math.round(reader.gap * 10) / 10, gapAfter: reader.gapAfter,
      closeCode: reader.closeCode, closeReason: reader.closeReason },
    stalled: { ...stalled.state(), readForMs: stalledMs },
    flooder: { ...flooder.state(), closedDuringBurst: flooderDuring.closeCode !== null || flooderDuring.ended,
      writtenMs, answersPing: flooderAnswers },
  });
  process.exit(0);
}

main().catch((err) => {
  emit({ event: 'result', ok: false, error: err.stack || String(err) });
  process.exit(1);
});
