#!/usr/bin/env node
// Independent HBONE client for interop tests: Node's built-in http2 only.
// Shares no code with the product.
//
// node node_hbone_client.js --connect HOST:PORT --authority IP:PORT --ca FILE
//      [--cert FILE --key FILE] [--expect-san spiffe://...] [--message TEXT]
//      [--read-bytes N] [--timeout-ms N] [--forwarded V] [--baggage V]
//      [--traceparent V]
//
// TLS 1.3 only, ALPN h2, no SNI (the TLS socket is made here without a
// servername).  The server chain must verify against --ca; with --expect-san
// the server certificate's URI SAN must equal it.  Without --cert/--key no
// client certificate is sent (to test that servers refuse that).
//
// Sends CONNECT with :authority, writes --message, then
//   --read-bytes N : waits for N bytes of response body, then closes the session
//                    (needed through nghttpx, which never passes a half-close on);
//   otherwise      : half-closes (END_STREAM) and reads until the server ends.
// Prints one JSON line: {"status": 200, "peer_san": "...", "body": "..."} and
// exits 0 on status 200, 1 on another status, 2 on a TLS/connection error or
// timeout ({"error": "...", plus whatever was known}).
'use strict';
const fs = require('fs');
const http2 = require('http2');
const tls = require('tls');

function parseArgs(argv) {
  const flags = new Set(['connect', 'authority', 'ca', 'cert', 'key', 'expect-san', 'message',
    'read-bytes', 'timeout-ms', 'forwarded', 'baggage', 'traceparent']);
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(argv[i]);
    if (!m || !flags.has(m[1])) usage(`unknown argument ${argv[i]}`);
    out[m[1]] = m[2] !== undefined ? m[2] : argv[++i];
    if (out[m[1]] === undefined) usage(`--${m[1]} needs a value`);
  }
  for (const f of ['connect', 'authority', 'ca']) if (!out[f]) usage(`--${f} is required`);
  if (!out.cert !== !out.key) usage('--cert and --key go together');
  return out;
}

function usage(msg) {
  process.stderr.write(`node_hbone_client: ${msg}\n`);
  process.exit(64);
}

function splitHostPort(s) {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(s) || /^([^:]+):(\d+)$/.exec(s);
  if (!m) usage(`bad HOST:PORT ${s}`);
  return [m[1], Number(m[2])];
}

function uriSans(cert) {
  // subjectaltname looks like 'URI:spiffe://td/ns/a/sa/b, DNS:x'
  return (cert && cert.subjectaltname ? cert.subjectaltname.split(', ') : [])
    .filter((s) => s.startsWith('URI:')).map((s) => s.slice(4));
}

const args = parseArgs(process.argv.slice(2));
const [host, port] = splitHostPort(args.connect);
const readBytes = args['read-bytes'] !== undefined ? Number(args['read-bytes']) : null;
const timeoutMs = Number(args['timeout-ms'] || 10000);
const result = {};
const chunks = [];
let received = 0;
let finished = false;
let session = null;

function finish(code, error) {
  if (finished) return;
  finished = true;
  if (result.status === undefined && code !== 2) {
    code = 2;
    error = error || 'no response';
  }
  if (error) result.error = String(error && error.message ? error.message : error).trim();
  if (chunks.length || result.status !== undefined) result.body = Buffer.concat(chunks).toString('utf8');
  process.stdout.write(JSON.stringify(result) + '\n', () => {
    if (session) session.destroy();
    process.exit(code);
  });
}

setTimeout(() => finish(2, `timeout after ${timeoutMs} ms`), timeoutMs).unref();
process.on('beforeExit', () => finish(2, 'nothing left to wait for'));

const tlsOptions = {
  host, port,
  // no `servername`: tls.connect then sends no SNI (http2.connect would add one)
  ca: fs.readFileSync(args.ca),
  minVersion: 'TLSv1.3',
  maxVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
  rejectUnauthorized: true,
  checkServerIdentity: (_hostname, cert) => {
    const sans = uriSans(cert);
    result.peer_san = sans[0] || '';
    if (args['expect-san'] && !sans.includes(args['expect-san'])) {
      return new Error(`server SAN ${JSON.stringify(sans)} != expected ${args['expect-san']}`);
    }
    return undefined;
  },
};
if (args.cert) {
  tlsOptions.cert = fs.readFileSync(args.cert);
  tlsOptions.key = fs.readFileSync(args.key);
}

session = http2.connect(`https://${args.connect}`, {
  createConnection: () => tls.connect(tlsOptions),
});
session.on('error', (e) => finish(2, e));
session.on('close', () => finish(2, 'session closed early'));
session.on('goaway', (code) => { result.goaway = code; });

const headers = { ':method': 'CONNECT', ':authority': args.authority };
for (const h of ['forwarded', 'baggage', 'traceparent']) if (args[h]) headers[h] = args[h];
const stream = session.request(headers, { endStream: false });

stream.on('response', (h) => {
  result.status = Number(h[':status']);
  if (result.status !== 200) {
    finish(1);
    return;
  }
  if (args.message) stream.write(args.message);
  if (readBytes === null) stream.end();
  else if (readBytes <= 0) finish(0);
});
stream.on('data', (d) => {
  chunks.push(d);
  received += d.length;
  if (readBytes !== null && received >= readBytes) finish(0);
});
stream.on('end', () => {
  if (readBytes === null) finish(result.status === 200 ? 0 : 1);
  else finish(2, `stream ended after ${received} of ${readBytes} bytes`);
});
stream.on('error', (e) => finish(2, e));
stream.on('close', () => {
  if (result.status === undefined) {
    finish(2, `stream closed before a response (rst code ${stream.rstCode})`);
  } else if (!finished) {
    finish(2, `stream reset (code ${stream.rstCode}) after ${received} bytes`);
  }
});
