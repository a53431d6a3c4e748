'use strict';
// Hand check of a peer against the raw-ws room contract (bench/peers/README.md):
//
//   node bench/peers/check.js ws://127.0.0.1:PORT/ws [--http-pub http://127.0.0.1:PORT/pub]
//
// Two clients join one fresh room, a third joins another room; A and B each send two
// messages. Passes when A and B each see all four messages (their own included), in each
// sender's order, the other room sees none, and a ping is answered with a pong. With
// --http-pub it also POSTs one message to the room over HTTP (nchan) and expects both to
// see it. Prints what every client received; exit status 0 on pass.
// Uses the `ws` package of bench/peers/node-ws (run `npm ci` there first).

const path = require('path');
const http = require('http');
const WebSocket = require(path.join(__dirname, 'node-ws', 'node_modules', 'ws'));

const base = process.argv[2];
const pubIdx = process.argv.indexOf('--http-pub');
const pubBase = pubIdx > 0 ? process.argv[pubIdx + 1] : null;
if (!base) {
  console.error('usage: check.js ws://HOST:PORT/ws [--http-pub http://HOST:PORT/pub]');
  process.exit(2);
}
const room = `check-${process.pid}-${Date.now()}`;
const other = `${room}-other`;

function open(name, r) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${base}/${r}`);
    ws.got = [];
    ws.name = name;
    ws.on('message', (d, isBinary) => ws.got.push((isBinary ? '[binary] ' : '') + d.toString()));
    ws.on('open', () => resolve(ws));
    ws.on('error', reject);
  });
}

function post(msg) {
  return new Promise((resolve, reject) => {
    const req = http.request(`${pubBase}/${room}`, { method: 'POST' }, (res) => {
      res.resume();
      res.on('end', () => resolve(res.statusCode));
    });
    req.on('error', reject);
    req.end(msg);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

(async () => {
  const a = await open('A', room);
  const b = await open('B', room);
  const c = await open('C (other room)', other);
  await sleep(200);
  const pong = new Promise((resolve) => a.once('pong', (d) => resolve(d.toString())));
  a.ping('p1');
  a.send('a1');
  b.send('b1');
  a.send('a2');
  b.send('b2');
  let expected = ['a1', 'a2', 'b1', 'b2'];
  if (pubBase) {
    await sleep(100);
    console.log(`HTTP POST ${pubBase}/${room}: ${await post('http1')}`);
    expected.push('http1');
  }
  const pongData = await Promise.race([pong, sleep(2000).then(() => null)]);
  await sleep(500);
  let ok = pongData === 'p1';
  console.log(`ping -> pong: ${pongData === null ? 'NO PONG' : JSON.stringify(pongData)}`);
  for (const ws of [a, b, c]) console.log(`${ws.name} received: ${JSON.stringify(ws.got)}`);
  for (const ws of [a, b]) {
    const got = [...ws.got].sort();
    const order = (p) => ws.got.filter((m) => m.startsWith(p));
    if (JSON.stringify(got) !== JSON.stringify([...expected].sort())) ok = false;
    if (JSON.stringify(order('a')) !== '["a1","a2"]') ok = false;
    if (JSON.stringify(order('b')) !== '["b1","b2"]') ok = false;
  }
  if (c.got.length !== 0) ok = false;
  const closed = new Promise((resolve) => a.once('close', (code) => resolve(code)));
  a.close(1000);
  const code = await Promise.race([closed, sleep(2000).then(() => 'no close reply')]);
  console.log(`close handshake: ${code}`);
  if (code !== 1000) ok = false;
  b.terminate();
  c.terminate();
  console.log(ok ? 'PASS' : 'FAIL');
  process.exit(ok ? 0 : 1);
})().catch((e) => {
  console.error(`FAIL: ${e.message}`);
  process.exit(1);
});
