// Node `ws` peer for the JSON ping benchmark (bench/run-peers.sh, bench/run-idle.sh):
// GET /ws upgraded only with a valid HS256 token (Authorization: Bearer or ?token=), each
// text frame parsed as JSON, `{"type":"ping","timestamp":N}` answered with
// `{"type":"pong","timestamp":N}`, invalid JSON closed with 1007. Env: LISTEN, JWT_SECRET.
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');
const { verifier, tokenFrom, listenAddress, secret } = require('./jwt');

const verify = verifier(secret());
const { host, port } = listenAddress();
const wss = new WebSocketServer({ noServer: true, clientTracking: false, maxPayload: 64 * 1024 });

function refuse(socket, status) {
  socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
}

function onMessage(data, isBinary) {
  if (isBinary) return;
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    this.close(1007);
    return;
  }
  if (frame && frame.type === 'ping') {
    this.send(JSON.stringify({ type: 'pong', timestamp: frame.timestamp }));
  }
}

const server = http.createServer((req, res) => {
  res.writeHead(404).end();
});
server.on('upgrade', (req, socket, head) => {
  const q = req.url.indexOf('?');
  const path = q < 0 ? req.url : req.url.slice(0, q);
  if (path !== '/ws') return refuse(socket, '404 Not Found');
  const identity = verify(tokenFrom(req.headers.authorization, q < 0 ? null : req.url.slice(q + 1)));
  if (!identity) return refuse(socket, '401 Unauthorized');
  wss.handleUpgrade(req, socket, head, (ws) => {
    ws.identity = identity;
    ws.on('message', onMessage);
    ws.on('error', () => {});
  });
});
server.listen(port, host, () => console.error(`ws peer listening on ws://${host}:${port}/ws`));
