// uWebSockets.js peer for the JSON ping benchmark (bench/run-peers.sh, bench/run-idle.sh):
// GET /ws upgraded only with a valid HS256 token (Authorization: Bearer or ?token=), each
// text frame parsed as JSON, `{"type":"ping","timestamp":N}` answered with
// `{"type":"pong","timestamp":N}`, invalid JSON closed with 1007. Env: LISTEN, JWT_SECRET.
'use strict';
const uWS = require('uWebSockets.js');
const { verifier, tokenFrom, listenAddress, secret } = require('./jwt');

const verify = verifier(secret());
const { host, port } = listenAddress();
const decoder = new TextDecoder();

uWS
  .App()
  .ws('/ws', {
    compression: uWS.DISABLED,
    maxPayloadLength: 64 * 1024,
    // The gateway drops a connection silent for 90 s; uWS's closest setting (it pings first).
    idleTimeout: 120,
    upgrade: (res, req, context) => {
      const identity = verify(tokenFrom(req.getHeader('authorization'), req.getQuery()));
      if (!identity) {
        res.writeStatus('401 Unauthorized').end();
        return;
      }
      res.upgrade(
        { identity },
        req.getHeader('sec-websocket-key'),
        req.getHeader('sec-websocket-protocol'),
        req.getHeader('sec-websocket-extensions'),
        context,
      );
    },
    message: (ws, message, isBinary) => {
      if (isBinary) return;
      let frame;
      try {
        frame = JSON.parse(decoder.decode(message));
      } catch {
        ws.end(1007);
        return;
      }
      if (frame && frame.type === 'ping') {
        ws.send(JSON.stringify({ type: 'pong', timestamp: frame.timestamp }), false);
      }
    },
  })
  .any('/*', (res) => {
    res.writeStatus('404 Not Found').end();
  })
  .listen(host, port, (token) => {
    if (!token) {
      console.error(`cannot listen on ${host}:${port}`);
      process.exit(1);
    }
    console.error(`uWebSockets.js peer listening on ws://${host}:${port}/ws`);
  });
