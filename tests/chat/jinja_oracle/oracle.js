// The Jinja oracle: @huggingface/jinja (pinned in package.json / package-lock.json) renders chat
// templates for tests/chat/test_jinja_oracle.py, exactly as transformers.js applies them
// (`new Template(source).render(context)`).
//
//   node oracle.js < JOB.json
//
// JOB: {"cases": [{"template": "...", "context": {...}}, ...]}. Prints one JSON list with, per
// case, {"ok": true, "output": "..."} or {"ok": false, "error": "..."} (for raise_exception(msg),
// the error is msg). Exit code 77 when the package is not
// installed (the test then reports itself skipped).
"use strict";
const fs = require("fs");

let Template;
try {
  ({ Template } = require("@huggingface/jinja"));
} catch (e) {
  console.error("oracle: @huggingface/jinja is not installed (npm ci --prefix tests/chat/jinja_oracle): " + e.message);
  process.exit(77);
}

const job = JSON.parse(fs.readFileSync(0, "utf8"));
const results = job.cases.map((c) => {
  try {
    const template = new Template(c.template);
    return { ok: true, output: template.render(c.context || {}) };
  } catch (e) {
    return { ok: false, error: String(e && e.message) };
  }
});
process.stdout.write(JSON.stringify(results) + "\n");
