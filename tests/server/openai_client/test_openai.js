// The official openai npm client (pinned in package-lock.json) against a live retnet-server's
// OpenAI-compatible HTTP API. Run by tests/server/test_openai_api.py, which starts the server:
//   node test_openai.js BASE_URL MODEL_NAME
// Prints ok/FAIL per check; exit status 1 when any failed.
'use strict';
const { OpenAI } = require('openai');

const [baseURL, modelName] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 60000 });
let failures = 0;
function check(cond, what) {
  console.log(`${cond ? 'ok  ' : 'FAIL'} ${what}`);
  if (!cond) failures++;
  return cond;
}

async function collect(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

function textsByIndex(chunks, chat) {
  const out = {};
  for (const c of chunks) {
    for (const ch of c.choices) {
      const piece = chat ? (ch.delta && ch.delta.content) || '' : ch.text || '';
      out[ch.index] = (out[ch.index] || '') + piece;
    }
  }
  return out;
}

async function expectError(promise, status, what, messageIncludes) {
  try {
    await promise;
    check(false, `${what}: expected HTTP ${status}, got success`);
  } catch (e) {
    const msg = (e && e.error && e.error.message) || e.message || '';
    check(e instanceof OpenAI.APIError && e.status === status &&
              (!messageIncludes || msg.includes(messageIncludes)),
          `${what}: HTTP ${status}${messageIncludes ? ` naming '${messageIncludes}'` : ''} (got ${e.status}: ${msg})`);
  }
}

async function main() {
  // Models.
  const models = await client.models.list();
  check(models.data.length === 1 && models.data[0].id === modelName, `GET /v1/models lists '${modelName}'`);
  const one = await client.models.retrieve(modelName);
  check(one.id === modelName && one.object === 'model', 'GET /v1/models/{id}');

  // Completions: greedy, not streamed.
  const prompt = 'The quick brown fox';
  const greedy = await client.completions.create({ model: modelName, prompt, max_tokens: 24, temperature: 0 });
  const g = greedy.choices[0];
  check(greedy.object === 'text_completion' && greedy.id.startsWith('cmpl-') && greedy.created > 0,
        'completion: id, object, created');
  check(g.index === 0 && typeof g.text === 'string', 'completion: one choice with text');
  check(['length', 'stop'].includes(g.finish_reason), `completion: finish_reason '${g.finish_reason}'`);
  const u = greedy.usage;
  check(u.prompt_tokens > 0 && u.total_tokens === u.prompt_tokens + u.completion_tokens,
        `completion: usage adds up (${JSON.stringify(u)})`);
  check(g.finish_reason !== 'length' || u.completion_tokens === 24, 'completion: length means max_tokens tokens');

  // The same, streamed with usage: the same text, usage in a last chunk without choices.
  const chunks = await collect(await client.completions.create(
      { model: modelName, prompt, max_tokens: 24, temperature: 0, stream: true, stream_options: { include_usage: true } }));
  check(textsByIndex(chunks, false)[0] === g.text, 'completion stream: the chunks concatenate to the non-streamed text');
  const last = chunks[chunks.length - 1];
  check(last.choices.length === 0 && last.usage && last.usage.completion_tokens === u.completion_tokens &&
            last.usage.prompt_tokens === u.prompt_tokens,
        'completion stream: include_usage sends the usage last');
  const finishes = chunks.flatMap((c) => c.choices).filter((c) => c.finish_reason);
  check(finishes.length === 1 && finishes[0].finish_reason === g.finish_reason,
        'completion stream: one finish_reason, the same as non-streamed');

  // Seeds: reproducible.
  const sample = (seed) => client.completions.create(
      { model: modelName, prompt, max_tokens: 32, temperature: 1.0, seed });
  const [s1, s2, s3] = await Promise.all([sample(7), sample(7), sample(8)]);
  check(s1.choices[0].text === s2.choices[0].text, 'seed: the same seed gives the same text');
  check(s1.choices[0].text !== s3.choices[0].text, 'seed: another seed gives another text');

  // Stop strings: the text ends before the first occurrence, finish_reason stop.
  const long = await client.completions.create({ model: modelName, prompt, max_tokens: 48, temperature: 0, ignore_eos: true });
  const lt = long.choices[0].text;
  if (check(lt.length >= 12, 'stop: a long enough greedy text to cut')) {
    const stop = lt.slice(8, 11);
    const cut = await client.completions.create({ model: modelName, prompt, max_tokens: 48, temperature: 0, ignore_eos: true, stop: [stop] });
    check(cut.choices[0].text === lt.slice(0, lt.indexOf(stop)) && cut.choices[0].finish_reason === 'stop',
          `stop: '${stop}' ends the text before it, finish_reason stop`);
  }

  // n > 1: prefilled once, forked. Greedy copies equal the single greedy answer.
  const n3 = await client.completions.create({ model: modelName, prompt, max_tokens: 24, temperature: 0, n: 3 });
  check(n3.choices.length === 3 && n3.choices.every((c, i) => c.index === i && c.text === g.text),
        'n=3 greedy: three choices, each equal to the n=1 text (forks of one prefill)');
  check(n3.usage.prompt_tokens === u.prompt_tokens && n3.usage.completion_tokens === 3 * u.completion_tokens,
        `n=3: the prompt counted once, completions summed (${JSON.stringify(n3.usage)})`);
  const n3s = await client.completions.create({ model: modelName, prompt, max_tokens: 32, temperature: 1.0, n: 3, seed: 11 });
  const texts = n3s.choices.map((c) => c.text);
  check(new Set(texts).size === 3, 'n=3 sampled: three different continuations');
  const n3again = await client.completions.create({ model: modelName, prompt, max_tokens: 32, temperature: 1.0, n: 3, seed: 11 });
  check(JSON.stringify(n3again.choices.map((c) => c.text)) === JSON.stringify(texts), 'n=3 sampled: reproducible with a seed');
  const n2stream = await collect(await client.completions.create(
      { model: modelName, prompt, max_tokens: 24, temperature: 0, n: 2, stream: true }));
  const byIndex = textsByIndex(n2stream, false);
  check(byIndex[0] === g.text && byIndex[1] === g.text, 'n=2 stream: both choices stream the greedy text');

  // Several prompts, and token ids as a prompt.
  const multi = await client.completions.create({ model: modelName, prompt: [prompt, 'Once upon'], max_tokens: 8, temperature: 0 });
  check(multi.choices.length === 2 && multi.choices[0].text === g.text.slice(0, multi.choices[0].text.length),
        'a list of prompts: one choice each, in order');
  const ids = Array.from(Buffer.from(prompt)).map(Number);
  const byIds = await client.completions.create({ model: modelName, prompt: ids, max_tokens: 24, temperature: 0 });
  check(byIds.choices[0].text === g.text && byIds.usage.prompt_tokens === u.prompt_tokens,
        'token ids as the prompt: the same answer as its text');

  // Log probabilities (completions).
  const lp = await client.completions.create({ model: modelName, prompt, max_tokens: 8, temperature: 0, logprobs: 2 });
  const l = lp.choices[0].logprobs;
  check(l && l.tokens.length === lp.usage.completion_tokens && l.token_logprobs.length === l.tokens.length &&
            l.top_logprobs.every((t) => Object.keys(t).length >= 1 && Object.keys(t).length <= 2),
        'logprobs=2: tokens, token_logprobs and top_logprobs per token');
  check(l.token_logprobs.every((v, i) => v <= 0 && Object.values(l.top_logprobs[i]).every((a) => a <= v + 1e-5)),
        'logprobs (greedy): the chosen token is the most likely');

  // Chat.
  const messages = [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Name a colour.' }];
  const chat = await client.chat.completions.create({ model: modelName, messages, max_completion_tokens: 20, temperature: 0 });
  const c0 = chat.choices[0];
  check(chat.object === 'chat.completion' && chat.id.startsWith('chatcmpl-') && c0.message.role === 'assistant' &&
            typeof c0.message.content === 'string',
        'chat: an assistant message');
  const chatChunks = await collect(await client.chat.completions.create(
      { model: modelName, messages, max_tokens: 20, temperature: 0, stream: true, stream_options: { include_usage: true } }));
  check(chatChunks[0].object === 'chat.completion.chunk' && chatChunks[0].choices[0].delta.role === 'assistant',
        'chat stream: the first delta carries the role');
  check(textsByIndex(chatChunks, true)[0] === c0.message.content, 'chat stream: the deltas concatenate to the message');
  check(chatChunks[chatChunks.length - 1].usage.completion_tokens === chat.usage.completion_tokens, 'chat stream: usage');
  const chatLp = await client.chat.completions.create({ model: modelName, messages, max_tokens: 6, temperature: 0, logprobs: true, top_logprobs: 3 });
  const content = chatLp.choices[0].logprobs.content;
  check(content.length === chatLp.usage.completion_tokens &&
            content.every((t) => typeof t.token === 'string' && Array.isArray(t.bytes) && t.top_logprobs.length === 3),
        'chat logprobs: one entry per token with bytes and 3 alternatives');
  const chatN = await client.chat.completions.create({ model: modelName, messages, max_tokens: 20, temperature: 0, n: 2 });
  check(chatN.choices.length === 2 && chatN.choices.every((c) => c.message.content === c0.message.content), 'chat n=2 greedy');

  // Sessions: the second turn prefills only its new part and answers as the whole conversation would.
  const sid = `oai-test-${process.pid}`;
  const opts = { headers: { 'x-session-id': sid } };
  const t1 = await client.chat.completions.create({ model: modelName, messages: [{ role: 'user', content: 'Hello there.' }], max_tokens: 12, temperature: 0 }, opts);
  const convo = [{ role: 'user', content: 'Hello there.' }, { role: 'assistant', content: t1.choices[0].message.content },
                 { role: 'user', content: 'And then?' }];
  const t2 = await client.chat.completions.create({ model: modelName, messages: convo, max_tokens: 12, temperature: 0 }, opts);
  const whole = await client.chat.completions.create({ model: modelName, messages: convo, max_tokens: 12, temperature: 0 });
  check(t2.choices[0].message.content === whole.choices[0].message.content,
        'session: turn 2 equals the whole conversation sent at once');
  check(t2.usage.prompt_tokens < whole.usage.prompt_tokens,
        `session: turn 2 prefills only the new part (${t2.usage.prompt_tokens} < ${whole.usage.prompt_tokens} tokens)`);
  await expectError(client.chat.completions.create(
      { model: modelName, messages: [{ role: 'user', content: 'Something else.' }], max_tokens: 4 }, opts),
      400, 'session: messages that do not extend the conversation', 'do not extend');
  const convo3 = [...convo, { role: 'assistant', content: t2.choices[0].message.content }, { role: 'user', content: 'Ok.' }];
  const t3 = await collect(await client.chat.completions.create({ model: modelName, messages: convo3, max_tokens: 10, temperature: 0, stream: true }, opts));
  const whole3 = await client.chat.completions.create({ model: modelName, messages: convo3, max_tokens: 10, temperature: 0 });
  check(textsByIndex(t3, true)[0] === whole3.choices[0].message.content,
        'session: a streamed third turn equals the whole conversation sent at once');
  await expectError(client.completions.create({ model: modelName, prompt, n: 2, max_tokens: 4 }, opts), 400, 'session: n > 1', 'n');

  // Errors.
  await expectError(client.completions.create({ model: modelName, prompt, temperature: 5 }), 400, 'temperature 5', 'temperature');
  await expectError(client.completions.create({ model: modelName, prompt, top_p: 0 }), 400, 'top_p 0', 'top_p');
  await expectError(client.completions.create({ model: modelName, prompt, max_tokens: 0 }), 400, 'max_tokens 0', 'max_tokens');
  await expectError(client.completions.create({ model: modelName, prompt, echo: true }), 400, 'unsupported parameter echo', 'echo');
  await expectError(client.chat.completions.create({ model: modelName, messages, tools: [{ type: 'function', function: { name: 'f' } }] }),
      400, 'unsupported parameter tools', 'tools');
  await expectError(client.completions.create({ model: 'no-such-model', prompt }), 404, 'an unknown model', 'no-such-model');
  await expectError(client.completions.create({ model: modelName, prompt: [999999] }), 400, 'a token id outside the vocabulary', 'prompt');
  await expectError(client.chat.completions.create({ model: modelName, messages: [] }), 400, 'no messages', 'messages');
  await expectError(client.chat.completions.create({ model: modelName, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }] }),
      400, 'an image part', 'messages[0].content[0]');
  await expectError(client.completions.create({ model: modelName, prompt, n: 1000 }), 400, 'n too large', 'n');
  await expectError(client.completions.create({ model: modelName, prompt, logit_bias: { abc: 1 } }), 400, 'a bad logit_bias key', 'logit_bias');

  // Parameters that change the output.
  const banned = g.text.length > 0 ? Buffer.from(g.text)[0] : 65;
  const biased = await client.completions.create({ model: modelName, prompt, max_tokens: 4, temperature: 0, logit_bias: { [banned]: -100 } });
  check(biased.choices[0].text.length === 0 || Buffer.from(biased.choices[0].text)[0] !== banned,
        'logit_bias -100 bans the greedy first token');
  const minTok = await client.completions.create({ model: modelName, prompt, max_tokens: 10, min_tokens: 10, temperature: 0 });
  check(minTok.usage.completion_tokens === 10, 'min_tokens = max_tokens: exactly that many tokens');
  const penal = await client.completions.create({ model: modelName, prompt, max_tokens: 24, temperature: 0, repetition_penalty: 1.8,
                                                   presence_penalty: 1.5, frequency_penalty: 1.0, top_k: 5, min_p: 0.01, user: 'test' });
  check(typeof penal.choices[0].text === 'string', 'vLLM extras and penalties are accepted');

  console.log(failures ? `${failures} failures` : 'all passed');
  process.exit(failures ? 1 : 0);
}

main().catch((e) => {
  console.log(`FAIL unexpected error: ${e && e.stack ? e.stack : e}`);
  process.exit(1);
});
