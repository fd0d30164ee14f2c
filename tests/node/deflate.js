// Two `ws` clients with perMessageDeflate on, against `/` (relay) or `/ws` (rooms): both must have
// negotiated permessage-deflate, and large text and binary messages (compressed by ws above its
// 1 KiB threshold) must arrive byte for byte in both directions. Prints one JSON line; exits 1 on a mismatch.
const WebSocket = require('ws');

const [url, mode] = process.argv.slice(2);
const deadline = setTimeout(() => fail('timed out'), 10000);

function fail(why) {
  console.log(JSON.stringify({ ok: false, why }));
  process.exit(1);
}

function open() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: true });
    ws.inbox = [];
    ws.waiters = [];
    ws.on('message', (data, isBinary) => {
      const item = { isBinary, data: Buffer.from(data) };
      const waiter = ws.waiters.shift();
      if (waiter) waiter(item); else ws.inbox.push(item);
    });
    ws.on('upgrade', (res) => { ws.answer = res.headers['sec-websocket-extensions']; });
    ws.on('open', () => resolve(ws));
    ws.on('error', reject);
  });
}

function next(ws) {
  return new Promise((resolve) => {
    const item = ws.inbox.shift();
    if (item) resolve(item); else ws.waiters.push(resolve);
  });
}

async function nextOfType(ws, type) {
  for (;;) {
    const item = await next(ws);
    const msg = JSON.parse(item.data.toString());
    if (msg.type === type) return msg;
  }
}

function chatText(n) {
  const words = ['hello', 'room', 'message', 'ünïcode ✓', 'deflate', 'json', '🎉'];
  let out = '';
  for (let i = 0; out.length < n; i++) out += `${words[i % words.length]}-${i} `;
  return out;
}

async function relay(a, b, seen) {
  const text = chatText(6000);
  a.send(text);
  let got = await next(b);
  if (got.isBinary || got.data.toString() !== text) fail('b got a different text');
  seen.textAtoB = got.data.length;
  const bin = Buffer.alloc(5000);
  for (let i = 0; i < bin.length; i++) bin[i] = (i * 7) % 13;
  b.send(bin);
  got = await next(a);
  if (!got.isBinary || !got.data.equals(bin)) fail('a got different bytes');
  seen.binaryBtoA = got.data.length;
  a.send('small');
  got = await next(b);
  if (got.data.toString() !== 'small') fail('b got a different small text');
}

async function rooms(a, b, seen) {
  await nextOfType(a, 'welcome');
  await nextOfType(b, 'welcome');
  for (const ws of [a, b]) {
    ws.send(JSON.stringify({ type: 'join', room: 'deflate' }));
    await nextOfType(ws, 'joined');
  }
  const text = chatText(6000);
  a.send(JSON.stringify({ type: 'publish', room: 'deflate', data: { text } }));
  let msg = await nextOfType(b, 'message');
  if (msg.data.text !== text) fail('b got a different message');
  seen.textAtoB = msg.data.text.length;
  b.send(JSON.stringify({ type: 'publish', room: 'deflate', data: { text: text + '!' } }));
  msg = await nextOfType(a, 'message');
  if (msg.data.text !== text + '!') fail('a got a different message');
  seen.textBtoA = msg.data.text.length;
}

(async () => {
  const a = await open();
  const b = await open();
  // ws.extensions names what ws accepted; the answer is the server's 101 header.
  const seen = { extensions: [a.extensions, b.extensions], answers: [a.answer, b.answer] };
  await (mode === 'rooms' ? rooms(a, b, seen) : relay(a, b, seen));
  a.close(1000);
  b.close(1000);
  clearTimeout(deadline);
  console.log(JSON.stringify({ ok: true, seen }));
})().catch((err) => fail(String(err)));
