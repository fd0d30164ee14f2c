'use strict';
// The classic Node `ws` broadcast server: every message a client sends goes to every other OPEN client.
// bench/run.py measures wsapp's relay route (`/`) against this. PORT (default 8080) and HOST from env.
// REF_DEFLATE=1 turns permessage-deflate on with ws's defaults (`perMessageDeflate: true`: context
// takeover both ways unless the client asks otherwise, 1 KiB threshold, zlib level 6), as the
// deflate cases of bench/run.py run it; otherwise it is off, as in the other cases.
const http = require('node:http');
const { WebSocket, WebSocketServer } = require('ws');

const port = Number(process.env.PORT || 8080);
const host = process.env.HOST || '127.0.0.1';

const server = http.createServer();
const wss = new WebSocketServer({ server, perMessageDeflate: process.env.REF_DEFLATE === '1' });

wss.on('connection', (ws) => {
  ws.on('error', (err) => console.error('client error:', err.message));
  ws.on('message', (data, isBinary) => {
    // ws 8 hands us the payload as a Buffer, and send(Buffer) alone would forward a text message as a
    // binary frame. Passing {binary: isBinary} keeps the frame type, as wsapp does, so both servers
    // put identical traffic on the wire.
    wss.clients.forEach((client) => {
      if (client !== ws && client.readyState === WebSocket.OPEN) {
        client.send(data, { binary: isBinary });
      }
    });
  });
});

server.listen(port, host, () => {
  console.error(`reference listening on http://${host}:${server.address().port}`);
});

// SIGTERM from bench/run.py: exit promptly with status 0 rather than dying on the signal.
process.on('SIGTERM', () => process.exit(0));
