// HS256 JWT check for the Node peers, the same checks as chatify-core's Authenticator:
// header alg exactly HS256, HMAC-SHA256 signature (constant-time compare), exp required and
// nbf if present (5 s leeway), sub and did valid Chatify ids, jti 1..128 bytes.
'use strict';
const crypto = require('crypto');

const LEEWAY_SECONDS = 5;
const ID_RE = /^[A-Za-z0-9._@-]{1,64}$/;

function decodeJson(part) {
  return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
}

function verifier(secret) {
  const key = Buffer.from(secret, 'utf8');
  return function verify(token) {
    if (!token) return null;
    const dot1 = token.indexOf('.');
    const dot2 = dot1 < 0 ? -1 : token.indexOf('.', dot1 + 1);
    if (dot2 < 0 || token.indexOf('.', dot2 + 1) >= 0) return null;
    let header;
    let claims;
    try {
      header = decodeJson(token.slice(0, dot1));
    } catch {
      return null;
    }
    if (!header || header.alg !== 'HS256') return null;
    const signature = Buffer.from(token.slice(dot2 + 1), 'base64url');
    const expected = crypto.createHmac('sha256', key).update(token.slice(0, dot2)).digest();
    if (signature.length !== expected.length || !crypto.timingSafeEqual(signature, expected)) {
      return null;
    }
    try {
      claims = decodeJson(token.slice(dot1 + 1, dot2));
    } catch {
      return null;
    }
    const now = Date.now() / 1000;
    if (typeof claims.exp !== 'number' || claims.exp + LEEWAY_SECONDS < now) return null;
    if (claims.nbf !== undefined && (typeof claims.nbf !== 'number' || claims.nbf - LEEWAY_SECONDS > now)) {
      return null;
    }
    if (typeof claims.sub !== 'string' || !ID_RE.test(claims.sub)) return null;
    if (typeof claims.did !== 'string' || !ID_RE.test(claims.did)) return null;
    if (typeof claims.jti !== 'string' || claims.jti.length === 0 || claims.jti.length > 128) return null;
    return { userId: claims.sub, deviceId: claims.did, jti: claims.jti, expiresAt: claims.exp };
  };
}

// The token to verify: `Authorization: Bearer` wins over `?token=` (as in the gateway).
function tokenFrom(authorization, query) {
  if (authorization) {
    const space = authorization.indexOf(' ');
    if (space > 0 && authorization.slice(0, space).toLowerCase() === 'bearer') {
      const token = authorization.slice(space + 1).trim();
      if (token) return token;
    }
  }
  if (query) {
    for (const pair of query.split('&')) {
      if (pair.startsWith('token=')) {
        try {
          return decodeURIComponent(pair.slice(6));
        } catch {
          return null;
        }
      }
    }
  }
  return null;
}

function listenAddress() {
  const listen = process.env.LISTEN || '127.0.0.1:18100';
  const colon = listen.lastIndexOf(':');
  return { host: listen.slice(0, colon), port: Number(listen.slice(colon + 1)) };
}

function secret() {
  const value = process.env.JWT_SECRET || '';
  if (Buffer.byteLength(value) < 32) {
    console.error('JWT_SECRET must be at least 32 bytes');
    process.exit(2);
  }
  return value;
}

module.exports = { verifier, tokenFrom, listenAddress, secret };
