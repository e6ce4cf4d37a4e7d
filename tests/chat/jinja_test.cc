// Unit tests of the Jinja engine (chat/jinja.h): syntax, whitespace control, values, filters,
// tests, errors with positions, raise_exception and the resource limits. The byte-for-byte
// comparison with @huggingface/jinja is the jinja_oracle test.
#include "chat/jinja.h"

#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"

namespace retnet::chat {
namespace {

using Json = nlohmann::ordered_json;

std::string Render(const std::string& source, const Json& context = Json::object()) {
  absl::StatusOr<Template> t = Template::Parse(source);
  if (!t.ok()) return "PARSE ERROR: " + std::string(t.status().message());
  absl::StatusOr<std::string> out = t->Render(context);
  if (!out.ok()) return "RENDER ERROR: " + std::string(out.status().message());
  return *out;
}

absl::Status RenderStatus(const std::string& source, const Json& context = Json::object(),
                          const Limits& limits = Limits()) {
  absl::StatusOr<Template> t = Template::Parse(source, limits);
  if (!t.ok()) return t.status();
  return t->Render(context).status();
}

TEST(Syntax, TextExpressionsAndComments) {
  EXPECT_EQ(Render("plain"), "plain");
  EXPECT_EQ(Render("a{# comment #}b{{ 1 + 2 }}c"), "ab3c");
  EXPECT_EQ(Render("{{ 'x' ~ name }}", {{"name", "y"}}), "xy");
  EXPECT_EQ(Render("one trailing newline dropped\n"), "one trailing newline dropped");
}

TEST(Syntax, WhitespaceControlAndHfBlockTrimming) {
  // trim_blocks and lstrip_blocks are on, as transformers and @huggingface/jinja render.
  EXPECT_EQ(Render("x\n  {% if true %}\n    y\n  {% endif %}\nz"), "x\n    y\nz");
  EXPECT_EQ(Render("a   {%- if true -%}   b   {%- endif -%}   c"), "abc");
  EXPECT_EQ(Render("a  {{- 'b' -}}  c"), "abc");
  EXPECT_EQ(Render("a  {#- c -#}  b"), "ab");
  EXPECT_EQ(Render("{% generation %}kept{% endgeneration %}"), "kept");
}

TEST(Syntax, Literals) {
  EXPECT_EQ(Render("{{ 1 }} {{ -3 }} {{ 2.5 }} {{ 2.0 }} {{ true }} {{ None }}|"),
            "1 -3 2.5 2.0 true |");
  EXPECT_EQ(Render("{{ 'a\\tb' }}{{ \"\\u00e9\" }}{{ 'x' 'y' }}"), "a\tbéxy");
  EXPECT_EQ(Render("{{ [1, 'a', none, 2.0] }} {{ {'k': [1]} }}"),
            "[1, \"a\", null, 2] {\"k\": [1]}");
}

TEST(Syntax, Operators) {
  EXPECT_EQ(
      Render("{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ 10 / 4 }} {{ 2 ** 3 }} {{ 1 + 2 * 3 }}"),
      "3 -4 1 2.5 8 7");
  EXPECT_EQ(Render("{{ 'a' ~ 1 ~ 2.0 }} {{ 'a' + 1 }} {{ [1] + [2] }}"), "a12 a1 [1, 2]");
  EXPECT_EQ(
      Render(
          "{{ 1 < 2 and 'y' }} {{ 0 or 'n' }} {{ not [] }} {{ 'a' in 'cat' }} {{ 3 not in [1] }}"),
      "y n true true true");
  EXPECT_EQ(Render("{{ 'a' if x else 'b' }}{{ 'c' if not x }}", {{"x", 0}}), "bc");
}

TEST(Syntax, AccessAndSlices) {
  Json ctx = {{"m", {{"role", "user"}}}, {"xs", {1, 2, 3, 4}}, {"s", "héllo"}};
  EXPECT_EQ(Render("{{ m.role }}{{ m['role'] }}[{{ m.nope }}][{{ m.nope.deeper }}]", ctx),
            "useruser[][]");
  EXPECT_EQ(Render("{{ xs[-1] }} {{ xs[1:] }} {{ xs[::-1] }} {{ xs[:2] }} {{ s[::-1] }}", ctx),
            "4 [2, 3, 4] [4, 3, 2, 1] [1, 2] olléh");
}

TEST(Statements, ForLoops) {
  Json ctx = {{"xs", {"a", "b", "c"}}, {"d", {{"k", 1}, {"j", 2}}}};
  EXPECT_EQ(Render("{% for x in xs %}{{ loop.index }}{{ x }}{% if not loop.last %},{% endif %}"
                   "{% endfor %}",
                   ctx),
            "1a,2b,3c");
  EXPECT_EQ(Render("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}", ctx), "k=1;j=2;");
  EXPECT_EQ(Render("{% for x in xs if x != 'b' %}{{ x }}{{ loop.length }}{% endfor %}", ctx),
            "a2c2");
  EXPECT_EQ(Render("{% for x in [] %}x{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(
      Render("{% for x in xs %}{% if x == 'c' %}{% break %}{% endif %}{{ x }}{% endfor %}", ctx),
      "ab");
}

TEST(Statements, SetNamespaceMacroCallFilter) {
  EXPECT_EQ(Render("{% set a, b = 1, 2 %}{{ a + b }}"), "3");
  EXPECT_EQ(Render("{% set ns = namespace(n=0) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}"
                   "{% endfor %}{{ ns.n }}"),
            "6");
  EXPECT_EQ(Render("{% set x %}in {{ 1 }}{% endset %}[{{ x }}]"), "[in 1]");
  EXPECT_EQ(Render("{% macro m(a, b='B') %}{{ a }}{{ b }}{% endmacro %}{{ m(1) }}{{ m(1, b=2) }}"),
            "1B12");
  EXPECT_EQ(Render("{% macro w() %}<{{ caller() }}>{% endmacro %}{% call w() %}x{% endcall %}"),
            "<x>");
  EXPECT_EQ(Render("{% filter upper %}abc{% endfilter %}"), "ABC");
}

TEST(Filters, Strings) {
  EXPECT_EQ(Render("{{ ' x ' | trim }}|{{ 'ab' | upper }}|{{ 'hello world' | title }}|"
                   "{{ 'ab' | capitalize }}|{{ 'é' | upper }}|{{ 'a🙂' | length }}"),
            "x|AB|Hello World|Ab|É|3");
  EXPECT_EQ(Render("{{ 'a\nb' | indent(2, true) }}|{{ 'a-b' | replace('-', '+') }}"),
            "  a\n  b|a+b");
  EXPECT_EQ(Render("{{ '42' | int + 1 }} {{ 'x' | int }} {{ '2.5' | float }} {{ 3 | string }}"),
            "43 0 2.5 3");
}

TEST(Filters, ListsAndDicts) {
  Json ctx = {{"xs", {3, 1, 2}},
              {"ms", {{{"role", "user"}, {"c", "a"}}, {{"role", "bot"}, {"c", "b"}}}}};
  EXPECT_EQ(Render("{{ xs | sort }} {{ xs | first }} {{ xs | last }} {{ xs | join('-') }} "
                   "{{ xs | reverse | list }} {{ xs | length }}",
                   ctx),
            "[1, 2, 3] 3 2 3-1-2 [2, 1, 3] 3");
  EXPECT_EQ(Render("{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='c') | join }}"
                   "{{ ms | rejectattr('role', 'equalto', 'user') | length }}",
                   ctx),
            "a1");
  EXPECT_EQ(Render("{{ x | default('d') }}{{ '' | default('e', true) }}"), "de");
  EXPECT_EQ(Render("{{ {'b': 1, 'a': 2} | dictsort }}"), "[[\"a\", 2], [\"b\", 1]]");
}

TEST(Filters, ToJsonMatchesTheOracle) {
  Json ctx = Json::parse(R"({"v": {"b": [1, {"c": []}], "a": "é\n", "n": 1.0, "f": 0.5}})");
  EXPECT_EQ(Render("{{ v | tojson }}", ctx),
            R"({"b": [1, {"c": []}], "a": "é\n", "n": 1, "f": 0.5})");
  EXPECT_EQ(Render("{{ v | tojson(indent=2) }}", ctx),
            "{\n  \"b\": [\n    1,\n    {\n      \"c\": []\n    }\n  ],\n  \"a\": \"é\\n\",\n"
            "  \"n\": 1,\n  \"f\": 0.5\n}");
  EXPECT_EQ(Render("{{ v.a | tojson(ensure_ascii=true) }}", ctx), R"("\u00e9\n")");
  EXPECT_EQ(Render("{{ v | tojson(sort_keys=true, separators=(',', ':')) }}", ctx),
            R"({"a":"é\n","b":[1,{"c":[]}],"f":0.5,"n":1})");
}

TEST(Values, KeyOrderFollowsTheInput) {
  const std::string src = "{% for k in d %}{{ k }}{% endfor %}";
  EXPECT_EQ(Render(src, Json::parse(R"({"d": {"b": 1, "a": 2, "2": 3, "1": 4}})")), "12ba");
  // A sorted nlohmann::json is accepted too (its keys come sorted).
  absl::StatusOr<Template> t = Template::Parse(src);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t->Render(nlohmann::json::parse(R"({"d": {"b": 1, "a": 2}})")), "ab");
}

TEST(Values, UndefinedAndEquality) {
  EXPECT_EQ(Render("[{{ nope }}]{{ nope is defined }}{{ nope.x is undefined }}"), "[]falsetrue");
  EXPECT_EQ(Render("{{ 1 == 1.0 }}{{ '1' == 1 }}{{ none == nope }}{{ [1] == [1] }}"),
            "truetruetruefalse");
}

TEST(Tests, Builtins) {
  EXPECT_EQ(Render("{{ 3 is odd }}{{ 4 is even }}{{ 'a' is string }}{{ {} is mapping }}"
                   "{{ [] is iterable }}{{ none is none }}{{ 1 is number }}{{ true is boolean }}"),
            "truetruetruetruetruetruetruetrue");
}

TEST(Methods, StringAndDict) {
  EXPECT_EQ(Render("{{ ' a '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'abc'.startswith('ab') }}|"
                   "{{ 'x</think>y'.split('</think>')[-1] }}|{{ {'a': 1}.get('b', 2) }}"),
            "a|[\"a\", \"b\"]|true|y|2");
}

TEST(Globals, RangeAndStrftime) {
  EXPECT_EQ(Render("{{ range(3) }}{{ range(4, 0, -2) }}"), "[0, 1, 2][4, 2]");
  EXPECT_EQ(Render("{{ strftime_now('%Y') | length }}{{ strftime_now('%%') }}"), "4%");
}

TEST(Errors, SyntaxErrorsCarryLineAndColumn) {
  absl::Status s = RenderStatus("line one\n{% if x %}\n{{ 1 + }}\n{% endif %}");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "line 3, column 8")) << s;
  s = RenderStatus("{% for x in xs %}never closed");
  EXPECT_TRUE(absl::StrContains(s.message(), "endfor")) << s;
  s = RenderStatus("{% frobnicate %}");
  EXPECT_TRUE(absl::StrContains(s.message(), "unknown statement 'frobnicate'")) << s;
  EXPECT_FALSE(RenderStatus("{{ 'unterminated }}").ok());
  EXPECT_FALSE(RenderStatus("{{ x is divisibleby(3) }}").ok());
}

TEST(Errors, RuntimeErrorsCarryLineAndColumn) {
  absl::Status s = RenderStatus("a\n  {{ x | nosuch }}", {{"x", 1}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "line 2, column 10")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "unknown filter 'nosuch'")) << s;
  EXPECT_FALSE(RenderStatus("{{ nope + 1 }}").ok());
  EXPECT_FALSE(RenderStatus("{{ 1 / 0 }}").ok());
  EXPECT_FALSE(RenderStatus("{% for c in 'abc' %}{% endfor %}").ok());
  EXPECT_FALSE(RenderStatus("{{ x }}", Json::array()).ok());
  EXPECT_FALSE(RenderStatus("{{ range }}", {{"range", 1}}).ok());
}

TEST(Errors, RaiseException) {
  absl::Status s = RenderStatus("before{{ raise_exception('Roles must alternate') }}");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "Roles must alternate");
  EXPECT_TRUE(IsRaisedException(s));
  EXPECT_FALSE(IsRaisedException(RenderStatus("{{ 1 + }}")));
  EXPECT_FALSE(IsRaisedException(absl::OkStatus()));
}

TEST(Limits, OutputSize) {
  Limits limits;
  limits.max_output_bytes = 1000;
  absl::Status s =
      RenderStatus("{% for i in range(100) %}0123456789ab{% endfor %}", Json::object(), limits);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  // A string that doubles in a loop is stopped before it is built.
  s = RenderStatus(
      "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
      "{% set ns.s = ns.s ~ ns.s %}{% endfor %}");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  s = RenderStatus(
      "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}"
      "{% set ns.l = ns.l + ns.l %}{% endfor %}");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
}

TEST(Limits, LoopsAndRecursion) {
  absl::Status s = RenderStatus(
      "{% for a in range(1000) %}{% for b in range(1000) %}{% for c in range(1000) %}"
      "{% endfor %}{% endfor %}{% endfor %}");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_EQ(RenderStatus("{{ range(100000000) | length }}").code(),
            absl::StatusCode::kResourceExhausted);
  s = RenderStatus("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  const std::string deep = "{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}";
  EXPECT_EQ(RenderStatus(deep).code(), absl::StatusCode::kInvalidArgument);
  std::string nested;
  for (int i = 0; i < 1000; ++i) nested += "{% if true %}";
  EXPECT_FALSE(RenderStatus(nested).ok());
}

TEST(Template, RendersOnManyThreadsAtOnce) {
  absl::StatusOr<Template> t =
      Template::Parse("{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}");
  ASSERT_TRUE(t.ok());
  std::vector<std::thread> threads;
  std::vector<std::string> outs(8);
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      Json ctx = {{"messages", {{{"role", "user"}, {"content", std::to_string(i)}}}}};
      for (int k = 0; k < 200; ++k) outs[i] = *t->Render(ctx);
    });
  }
  for (auto& th : threads) th.join();
  for (int i = 0; i < 8; ++i) EXPECT_EQ(outs[i], "user:" + std::to_string(i) + ";");
}

}  // namespace
}  // namespace retnet::chat
