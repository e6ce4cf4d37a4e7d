// The HF oracle: @huggingface/tokenizers (pinned in package.json / package-lock.json) encodes and
// decodes texts with a tokenizer.json, for tests/model/test_hf_tokenizer.py.
//
//   node oracle.js JOB.json
//
// JOB: {"tokenizer": "path/tokenizer.json", "config": "path/tokenizer_config.json" | null,
//       "texts": ["...", ...], "id_lists": [[...], ...] (optional)}
// Prints {"results": [{"ids": [...], "decode": "..."}, ...], "decodes": ["...", ...]}: ids
// without special tokens added by a post-processor; decode (of each text's ids, and of each
// id list) with special tokens skipped and no clean-up of spaces.
// Exit code 77 when the package is not installed (the test then reports itself skipped).
"use strict";
const fs = require("fs");

let Tokenizer;
try {
  ({ Tokenizer } = require("@huggingface/tokenizers"));
} catch (e) {
  console.error("oracle: @huggingface/tokenizers is not installed (npm ci --prefix tests/model/hf_oracle): " + e.message);
  process.exit(77);
}

const job = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const tokenizerJson = JSON.parse(fs.readFileSync(job.tokenizer, "utf8"));
const config = job.config ? JSON.parse(fs.readFileSync(job.config, "utf8")) : {};
config.clean_up_tokenization_spaces = false;
const tokenizer = new Tokenizer(tokenizerJson, config);
const results = job.texts.map((text) => {
  const ids = tokenizer.encode(text, { add_special_tokens: false }).ids;
  const decode = ids.length === 0 ? "" :
    tokenizer.decode(ids, { skip_special_tokens: true, clean_up_tokenization_spaces: false });
  return { ids, decode };
});
const decodes = (job.id_lists || []).map((ids) => ids.length === 0 ? "" :
  tokenizer.decode(ids, { skip_special_tokens: true, clean_up_tokenization_spaces: false }));
process.stdout.write(JSON.stringify({ results, decodes }) + "\n");
