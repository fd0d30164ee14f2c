// The classic client written for the Node `ws` broadcast server, as users have it:
// connect, greet on open, log what arrives and when it is closed. Only the URL is configurable.
const WebSocket = require('ws');

const ws = new WebSocket(process.env.WS_URL || 'ws://localhost:8080');

ws.on('open', () => {
  console.log('Connected to the WebSocket server');
  ws.send(process.env.GREETING || 'Hello, WebSocket server!');
});

ws.on('message', (message) => {
  console.log(`Received: ${message}`);
});

ws.on('close', () => {
  console.log('Disconnected from the WebSocket server');
});
