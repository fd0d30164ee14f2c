'use strict';
// Reference echo server for the Autobahn fuzzing client: the same role as wsapp's /echo route,
// built on the Node `ws` library so both servers run the same cases and their results compare.
const { WebSocketServer } = require('ws');

const port = Number.parseInt(process.env.PORT || '0', 10);
const host = process.env.HOST || '127.0.0.1';

const wss = new WebSocketServer({
  host,
  port,
  // Same cap as wsapp's WSAPP_MAX_MESSAGE_BYTES in the harness, so section 9 (up to 16 MiB)
  // measures both servers on the same messages instead of one of them refusing them.
  maxPayload: 20000000,
  // ws 8.23 caps a message at 16384 fragments by default; cases 9.3.1/9.4.1 send 65536. wsapp runs
  // with WSAPP_MAX_FRAGMENTS=0 here, so lift the cap on both sides.
  maxFragments: 0,
  // permessage-deflate is off for the compared sections 1-10. WS_DEFLATE=1 turns it on with ws's
  // defaults, to time sections 12 and 13 against a peer (docs/CONFORMANCE.md, "Where the time of
  // 12 and 13 goes").
  perMessageDeflate: process.env.WS_DEFLATE === '1',
});

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    ws.send(data, { binary: isBinary });
  });
  // A protocol error closes the socket inside ws; without a listener it would crash the process.
  ws.on('error', () => {});
});

wss.on('listening', () => {
  // run.sh reads this line to learn the port when PORT=0.
  process.stderr.write(`node-ws echo listening on ws://${host}:${wss.address().port}\n`);
});

function shutdown() {
  for (const client of wss.clients) client.terminate();
  wss.close(() => process.exit(0));
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
