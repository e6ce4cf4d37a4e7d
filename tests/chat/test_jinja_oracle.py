#!/usr/bin/python3
"""retnet::chat's Jinja engine (retnet-jinja-render) against @huggingface/jinja.

Renders every real-world chat template in tests/chat/templates/*.jinja over a set of
conversations (with and without a system message, multi-turn, ending on an assistant turn, roles
that do not alternate, tool calls and tool results, each with add_generation_prompt true and
false), plus a synthetic set of small templates that exercise each supported feature, with both
the C++ engine and the pinned JS library (tests/chat/jinja_oracle), and 1500 seeded random edits
of those templates (differential fuzzing of the lexer, parser and runtime). Outputs must be
byte-identical; a case that fails must fail in both, and when the template raised an exception
(raise_exception), with the same message.

Usage: test_jinja_oracle.py --render build/bin/retnet-jinja-render --node /usr/bin/node
Exit code 77 (skipped) when node or the npm package is missing.
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ORACLE_DIR = os.path.join(HERE, "jinja_oracle")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city (°C or °F).",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city, e.g. \"Zürich\""},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"}, "max_results": {"type": "integer", "default": 5},
            "10": {"type": "number"}},
            "required": ["query"]}}},
]

SYSTEM = {"role": "system", "content": "  You are a helpful assistant.\nAnswer briefly.  "}
U1 = {"role": "user", "content": "Hello! What's 2 + 2?"}
A1 = {"role": "assistant", "content": "It's 4. <think>easy</think>"}
U2 = {"role": "user", "content": "  And in base 3?\n\n"}
A2 = {"role": "assistant", "content": "</think>11 — «eleven» 🙂"}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"type": "function", "id": "c1",
     "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}]}
TOOL = {"role": "tool", "content": "{\"temperature\": 21.5, \"sky\": \"clear\"}"}
TOOL2 = {"role": "tool", "content": "nothing else"}

CONVERSATIONS = {
    "user": [U1],
    "system_user": [SYSTEM, U1],
    "multi_turn": [SYSTEM, U1, A1, U2],
    "no_system_multi": [U1, A1, U2, A2],
    "ends_assistant": [U1, A1],
    "not_alternating": [U1, U2],
    "system_only": [SYSTEM],
    "tools": [SYSTEM, {"role": "user", "content": "Weather in Zürich?"}, CALL, TOOL, TOOL2,
              {"role": "assistant", "content": "It is 21.5 °C and clear."}],
}


def template_cases():
    cases = []
    for path in sorted(glob.glob(os.path.join(HERE, "templates", "*.jinja"))):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        name = os.path.basename(path)
        for conv_name, messages in CONVERSATIONS.items():
            for agp in (True, False):
                context = {"messages": messages, "add_generation_prompt": agp,
                           "bos_token": "<s>", "eos_token": "</s>"}
                if conv_name == "tools":
                    context["tools"] = TOOLS
                cases.append((f"{name}/{conv_name}/agp={agp}", source, context))
        # The same template as HF passes it from a tokenizer_config.json with no trailing newline.
        cases.append((f"{name}/no_trailing_newline", source.rstrip("\n"),
                      {"messages": CONVERSATIONS["multi_turn"], "add_generation_prompt": True,
                       "bos_token": "<s>", "eos_token": "</s>"}))
    return cases


# Small templates, one feature each (and the edges of the oracle's semantics).
SYNTHETIC = [
    # Text, comments, whitespace control, trim_blocks / lstrip_blocks.
    ("a {# c #} b", {}),
    ("a  {#- c -#}  b", {}),
    ("x\n  {% if true %}\n    y\n  {% endif %}\nz\n", {}),
    ("x   {%- if true -%}   y   {%- endif -%}   z", {}),
    ("  {{ 'a' }}\n{{- ' b' }}   {{- ' c' -}}   d", {}),
    ("\t{# note #}\nline\n\n", {}),
    ("{% generation %}kept{% endgeneration %} and {%- generation -%}  x  {%- endgeneration %}", {}),
    ("no tags at all\n", {}),
    ("\u00a0 {{- 'nbsp stripped' -}} \u3000 end", {}),
    # Literals and printing.
    ("{{ 1 }} {{ -3 }} {{ 2.5 }} {{ 2.0 }} {{ -0.0 }} {{ 1e3 if false else 7 }}", {}),
    ("{{ 'a\\tb\\n' }}{{ \"q\\\"\\\\\" }}{{ '\\x41\\u00e9' }}{{ 'con' 'cat' }}", {}),
    ("{{ true }} {{ false }} {{ none }} {{ True }} {{ None }} [{{ undefined_name }}]", {}),
    ("{{ [1, 'a', none, true, 2.0, [3]] }} {{ {'k': 'v', 'n': {'x': 1}} }} {{ (1, 2) }}", {}),
    ("{{ x }} {{ y }} {{ z }} {{ w }}", {"x": 1.0, "y": 1.5, "z": 12345678901, "w": 1e-7}),
    ("{{ 0.1 + 0.2 }} {{ 1 / 3 }} {{ 10 / 4 }} {{ 1e21 if false else 123456789012345680000.0 }}", {}),
    # Arithmetic and operators.
    ("{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7.5 % 2 }} {{ 2 ** 10 }} {{ 2 ** -1 }}", {}),
    ("{{ 1 + 2 * 3 - 4 }} {{ (1 + 2) * 3 }} {{ 3 * 1.5 }} {{ 1 - -1 }} {{ -x }}", {"x": 4}),
    ("{{ 'a' ~ 1 ~ 2.0 ~ true }} {{ 'a' + 1 }} {{ 1 + 'a' }} {{ u ~ 'x' }} {{ [1,2] ~ '' }}", {}),
    ("{{ [1] + [2, 3] }} {{ 'ab' * 2 if false else 'no' }}", {}),
    ("{{ 1 < 2 }} {{ 2 <= 1.5 }} {{ 3 > 2 > 1 }} {{ 1 == 1.0 }} {{ 'a' == 'a' }} {{ 1 != 2 }}", {}),
    ("{{ 1 == true }} {{ '1' == 1 }} {{ none == u }} {{ [1] == [1] }} {{ m == m }} {{ m == n }}",
     {"m": [1], "n": [1]}),
    ("{{ 'a' in 'cat' }} {{ 'z' not in 'cat' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 1 in u }}", {}),
    ("{{ x in xs }} {{ 2.0 in [2] }} {{ none in [none] }}", {"x": {"a": 1}, "xs": [{"a": 1}]}),
    ("{{ true and 'yes' }} {{ false or 'fallback' }} {{ '' or [] or 0 }} {{ not [] }} {{ not not 'x' }}", {}),
    ("{{ 'a' if x else 'b' }} {{ 'c' if y }}|{{ 'd' if not y else 'e' if x else 'f' }}", {"x": 1, "y": 0}),
    # Attribute / subscript access, slices.
    ("{{ m.role }} {{ m['content'] }} {{ m.missing }} {{ m.missing.deeper }} {{ u.x }} {{ none.x }}",
     {"m": {"role": "user", "content": "hi"}}),
    ("{{ xs[0] }} {{ xs[-1] }} {{ xs[5] }} {{ xs.1 }} {{ xs | length }} {{ xs.length }}", {"xs": [10, 20, 30]}),
    ("{{ xs[1:] }} {{ xs[:2] }} {{ xs[::-1] }} {{ xs[::2] }} {{ xs[-2:] }} {{ xs[1:-1] }} {{ xs[5:] }}",
     {"xs": [1, 2, 3, 4, 5]}),
    ("{{ s[0] }} {{ s[-1] }} {{ s[::-1] }} {{ s[1:3] }} {{ s | length }} {{ e | length }} {{ e[::-1] }}",
     {"s": "héllo", "e": "a🙂b"}),
    ("{{ d.items is callable }} {{ d.get('a') }} {{ d.get('zz', 'dflt') }} {{ d.get('zz') }} {{ d['a'] }}",
     {"d": {"a": 1}}),
    ("{{ d.keys() }} {{ d.values() }} {{ d.items() }} {% for k in d %}{{ k }};{% endfor %}",
     {"d": {"b": 1, "a": 2, "2": 3, "1": 4, "01": 5}}),
    # Statements.
    ("{% if x %}a{% elif y %}b{% elif z %}c{% else %}d{% endif %}", {"x": 0, "y": "", "z": [0]}),
    ("{% for x in xs %}{{ loop.index }}{{ loop.index0 }}{{ loop.revindex }}{{ loop.revindex0 }}"
     "{{ loop.first }}{{ loop.last }}{{ loop.length }}{{ loop.previtem }}{{ loop.nextitem }}|{% endfor %}",
     {"xs": ["a", "b", "c"]}),
    ("{% for k, v in d.items() %}{{ k }}={{ v }},{% endfor %}{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}",
     {"d": {"x": 1, "y": [2]}}),
    ("{% for x in xs if x is odd %}{{ x }}{{ loop.index }}{% else %}none{% endfor %}", {"xs": [1, 2, 3, 4, 5]}),
    ("{% for x in [] %}x{% else %}empty{% endfor %}{% for x in xs %}{% endfor %}", {"xs": [1]}),
    ("{% for x in xs %}{% if x == 3 %}{% break %}{% endif %}{% if x == 1 %}skipped{% continue %}{% endif %}{{ x }}{% endfor %}",
     {"xs": [1, 2, 3, 4]}),
    ("{% for x in xs %}{% continue %}{% else %}all continued{% endfor %}", {"xs": [1]}),
    ("{% set x = 1 %}{% set y, z = 2, 3 %}{{ x + y + z }}{% set t = (4, 5) %}{{ t[1] }}", {}),
    ("{% set ns = namespace(count=0, items=[]) %}{% for m in ms %}{% set ns.count = ns.count + 1 %}"
     "{% set ns.items = ns.items + [m] %}{% endfor %}{{ ns.count }} {{ ns.items }} {{ ns }}",
     {"ms": ["a", "b"]}),
    ("{% set outer = 1 %}{% for x in [1, 2] %}{% set outer = outer + x %}{{ outer }}{% endfor %}{{ outer }}", {}),
    ("{% set block %}  inner {{ 1 + 1 }}\n{% endset %}[{{ block }}]{{ block | trim }}", {}),
    ("{% macro greet(name, greeting='Hello') %}{{ greeting }}, {{ name }}!{% endmacro %}"
     "{{ greet('Ann') }} {{ greet('Bob', 'Hi') }} {{ greet(greeting='Yo', name='Cy') }} {{ greet() }}", {}),
    ("{% macro wrap(tag) %}<{{ tag }}>{{ caller() }}</{{ tag }}>{% endmacro %}"
     "{% call wrap('b') %}bold {{ 1 + 1 }}{% endcall %}", {}),
    ("{% filter upper %}shout {{ 'it' }}{% endfilter %}{% filter replace('a', 'o') %}banana{% endfilter %}", {}),
    ("{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(5) }}", {}),
    # Tests.
    ("{{ x is defined }} {{ u is undefined }} {{ none is none }} {{ 'a' is string }} {{ 1 is number }}"
     " {{ 1.5 is integer }} {{ d is mapping }} {{ xs is iterable }} {{ 'a' is iterable }} {{ d is iterable }}",
     {"x": 0, "d": {}, "xs": []}),
    ("{{ xs is sequence }} {{ d is sequence }} {{ true is boolean }} {{ 1 is boolean }} {{ true is true }}"
     " {{ 0 is false }} {{ 3 is odd }} {{ 4 is even }} {{ 'abc' is lower }} {{ 'AbC' is upper }}"
     " {{ range is callable }} {{ x is not none }}", {"x": 0, "d": {}, "xs": []}),
    # Filters.
    ("{{ '  Hi There  ' | trim }}|{{ 'abc' | upper }}|{{ 'ABC' | lower }}|{{ 'hello wORLD-x y_z' | title }}"
     "|{{ 'hello World' | capitalize }}|{{ 'é' | upper }}",
     {}),
    ("{{ s | upper }}|{{ s | lower }}|{{ s.upper() }}|{{ 'ébc' | capitalize }}|{{ s is lower }}",
     {"s": "Ça déjà vu ÀÿŸ straße Ωμέγα Привет Ёж ĞğŁł"}),
    ("{{ xs | length }} {{ xs | first }} {{ xs | last }} {{ xs | reverse }} {{ xs | join }} {{ xs | join(', ') }}"
     " {{ xs | join(separator='-') }} {{ 'abc' | join('.') }} {{ xs | list }} {{ xs | unique }}",
     {"xs": [3, 1, 2, 1]}),
    ("{{ xs | sort }} {{ ws | sort }} {{ ws | sort(reverse=true) }} {{ ws | sort(case_sensitive=true) }}"
     " {{ ds | sort(attribute='n') | map(attribute='k') | join }} {{ ds | map(attribute='z', default='-') | list }}",
     {"xs": [3, 1.5, 2], "ws": ["b", "A", "a", "C"], "ds": [{"k": "x", "n": 2}, {"k": "y", "n": 1}]}),
    ("{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='content') | join('|') }}"
     " {{ ms | rejectattr('role', 'equalto', 'user') | length }} {{ ms | selectattr('tool') | length }}"
     " {{ ms | selectattr('role', 'defined') | length }}",
     {"ms": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool": True},
             {"role": "user", "content": "c"}]}),
    ("{{ x | default('d') }} {{ u | default('d') }} {{ '' | default('d') }} {{ '' | default('d', true) }}"
     " {{ none | default('d', boolean=true) }} {{ none | default('d') }}", {"x": "x"}),
    ("{{ '42' | int }} {{ ' 7.9x' | int }} {{ 'abc' | int }} {{ 'abc' | int(5) }} {{ 3.99 | int }} {{ -3.99 | int }}"
     " {{ '2.5e1' | float }} {{ 'x' | float }} {{ 2 | float }} {{ true | int }} {{ -5 | abs }} {{ -2.5 | abs }}", {}),
    ("{{ 3 | string }} {{ 2.0 | string }} {{ true | string }} {{ [1, 'a'] | string }} {{ 'x' | string }} {{ 'a<b' | safe }}", {}),
    ("{{ d | items }} {{ d | length }} {{ d | dictsort }} {{ d.dictsort(by='value', reverse=true) }}",
     {"d": {"b": 2, "a": 3, "c": 1}}),
    ("{{ 'l1\nl2\n\nl3' | indent }}|{{ 'l1\nl2\n\nl3' | indent(2, true) }}|{{ 'l1\nl2\n\nl3' | indent('> ', first=true, blank=true) }}", {}),
    ("{{ 'a-b-c' | replace('-', '+') }} {{ 'aaa' | replace('a', 'b', 2) }} {{ 'ab' | replace('', '.') }}", {}),
    # tojson.
    ("{{ v | tojson }}", {"v": {"s": "q\"\\\n\t\u0001é🙂/", "n": [1, 2.5, -0.0, 1e-7, 1e21, True, None],
                               "e": {}, "l": [], "z": {"b": 1, "a": 2, "9": 3}}}),
    ("{{ v | tojson(indent=2) }}\n{{ v | tojson(indent=0) }}\n{{ v | tojson(sort_keys=true) }}",
     {"v": {"b": [1, {"c": []}], "a": {"x": None}, "e": {}}}),
    ("{{ v | tojson(ensure_ascii=true) }} {{ v | tojson(separators=(',', ':')) }}",
     {"v": {"k": "é🙂\u007f", "l": [1, 2]}}),
    ("{{ u | tojson }} {{ [u, 1] | tojson }} {{ [u] | string }} {{ 'x' | tojson }} {{ 3 | tojson }}", {}),
    # String methods.
    ("{{ '  x  '.strip() }}|{{ '  x  '.lstrip() }}|{{ '  x  '.rstrip() }}|{{ 'abc'.upper() }}|{{ 'ABC'.lower() }}"
     "|{{ 'ab cd'.title() }}|{{ 'ab'.capitalize() }}", {}),
    ("{{ 'hello'.startswith('he') }} {{ 'hello'.endswith('lo') }} {{ 'hello'.startswith(('x', 'h')) }} {{ 'hi'.endswith('hello') }}", {}),
    ("{{ 'a,b,,c'.split(',') }} {{ '  a  b c '.split() }} {{ 'a b c'.split(' ', 1) }} {{ ' a b  c'.split(none, 1) }}"
     " {{ 'x</think>y'.split('</think>')[-1] }}", {}),
    ("{{ 'a-b-a'.replace('a', 'x') }} {{ 'a-b-a'.replace('a', 'x', 1) }} {{ 'abc'.replace('b', 'BB', count=1) }}", {}),
    # Globals.
    ("{{ range(3) }} {{ range(1, 4) }} {{ range(10, 0, -3) }} {% for i in range(2) %}{{ i }}{% endfor %}", {}),
    ("{% set ns = namespace({'a': 1}, b=2) %}{{ ns.a }}{{ ns.b }}{{ ns.c }}", {}),
    ("{{ strftime_now('%Y') | length }} {{ strftime_now('%%|%S') }}", {}),
    # Edges of the oracle's semantics (loose equality, JavaScript number printing, ...).
    ("{% set x = [] | first %}{{ x is defined }}", {}),
    ("{{ ns | items }}", {}), ("{% for x in xs %}{{ loop }}{% endfor %}", {"xs":[1]}),
    ("{{x}}{{-x-}} {%- set y = 1 -%} {{y}}", {"x":1}), ("{{ 1. }}", {}), ("{{ .5 }}", {}),
    ("{{ 2 ** 0.5 }}", {}),
    ("{{ -x }}{{ +x }}{{ - 1 }}{{ not x }}", {"x": 1.5}), ("{{ x.y.z | default('d') }}", {}),
    ("{{ '%s' % 1 }}", {}), ("{{ 'a' * 3 }}", {}), ("{{ 3 * 'a' }}", {}),
    ("{{ messages[0]['content'] if messages else '' }}", {"messages": []}),
    ("{{ m.content is none }}", {"m": {"content": None}}), ("{{ x | tojson(indent=2) }}", {"x": [[], {}, [1]]}),
    ("{% if x is string and x %}s{% endif %}", {"x": "a"}), ("{{ x | join(',') }}", {"x": [None, 1.0, [1,2], {"a":1}, True]}),
    ("{{ xs | map(attribute='a.b') | list }}", {"xs": [{"a": {"b": 1}}, {"a": {}}]}),
    ("{{ xs | selectattr('a', 'none') | list }}", {"xs": [{"a": None}, {"a": 1}]}),
    ("{{ xs | selectattr('a', 'equalto', 1) | list }}", {"xs": [{"a": 1}]}),
    ("{{ d.items() | list }}", {"d": {"a": 1}}), ("{{ d | dictsort(true) }}", {"d": {"B": 1, "a": 2}}),
    ("{% for a, b in d | items %}{{ a }}{{ b }}{% endfor %}", {"d": {"x": 1}}),
    ("{{ 'ab' in ['ab'] }} {{ ['a'] in [['a']] }}", {}), ("{{ x['a'] }}", {"x": [1]}), ("{{ x[0] }}", {"x": {"0": 1}}),
    ("{{ 'abc'[1] }} {{ 'abc'.length }} {{ 'abc' | count }}", {}), ("{{ (1, 2) | length }} {{ (1,) }}", {}),
    ("{{ {'a': 1, 'a': 2} }}", {}), ("{{ {1: 2} }}", {}), ("{{ range(3) | sum }}", {}),
    ("{% set x = namespace() %}{{ x is mapping }}{{ x is defined }}", {}),
    ("{{ 'x' if true else }}", {}), ("{{ a if b if c else d else e }}", {}),
    ("{% for x in [1,2,3] %}{% set y = x %}{% endfor %}{{ y }}", {}),
    ("{% macro m() %}x{% endmacro %}{{ m(a=1) }}", {}),
    ("{{ x.strip('a') }}", {"x": "aba"}), ("{{ 'a b'.split(' ', -1) }}", {}), ("{{ 'A'.lower().upper() }}", {}),
    ("{{ true + 1 }}", {}), ("{{ 1 + true }}", {}), ("{{ 1 < true }}", {}), ("{{ none == false }}", {}),
    ("{{ '' == 0 }} {{ ' 1 ' == 1 }} {{ '1e2' == 100 }} {{ 'x' == 0 }}", {}), ("{{ [1] == 1 }} {{ [] == '' }}", {}),
    ("{{ 0.1 * 3 }} {{ 1e-7 if false else 0.0000001 }} {{ 100000000000000000000000.0 }}", {}),
    ("{{ x }}", {"x": 1e300}), ("{{ x | tojson }}", {"x": 1e300}), ("{{ x }}", {"x": 123456789.125}),
    ("{% raw %}{{ x }}{% endraw %}", {}), ("{{ x | indent(first=true) }}", {"x": "a\nb"}),
    ("{{ 'Hello'|replace('l', 'L', count=none) }}", {}), ("{{ 'x'.startswith() }}", {}),
    ("{{ xs|sort(attribute='n', reverse=true)|map(attribute='n')|list }}", {"xs": [{"n": 1}, {"n": 3}, {"n": 2}]}),
    ("{{ strftime_now('%d %b %B %H:%M') | length > 5 }}", {}),
    ("{%- for m in messages -%}{%- if loop.index0 is even -%}e{%- endif -%}{%- endfor -%}", {"messages": [1,2,3]}),
    # Errors: both sides must fail (raise_exception: with the same message).
    ("{{ raise_exception('Conversation roles must alternate') }}", {}),
    ("{% if messages | length > 1 %}{{ raise_exception('Only ' ~ 1 ~ ' message is supported') }}{% endif %}",
     {"messages": [1, 2]}),
    ("{{ raise_exception() }}", {}),
    ("{% if %}", {}),
    ("{% for x in xs %}no end", {"xs": []}),
    ("{{ 1 +", {}),
    ("{% endif %}", {}),
    ("{{ x | nosuchfilter }}", {"x": 1}),
    ("{{ x is divisibleby(3) }}", {"x": 3}),
    ("{{ 'a' < 'b' }}", {}),
    ("{{ u + 1 }}", {}),
    ("{{ none ~ 'x' }}", {}),
    ("{{ x | d('y') }}", {}),
    ("{% for x in 'abc' %}{{ x }}{% endfor %}", {}),
    ("{{ 'x' | tojson(indent='2') }}", {}),
    ("{% set x.y = 1 %}", {"x": {"y": 0}}),
    ("{{ 'unterminated }}", {}),
    ("{{ [1, 2] | sort(attribute='x') | first }} {{ [1, 'a'] | sort }}", {}),
    ("{{ range }}", {"range": 1}),
]


FRAGMENTS = ["{%", "%}", "{{", "}}", "-", "(", ")", "[", "]", "|", "'", '"', " if ", " else ",
             "not ", " in ", ".", ",", ":", "~", "+", "*", "**", "//", "{#", "#}", "\n", " ",
             "endif", "endfor", "{% endfor %}", "{% if x %}", "loop.", "[::-1]", "| tojson",
             "| length", "0", "1.5", "none"]


def mutated_cases(base, count, seed):
    """Differential fuzzing: `count` random small edits (deletions, inserted Jinja fragments,
    copied spans) of the other cases' templates; both engines must agree on each."""
    rng = random.Random(seed)
    cases = []
    for k in range(count):
        name, source, context = rng.choice(base)
        for _ in range(rng.choice([1, 1, 1, 2])):
            p = rng.randint(0, len(source))
            r = rng.random()
            if r < 0.4:
                source = source[:p] + source[p + rng.randint(1, 5):]
            elif r < 0.8:
                source = source[:p] + rng.choice(FRAGMENTS) + source[p:]
            else:
                q = rng.randint(0, len(source))
                source = source[:p] + source[q:q + 10] + source[p:]
        cases.append((f"mutated/{k} (of {name})", source, context))
    return cases


def run(cmd, cases):
    job = json.dumps({"cases": [{"template": t, "context": c} for _, t, c in cases]})
    proc = subprocess.run(cmd, input=job.encode(), capture_output=True, timeout=240)
    if proc.returncode == 77:
        print(proc.stderr.decode(errors="replace").strip())
        sys.exit(77)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return json.loads(proc.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--render", required=True)
    ap.add_argument("--node", default="")
    args = ap.parse_args()
    if not args.node or not os.path.exists(args.node):
        print("SKIP: node is not installed")
        return 77
    if not os.path.isdir(os.path.join(ORACLE_DIR, "node_modules", "@huggingface", "jinja")):
        print("SKIP: @huggingface/jinja is not installed (npm ci --prefix tests/chat/jinja_oracle)")
        return 77
    cases = template_cases()
    n_templates = len(cases)
    cases += [(f"synthetic/{i}", t, c) for i, (t, c) in enumerate(SYNTHETIC)]
    n_fixed = len(cases)
    cases += mutated_cases(cases[::4], 1500, seed=20261203)
    ours = run([args.render], cases)
    theirs = run([args.node, os.path.join(ORACLE_DIR, "oracle.js")], cases)
    assert len(ours) == len(theirs) == len(cases)
    failures = 0
    rendered = raised = failed = 0
    for (name, template, context), a, b in zip(cases, ours, theirs):
        problem = None
        if a["ok"] != b["ok"]:
            problem = "only one side failed"
        elif a["ok"] and a["output"] != b["output"]:
            problem = "outputs differ"
        elif not a["ok"] and a.get("raised") and a["error"] != b["error"]:
            problem = "raise_exception messages differ"
        if problem:
            failures += 1
            print(f"FAIL {name}: {problem}\n  template: {template[:300]!r}\n  ours:   {a}\n  oracle: {b}")
        elif a["ok"]:
            rendered += 1
        elif a.get("raised"):
            raised += 1
        else:
            failed += 1
    print(f"{len(cases)} cases ({n_templates} from {len(glob.glob(os.path.join(HERE, 'templates', '*.jinja')))} "
          f"templates, {len(SYNTHETIC)} synthetic, {len(cases) - n_fixed} mutated): "
          f"{rendered} identical renders, {raised} identical "
          f"raise_exception errors, {failed} failing in both, {failures} mismatches")
    if rendered < n_templates // 2:
        print("FAIL: too few successful renders to mean anything")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
