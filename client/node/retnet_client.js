'use strict';
/**
 * A small Node.js client for retnet-serve (retnet.v1.RetNet over gRPC).
 *
 * The service definition is loaded at runtime from proto/retnet/v1/retnet.proto (two folders up
 * from this file) with @grpc/proto-loader: field names are camelCase (keepCase false), 64-bit
 * integers are Numbers, enums are their names as Strings, unset fields read as their defaults and
 * oneofs name their set member (GenerateResponse.kind is 'chunk' or 'final').
 *
 *     const { Client } = require('./retnet_client');
 *     const c = new Client('localhost:50051');
 *     for await (const piece of c.generate('And God said', { session: 'demo', maxNewTokens: 40 })) {
 *       process.stdout.write(piece.text);
 *     }
 *     console.log(c.lastFinal.usage);
 *     c.close();
 *
 * gRPC failures are thrown as Errors carrying `.code` (the numeric grpc status, see
 * `grpc.status`) and `.details` (the server's message).
 */

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.join(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'retnet/v1/retnet.proto';
const LOADER_OPTIONS = {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

let cachedService = null;
function retnetService() {
  if (cachedService === null) {
    const definition = protoLoader.loadSync(PROTO_FILE, LOADER_OPTIONS);
    cachedService = grpc.loadPackageDefinition(definition).retnet.v1.RetNet;
  }
  return cachedService;
}

function rpcError(code, details) {
  const err = new Error(`${code} ${grpc.status[code]}: ${details}`);
  err.code = code;
  err.details = details;
  return err;
}

/** Thin wrapper over the retnet.v1.RetNet stub. */
/**
 * Channel options that retry a call refused with UNAVAILABLE before anything was received
 * (a replica loading or draining behind a gateway), with exponential backoff; 0 = none.
 */
function retryOptions(retries) {
  if (!retries) return { 'grpc.enable_retries': 0 };
  return {
    'grpc.enable_retries': 1,
    'grpc.service_config': JSON.stringify({
      methodConfig: [{
        name: [{ service: 'retnet.v1.RetNet' }],
        retryPolicy: {
          maxAttempts: Math.min(retries + 1, 5),
          initialBackoff: '0.1s',
          maxBackoff: '2s',
          backoffMultiplier: 2,
          // CANCELLED too: gRPC core cancels calls that reach a server after its shutdown began,
          // before a handler ran; nothing was received, so the retry is safe.
          retryableStatusCodes: ['UNAVAILABLE', 'CANCELLED'],
        },
      }],
    }),
  };
}

class Client {
  /**
   * @param {string} target host:port
   * @param {object} [options]
   * @param {string} [options.apiKey] sent as `authorization: Bearer <key>` on every call
   * @param {Buffer|string} [options.rootCerts] PEM roots; given = TLS, else plaintext
   * @param {number} [options.timeoutMs=120000] deadline of every call
   */
  constructor(target, { apiKey = null, rootCerts = null, timeoutMs = 120000, retries = 3 } = {}) {
    const creds = rootCerts != null
      ? grpc.credentials.createSsl(Buffer.isBuffer(rootCerts) ? rootCerts : Buffer.from(rootCerts))
      : grpc.credentials.createInsecure();
    const Service = retnetService();
    this._stub = new Service(target, creds, retryOptions(retries));
    this._apiKey = apiKey || null;
    this._timeoutMs = timeoutMs;
    /** The Final message of the latest generate()/complete() turn (null until one arrives). */
    this.lastFinal = null;
  }

  close() {
    this._stub.close();
  }

  _metadata(sessionId) {
    const md = new grpc.Metadata();
    if (this._apiKey) md.set('authorization', `Bearer ${this._apiKey}`);
    if (sessionId) md.set('x-session-id', sessionId);
    return md;
  }

  _callOptions() {
    return { deadline: Date.now() + this._timeoutMs };
  }

  _unary(method, request, sessionId = '') {
    return new Promise((resolve, reject) => {
      this._stub[method](request, this._metadata(sessionId), this._callOptions(), (err, response) => {
        if (err) reject(err);
        else resolve(response);
      });
    });
  }

  /** The GenerateRequest for a prompt (text, or an array/iterable of token ids) and options. */
  static request(prompt, {
    session = '', maxNewTokens = null, temperature = null, topK = 0, topP = null, seed = null,
    stop = [], ignoreEos = false, logprobs = null, logitBias = null, tokenBytes = false,
  } = {}) {
    // A named session is continued, or created under that name if it does not exist.
    const req = { sessionId: session, createSession: Boolean(session), returnTokenBytes: tokenBytes };
    if (typeof prompt === 'string') {
      req.text = prompt;
    } else if (prompt != null && typeof prompt[Symbol.iterator] === 'function') {
      req.tokens = { ids: Array.from(prompt, Number) };
    } else {
      throw new TypeError('prompt must be a string or an array of token ids');
    }
    // Unset (null) = the server's default (temperature 1.0, --default-max-new-tokens), as with
    // retnet-client and any other client of the API.
    req.sampling = { topK };
    if (temperature != null) req.sampling.temperature = temperature;
    if (topP != null) req.sampling.topP = topP;
    if (seed != null) req.sampling.seed = seed;
    req.stopping = { stop: Array.from(stop), ignoreEos };
    if (maxNewTokens != null) req.stopping.maxNewTokens = maxNewTokens;
    if (logprobs != null) req.logprobs = logprobs;
    if (logitBias != null) {
      req.sampling.logitBias = {};
      for (const [id, bias] of Object.entries(logitBias)) req.sampling.logitBias[id] = Number(bias);
    }
    return req;
  }

  /**
   * Streams one turn's tokens as {id, text, logprob} (logprob is null unless requested); the
   * Final message is left in `lastFinal`. An empty `session` makes a one-shot request that
   * leaves no session behind (lastFinal.sessionId is empty). Breaking out of the loop cancels the call.
   */
  async *generate(prompt, opts = {}) {
    const req = Client.request(prompt, opts);
    this.lastFinal = null;
    const call = this._stub.generate(req, this._metadata(req.sessionId), this._callOptions());
    let finished = false;
    try {
      for await (const msg of call) {
        if (msg.kind === 'chunk') {
          for (const t of msg.chunk.tokens) yield Client._piece(t, req.returnTokenBytes);
        } else if (msg.kind === 'final') {
          this.lastFinal = msg.final;
        }
      }
      finished = true;
    } finally {
      if (!finished) {
        call.on('error', () => {}); // the CANCELLED status that cancel() produces
        call.cancel();
      }
    }
    if (this.lastFinal === null) {
      throw rpcError(grpc.status.INTERNAL, 'the Generate stream ended without a Final message');
    }
  }

  /** {id, text, logprob, tokenBytes}: tokenBytes (a Buffer) only when asked for. */
  static _piece(t, withBytes) {
    return {
      id: t.id,
      text: t.text,
      logprob: t.logprob === undefined || t.logprob === null ? null : t.logprob,
      tokenBytes: withBytes ? Buffer.from(t.tokenBytes) : null,
    };
  }

  /**
   * One Chat stream: sends each request of `turns` (built with Client.request) after the previous
   * turn's Final and yields that turn's pieces; its Final is in `lastFinal` meanwhile.
   */
  async *chat(turns, session = '') {
    const call = this._stub.chat(this._metadata(session), this._callOptions());
    const queue = [];
    let wake = null;
    let ended = null;  // the stream's error, or true when it ended
    const notify = () => { if (wake) { const w = wake; wake = null; w(); } };
    call.on('data', (msg) => { queue.push(msg); notify(); });
    call.on('error', (err) => { ended = err; notify(); });
    call.on('end', () => { if (ended === null) ended = true; notify(); });
    try {
      for (const req of turns) {
        call.write({ turn: req });
        const pieces = [];
        this.lastFinal = null;
        while (this.lastFinal === null) {
          if (queue.length === 0) {
            if (ended instanceof Error) throw ended;
            if (ended) throw rpcError(grpc.status.INTERNAL, 'the Chat stream ended before a Final');
            await new Promise((resolve) => { wake = resolve; });
            continue;
          }
          const msg = queue.shift();
          if (msg.kind === 'chunk') {
            for (const t of msg.chunk.tokens) pieces.push(Client._piece(t, req.returnTokenBytes));
          } else if (msg.kind === 'final') {
            this.lastFinal = msg.final;
          }
        }
        yield pieces;
      }
      call.end();
    } finally {
      if (ended === null) {
        call.on('error', () => {});
        call.cancel();
      }
    }
  }

  async tokenize(text, addBos = false) {
    return (await this._unary('tokenize', { text, addBos })).ids;
  }

  /** {text, raw}: valid UTF-8 text (U+FFFD for ill-formed bytes) and the exact bytes (a Buffer). */
  async detokenize(ids) {
    const resp = await this._unary('detokenize', { ids: Array.from(ids, Number) });
    return { text: resp.text, raw: Buffer.from(resp.raw) };
  }

  /** generate() collected into {tokens, text, final}. */
  async complete(prompt, opts = {}) {
    const tokens = [];
    let text = '';
    for await (const piece of this.generate(prompt, opts)) {
      tokens.push(piece.id);
      text += piece.text;
    }
    const final = this.lastFinal;
    return { tokens, text: text + final.text, final };
  }

  getSession(sessionId) {
    return this._unary('getSession', { sessionId }, sessionId);
  }

  async deleteSession(sessionId) {
    await this._unary('deleteSession', { sessionId }, sessionId);
  }

  async listSessions() {
    return (await this._unary('listSessions', {})).sessions;
  }

  modelInfo() {
    return this._unary('getModelInfo', {});
  }
}

module.exports = { Client, grpc, PROTO_DIR, PROTO_FILE, LOADER_OPTIONS };
