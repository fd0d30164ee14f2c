// Two `ws` clients against a server's relay: text and binary both ways, types kept, nothing echoed
// to the sender, clean close. Prints one JSON line with what it saw; exits 1 on any mismatch.
const WebSocket = require('ws');

const url = process.argv[2];
const deadline = setTimeout(() => fail('timed out'), 10000);

function fail(why) {
  console.log(JSON.stringify({ ok: false, why }));
  process.exit(1);
}

function open(name) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    ws.inbox = [];
    ws.waiters = [];
    ws.on('message', (data, isBinary) => {
      const item = { isBinary, data: Buffer.from(data) };
      const waiter = ws.waiters.shift();
      if (waiter) waiter(item); else ws.inbox.push(item);
    });
    ws.on('open', () => resolve(ws));
    ws.on('error', reject);
    ws.name = name;
  });
}

function next(ws) {
  return new Promise((resolve) => {
    const item = ws.inbox.shift();
    if (item) resolve(item); else ws.waiters.push(resolve);
  });
}

function closed(ws) {
  return new Promise((resolve) => ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() })));
}

(async () => {
  const a = await open('a');
  const b = await open('b');
  const seen = {};

  a.send('Hello, WebSocket server!');
  let got = await next(b);
  if (got.isBinary || got.data.toString() !== 'Hello, WebSocket server!') fail(`b got ${JSON.stringify(got)}`);
  seen.textAtoB = got.data.toString();

  const bin = Buffer.from([0, 1, 2, 254, 255]);
  b.send(bin);
  got = await next(a);
  if (!got.isBinary || !got.data.equals(bin)) fail(`a got ${JSON.stringify(got)}`);
  seen.binaryBtoA = [...got.data];

  const unicode = 'héllo ✓ 🎉';
  b.send(unicode);
  got = await next(a);
  if (got.isBinary || got.data.toString() !== unicode) fail(`a got ${JSON.stringify(got)}`);
  seen.unicodeBtoA = got.data.toString();

  // Nothing of its own came back to either sender.
  if (a.inbox.length || b.inbox.length) fail('a sender received its own message');

  const aClosed = closed(a);
  a.close(1000, 'done');
  seen.close = await aClosed;
  b.close();
  clearTimeout(deadline);
  console.log(JSON.stringify({ ok: true, seen }));
})().catch((err) => fail(String(err)));
