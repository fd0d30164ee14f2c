// A Node `ws` client that reads as fast as it can and checks it gets every message of a burst in order.
//   node reader.js URL relay N         messages are "<6-digit number><padding>", 0..N-1 from each sender
//   node reader.js URL rooms N ROOM    joins ROOM on /ws; `message`s carry data {"s": sender, "i": n}
// Prints "ready" once it listens, then one JSON line: {count, outOfOrder, closeCode, ms}.
const WebSocket = require('ws');

const [url, mode, total, room] = [process.argv[2], process.argv[3], Number(process.argv[4]), process.argv[5]];
const ws = new WebSocket(url);
const next = new Map(); // sender -> next expected number
let count = 0;
let outOfOrder = 0;
let started = 0;
const deadline = setTimeout(() => finish(null), 60000);

function finish(closeCode) {
  clearTimeout(deadline);
  console.log(JSON.stringify({ count, outOfOrder, closeCode, ms: started ? Date.now() - started : 0 }));
  process.exit(0);
}

function seen(sender, i) {
  if (!started) started = Date.now();
  if ((next.get(sender) || 0) !== i) outOfOrder += 1;
  next.set(sender, i + 1);
  count += 1;
  if (count === total) finish(null);
}

ws.on('open', () => {
  if (mode === 'relay') console.log('ready');
  else ws.send(JSON.stringify({ type: 'join', room }));
});
ws.on('message', (data, isBinary) => {
  if (mode === 'relay') {
    const text = data.toString('latin1', 0, 12);
    const [sender, i] = text.includes(':') ? text.split(':') : ['0', text.slice(0, 6)];
    seen(sender, Number(i.slice(0, 6)));
    return;
  }
  const msg = JSON.parse(data.toString());
  if (msg.type === 'joined') console.log('ready');
  else if (msg.type === 'message') seen(String(msg.data.s), msg.data.i);
});
ws.on('close', (code) => finish(code));
ws.on('error', (err) => { console.log(JSON.stringify({ error: String(err) })); process.exit(1); });
