// Encrypts as Node.js programs do, for keyissuer's interop tests
// (server/daemon/interop_test.go). Each input line is
// "SCHEME PUBLIC_KEY_B64 PLAINTEXT_B64" (the public key is keyissuer's
// base64 DER SubjectPublicKeyInfo); each output line is "SCHEME
// CIPHERTEXT_B64". The schemes are the common settings of Node's crypto
// module and of WebCrypto (crypto.subtle, as in browsers).
'use strict';
const crypto = require('crypto');

const schemes = {
  // publicEncrypt's default padding is OAEP with SHA-1 (and MGF1-SHA-1).
  'publicEncrypt-default': (key, pt) => crypto.publicEncrypt(key, pt),
  // oaepHash sets the OAEP hash; OpenSSL then uses it for MGF1 as well.
  'publicEncrypt-oaepHash-sha256': (key, pt) => crypto.publicEncrypt(
    { key, padding: crypto.constants.RSA_PKCS1_OAEP_PADDING, oaepHash: 'sha256' }, pt),
  'publicEncrypt-RSA_PKCS1_PADDING': (key, pt) => crypto.publicEncrypt(
    { key, padding: crypto.constants.RSA_PKCS1_PADDING }, pt),
  // WebCrypto's RSA-OAEP uses the key's hash for OAEP and MGF1 alike.
  'webcrypto-RSA-OAEP-SHA-256': (key, pt, der) => webcrypto('SHA-256', der, pt),
  'webcrypto-RSA-OAEP-SHA-1': (key, pt, der) => webcrypto('SHA-1', der, pt),
};

async function webcrypto(hash, der, pt) {
  const subtle = crypto.webcrypto.subtle;
  const k = await subtle.importKey('spki', der, { name: 'RSA-OAEP', hash }, false, ['encrypt']);
  return Buffer.from(await subtle.encrypt({ name: 'RSA-OAEP' }, k, pt));
}

async function main() {
  const input = require('fs').readFileSync(0, 'utf8');
  const out = [];
  for (const line of input.split('\n').filter((l) => l.trim() !== '')) {
    const [scheme, pubB64, ptB64] = line.trim().split(' ');
    const enc = schemes[scheme];
    if (!enc) throw new Error(`unknown scheme ${scheme}`);
    const der = Buffer.from(pubB64, 'base64');
    const key = crypto.createPublicKey({ key: der, format: 'der', type: 'spki' });
    const ct = await enc(key, Buffer.from(ptB64, 'base64'), der);
    out.push(`${scheme} ${Buffer.from(ct).toString('base64')}\n`);
  }
  process.stdout.write(out.join(''));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
