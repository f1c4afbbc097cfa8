#!/usr/bin/env node
// Independent HBONE server for interop tests: Node's built-in http2 only.
// Shares no code with the product.
//
// node node_hbone_server.js --listen HOST:PORT --ca FILE --cert FILE --key FILE
//      [--allow-prefix P]...
//
// mTLS 1.3 only, ALPN h2; the client certificate must verify against --ca.
// Each CONNECT stream is connected to its :authority (only 127.0.0.1 or an
// address starting with one of the --allow-prefix strings, else 403) and
// piped both ways, passing half-closes on in both directions.  Other methods
// get 405; an unreachable target gets 503.
//
// stdout, one JSON object per line:
//   {"ready": PORT}                          once listening (PORT is the real one for :0)
//   {"peer_san": ..., "authority": ..., "forwarded": ..., "baggage": ...,
//    "traceparent": ..., "sni": ..., "remote": "ip:port", "status": N}
//                                            once per stream, when it is answered
//   {"tls_error": "..."}                     for each refused TLS handshake
'use strict';
const fs = require('fs');
const http2 = require('http2');
const net = require('net');

function usage(msg) {
  process.stderr.write(`node_hbone_server: ${msg}\n`);
  process.exit(64);
}

function parseArgs(argv) {
  const out = { 'allow-prefix': [] };
  for (let i = 0; i < argv.length; i++) {
    const m = /^--(listen|ca|cert|key|allow-prefix)(?:=(.*))?$/.exec(argv[i]);
    if (!m) usage(`unknown argument ${argv[i]}`);
    const v = m[2] !== undefined ? m[2] : argv[++i];
    if (v === undefined) usage(`--${m[1]} needs a value`);
    if (m[1] === 'allow-prefix') out[m[1]].push(v); else out[m[1]] = v;
  }
  for (const f of ['listen', 'ca', 'cert', 'key']) if (!out[f]) usage(`--${f} is required`);
  return out;
}

function splitHostPort(s) {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(s) || /^([^:\[\]]+):(\d+)$/.exec(s);
  return m ? [m[1], Number(m[2])] : null;
}

function log(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function uriSans(cert) {
  return (cert && cert.subjectaltname ? cert.subjectaltname.split(', ') : [])
    .filter((s) => s.startsWith('URI:')).map((s) => s.slice(4));
}

const args = parseArgs(process.argv.slice(2));
const listen = splitHostPort(args.listen);
if (!listen) usage(`bad --listen ${args.listen}`);
const allowed = (ip) => ip === '127.0.0.1' || args['allow-prefix'].some((p) => ip.startsWith(p));

const server = http2.createSecureServer({
  ca: fs.readFileSync(args.ca),
  cert: fs.readFileSync(args.cert),
  key: fs.readFileSync(args.key),
  requestCert: true,
  rejectUnauthorized: true,
  minVersion: 'TLSv1.3',
  maxVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
});

server.on('tlsClientError', (err) => log({ tls_error: err.message }));
server.on('sessionError', () => {});
server.on('session', (session) => session.on('error', () => {}));

server.on('stream', (stream, headers) => {
  const sock = stream.session.socket;
  const record = {
    peer_san: uriSans(sock.getPeerCertificate()).join(','),
    authority: headers[':authority'] || null,
    forwarded: headers.forwarded || null,
    baggage: headers.baggage || null,
    traceparent: headers.traceparent || null,
    sni: sock.servername || null,
    remote: `${sock.remoteAddress}:${sock.remotePort}`,
  };
  stream.on('error', () => {});
  const answer = (status) => {
    record.status = status;
    log(record);
    if (!stream.destroyed && !stream.headersSent) {
      stream.respond({ ':status': status }, { endStream: status !== 200 });
    }
  };
  if (headers[':method'] !== 'CONNECT') return answer(405);
  const target = splitHostPort(record.authority || '');
  if (!target || !allowed(target[0])) return answer(403);

  const upstream = net.connect({ host: target[0], port: target[1], allowHalfOpen: true });
  let connected = false;
  upstream.on('connect', () => {
    connected = true;
    answer(200);
    stream.pipe(upstream);   // client END_STREAM -> FIN to the target
    upstream.pipe(stream);   // FIN from the target -> END_STREAM to the client
  });
  upstream.on('error', (e) => {
    if (!connected) {
      record.error = e.code || e.message;
      answer(503);
    } else if (!stream.destroyed) {
      stream.close(http2.constants.NGHTTP2_CONNECT_ERROR);
    }
  });
  stream.on('close', () => upstream.destroy());
});

process.on('uncaughtException', (e) => {
  process.stderr.write(`node_hbone_server: ${e.stack || e}\n`);
});
process.on('SIGTERM', () => process.exit(0));

server.once('error', (e) => {
  process.stderr.write(`node_hbone_server: ${e.message}\n`);
  process.exit(1);
});
server.listen(listen[1], listen[0], () => log({ ready: server.address().port }));
