// The checkout page: asks the merchant's backend for a one-time key,
// encrypts the wallet password followed by the salt with WebCrypto
// (RSA-OAEP, SHA-256), and posts {uniqueId, ciphertext} for the wallet to
// check. The password never leaves this page unencrypted. "Password then
// salt" is keyissuerd's default plaintext layout (keys.layout =
// "password-salt"); a daemon with another layout needs that order here.
"use strict";

const form = document.getElementById("checkout");
const password = document.getElementById("password");
const pay = document.getElementById("pay");
const replay = document.getElementById("replay");
const status = document.getElementById("status");

let last = null; // the last {uniqueId, ciphertext} sent, for #replay

function step(text, cls) {
  const li = document.createElement("li");
  li.textContent = text;
  if (cls) li.className = cls;
  status.appendChild(li);
}

function begin() {
  status.replaceChildren();
  delete status.dataset.outcome;
  pay.disabled = replay.disabled = true;
}

function finish(outcome, message) {
  step(message, "final");
  status.dataset.outcome = outcome;
  pay.disabled = false;
  replay.disabled = last === null;
}

async function postJSON(path, body) {
  const r = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return r.json();
}

function fromBase64(s) {
  return Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
}

function toBase64(buf) {
  let s = "";
  for (const b of new Uint8Array(buf)) s += String.fromCharCode(b);
  return btoa(s);
}

async function submit(payload) {
  step("Sent {uniqueId, ciphertext} to the merchant, who forwards it to the wallet…");
  const v = await postJSON("checkout/pay", payload);
  finish(v.outcome, v.message);
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  begin();
  try {
    step("Asking the merchant for a one-time key…");
    const k = await postJSON("checkout/key", {});
    if (!k.uniqueId) {
      finish(k.outcome || "error", k.message || "no key");
      return;
    }
    step("Got key " + k.uniqueId + " from keyissuerd (its signature checked by the merchant)");
    const key = await crypto.subtle.importKey("spki", fromBase64(k.publicKey),
      { name: "RSA-OAEP", hash: "SHA-256" }, false, ["encrypt"]);
    const plaintext = new TextEncoder().encode(password.value + k.salt);
    const ct = await crypto.subtle.encrypt({ name: "RSA-OAEP" }, key, plaintext);
    step("Encrypted password + salt in the browser (RSA-OAEP, SHA-256): " + ct.byteLength + " bytes");
    last = { uniqueId: k.uniqueId, ciphertext: toBase64(ct) };
    await submit(last);
  } catch (e) {
    finish("error", "error: " + e.message);
  }
});

replay.addEventListener("click", async () => {
  if (last === null) return;
  begin();
  try {
    step("Replaying the last ciphertext, for key " + last.uniqueId);
    await submit(last);
  } catch (e) {
    finish("error", "error: " + e.message);
  }
});
