// File: chat/jinja.h
//
// A self-contained Jinja2 template engine, sized for Hugging Face chat templates (the
// `chat_template` of tokenizer_config.json). Its reference is @huggingface/jinja (pinned in
// tests/chat/jinja_oracle), the engine transformers.js renders chat templates with; the test
// `jinja_oracle` renders real-world templates and a synthetic feature set with both and requires
// byte-identical output. Where that library differs from Python Jinja2, this engine follows the
// library, for example:
//
//  - The source is preprocessed as HF does: one trailing newline is dropped, `trim_blocks` and
//    `lstrip_blocks` are ON (the newline after a `%}` / `#}` tag is removed, spaces and tabs before
//    a `{%` / `{#` tag at the start of a line are removed), and transformers' `{% generation %}` /
//    `{% endgeneration %}` tags are removed. `{%-`, `-%}`, `{{-`, `-}}`, `{#-`, `-#}` strip
//    whitespace (Unicode whitespace, as JavaScript's \s).
//  - Booleans print as `true`/`false`; a float with an integral value prints as `2.0` but
//    concatenates (`~`, `+`) and serialises (`tojson`) as `2`; numbers in the JSON context that
//    are integral (`1.0`) are integers; objects in the context list integer-like keys ("0", "12")
//    first, in ascending order (JavaScript's property order), then the others in input order.
//  - An undefined variable renders as the empty string, is falsy, and its attributes are
//    undefined; most other operations on it (arithmetic, filters other than `default(...)`,
//    `tojson`, `safe`) are errors. `none` renders as the empty string.
//  - `==` compares numbers, strings and booleans by value (numbers against booleans and numeric
//    strings as JavaScript's loose equality does; `none == undefined`), lists and dicts by
//    identity. `<`, `>`, `<=`, `>=` accept numbers only.
//  - Tests take no arguments (`is divisibleby(3)` is a syntax error); filters exist only where
//    the library has them (no `d`, `count`, `round`, `strip` filter, ...).
//
// Supported: text, `{{ }}`, `{% %}`, `{# #}` and whitespace control; `if`/`elif`/`else`, `for`
// (tuple unpacking, `if` filter, `else`, `loop.*`, `break`, `continue`; over lists and dicts'
// keys), `set` (names, tuples, `ns.attr`, block form), `macro` (positional and keyword arguments,
// defaults), `call` blocks with `caller()`, `filter` blocks. Expressions: literals, lists, tuples,
// dicts, attributes and subscripts (negative indices, slices), `+ - * / // % **`, `~`,
// comparisons, `and or not`, `in`/`not in`, `is [not] test`, `a if c else b`, `a if c`, filters,
// calls, the string, dict and loop methods and the globals `raise_exception`, `range`,
// `namespace`, `strftime_now` (local time; %Y %m %d %b %B %H %M %%). See jinja.cc for the
// complete list of filters, tests and methods. Not supported: template inheritance and includes,
// `*args`/`**kwargs` in calls and macros, autoescaping, full Unicode case mapping (upper/lower
// map ASCII, Latin-1, Latin Extended-A, basic Greek and Cyrillic only). String lengths count
// UTF-16 code units like JavaScript, indexing and slicing count code points.
//
// Known differences from the oracle, all where it misbehaves: integer overflow beyond int64 and
// division or modulo by zero are errors here (the oracle prints rounded numbers, `Infinity` or
// `NaN`); `[] | first` is undefined (the oracle crashes); a macro's `varargs` / `kwargs` are not
// supported (extra arguments are an error); printing a function prints nothing (the oracle
// prints its JavaScript source).
//
// Errors: absl::InvalidArgumentError with the line and column (1-based; columns count bytes) of
// the source, e.g. "line 3, column 12: unknown filter 'frobnicate' for a string".
// `raise_exception(msg)` fails the render with InvalidArgumentError(msg) exactly, tagged so that
// IsRaisedException() recognises it. Exceeding a Limits bound is ResourceExhaustedError.
//
// Ownership and threading: a Template is an immutable, cheaply copyable handle (it shares the
// parsed program). Render() is const and keeps all state on its own stack, so one Template may
// render on any number of threads at once.
#ifndef RETNET_CHAT_JINJA_H_
#define RETNET_CHAT_JINJA_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace retnet::chat {

// Bounds that keep a hostile template from hanging the caller or exhausting its memory.
struct Limits {
  // The rendered text, and any single string or rendered block inside it.
  size_t max_output_bytes = size_t{16} << 20;
  // Nesting of blocks and expressions in the source (checked by Parse), and of evaluation,
  // macro calls included, at render time.
  int max_parse_depth = 128;
  int max_render_depth = 512;
  // Loop iterations over one render, all loops together.
  int64_t max_loop_iterations = 1'000'000;
  // Elements of a list the template builds (`range`, `+`, `split`).
  size_t max_list_size = size_t{1} << 20;
};

namespace jinja_internal {
struct Program;
}  // namespace jinja_internal

class Template {
 public:
  // Parses `source` (UTF-8). InvalidArgumentError with line and column on a syntax error.
  static absl::StatusOr<Template> Parse(std::string_view source, const Limits& limits = Limits());

  // Renders with the variables of `context` (a JSON object; null means none). ordered_json
  // keeps the key order of the input, which `tojson` and dict iteration show; a plain
  // nlohmann::json (keys sorted) is accepted too.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& context) const;
  absl::StatusOr<std::string> Render(const nlohmann::json& context) const;

  const Limits& limits() const;

 private:
  explicit Template(std::shared_ptr<const jinja_internal::Program> program)
      : program_(std::move(program)) {}

  std::shared_ptr<const jinja_internal::Program> program_;
};

// True for the error a template's `raise_exception(msg)` call produced (its message is `msg`):
// the template rejected its input, which a server reports as a client error.
bool IsRaisedException(const absl::Status& status);

}  // namespace retnet::chat

#endif  // RETNET_CHAT_JINJA_H_
