'use strict';
/**
 * Runs the Node client against a live retnet-server (started here on 127.0.0.1 port 0).
 *
 * usage: node client/node/test_client.js --server build/bin/retnet-server
 *                                        [--cxx-client build/bin/retnet-client]
 * Checks: model info; greedy generation (30 tokens, usage); with --cxx-client, the C++ client's
 * ids for the same request equal the Node client's; a session continued across two calls equals
 * one pass over the whole conversation; status codes surface as errors with .code and .details.
 */

const childProcess = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
let Client, grpc;
try {
  ({ Client, grpc } = require('./retnet_client'));
} catch (e) {
  if (e.code !== 'MODULE_NOT_FOUND') throw e;
  // ctest reports exit 77 as skipped: the dependencies are installed by `npm ci` in client/node.
  console.log(`skipped: ${e.message.split('\n')[0]} (run npm ci in client/node)`);
  process.exit(77);
}

function parseArgs(argv) {
  const args = { server: null, cxxClient: null };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--server') args.server = value();
    else if (a === '--cxx-client') args.cxxClient = value();
    else throw new Error(`unknown argument ${a}`);
  }
  if (!args.server) throw new Error('usage: test_client.js --server PATH [--cxx-client PATH]');
  return args;
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Bounded: up to 30 s for the server to bind and load the model.
async function waitForPort(portFile, server, spawnError) {
  for (let i = 0; i < 3000; i++) {
    if (spawnError()) throw new Error(`cannot start the server: ${spawnError().message}`);
    if (server.exitCode !== null || server.signalCode !== null) {
      throw new Error(`server exited early (${server.exitCode ?? server.signalCode})`);
    }
    if (fs.existsSync(portFile)) {
      const port = parseInt(fs.readFileSync(portFile, 'utf8'), 10);
      if (port > 0) return port;
    }
    await delay(10);
  }
  throw new Error('no port file after 30 s');
}

function sameIds(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

async function runChecks(target, cxxClient, check) {
  const c = new Client(target, { timeoutMs: 60000 });
  try {
    const info = await c.modelInfo();
    check(info.vocabSize === 258, `model info: vocab 258 (got ${info.vocabSize})`);

    const greedy = { maxNewTokens: 30, temperature: 0, ignoreEos: true };
    const a = await c.complete('In the beginning', { session: 'node-a', ...greedy });
    check(a.tokens.length === 30 && a.final.usage.completionTokens === 30,
      `30 tokens and usage (got ${a.tokens.length}, usage ${a.final.usage.completionTokens})`);
    check(a.final.sessionId === 'node-a' && a.final.finishReason === 'FINISH_REASON_LENGTH',
      'final names the session and finishes by length');
    check(Buffer.from(a.tokens).toString('utf8') === a.text, 'text is the bytes of the ids');

    if (cxxClient) {
      const out = childProcess.execFileSync(cxxClient, [
        '--target', target, 'generate', 'In the beginning', '--session', 'node-cxx',
        '--max-new-tokens', '30', '--temperature', '0', '--ignore-eos', '--json',
      ], { encoding: 'utf8', timeout: 60000, stdio: ['ignore', 'pipe', 'inherit'] });
      const cxx = JSON.parse(out);
      check(Array.isArray(cxx.tokens) && cxx.tokens.every((t) => typeof t === 'number') &&
        sameIds(cxx.tokens, a.tokens), 'C++ client ids equal Node client ids');
    }

    // One session continued across two calls == one call over the joined conversation.
    const ten = { maxNewTokens: 10, temperature: 0, ignoreEos: true };
    const first = await c.complete('And God', { session: 'node-b', ...ten });
    const second = await c.complete(' said', { session: 'node-b', ...ten });
    // (the server puts BOS in front of a new session's first turn, ids or text alike)
    const convo = [...Buffer.from('And God'), ...first.tokens, ...Buffer.from(' said')];
    const whole = await c.complete(convo, { session: 'node-c', ...ten });
    check(second.tokens.length === 10 && sameIds(second.tokens, whole.tokens),
      'a continued session equals one pass over the conversation');
    const s = await c.getSession('node-b');
    check(s.position === 1 + convo.length + 10 - 1,
      `session position counts the conversation (got ${s.position}, want ${1 + convo.length + 10 - 1})`);
    const listed = (await c.listSessions()).map((x) => x.sessionId);
    check(['node-a', 'node-b', 'node-c'].every((id) => listed.includes(id)), 'listSessions has the sessions');
    await c.deleteSession('node-c');
    try {
      await c.getSession('node-c');
      check(false, 'a deleted session is NOT_FOUND');
    } catch (e) {
      check(e.code === grpc.status.NOT_FOUND, 'a deleted session is NOT_FOUND');
    }

    try {
      await c.complete('x', { session: 'node-d', temperature: -1 });
      check(false, 'negative temperature refused');
    } catch (e) {
      check(e.code === grpc.status.INVALID_ARGUMENT && typeof e.details === 'string' &&
        e.details.includes('temperature'),
      `negative temperature is INVALID_ARGUMENT naming the field (got ${e.code}: ${e.details})`);
    }
  } finally {
    c.close();
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-node-'));
  const portFile = path.join(tmp, 'port');
  const server = childProcess.spawn(args.server, [
    '--listen', '127.0.0.1:0', '--metrics-listen', '', '--http-listen', '', '--port-file', portFile, '--log-level', 'warn',
  ], { stdio: ['ignore', 'inherit', 'inherit'] });
  let spawnError = null;
  const exited = new Promise((resolve) => {
    server.once('exit', resolve);
    server.once('error', (e) => { spawnError = e; resolve(); });
  });

  const failures = [];
  const check = (cond, what) => {
    console.log((cond ? 'ok   ' : 'FAIL ') + what);
    if (!cond) failures.push(what);
  };
  try {
    const port = await waitForPort(portFile, server, () => spawnError);
    await runChecks(`127.0.0.1:${port}`, args.cxxClient, check);
  } catch (e) {
    check(false, `unexpected error: ${e.stack || e}`);
  } finally {
    if (!spawnError && server.exitCode === null && server.signalCode === null) server.kill('SIGTERM');
    const timer = setTimeout(() => server.kill('SIGKILL'), 60000); // bounded wait for the drain
    await exited;
    clearTimeout(timer);
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  console.log(failures.length ? `${failures.length} check(s) failed` : 'all checks passed');
  return failures.length ? 1 : 0;
}

main().then((code) => { process.exitCode = code; }, (e) => {
  console.error(e.stack || e);
  process.exitCode = 1;
});
