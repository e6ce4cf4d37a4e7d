// The Node client's half of test_strict_clients.py: prints one JSON object on stdout.
//
//   node strict_node.js real TARGET   every byte token 0-255 forced through Generate, Chat and
//                                     Detokenize on a live retnet-server
//   node strict_node.js rogue TARGET  Generate and Detokenize against a server that sends text
//                                     fields that are not UTF-8
// Exits 77 (skipped) when npm could not install @grpc/grpc-js.
'use strict';

const path = require('path');

let Client;
try {
  ({ Client } = require(path.join(__dirname, '..', '..', 'client', 'node', 'retnet_client.js')));
} catch (err) {
  console.error(`node client unavailable (${err.message}): skipped`);
  process.exit(77);
}

async function real(target) {
  const c = new Client(target, { timeoutMs: 60000, retries: 0 });
  const out = { generate: [], chat: [], detokenize: [] };
  for (let b = 0; b < 256; ++b) {
    const pieces = [];
    for await (const p of c.generate([65], { ...forcedOpts(b), session: 'node-strict-gen' })) {
      pieces.push(p);
    }
    out.generate.push(turnJson(pieces, c.lastFinal));
  }
  const turns = [];
  for (let b = 0; b < 256; ++b) turns.push(Client.request([65], { ...forcedOpts(b), session: 'node-strict-chat' }));
  for await (const pieces of c.chat(turns, 'node-strict-chat')) {
    out.chat.push(turnJson(pieces, c.lastFinal));
  }
  for (let b = 0; b < 256; ++b) {
    const d = await c.detokenize([b]);
    out.detokenize.push({ text: d.text, raw_hex: d.raw.toString('hex') });
  }
  const all = await c.detokenize(Array.from({ length: 256 }, (_, i) => i));
  out.detokenize_all = { text: all.text, raw_hex: all.raw.toString('hex') };
  c.close();
  return out;
}

function forcedOpts(b) {
  return { maxNewTokens: 1, temperature: 0, ignoreEos: true, logitBias: { [b]: 100 }, tokenBytes: true };
}

function turnJson(pieces, final) {
  return {
    ids: pieces.map((p) => p.id),
    text: pieces.map((p) => p.text).join('') + final.text,
    bytes_hex: pieces.map((p) => p.tokenBytes.toString('hex')).join(''),
  };
}

async function rogue(target) {
  const c = new Client(target, { timeoutMs: 60000, retries: 0 });
  const out = {};
  const t0 = Date.now();
  try {
    const r = await c.complete('hi', { maxNewTokens: 4 });
    out.generate = { ok: true, text: r.text };
  } catch (err) {
    out.generate = { ok: false, code: err.code, details: String(err.details || err.message) };
  }
  out.generate.seconds = (Date.now() - t0) / 1000;
  try {
    const d = await c.detokenize([1]);
    out.detokenize = { ok: true, text: d.text, raw_hex: d.raw.toString('hex') };
  } catch (err) {
    out.detokenize = { ok: false, code: err.code, details: String(err.details || err.message) };
  }
  c.close();
  return out;
}

(async () => {
  const [mode, target] = process.argv.slice(2);
  const result = mode === 'real' ? await real(target) : await rogue(target);
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.exit(0);
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
