'use strict';
// A WebSocket room broadcast server on Node.js `ws`: the "node-ws" peer of bench/compare,
// written the way ws is usually deployed: one Node process (ws has no multi-core mode;
// scaling out means more processes behind a balancer, and rooms would then need a
// shared bus, which is a different server).
//
// Contract (the "raw-ws room" contract, bench/peers/README.md): a client opens
// ws://HOST:PORT/ws/<room>; every text message it sends goes, unchanged, to every
// connection currently in that room, the sender included, in the order received.
// Pings are answered by ws (autoPong), close handshakes too.
//
// Bounds: a connection whose unsent data (ws.bufferedAmount: bytes queued in ws and in
// the socket's user-space buffer) is over OUTBOUND_BYTES_MAX is terminated, the same
// 4 MiB Flare uses (--outbound-bytes-max); incoming messages are capped at
// MESSAGE_BYTES_MAX (maxPayload).
//
// Usage: node server.js [PORT]  (or env PORT, default 8082; env BIND, default 127.0.0.1)
// Prints "node-ws listening on ADDR:PORT" when ready; exits on SIGTERM / SIGINT.

const http = require('http');
const { WebSocketServer } = require('ws');

const OUTBOUND_BYTES_MAX = 4 * 1024 * 1024;
const MESSAGE_BYTES_MAX = 64 * 1024;
const ROOM_PATH = /^\/ws\/([A-Za-z0-9_.@:-]+)$/;

const port = Number(process.argv[2] || process.env.PORT || 8082);
const host = process.env.BIND || '127.0.0.1';

/** room name -> Set of sockets in it */
const rooms = new Map();

function join(room, ws) {
  let members = rooms.get(room);
  if (!members) {
    members = new Set();
    rooms.set(room, members);
  }
  members.add(ws);
}

function leave(room, ws) {
  const members = rooms.get(room);
  if (!members) return;
  members.delete(ws);
  if (members.size === 0) rooms.delete(room);
}

function broadcast(room, data) {
  const members = rooms.get(room);
  if (!members) return;
  for (const peer of members) {
    if (peer.bufferedAmount > OUTBOUND_BYTES_MAX) {
      // Too slow: drop it rather than hold unbounded memory for it.
      peer.terminate();
      continue;
    }
    peer.send(data, { binary: false });
  }
}

const wss = new WebSocketServer({
  noServer: true,
  perMessageDeflate: false,
  maxPayload: MESSAGE_BYTES_MAX,
});

const server = http.createServer((req, res) => {
  res.writeHead(426, { 'content-type': 'text/plain' });
  res.end('WebSocket only: ws://HOST:PORT/ws/<room>\n');
});

server.on('upgrade', (req, socket, head) => {
  const m = ROOM_PATH.exec(req.url);
  if (!m) {
    socket.end('HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
    return;
  }
  const room = m[1];
  wss.handleUpgrade(req, socket, head, (ws) => {
    join(room, ws);
    ws.on('message', (data, isBinary) => {
      if (!isBinary) broadcast(room, data);
    });
    ws.on('close', () => leave(room, ws));
    ws.on('error', () => {}); // 'close' follows
  });
});

server.listen(port, host, () => {
  const a = server.address();
  console.log(`node-ws listening on ${a.address}:${a.port}`);
});

function stop() {
  server.close();
  for (const ws of wss.clients) ws.terminate();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
