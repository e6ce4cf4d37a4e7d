// File: chat/jinja.cc
//
// The engine in four parts: source preprocessing and the lexer (both follow @huggingface/jinja's
// rules, see jinja.h), a recursive-descent parser into a small AST, runtime values, and a
// tree-walking renderer. No exceptions: every step returns absl::Status(Or).
//
// Filters (by operand type; "(…)" means the call form is required or accepted):
//   any: safe, tojson(indent=, ensure_ascii=, sort_keys=, separators=), default(value, boolean)
//   list: list first last length reverse sort(reverse, case_sensitive, attribute) join(sep)
//         string unique selectattr(attr[, test[, value]]) rejectattr(...) map(attribute=, default=)
//   string: length upper lower title capitalize trim indent(width, first, blank) join(sep) string
//           int(default) float(default) replace(old, new, count)
//   number: abs int float string; bool: bool int float string
//   dict: items length get keys values dictsort (and get(key, default), dictsort(...) called)
// Tests: boolean callable odd even false true none string number integer iterable mapping
//        sequence lower upper defined undefined equalto eq
// Methods: string upper lower strip lstrip rstrip title capitalize startswith endswith
//          split(sep, maxsplit) replace(old, new, count) and .length; list .length;
//          dict get items keys values dictsort.
#include "chat/jinja.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <ctime>
#include <functional>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/utf8.h"

namespace retnet::chat {
namespace jinja_internal {
namespace {

// ---------------------------------------------------------------------------------------------
// Text helpers (UTF-8; JavaScript semantics where the oracle's behaviour depends on them).

// Decodes the code point at s[i] (the input is valid UTF-8; a stray byte decodes as itself).
uint32_t DecodeAt(std::string_view s, size_t i, size_t* len) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if (c < 0xC0 && c >= 0x80) n = 1;
  if (i + n > s.size()) n = 1;
  if (n == 1) {
    *len = 1;
    return c;
  }
  uint32_t cp = c & (0xFF >> (n + 1));
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (b(i + k) & 0x3F);
  *len = n;
  return cp;
}

// JavaScript's \s (and String.prototype.trim's set).
bool IsJsSpace(uint32_t cp) {
  if (cp <= 32) return cp == 32 || (cp >= 9 && cp <= 13);
  return cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
         cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000 || cp == 0xFEFF;
}

// Length of a whitespace character at s[i] (0 when there is none).
size_t SpaceAt(std::string_view s, size_t i) {
  if (i >= s.size()) return 0;
  size_t len;
  return IsJsSpace(DecodeAt(s, i, &len)) ? len : 0;
}

std::string_view TrimEnd(std::string_view s) {
  size_t end = s.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    size_t len;
    if (!IsJsSpace(DecodeAt(s, start, &len))) break;
    end = start;
  }
  return s.substr(0, end);
}

std::string_view TrimStart(std::string_view s) {
  size_t i = 0;
  while (size_t n = SpaceAt(s, i)) i += n;
  return s.substr(i);
}

std::string_view Trim(std::string_view s) { return TrimStart(TrimEnd(s)); }

size_t Utf16Length(std::string_view s) {
  size_t n = 0;
  for (size_t i = 0; i < s.size();) {
    size_t len;
    n += DecodeAt(s, i, &len) >= 0x10000 ? 2 : 1;
    i += len;
  }
  return n;
}

std::vector<std::string_view> CodePoints(std::string_view s) {
  std::vector<std::string_view> out;
  for (size_t i = 0; i < s.size();) {
    size_t len;
    DecodeAt(s, i, &len);
    out.push_back(s.substr(i, len));
    i += len;
  }
  return out;
}

// Debian's absl::string_view is not std::string_view.
absl::string_view AV(std::string_view s) { return absl::string_view(s.data(), s.size()); }

bool IsWordByte(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}
bool IsDigit(unsigned char c) { return c >= '0' && c <= '9'; }

// Case mapping as JavaScript's toUpperCase / toLowerCase for ASCII, Latin-1, Latin Extended-A,
// basic Greek and Cyrillic (other characters are left as they are).
uint32_t UpperCp(uint32_t c) {
  if (c >= 'a' && c <= 'z') return c - 32;
  if (c < 0x80) return c;
  if (c == 0xB5) return 0x39C;
  if ((c >= 0xE0 && c <= 0xFE && c != 0xF7)) return c - 32;
  if (c == 0xFF) return 0x178;
  if (c == 0x131) return 'I';
  if (c == 0x17F) return 'S';
  if ((c >= 0x100 && c <= 0x12F) || (c >= 0x132 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) {
    return c & ~1u;
  }
  if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c % 2 == 0) ? c - 1 : c;
  if (c == 0x3C2) return 0x3A3;
  if (c >= 0x3B1 && c <= 0x3CB) return c - 32;
  if (c == 0x3AC) return 0x386;
  if (c >= 0x3AD && c <= 0x3AF) return c - 37;
  if (c == 0x3CC) return 0x38C;
  if (c == 0x3CD || c == 0x3CE) return c - 63;
  if (c >= 0x430 && c <= 0x44F) return c - 32;
  if (c >= 0x450 && c <= 0x45F) return c - 80;
  return c;
}
uint32_t LowerCp(uint32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c < 0x80) return c;
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
  if (c == 0x178) return 0xFF;
  if (c == 0x130) return c;  // İ lowers to two code points; left alone
  if ((c >= 0x100 && c <= 0x12F) || (c >= 0x132 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) {
    return c | 1u;
  }
  if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c % 2 == 1) ? c + 1 : c;
  if (c >= 0x391 && c <= 0x3AB && c != 0x3A2) return c + 32;
  if (c == 0x386) return 0x3AC;
  if (c >= 0x388 && c <= 0x38A) return c + 37;
  if (c == 0x38C) return 0x3CC;
  if (c == 0x38E || c == 0x38F) return c + 63;
  if (c >= 0x410 && c <= 0x42F) return c + 32;
  if (c >= 0x400 && c <= 0x40F) return c + 80;
  return c;
}
std::string MapCase(std::string_view s, bool upper) {
  std::string r;
  r.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t len;
    const uint32_t c = DecodeAt(s, i, &len);
    if (upper && c == 0xDF) {
      r += "SS";
    } else {
      common::AppendUtf8(&r, upper ? UpperCp(c) : LowerCp(c));
    }
    i += len;
  }
  return r;
}
std::string AsciiUpper(std::string_view s) { return MapCase(s, true); }
std::string AsciiLower(std::string_view s) { return MapCase(s, false); }

// JavaScript's Number.prototype.toString() (shortest round trip, ECMAScript's layout rules).
std::string JsNumber(double d) {
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  if (d == 0) return "0";
  std::string sign = d < 0 ? "-" : "";
  d = std::fabs(d);
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  const size_t e_pos = sci.find('e');
  std::string digits;
  for (size_t i = 0; i < e_pos; ++i) {
    if (sci[i] != '.') digits.push_back(sci[i]);
  }
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  const int exp = std::atoi(sci.c_str() + e_pos + 1);
  const int k = static_cast<int>(digits.size());
  const int n = exp + 1;
  std::string out;
  if (k <= n && n <= 21) {
    out = digits + std::string(n - k, '0');
  } else if (0 < n && n <= 21) {
    out = digits.substr(0, n) + "." + digits.substr(n);
  } else if (-6 < n && n <= 0) {
    out = "0." + std::string(-n, '0') + digits;
  } else {
    const int e = n - 1;
    out = digits.substr(0, 1);
    if (k > 1) out += "." + digits.substr(1);
    out += e < 0 ? "e-" : "e+";
    out += std::to_string(e < 0 ? -e : e);
  }
  return sign + out;
}

// The printed form of a float (the oracle's FloatValue.toString).
std::string FloatText(double d) {
  if (d == 0 && std::signbit(d)) return "-0.0";
  if (std::isfinite(d) && std::floor(d) == d && std::fabs(d) < 1e21) {
    char buf[400];
    std::snprintf(buf, sizeof(buf), "%.1f", d);
    return buf;
  }
  return JsNumber(d);
}

// JSON.stringify of a string; with `ascii`, every UTF-16 unit >= 0x7F becomes \uXXXX.
void AppendJsonString(std::string* out, std::string_view s, bool ascii) {
  static constexpr char kHex[] = "0123456789abcdef";
  const auto hex4 = [&](uint32_t u) {
    out->append("\\u");
    for (int shift = 12; shift >= 0; shift -= 4) out->push_back(kHex[(u >> shift) & 0xF]);
  };
  out->push_back('"');
  for (size_t i = 0; i < s.size();) {
    size_t len;
    const uint32_t cp = DecodeAt(s, i, &len);
    switch (cp) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\b':
        out->append("\\b");
        break;
      case '\f':
        out->append("\\f");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      default:
        if (cp < 0x20) {
          hex4(cp);
        } else if (ascii && cp >= 0x7F) {
          if (cp >= 0x10000) {
            hex4(0xD800 + ((cp - 0x10000) >> 10));
            hex4(0xDC00 + ((cp - 0x10000) & 0x3FF));
          } else {
            hex4(cp);
          }
        } else {
          out->append(s.substr(i, len));
        }
    }
    i += len;
  }
  out->push_back('"');
}

// ---------------------------------------------------------------------------------------------
// Source positions and errors.

struct SourceMap {
  std::string original;
  std::string text;            // after preprocessing
  std::vector<uint32_t> orig;  // text[i] came from original[orig[i]]; orig[size] = end

  std::string Where(size_t text_pos) const {
    const size_t p = text_pos < orig.size() ? orig[text_pos] : original.size();
    size_t line = 1, col = 1;
    for (size_t i = 0; i < p && i < original.size(); ++i) {
      if (original[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    return absl::StrCat("line ", line, ", column ", col);
  }
};

// Removes the characters of `text` for which keep[i] is false.
void Compact(SourceMap* m, const std::vector<bool>& keep) {
  std::string text;
  std::vector<uint32_t> orig;
  text.reserve(m->text.size());
  orig.reserve(m->text.size() + 1);
  for (size_t i = 0; i < m->text.size(); ++i) {
    if (keep[i]) {
      text.push_back(m->text[i]);
      orig.push_back(m->orig[i]);
    }
  }
  orig.push_back(m->orig.back());
  m->text = std::move(text);
  m->orig = std::move(orig);
}

// The oracle's preprocess(): trailing newline, lstrip_blocks, trim_blocks, generation tags.
void Preprocess(SourceMap* m) {
  m->text = m->original;
  m->orig.resize(m->text.size() + 1);
  for (size_t i = 0; i <= m->text.size(); ++i) m->orig[i] = static_cast<uint32_t>(i);
  if (!m->text.empty() && m->text.back() == '\n') {
    m->text.pop_back();
    m->orig.erase(m->orig.end() - 2);
  }
  std::string& t = m->text;
  {  // lstrip_blocks: /^[ \t]*({[#%-])/gm
    std::vector<bool> keep(t.size(), true);
    for (size_t i = 0; i < t.size(); ++i) {
      bool line_start = i == 0 || t[i - 1] == '\n' || t[i - 1] == '\r';
      if (!line_start && i >= 3) {  // U+2028 / U+2029 end a line for JavaScript's ^ too
        line_start =
            t[i - 3] == '\xE2' && t[i - 2] == '\x80' && (t[i - 1] == '\xA8' || t[i - 1] == '\xA9');
      }
      if (!line_start) continue;
      size_t j = i;
      while (j < t.size() && (t[j] == ' ' || t[j] == '\t')) ++j;
      if (j > i && j + 1 < t.size() && t[j] == '{' &&
          (t[j + 1] == '#' || t[j + 1] == '%' || t[j + 1] == '-')) {
        for (size_t k = i; k < j; ++k) keep[k] = false;
        i = j + 1;
      }
    }
    Compact(m, keep);
  }
  {  // trim_blocks: /([#%-]})\n/g
    std::vector<bool> keep(t.size(), true);
    for (size_t i = 0; i + 2 < t.size(); ++i) {
      if ((t[i] == '#' || t[i] == '%' || t[i] == '-') && t[i + 1] == '}' && t[i + 2] == '\n') {
        keep[i + 2] = false;
        i += 2;
      }
    }
    Compact(m, keep);
  }
  {  // {%-? (end)?generation -?%} and the whitespace it strips
    std::vector<bool> keep(t.size(), true);
    size_t last = 0;
    for (size_t i = 0; i + 1 < t.size(); ++i) {
      if (t[i] != '{' || t[i + 1] != '%') continue;
      size_t j = i + 2;
      const bool lstrip = j < t.size() && t[j] == '-';
      if (lstrip) ++j;
      while (size_t n = SpaceAt(t, j)) j += n;
      if (t.compare(j, 3, "end") == 0) j += 3;
      if (t.compare(j, 10, "generation") != 0) continue;
      j += 10;
      while (size_t n = SpaceAt(t, j)) j += n;
      const bool rstrip = j < t.size() && t[j] == '-';
      if (rstrip) ++j;
      if (t.compare(j, 2, "%}") != 0) continue;
      j += 2;
      size_t after = j;
      while (size_t n = SpaceAt(t, after)) after += n;
      size_t begin = i;
      if (lstrip) {
        while (begin > last) {
          size_t s = begin - 1;
          while (s > last && (static_cast<unsigned char>(t[s]) & 0xC0) == 0x80) --s;
          size_t len;
          if (!IsJsSpace(DecodeAt(t, s, &len))) break;
          begin = s;
        }
      }
      for (size_t k = begin; k < j; ++k) keep[k] = false;
      if (rstrip) {
        for (size_t k = j; k < after; ++k) keep[k] = false;
      }
      last = after;
      i = after - 1;
    }
    Compact(m, keep);
  }
}

// ---------------------------------------------------------------------------------------------
// Lexer.

enum class Tok {
  kText,
  kNumber,
  kString,
  kIdent,
  kEquals,
  kOpenParen,
  kCloseParen,
  kOpenStmt,
  kCloseStmt,
  kOpenExpr,
  kCloseExpr,
  kOpenBracket,
  kCloseBracket,
  kOpenBrace,
  kCloseBrace,
  kComma,
  kDot,
  kColon,
  kPipe,
  kAdditive,
  kMultiplicative,
  kPower,
  kComparison,
  kUnary,
  kComment,
  kEnd,
};

struct Token {
  Tok type;
  std::string value;
  size_t pos;
};

struct Rule {
  const char* seq;
  Tok type;
};
constexpr Rule kRules[] = {
    {"{%", Tok::kOpenStmt},      {"%}", Tok::kCloseStmt},
    {"{{", Tok::kOpenExpr},      {"}}", Tok::kCloseExpr},
    {"(", Tok::kOpenParen},      {")", Tok::kCloseParen},
    {"{", Tok::kOpenBrace},      {"}", Tok::kCloseBrace},
    {"[", Tok::kOpenBracket},    {"]", Tok::kCloseBracket},
    {",", Tok::kComma},          {".", Tok::kDot},
    {":", Tok::kColon},          {"|", Tok::kPipe},
    {"<=", Tok::kComparison},    {">=", Tok::kComparison},
    {"==", Tok::kComparison},    {"!=", Tok::kComparison},
    {"<", Tok::kComparison},     {">", Tok::kComparison},
    {"+", Tok::kAdditive},       {"-", Tok::kAdditive},
    {"~", Tok::kAdditive},       {"**", Tok::kPower},
    {"*", Tok::kMultiplicative}, {"//", Tok::kMultiplicative},
    {"/", Tok::kMultiplicative}, {"%", Tok::kMultiplicative},
    {"=", Tok::kEquals},
};

class Lexer {
 public:
  explicit Lexer(const SourceMap& map) : map_(map), src_(map.text) {}

  absl::StatusOr<std::vector<Token>> Run() {
    while (pos_ < src_.size()) {
      const Tok last = tokens_.empty() ? Tok::kEnd : tokens_.back().type;  // kEnd: none yet
      if (last == Tok::kEnd || last == Tok::kCloseStmt || last == Tok::kCloseExpr ||
          last == Tok::kComment) {
        size_t end = pos_;
        while (true) {
          end = src_.find('{', end);
          if (end == std::string::npos) {
            end = src_.size();
            break;
          }
          const char next = end + 1 < src_.size() ? src_[end + 1] : '\0';
          if (next == '%' || next == '{' || next == '#') break;
          ++end;
        }
        if (end > pos_) {
          Push(Tok::kText, std::string(src_.substr(pos_, end - pos_)), pos_);
          pos_ = end;
          continue;
        }
      }
      if (src_[pos_] == '{') {
        const char next = At(pos_ + 1);
        if (next == '#') {
          const size_t start = pos_;
          pos_ += 2;
          const bool strip_before = At(pos_) == '-';
          if (strip_before) ++pos_;
          const size_t end = src_.find("#}", pos_);
          if (end == std::string::npos) return Error(start, "missing end of comment tag");
          const bool strip_after = end > pos_ && src_[end - 1] == '-';
          if (strip_before) StripTrailingWhitespace();
          Push(Tok::kComment, "", start);
          pos_ = end + 2;
          if (strip_after) SkipLeadingWhitespace();
          continue;
        }
        if (At(pos_ + 2) == '-' && (next == '%' || next == '{')) {
          StripTrailingWhitespace();
          Push(next == '%' ? Tok::kOpenStmt : Tok::kOpenExpr, next == '%' ? "{%" : "{{", pos_);
          if (next == '{') curly_depth_ = 0;
          pos_ += 3;
          continue;
        }
      }
      // Whitespace inside a tag.
      while (size_t n = SpaceAt(src_, pos_)) {
        pos_ += n;
        if (pos_ >= src_.size()) return Error(pos_, "unexpected end of template");
      }
      const char c = src_[pos_];
      if (c == '-' && At(pos_ + 2) == '}' && (At(pos_ + 1) == '%' || At(pos_ + 1) == '}')) {
        const bool stmt = At(pos_ + 1) == '%';
        Push(stmt ? Tok::kCloseStmt : Tok::kCloseExpr, stmt ? "%}" : "}}", pos_);
        pos_ += 3;
        SkipLeadingWhitespace();
        continue;
      }
      if (c == '-' || c == '+') {
        const Tok prev = tokens_.empty() ? Tok::kEnd : tokens_.back().type;
        if (prev == Tok::kEnd || prev == Tok::kText) {
          return Error(pos_, absl::StrCat("unexpected '", std::string(1, c), "'"));
        }
        if (prev != Tok::kIdent && prev != Tok::kNumber && prev != Tok::kString &&
            prev != Tok::kCloseParen && prev != Tok::kCloseBracket) {
          const size_t start = pos_++;
          ASSIGN_OR_RETURN(std::string num, ConsumeDigits());
          if (!num.empty() && At(pos_) == '.' && IsDigit(At(pos_ + 1))) {
            ++pos_;
            ASSIGN_OR_RETURN(std::string frac, ConsumeDigits());
            num = absl::StrCat(num, ".", frac);
          }
          if (num.empty()) {
            Push(Tok::kUnary, std::string(1, c), start);
          } else {
            Push(Tok::kNumber, std::string(1, c) + num, start);
          }
          continue;
        }
      }
      bool matched = false;
      for (const Rule& rule : kRules) {
        const std::string_view seq = rule.seq;
        if (seq == "}}" && curly_depth_ > 0) continue;
        if (src_.compare(pos_, seq.size(), seq) == 0) {
          Push(rule.type, std::string(seq), pos_);
          if (rule.type == Tok::kOpenExpr) {
            curly_depth_ = 0;
          } else if (rule.type == Tok::kOpenBrace) {
            ++curly_depth_;
          } else if (rule.type == Tok::kCloseBrace) {
            --curly_depth_;
          }
          pos_ += seq.size();
          matched = true;
          break;
        }
      }
      if (matched) continue;
      if (c == '\'' || c == '"') {
        const size_t start = pos_++;
        ASSIGN_OR_RETURN(std::string str, ConsumeString(c));
        Push(Tok::kString, std::move(str), start);
        ++pos_;
        continue;
      }
      if (IsDigit(c)) {
        const size_t start = pos_;
        ASSIGN_OR_RETURN(std::string num, ConsumeDigits());
        if ((tokens_.empty() || tokens_.back().type != Tok::kDot) && At(pos_) == '.' &&
            IsDigit(At(pos_ + 1))) {
          ++pos_;
          ASSIGN_OR_RETURN(std::string frac, ConsumeDigits());
          num = absl::StrCat(num, ".", frac);
        }
        Push(Tok::kNumber, std::move(num), start);
        continue;
      }
      if (IsWordByte(c)) {
        const size_t start = pos_;
        while (IsWordByte(At(pos_))) {
          if (++pos_ >= src_.size()) return Error(pos_, "unexpected end of template");
        }
        Push(Tok::kIdent, std::string(src_.substr(start, pos_ - start)), start);
        continue;
      }
      size_t len;
      DecodeAt(src_, pos_, &len);
      return Error(
          pos_, absl::StrCat("unexpected character '", std::string(src_.substr(pos_, len)), "'"));
    }
    Push(Tok::kEnd, "", src_.size());
    return std::move(tokens_);
  }

 private:
  char At(size_t i) const { return i < src_.size() ? src_[i] : '\0'; }
  void Push(Tok type, std::string value, size_t pos) {
    tokens_.push_back(Token{type, std::move(value), pos});
  }
  absl::Status Error(size_t pos, std::string_view message) const {
    return absl::InvalidArgumentError(absl::StrCat(map_.Where(pos), ": ", AV(message)));
  }
  absl::StatusOr<std::string> ConsumeDigits() {
    const size_t start = pos_;
    while (IsDigit(At(pos_))) {
      if (++pos_ >= src_.size()) return Error(pos_, "unexpected end of template");
    }
    return std::string(src_.substr(start, pos_ - start));
  }
  absl::StatusOr<std::string> ConsumeString(char quote) {
    std::string str;
    while (true) {
      if (pos_ >= src_.size()) return Error(pos_, "unterminated string literal");
      const char ch = src_[pos_];
      if (ch == quote) break;
      ++pos_;
      if (ch != '\\') {
        str.push_back(ch);
        continue;
      }
      if (pos_ >= src_.size()) return Error(pos_, "unterminated string literal");
      const char esc = src_[pos_++];
      switch (esc) {
        case 'n':
          str.push_back('\n');
          break;
        case 't':
          str.push_back('\t');
          break;
        case 'r':
          str.push_back('\r');
          break;
        case 'b':
          str.push_back('\b');
          break;
        case 'f':
          str.push_back('\f');
          break;
        case 'v':
          str.push_back('\v');
          break;
        case '\'':
        case '"':
        case '\\':
          str.push_back(esc);
          break;
        case 'x':
        case 'u': {
          const size_t n = esc == 'x' ? 2 : 4;
          uint32_t cp = 0;
          for (size_t k = 0; k < n; ++k) {
            const char h = At(pos_ + k);
            int v = h >= '0' && h <= '9'   ? h - '0'
                    : h >= 'a' && h <= 'f' ? h - 'a' + 10
                    : h >= 'A' && h <= 'F' ? h - 'A' + 10
                                           : -1;
            if (v < 0 || pos_ + k >= src_.size()) {
              return Error(pos_ - 2, "invalid hexadecimal escape sequence");
            }
            cp = cp * 16 + static_cast<uint32_t>(v);
          }
          pos_ += n;
          if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;  // no lone surrogates in UTF-8
          common::AppendUtf8(&str, cp);
          break;
        }
        default:
          return Error(pos_ - 2,
                       absl::StrCat("unexpected escaped character '", std::string(1, esc), "'"));
      }
    }
    return str;
  }
  void StripTrailingWhitespace() {
    if (!tokens_.empty() && tokens_.back().type == Tok::kText) {
      tokens_.back().value = std::string(TrimEnd(tokens_.back().value));
      if (tokens_.back().value.empty()) tokens_.pop_back();
    }
  }
  void SkipLeadingWhitespace() {
    while (size_t n = SpaceAt(src_, pos_)) pos_ += n;
  }

  const SourceMap& map_;
  std::string_view src_;
  size_t pos_ = 0;
  int curly_depth_ = 0;
  std::vector<Token> tokens_;
};

// ---------------------------------------------------------------------------------------------
// AST.

struct Node;
using NodePtr = std::unique_ptr<Node>;

enum class NodeKind {
  // Statements.
  kText,
  kIf,
  kFor,
  kSet,
  kMacro,
  kCallBlock,
  kFilterBlock,
  kBreak,
  kContinue,
  // Expressions.
  kInt,
  kFloat,
  kString,
  kIdent,
  kArray,
  kTuple,
  kObject,
  kMember,
  kSlice,
  kCall,
  kFilter,
  kTest,
  kUnary,
  kBinary,
  kTernary,
  kSelect,
  kKwarg,
};

struct Node {
  NodeKind kind;
  size_t pos = 0;
  std::string str;  // text, name, string literal, operator, filter or test name
  int64_t i = 0;
  double f = 0;
  bool flag = false;           // kMember: computed; kTest: negated; kFilter: called with (...)
  std::vector<NodePtr> kids;   // operands (a null entry is an omitted slice bound)
  std::vector<NodePtr> args;   // call / filter arguments, macro parameters
  std::vector<NodePtr> body;   // statement bodies
  std::vector<NodePtr> other;  // else branches
};

NodePtr MakeNode(NodeKind kind, size_t pos) {
  auto n = std::make_unique<Node>();
  n->kind = kind;
  n->pos = pos;
  return n;
}

}  // namespace

struct Program {
  SourceMap map;
  Limits limits;
  std::vector<NodePtr> body;
};

namespace {

// ---------------------------------------------------------------------------------------------
// Parser (the oracle's grammar and precedence: ternary < or < and < not < comparison and
// membership < + - ~ < * / // % < ** < is < | < unary sign < call, member < primary).

class Parser {
 public:
  Parser(const SourceMap& map, const std::vector<Token>& tokens, int max_depth)
      : map_(map), tokens_(tokens), max_depth_(max_depth) {}

  absl::StatusOr<std::vector<NodePtr>> Run() {
    std::vector<NodePtr> body;
    while (Peek().type != Tok::kEnd) {
      ASSIGN_OR_RETURN(NodePtr n, ParseAny());
      if (n) body.push_back(std::move(n));
    }
    return body;
  }

 private:
  // Guards recursion.
  class Depth {
   public:
    explicit Depth(Parser* p) : p_(p) { ++p_->depth_; }
    ~Depth() { --p_->depth_; }
    bool exceeded() const { return p_->depth_ > p_->max_depth_; }

   private:
    Parser* p_;
  };

  const Token& Peek(size_t k = 0) const {
    const size_t i = std::min(cur_ + k, tokens_.size() - 1);
    return tokens_[i];
  }
  bool Is(Tok t) const { return Peek().type == t; }
  bool IsIdent(std::string_view name, size_t k = 0) const {
    return Peek(k).type == Tok::kIdent && Peek(k).value == name;
  }
  bool IsStatement(std::initializer_list<std::string_view> names) const {
    if (Peek().type != Tok::kOpenStmt || Peek(1).type != Tok::kIdent) return false;
    for (std::string_view n : names) {
      if (Peek(1).value == n) return true;
    }
    return false;
  }
  absl::Status Error(const Token& t, std::string_view message) const {
    return absl::InvalidArgumentError(absl::StrCat(map_.Where(t.pos), ": ", AV(message)));
  }
  absl::Status Expect(Tok t, std::string_view what) {
    if (!Is(t)) {
      const Token& got = Peek();
      return Error(got, absl::StrCat("expected ", AV(what), ", got ",
                                     got.type == Tok::kEnd ? "end of template"
                                                           : absl::StrCat("'", got.value, "'")));
    }
    ++cur_;
    return absl::OkStatus();
  }
  absl::Status ExpectIdent(std::string_view name) {
    if (!IsIdent(name)) return Error(Peek(), absl::StrCat("expected '", AV(name), "'"));
    ++cur_;
    return absl::OkStatus();
  }
  // Parses statements until one of `ends` ({% name ...) is next.
  absl::Status ParseUntil(std::initializer_list<std::string_view> ends, std::vector<NodePtr>* out,
                          std::string_view block) {
    while (!IsStatement(ends)) {
      if (Is(Tok::kEnd)) {
        return Error(Peek(), absl::StrCat("unexpected end of template inside '", AV(block),
                                          "' (missing {% end", AV(block), " %}?)"));
      }
      ASSIGN_OR_RETURN(NodePtr n, ParseAny());
      if (n) out->push_back(std::move(n));
    }
    return absl::OkStatus();
  }
  absl::Status ExpectEnd(std::string_view name) {
    RETURN_IF_ERROR(Expect(Tok::kOpenStmt, "'{%'"));
    RETURN_IF_ERROR(ExpectIdent(name));
    return Expect(Tok::kCloseStmt, "'%}'");
  }

  absl::StatusOr<NodePtr> ParseAny() {
    Depth depth(this);
    if (depth.exceeded()) return Error(Peek(), "template nested too deeply");
    const Token& t = Peek();
    switch (t.type) {
      case Tok::kComment:
        ++cur_;
        return NodePtr();
      case Tok::kText: {
        NodePtr n = MakeNode(NodeKind::kText, t.pos);
        n->str = t.value;
        ++cur_;
        return n;
      }
      case Tok::kOpenStmt:
        return ParseStatement();
      case Tok::kOpenExpr: {
        ++cur_;
        ASSIGN_OR_RETURN(NodePtr e, ParseExpression());
        RETURN_IF_ERROR(Expect(Tok::kCloseExpr, "'}}'"));
        return e;
      }
      default:
        return Error(t, absl::StrCat("unexpected '", t.value, "'"));
    }
  }

  absl::StatusOr<NodePtr> ParseStatement() {
    ++cur_;  // {%
    const Token& t = Peek();
    if (t.type != Tok::kIdent) return Error(t, "expected a statement name");
    const std::string name = t.value;
    ++cur_;
    if (name == "set") return ParseSet(t.pos);
    if (name == "if") {
      ASSIGN_OR_RETURN(NodePtr n, ParseIf(t.pos));
      RETURN_IF_ERROR(ExpectEnd("endif"));
      return n;
    }
    if (name == "for") {
      ASSIGN_OR_RETURN(NodePtr n, ParseFor(t.pos));
      RETURN_IF_ERROR(ExpectEnd("endfor"));
      return n;
    }
    if (name == "macro") {
      NodePtr n = MakeNode(NodeKind::kMacro, t.pos);
      if (!Is(Tok::kIdent)) return Error(Peek(), "expected the macro's name");
      n->str = Peek().value;
      ++cur_;
      RETURN_IF_ERROR(ParseArgs(/*parameters=*/true, &n->args));
      RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
      RETURN_IF_ERROR(ParseUntil({"endmacro"}, &n->body, "macro"));
      RETURN_IF_ERROR(ExpectEnd("endmacro"));
      return n;
    }
    if (name == "call") {
      NodePtr n = MakeNode(NodeKind::kCallBlock, t.pos);
      if (Is(Tok::kOpenParen)) RETURN_IF_ERROR(ParseArgs(/*parameters=*/true, &n->args));
      if (!Is(Tok::kIdent)) return Error(Peek(), "expected a macro name after 'call'");
      NodePtr call = MakeNode(NodeKind::kCall, Peek().pos);
      NodePtr callee = MakeNode(NodeKind::kIdent, Peek().pos);
      callee->str = Peek().value;
      ++cur_;
      call->kids.push_back(std::move(callee));
      RETURN_IF_ERROR(ParseArgs(/*parameters=*/false, &call->args));
      RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
      n->kids.push_back(std::move(call));
      RETURN_IF_ERROR(ParseUntil({"endcall"}, &n->body, "call"));
      RETURN_IF_ERROR(ExpectEnd("endcall"));
      return n;
    }
    if (name == "filter") {
      NodePtr n = MakeNode(NodeKind::kFilterBlock, t.pos);
      ASSIGN_OR_RETURN(NodePtr f, ParseFilterSpec(nullptr, t.pos));
      n->kids.push_back(std::move(f));
      RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
      RETURN_IF_ERROR(ParseUntil({"endfilter"}, &n->body, "filter"));
      RETURN_IF_ERROR(ExpectEnd("endfilter"));
      return n;
    }
    if (name == "break" || name == "continue") {
      RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
      return MakeNode(name == "break" ? NodeKind::kBreak : NodeKind::kContinue, t.pos);
    }
    return Error(t, absl::StrCat("unknown statement '", name, "'"));
  }

  absl::StatusOr<NodePtr> ParseSet(size_t pos) {
    NodePtr n = MakeNode(NodeKind::kSet, pos);
    ASSIGN_OR_RETURN(NodePtr target, ParseSequence(/*primary=*/false));
    n->kids.push_back(std::move(target));
    if (Is(Tok::kEquals)) {
      ++cur_;
      ASSIGN_OR_RETURN(NodePtr value, ParseSequence(/*primary=*/false));
      n->kids.push_back(std::move(value));
    } else {
      RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'=' or '%}'"));
      RETURN_IF_ERROR(ParseUntil({"endset"}, &n->body, "set"));
      RETURN_IF_ERROR(Expect(Tok::kOpenStmt, "'{%'"));
      RETURN_IF_ERROR(ExpectIdent("endset"));
    }
    RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
    return n;
  }

  // After `if` / `elif`: the test, the body, and an elif chain or else branch (not the endif).
  absl::StatusOr<NodePtr> ParseIf(size_t pos) {
    Depth depth(this);
    if (depth.exceeded()) return Error(Peek(), "template nested too deeply");
    NodePtr n = MakeNode(NodeKind::kIf, pos);
    ASSIGN_OR_RETURN(NodePtr test, ParseExpression());
    n->kids.push_back(std::move(test));
    RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
    RETURN_IF_ERROR(ParseUntil({"elif", "else", "endif"}, &n->body, "if"));
    if (IsStatement({"elif"})) {
      const size_t elif_pos = Peek(1).pos;
      cur_ += 2;
      ASSIGN_OR_RETURN(NodePtr alt, ParseIf(elif_pos));
      n->other.push_back(std::move(alt));
    } else if (IsStatement({"else"})) {
      cur_ += 2;
      RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
      RETURN_IF_ERROR(ParseUntil({"endif"}, &n->other, "if"));
    }
    return n;
  }

  absl::StatusOr<NodePtr> ParseFor(size_t pos) {
    NodePtr n = MakeNode(NodeKind::kFor, pos);
    ASSIGN_OR_RETURN(NodePtr var, ParseSequence(/*primary=*/true));
    if (var->kind != NodeKind::kIdent && var->kind != NodeKind::kTuple) {
      return Error(Peek(), "expected a name or names for the loop variable");
    }
    n->kids.push_back(std::move(var));
    if (!IsIdent("in")) return Error(Peek(), "expected 'in' after the loop variable");
    ++cur_;
    ASSIGN_OR_RETURN(NodePtr iterable, ParseExpression());
    n->kids.push_back(std::move(iterable));
    RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
    RETURN_IF_ERROR(ParseUntil({"endfor", "else"}, &n->body, "for"));
    if (IsStatement({"else"})) {
      cur_ += 2;
      RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
      RETURN_IF_ERROR(ParseUntil({"endfor"}, &n->other, "for"));
    }
    return n;
  }

  // `a, b, c` (a tuple) or a single expression.
  absl::StatusOr<NodePtr> ParseSequence(bool primary) {
    const size_t pos = Peek().pos;
    auto one = [&]() { return primary ? ParsePrimary() : ParseExpression(); };
    ASSIGN_OR_RETURN(NodePtr first, one());
    if (!Is(Tok::kComma)) return first;
    NodePtr tuple = MakeNode(NodeKind::kTuple, pos);
    tuple->kids.push_back(std::move(first));
    while (Is(Tok::kComma)) {
      ++cur_;
      ASSIGN_OR_RETURN(NodePtr next, one());
      tuple->kids.push_back(std::move(next));
    }
    return tuple;
  }

  absl::StatusOr<NodePtr> ParseExpression() {
    Depth depth(this);
    if (depth.exceeded()) return Error(Peek(), "expression nested too deeply");
    ASSIGN_OR_RETURN(NodePtr a, ParseOr());
    if (!IsIdent("if")) return a;
    const size_t pos = Peek().pos;
    ++cur_;
    ASSIGN_OR_RETURN(NodePtr test, ParseOr());
    if (IsIdent("else")) {
      ++cur_;
      ASSIGN_OR_RETURN(NodePtr b, ParseExpression());
      NodePtr n = MakeNode(NodeKind::kTernary, pos);
      n->kids.push_back(std::move(test));
      n->kids.push_back(std::move(a));
      n->kids.push_back(std::move(b));
      return n;
    }
    NodePtr n = MakeNode(NodeKind::kSelect, pos);
    n->kids.push_back(std::move(a));
    n->kids.push_back(std::move(test));
    return n;
  }

  static NodePtr Binary(std::string op, size_t pos, NodePtr l, NodePtr r) {
    NodePtr n = MakeNode(NodeKind::kBinary, pos);
    n->str = std::move(op);
    n->kids.push_back(std::move(l));
    n->kids.push_back(std::move(r));
    return n;
  }

  absl::StatusOr<NodePtr> ParseOr() {
    ASSIGN_OR_RETURN(NodePtr left, ParseAnd());
    while (IsIdent("or")) {
      const size_t pos = Peek().pos;
      ++cur_;
      ASSIGN_OR_RETURN(NodePtr right, ParseAnd());
      left = Binary("or", pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<NodePtr> ParseAnd() {
    ASSIGN_OR_RETURN(NodePtr left, ParseNot());
    while (IsIdent("and")) {
      const size_t pos = Peek().pos;
      ++cur_;
      ASSIGN_OR_RETURN(NodePtr right, ParseNot());
      left = Binary("and", pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<NodePtr> ParseNot() {
    if (IsIdent("not")) {
      Depth depth(this);
      if (depth.exceeded()) return Error(Peek(), "expression nested too deeply");
      NodePtr n = MakeNode(NodeKind::kUnary, Peek().pos);
      n->str = "not";
      ++cur_;
      ASSIGN_OR_RETURN(NodePtr arg, ParseNot());
      n->kids.push_back(std::move(arg));
      return n;
    }
    return ParseComparison();
  }
  absl::StatusOr<NodePtr> ParseComparison() {
    ASSIGN_OR_RETURN(NodePtr left, ParseAdditive());
    while (true) {
      std::string op;
      const size_t pos = Peek().pos;
      if (IsIdent("not") && IsIdent("in", 1)) {
        op = "not in";
        cur_ += 2;
      } else if (IsIdent("in")) {
        op = "in";
        ++cur_;
      } else if (Is(Tok::kComparison)) {
        op = Peek().value;
        ++cur_;
      } else {
        break;
      }
      ASSIGN_OR_RETURN(NodePtr right, ParseAdditive());
      left = Binary(std::move(op), pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<NodePtr> ParseAdditive() {
    ASSIGN_OR_RETURN(NodePtr left, ParseMultiplicative());
    while (Is(Tok::kAdditive)) {
      const Token& t = Peek();
      ++cur_;
      ASSIGN_OR_RETURN(NodePtr right, ParseMultiplicative());
      left = Binary(t.value, t.pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<NodePtr> ParseMultiplicative() {
    ASSIGN_OR_RETURN(NodePtr left, ParsePower());
    while (Is(Tok::kMultiplicative)) {
      const Token& t = Peek();
      ++cur_;
      ASSIGN_OR_RETURN(NodePtr right, ParsePower());
      left = Binary(t.value, t.pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<NodePtr> ParsePower() {
    ASSIGN_OR_RETURN(NodePtr left, ParseTest());
    while (Is(Tok::kPower)) {
      const Token& t = Peek();
      ++cur_;
      ASSIGN_OR_RETURN(NodePtr right, ParseTest());
      left = Binary("**", t.pos, std::move(left), std::move(right));
    }
    return left;
  }
  absl::StatusOr<NodePtr> ParseTest() {
    ASSIGN_OR_RETURN(NodePtr operand, ParseFilter());
    while (IsIdent("is")) {
      NodePtr n = MakeNode(NodeKind::kTest, Peek().pos);
      ++cur_;
      if (IsIdent("not")) {
        n->flag = true;
        ++cur_;
      }
      if (!Is(Tok::kIdent)) return Error(Peek(), "expected a test name after 'is'");
      n->str = Peek().value;
      ++cur_;
      n->kids.push_back(std::move(operand));
      operand = std::move(n);
    }
    return operand;
  }
  // A filter name and optional (arguments), applied to `operand` (null for a filter block).
  absl::StatusOr<NodePtr> ParseFilterSpec(NodePtr operand, size_t pos) {
    if (!Is(Tok::kIdent)) return Error(Peek(), "expected a filter name");
    NodePtr n = MakeNode(NodeKind::kFilter, Peek().pos);
    n->str = Peek().value;
    ++cur_;
    if (Is(Tok::kOpenParen)) {
      n->flag = true;
      RETURN_IF_ERROR(ParseArgs(/*parameters=*/false, &n->args));
      if (Is(Tok::kDot) || Is(Tok::kOpenBracket) || Is(Tok::kOpenParen)) {
        return Error(Peek(), "unsupported expression after a filter call");
      }
    }
    n->kids.push_back(std::move(operand));
    return n;
  }
  absl::StatusOr<NodePtr> ParseFilter() {
    ASSIGN_OR_RETURN(NodePtr operand, ParseUnarySign());
    while (Is(Tok::kPipe)) {
      const size_t pos = Peek().pos;
      ++cur_;
      ASSIGN_OR_RETURN(operand, ParseFilterSpec(std::move(operand), pos));
    }
    return operand;
  }
  absl::StatusOr<NodePtr> ParseUnarySign() {
    const Token& t = Peek();
    if ((t.type == Tok::kUnary || t.type == Tok::kAdditive) && (t.value == "-" || t.value == "+")) {
      Depth depth(this);
      if (depth.exceeded()) return Error(t, "expression nested too deeply");
      NodePtr n = MakeNode(NodeKind::kUnary, t.pos);
      n->str = t.value;
      ++cur_;
      ASSIGN_OR_RETURN(NodePtr arg, ParseUnarySign());
      n->kids.push_back(std::move(arg));
      return n;
    }
    return ParsePostfix();
  }
  absl::StatusOr<NodePtr> ParsePostfix() {
    ASSIGN_OR_RETURN(NodePtr object, ParsePrimary());
    while (true) {
      if (Is(Tok::kOpenParen)) {
        NodePtr call = MakeNode(NodeKind::kCall, Peek().pos);
        call->kids.push_back(std::move(object));
        RETURN_IF_ERROR(ParseArgs(/*parameters=*/false, &call->args));
        object = std::move(call);
      } else if (Is(Tok::kDot)) {
        NodePtr m = MakeNode(NodeKind::kMember, Peek().pos);
        ++cur_;
        ASSIGN_OR_RETURN(NodePtr prop, ParsePrimary());
        if (prop->kind != NodeKind::kIdent && prop->kind != NodeKind::kInt) {
          return Error(Peek(), "expected a name or an integer after '.'");
        }
        m->kids.push_back(std::move(object));
        m->kids.push_back(std::move(prop));
        object = std::move(m);
      } else if (Is(Tok::kOpenBracket)) {
        NodePtr m = MakeNode(NodeKind::kMember, Peek().pos);
        m->flag = true;
        ++cur_;
        ASSIGN_OR_RETURN(NodePtr prop, ParseSubscript());
        RETURN_IF_ERROR(Expect(Tok::kCloseBracket, "']'"));
        m->kids.push_back(std::move(object));
        m->kids.push_back(std::move(prop));
        object = std::move(m);
      } else {
        return object;
      }
    }
  }
  absl::StatusOr<NodePtr> ParseSubscript() {
    const size_t pos = Peek().pos;
    std::vector<NodePtr> parts;
    bool slice = false;
    while (!Is(Tok::kCloseBracket)) {
      if (Is(Tok::kEnd)) return Error(Peek(), "expected ']'");
      if (Is(Tok::kColon)) {
        parts.push_back(nullptr);
        ++cur_;
        slice = true;
      } else {
        ASSIGN_OR_RETURN(NodePtr e, ParseExpression());
        parts.push_back(std::move(e));
        if (Is(Tok::kColon)) {
          ++cur_;
          slice = true;
        }
      }
    }
    if (parts.empty()) return Error(Peek(), "expected an index or a slice");
    if (!slice) return std::move(parts[0]);
    if (parts.size() > 3) return Error(Peek(), "a slice has at most three parts");
    NodePtr n = MakeNode(NodeKind::kSlice, pos);
    n->kids = std::move(parts);
    n->kids.resize(3);
    return n;
  }
  // ( arguments ) of a call, or ( parameters ) of a macro or call block.
  absl::Status ParseArgs(bool parameters, std::vector<NodePtr>* out) {
    RETURN_IF_ERROR(Expect(Tok::kOpenParen, "'('"));
    bool saw_keyword = false;
    std::vector<std::string> names;
    while (!Is(Tok::kCloseParen)) {
      if (Is(Tok::kEnd)) return Error(Peek(), "expected ')'");
      if (Is(Tok::kPower) || (Is(Tok::kMultiplicative) && Peek().value == "*")) {
        return Error(Peek(), "argument unpacking (* and **) is not supported");
      }
      const Token& start = Peek();
      ASSIGN_OR_RETURN(NodePtr arg, ParseExpression());
      if (Is(Tok::kEquals)) {
        ++cur_;
        if (arg->kind != NodeKind::kIdent) {
          return Error(start, parameters ? "expected a parameter name"
                                         : "expected a name for the keyword argument");
        }
        ASSIGN_OR_RETURN(NodePtr value, ParseExpression());
        NodePtr kw = MakeNode(NodeKind::kKwarg, start.pos);
        kw->str = arg->str;
        kw->kids.push_back(std::move(value));
        arg = std::move(kw);
      }
      if (parameters) {
        if (arg->kind != NodeKind::kIdent && arg->kind != NodeKind::kKwarg) {
          return Error(start, "expected a parameter name");
        }
        if (std::find(names.begin(), names.end(), arg->str) != names.end()) {
          return Error(start, absl::StrCat("duplicate parameter '", arg->str, "'"));
        }
        names.push_back(arg->str);
      }
      if (arg->kind == NodeKind::kKwarg) {
        saw_keyword = true;
      } else if (saw_keyword) {
        return Error(start, parameters ? "a parameter without a default follows one with a default"
                                       : "a positional argument follows a keyword argument");
      }
      out->push_back(std::move(arg));
      if (Is(Tok::kComma)) ++cur_;
    }
    ++cur_;  // )
    return absl::OkStatus();
  }

  absl::StatusOr<NodePtr> ParsePrimary() {
    Depth depth(this);
    if (depth.exceeded()) return Error(Peek(), "expression nested too deeply");
    const Token& t = Peek();
    switch (t.type) {
      case Tok::kNumber: {
        ++cur_;
        if (t.value.find('.') != std::string::npos) {
          NodePtr n = MakeNode(NodeKind::kFloat, t.pos);
          n->f = std::strtod(t.value.c_str(), nullptr);
          return n;
        }
        NodePtr n = MakeNode(NodeKind::kInt, t.pos);
        const char* b = t.value.data();
        auto res = std::from_chars(b + (t.value[0] == '+' ? 1 : 0), b + t.value.size(), n->i);
        if (res.ec != std::errc()) return Error(t, "integer literal out of range");
        return n;
      }
      case Tok::kString: {
        NodePtr n = MakeNode(NodeKind::kString, t.pos);
        n->str = t.value;
        ++cur_;
        while (Is(Tok::kString)) {
          n->str += Peek().value;
          ++cur_;
        }
        return n;
      }
      case Tok::kIdent: {
        NodePtr n = MakeNode(NodeKind::kIdent, t.pos);
        n->str = t.value;
        ++cur_;
        return n;
      }
      case Tok::kOpenParen: {
        ++cur_;
        ASSIGN_OR_RETURN(NodePtr e, ParseSequence(/*primary=*/false));
        RETURN_IF_ERROR(Expect(Tok::kCloseParen, "')'"));
        return e;
      }
      case Tok::kOpenBracket: {
        NodePtr n = MakeNode(NodeKind::kArray, t.pos);
        ++cur_;
        while (!Is(Tok::kCloseBracket)) {
          if (Is(Tok::kEnd)) return Error(Peek(), "expected ']'");
          ASSIGN_OR_RETURN(NodePtr e, ParseExpression());
          n->kids.push_back(std::move(e));
          if (Is(Tok::kComma)) ++cur_;
        }
        ++cur_;
        return n;
      }
      case Tok::kOpenBrace: {
        NodePtr n = MakeNode(NodeKind::kObject, t.pos);
        ++cur_;
        while (!Is(Tok::kCloseBrace)) {
          if (Is(Tok::kEnd)) return Error(Peek(), "expected '}'");
          ASSIGN_OR_RETURN(NodePtr key, ParseExpression());
          RETURN_IF_ERROR(Expect(Tok::kColon, "':' between a key and its value"));
          ASSIGN_OR_RETURN(NodePtr value, ParseExpression());
          n->kids.push_back(std::move(key));
          n->kids.push_back(std::move(value));
          if (Is(Tok::kComma)) ++cur_;
        }
        ++cur_;
        return n;
      }
      case Tok::kEnd:
        return Error(t, "unexpected end of template");
      default:
        return Error(t, absl::StrCat("unexpected '", t.value, "'"));
    }
  }

  const SourceMap& map_;
  const std::vector<Token>& tokens_;
  size_t cur_ = 0;
  int depth_ = 0;
  const int max_depth_;
};

// ---------------------------------------------------------------------------------------------
// Runtime values. Lists, dicts, namespaces and functions are shared by reference (as in
// JavaScript, which `==` on them shows); the rest are plain values.

struct ArrayBox;
struct ObjectBox;
struct FunctionBox;
struct Scope;
using ScopePtr = std::shared_ptr<Scope>;

struct Value {
  enum class Kind : uint8_t {
    kUndefined,
    kNull,
    kBool,
    kInt,
    kFloat,
    kString,
    kArray,
    kObject,
    kNamespace,
    kFunction,
  };
  Kind kind = Kind::kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<ArrayBox> array;
  std::shared_ptr<ObjectBox> object;  // kObject and kNamespace
  std::shared_ptr<FunctionBox> fn;

  bool is(Kind k) const { return kind == k; }
  bool nullish() const { return kind == Kind::kUndefined || kind == Kind::kNull; }
  bool number() const { return kind == Kind::kInt || kind == Kind::kFloat; }
  double num() const {
    return kind == Kind::kInt ? static_cast<double>(i) : kind == Kind::kFloat ? f : b ? 1 : 0;
  }
  bool dict() const { return kind == Kind::kObject; }
  bool container() const { return kind == Kind::kObject || kind == Kind::kNamespace; }
};
using Kind = Value::Kind;

struct ArrayBox {
  std::vector<Value> items;
  bool tuple = false;
};

struct ObjectBox {
  // Small objects (most messages, `loop`) are searched linearly; larger ones get a hash index.
  static constexpr size_t kIndexFrom = 16;
  std::vector<std::pair<std::string, Value>> items;
  absl::flat_hash_map<std::string, size_t> index;

  const Value* Find(const std::string& key) const {
    if (items.size() < kIndexFrom) {
      for (const auto& [k, v] : items) {
        if (k == key) return &v;
      }
      return nullptr;
    }
    auto it = index.find(key);
    return it == index.end() ? nullptr : &items[it->second].second;
  }
  void Set(const std::string& key, Value v) {
    if (Value* found = const_cast<Value*>(Find(key))) {
      *found = std::move(v);
      return;
    }
    items.emplace_back(key, std::move(v));
    if (items.size() == kIndexFrom) {
      for (size_t k = 0; k < items.size(); ++k) index.emplace(items[k].first, k);
    } else if (items.size() > kIndexFrom) {
      index.emplace(key, items.size() - 1);
    }
  }
};

struct FunctionBox {
  enum class Type { kGlobal, kMethod, kMacro, kCaller };
  Type type;
  std::string name;            // global or method name
  Value receiver;              // kMethod
  const Node* node = nullptr;  // kMacro: the macro; kCaller: the call block
  ScopePtr closure;            // kMacro: where it was defined; kCaller: the call site
};

struct Scope {
  explicit Scope(ScopePtr p) : parent(std::move(p)) {}
  absl::flat_hash_map<std::string, Value> vars;
  ScopePtr parent;

  const Value* Lookup(const std::string& name) const {
    for (const Scope* s = this; s != nullptr; s = s->parent.get()) {
      auto it = s->vars.find(name);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};

Value Undefined() { return Value(); }
Value Null() {
  Value v;
  v.kind = Kind::kNull;
  return v;
}
Value Bool(bool b) {
  Value v;
  v.kind = Kind::kBool;
  v.b = b;
  return v;
}
Value Int(int64_t i) {
  Value v;
  v.kind = Kind::kInt;
  v.i = i;
  return v;
}
Value Float(double f) {
  Value v;
  v.kind = Kind::kFloat;
  v.f = f;
  return v;
}
Value Str(std::string s) {
  Value v;
  v.kind = Kind::kString;
  v.s = std::move(s);
  return v;
}
Value Array(std::vector<Value> items, bool tuple = false) {
  Value v;
  v.kind = Kind::kArray;
  v.array = std::make_shared<ArrayBox>();
  v.array->items = std::move(items);
  v.array->tuple = tuple;
  return v;
}
Value Object(Kind kind = Kind::kObject) {
  Value v;
  v.kind = kind;
  v.object = std::make_shared<ObjectBox>();
  return v;
}
Value Function(FunctionBox::Type type, std::string name) {
  Value v;
  v.kind = Kind::kFunction;
  v.fn = std::make_shared<FunctionBox>();
  v.fn->type = type;
  v.fn->name = std::move(name);
  return v;
}

// A numeric result of integer arithmetic as the oracle's IntegerValue (a double there): exact
// within int64, an error beyond.
std::optional<Value> IntFromDouble(double d) {
  if (!std::isfinite(d) || std::fabs(d) >= 9.2e18) return std::nullopt;
  return Int(static_cast<int64_t>(d));
}

const char* TypeName(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined:
      return "undefined";
    case Kind::kNull:
      return "none";
    case Kind::kBool:
      return "boolean";
    case Kind::kInt:
      return "integer";
    case Kind::kFloat:
      return "float";
    case Kind::kString:
      return "string";
    case Kind::kArray:
      return v.array->tuple ? "tuple" : "list";
    case Kind::kObject:
      return "dict";
    case Kind::kNamespace:
      return "namespace";
    case Kind::kFunction:
      return "function";
  }
  return "value";
}

// Jinja truthiness as the oracle has it (a namespace and a function are always true).
bool Truthy(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined:
    case Kind::kNull:
      return false;
    case Kind::kBool:
      return v.b;
    case Kind::kInt:
      return v.i != 0;
    case Kind::kFloat:
      return v.f != 0 && !std::isnan(v.f);
    case Kind::kString:
      return !v.s.empty();
    case Kind::kArray:
      return !v.array->items.empty();
    case Kind::kObject:
      return !v.object->items.empty();
    case Kind::kNamespace:
    case Kind::kFunction:
      return true;
  }
  return false;
}

// JavaScript truthiness of the underlying value (containers are always true).
bool RawTruthy(const Value& v) {
  if (v.kind == Kind::kArray || v.kind == Kind::kObject) return true;
  return Truthy(v);
}

struct JsonOptions {
  std::optional<int64_t> indent;
  bool ascii = false;
  bool sort_keys = false;
  std::optional<std::pair<std::string, std::string>> separators;
};

absl::Status ToJson(const Value& v, const JsonOptions& o, int depth, bool undefined_as_null,
                    std::string* out, size_t limit);

// The oracle's RuntimeValue.toString(): what `{{ }}` prints for a defined, non-null value.
std::string Text(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined:
      return "undefined";
    case Kind::kNull:
      return "null";
    case Kind::kBool:
      return v.b ? "true" : "false";
    case Kind::kInt:
      return std::to_string(v.i);
    case Kind::kFloat:
      return FloatText(v.f);
    case Kind::kString:
      return v.s;
    case Kind::kArray:
    case Kind::kObject:
    case Kind::kNamespace: {
      std::string out;
      ToJson(v, JsonOptions(), 0, false, &out, std::numeric_limits<size_t>::max()).IgnoreError();
      return out;
    }
    case Kind::kFunction:
      return "";
  }
  return "";
}

// The underlying JavaScript value's toString(), which `~` and string `+` use (2.0 -> "2").
std::string RawText(const Value& v) {
  switch (v.kind) {
    case Kind::kFloat:
      return JsNumber(v.f);
    case Kind::kArray: {
      std::string out;
      for (size_t k = 0; k < v.array->items.size(); ++k) {
        if (k > 0) out += ",";
        out += Text(v.array->items[k]);
      }
      return out;
    }
    case Kind::kObject:
    case Kind::kNamespace:
      return "[object Map]";
    case Kind::kUndefined:
      return "";
    default:
      return Text(v);
  }
}

// JavaScript Array.prototype.join's view of an element's underlying value.
std::string JoinPiece(const Value& v) { return v.nullish() ? "" : RawText(v); }

absl::Status ToJson(const Value& v, const JsonOptions& o, int depth, bool undefined_as_null,
                    std::string* out, size_t limit) {
  if (out->size() > limit) {
    return absl::ResourceExhaustedError(absl::StrCat("tojson output exceeds ", limit, " bytes"));
  }
  if (depth > 512) return absl::InvalidArgumentError("tojson: value nested too deeply");
  std::string item_sep, key_sep;
  const bool indented = o.indent.has_value() && *o.indent != 0;
  if (o.separators) {
    item_sep = o.separators->first;
    key_sep = o.separators->second;
  } else {
    item_sep = indented ? "," : ", ";
    key_sep = ": ";
  }
  switch (v.kind) {
    case Kind::kNull:
      out->append("null");
      return absl::OkStatus();
    case Kind::kUndefined:
      out->append(undefined_as_null ? "null" : "undefined");
      return absl::OkStatus();
    case Kind::kInt:
      out->append(std::to_string(v.i));
      return absl::OkStatus();
    case Kind::kFloat:
      out->append(std::isfinite(v.f) ? JsNumber(v.f) : "null");
      return absl::OkStatus();
    case Kind::kBool:
      out->append(v.b ? "true" : "false");
      return absl::OkStatus();
    case Kind::kString:
      AppendJsonString(out, v.s, o.ascii);
      return absl::OkStatus();
    case Kind::kArray:
    case Kind::kObject:
    case Kind::kNamespace: {
      if (v.kind == Kind::kArray && v.array->tuple) {
        return absl::InvalidArgumentError("cannot convert a tuple to JSON");
      }
      const int64_t width =
          indented ? std::max<int64_t>(0, std::min<int64_t>(*o.indent, 1 << 16)) : 0;
      const std::string unit(static_cast<size_t>(width), ' ');
      std::string base = "\n";
      for (int k = 0; k < depth; ++k) base += unit;
      const std::string child = base + unit;
      if (v.kind == Kind::kArray) {
        const auto& items = v.array->items;
        out->push_back('[');
        for (size_t k = 0; k < items.size(); ++k) {
          if (k > 0) out->append(item_sep);
          if (indented) out->append(child);
          RETURN_IF_ERROR(ToJson(items[k], o, depth + 1, undefined_as_null, out, limit));
        }
        if (indented && !items.empty()) out->append(base);
        out->push_back(']');
        return absl::OkStatus();
      }
      std::vector<const std::pair<std::string, Value>*> entries;
      for (const auto& e : v.object->items) entries.push_back(&e);
      if (o.sort_keys) {
        std::stable_sort(entries.begin(), entries.end(),
                         [](const auto* a, const auto* b) { return a->first < b->first; });
      }
      out->push_back('{');
      for (size_t k = 0; k < entries.size(); ++k) {
        if (k > 0) out->append(item_sep);
        if (indented) out->append(child);
        AppendJsonString(out, entries[k]->first, o.ascii);
        out->append(key_sep);
        RETURN_IF_ERROR(ToJson(entries[k]->second, o, depth + 1, undefined_as_null, out, limit));
      }
      if (indented && !entries.empty()) out->append(base);
      out->push_back('}');
      return absl::OkStatus();
    }
    case Kind::kFunction:
      return absl::InvalidArgumentError("cannot convert a function to JSON");
  }
  return absl::OkStatus();
}

// JavaScript's Number(string) for decimal strings ("" is 0; anything else not a number is NaN).
double JsToNumber(std::string_view s) {
  s = Trim(s);
  if (s.empty()) return 0;
  std::string_view body = s;
  if (body[0] == '+' || body[0] == '-') body.remove_prefix(1);
  if (body == "Infinity") return s[0] == '-' ? -INFINITY : INFINITY;
  size_t k = 0, digits = 0;
  while (k < body.size() && IsDigit(body[k])) ++k, ++digits;
  if (k < body.size() && body[k] == '.') {
    ++k;
    while (k < body.size() && IsDigit(body[k])) ++k, ++digits;
  }
  if (digits == 0) return NAN;
  if (k < body.size() && (body[k] == 'e' || body[k] == 'E')) {
    ++k;
    if (k < body.size() && (body[k] == '+' || body[k] == '-')) ++k;
    size_t e = 0;
    while (k < body.size() && IsDigit(body[k])) ++k, ++e;
    if (e == 0) return NAN;
  }
  if (k != body.size()) return NAN;
  return std::strtod(std::string(s).c_str(), nullptr);
}

// parseInt(s, 10).
std::optional<double> JsParseInt(std::string_view s) {
  s = TrimStart(s);
  bool neg = false;
  if (!s.empty() && (s[0] == '+' || s[0] == '-')) {
    neg = s[0] == '-';
    s.remove_prefix(1);
  }
  size_t k = 0;
  double v = 0;
  while (k < s.size() && IsDigit(s[k])) v = v * 10 + (s[k++] - '0');
  if (k == 0) return std::nullopt;
  return neg ? -v : v;
}

// parseFloat(s).
std::optional<double> JsParseFloat(std::string_view s) {
  s = TrimStart(s);
  size_t k = 0;
  if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
  if (s.substr(k, 8) == "Infinity") return s[0] == '-' ? -INFINITY : INFINITY;
  size_t digits = 0;
  while (k < s.size() && IsDigit(s[k])) ++k, ++digits;
  if (k < s.size() && s[k] == '.') {
    size_t frac = 0;
    size_t j = k + 1;
    while (j < s.size() && IsDigit(s[j])) ++j, ++frac;
    if (digits > 0 || frac > 0) k = j;
    digits += frac;
  }
  if (digits == 0) return std::nullopt;
  if (k < s.size() && (s[k] == 'e' || s[k] == 'E')) {
    size_t j = k + 1;
    if (j < s.size() && (s[j] == '+' || s[j] == '-')) ++j;
    size_t e = 0;
    while (j < s.size() && IsDigit(s[j])) ++j, ++e;
    if (e > 0) k = j;
  }
  return std::strtod(std::string(s.substr(0, k)).c_str(), nullptr);
}

// JavaScript's ===, on the underlying values (containers by identity).
bool StrictEquals(const Value& a, const Value& b) {
  if (a.number() && b.number()) return a.num() == b.num();
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Kind::kUndefined:
    case Kind::kNull:
      return true;
    case Kind::kBool:
      return a.b == b.b;
    case Kind::kString:
      return a.s == b.s;
    case Kind::kArray:
      return a.array == b.array;
    case Kind::kObject:
    case Kind::kNamespace:
      return a.object == b.object;
    case Kind::kFunction:
      return a.fn == b.fn;
    default:
      return false;
  }
}

// JavaScript's ==, on the underlying values.
bool LooseEquals(const Value& a, const Value& b, int depth = 0) {
  if (a.nullish() || b.nullish()) return a.nullish() && b.nullish();
  if (a.kind == b.kind || (a.number() && b.number())) return StrictEquals(a, b);
  if (depth > 4) return false;
  if (a.is(Kind::kBool)) return LooseEquals(Float(a.num()), b, depth + 1);
  if (b.is(Kind::kBool)) return LooseEquals(a, Float(b.num()), depth + 1);
  if (a.number() && b.is(Kind::kString)) return a.num() == JsToNumber(b.s);
  if (a.is(Kind::kString) && b.number()) return JsToNumber(a.s) == b.num();
  const auto primitive = [](const Value& v) { return v.number() || v.is(Kind::kString); };
  if ((a.is(Kind::kArray) || a.container()) && primitive(b)) {
    return LooseEquals(Str(RawText(a)), b, depth + 1);
  }
  if ((b.is(Kind::kArray) || b.container()) && primitive(a)) {
    return LooseEquals(a, Str(RawText(b)), depth + 1);
  }
  return false;
}

// The oracle's compareRuntimeValues (sort, dictsort).
absl::StatusOr<int> Compare(const Value& a, const Value& b, bool case_sensitive) {
  if (a.is(Kind::kNull) && b.is(Kind::kNull)) return 0;
  if (a.is(Kind::kUndefined) && b.is(Kind::kUndefined)) return 0;
  if (a.nullish() || b.nullish()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot compare ", TypeName(a), " with ", TypeName(b)));
  }
  const auto numeric = [](const Value& v) { return v.number() || v.is(Kind::kBool); };
  if (numeric(a) && numeric(b)) {
    const double x = a.num(), y = b.num();
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is(Kind::kString) && b.is(Kind::kString)) {
    const std::string x = case_sensitive ? a.s : AsciiLower(a.s);
    const std::string y = case_sensitive ? b.s : AsciiLower(b.s);
    return x < y ? -1 : x > y ? 1 : 0;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("cannot compare ", TypeName(a), " with ", TypeName(b)));
}

// Sorts `items` by `key(item)` with Compare (stable, as JavaScript's sort).
absl::Status SortValues(std::vector<Value>* items, const std::function<Value(const Value&)>& key,
                        bool case_sensitive, bool reverse) {
  std::vector<std::pair<Value, size_t>> keyed;
  keyed.reserve(items->size());
  for (size_t k = 0; k < items->size(); ++k) keyed.emplace_back(key((*items)[k]), k);
  // Every pair must be comparable; checking each against the first is enough (the classes are
  // numbers-and-booleans, strings, none, undefined).
  for (size_t k = 1; k < keyed.size(); ++k) {
    RETURN_IF_ERROR(Compare(keyed[0].first, keyed[k].first, case_sensitive).status());
  }
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
    const int c = *Compare(x.first, y.first, case_sensitive);
    return reverse ? c > 0 : c < 0;
  });
  std::vector<Value> sorted;
  sorted.reserve(items->size());
  for (auto& kv : keyed) sorted.push_back(std::move((*items)[kv.second]));
  *items = std::move(sorted);
  return absl::OkStatus();
}

// A dotted attribute path ("a.b", "items.0") into dicts, namespaces and lists.
Value AttributePath(const Value& item, std::string_view path) {
  Value v = item;
  size_t start = 0;
  while (true) {
    const size_t dot = path.find('.', start);
    const std::string part(path.substr(start, dot == std::string_view::npos ? dot : dot - start));
    if (v.container()) {
      const Value* found = v.object->Find(part);
      v = found ? *found : Undefined();
    } else if (v.is(Kind::kArray)) {
      const std::optional<double> index = JsParseInt(part);
      if (!index || *index < 0 || *index >= static_cast<double>(v.array->items.size())) {
        return Undefined();
      }
      Value next = v.array->items[static_cast<size_t>(*index)];
      v = std::move(next);
    } else {
      return Undefined();
    }
    if (dot == std::string_view::npos) return v;
    start = dot + 1;
  }
}

// Converts the JSON context; the order of keys follows JavaScript objects (integer-like keys
// first, ascending).
bool IsArrayIndex(const std::string& key) {
  if (key.empty() || key.size() > 10 || (key.size() > 1 && key[0] == '0')) return false;
  for (char c : key) {
    if (!IsDigit(c)) return false;
  }
  return std::stoull(key) < 4294967295ull;
}

template <typename Json>
absl::StatusOr<Value> FromJson(const Json& j, int depth) {
  if (depth > 512) return absl::InvalidArgumentError("context nested too deeply");
  switch (j.type()) {
    case nlohmann::json::value_t::null:
    case nlohmann::json::value_t::discarded:
      return Null();
    case nlohmann::json::value_t::boolean:
      return Bool(j.template get<bool>());
    case nlohmann::json::value_t::number_integer:
      return Int(j.template get<int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      const uint64_t u = j.template get<uint64_t>();
      if (u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Int(static_cast<int64_t>(u));
      }
      return Float(static_cast<double>(u));
    }
    case nlohmann::json::value_t::number_float: {
      const double d = j.template get<double>();
      if (std::floor(d) == d && std::fabs(d) < 9.2e18) return Int(static_cast<int64_t>(d));
      return Float(d);
    }
    case nlohmann::json::value_t::string:
      return Str(j.template get<std::string>());
    case nlohmann::json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& e : j) {
        ASSIGN_OR_RETURN(Value v, FromJson(e, depth + 1));
        items.push_back(std::move(v));
      }
      return Array(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      Value obj = Object();
      std::vector<std::pair<uint64_t, const std::string*>> indices;
      for (auto it = j.begin(); it != j.end(); ++it) {
        if (IsArrayIndex(it.key())) indices.emplace_back(std::stoull(it.key()), &it.key());
      }
      std::sort(indices.begin(), indices.end());
      for (const auto& [index, key] : indices) {
        ASSIGN_OR_RETURN(Value v, FromJson(j.at(*key), depth + 1));
        obj.object->Set(*key, std::move(v));
      }
      for (auto it = j.begin(); it != j.end(); ++it) {
        if (IsArrayIndex(it.key())) continue;
        ASSIGN_OR_RETURN(Value v, FromJson(it.value(), depth + 1));
        obj.object->Set(it.key(), std::move(v));
      }
      return obj;
    }
    case nlohmann::json::value_t::binary:
      return absl::InvalidArgumentError("binary values are not supported in the context");
  }
  return Null();
}

// strftime_now's subset of strftime (%Y %m %d %b %B %H %M %%), in local time.
std::string StrftimeNow(std::string_view format) {
  static constexpr const char* kMonths[] = {"January",   "February", "March",    "April",
                                            "May",       "June",     "July",     "August",
                                            "September", "October",  "November", "December"};
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  const auto pad2 = [](int n) { return n < 10 ? absl::StrCat("0", n) : absl::StrCat(n); };
  std::string out;
  for (size_t k = 0; k < format.size(); ++k) {
    if (format[k] != '%' || k + 1 >= format.size()) {
      out.push_back(format[k]);
      continue;
    }
    const char c = format[k + 1];
    switch (c) {
      case 'Y':
        out += std::to_string(tm.tm_year + 1900);
        break;
      case 'm':
        out += pad2(tm.tm_mon + 1);
        break;
      case 'd':
        out += pad2(tm.tm_mday);
        break;
      case 'b':
        out += std::string(kMonths[tm.tm_mon]).substr(0, 3);
        break;
      case 'B':
        out += kMonths[tm.tm_mon];
        break;
      case 'H':
        out += pad2(tm.tm_hour);
        break;
      case 'M':
        out += pad2(tm.tm_min);
        break;
      case '%':
        out += "%";
        break;
      default:
        out.push_back('%');
        continue;  // the next character is copied as it is
    }
    ++k;
  }
  return out;
}

constexpr char kRaisedPayload[] = "retnet.chat/raise_exception";

// ---------------------------------------------------------------------------------------------
// Renderer.

enum class Flow { kNormal, kBreak, kContinue };

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;

  const Value* Kw(std::string_view name) const {
    for (const auto& [k, v] : kw) {
      if (k == name) return &v;
    }
    return nullptr;
  }
  // Positional `index`, else keyword `name`, else null.
  const Value* Get(size_t index, std::string_view name) const {
    if (index < pos.size()) return &pos[index];
    return Kw(name);
  }
};

class Renderer {
 public:
  explicit Renderer(const Program& program) : program_(program), limits_(program.limits) {}

  template <typename Json>
  absl::StatusOr<std::string> Run(const Json& context) {
    if (!context.is_object() && !context.is_null()) {
      return absl::InvalidArgumentError("the template context must be a JSON object");
    }
    auto global = std::make_shared<Scope>(nullptr);
    for (const char* name : {"namespace", "raise_exception", "range", "strftime_now"}) {
      global->vars[name] = Function(FunctionBox::Type::kGlobal, name);
    }
    for (const char* name : {"false", "False"}) global->vars[name] = Bool(false);
    for (const char* name : {"true", "True"}) global->vars[name] = Bool(true);
    for (const char* name : {"none", "None"}) global->vars[name] = Null();
    if (context.is_object()) {
      for (auto it = context.begin(); it != context.end(); ++it) {
        if (global->vars.contains(it.key())) {
          return absl::InvalidArgumentError(
              absl::StrCat("the context may not set the variable '", it.key(), "'"));
        }
        ASSIGN_OR_RETURN(Value v, FromJson(it.value(), 0));
        global->vars[it.key()] = std::move(v);
      }
    }
    std::string out;
    ASSIGN_OR_RETURN(Flow flow, Exec(program_.body, global, &out));
    if (flow != Flow::kNormal)
      return absl::InvalidArgumentError("break or continue outside a loop");
    return out;
  }

 private:
  class Depth {
   public:
    explicit Depth(Renderer* r) : r_(r) { ++r_->depth_; }
    ~Depth() { --r_->depth_; }
    bool exceeded() const { return r_->depth_ > r_->limits_.max_render_depth; }

   private:
    Renderer* r_;
  };

  absl::Status Error(const Node& n, std::string_view message) const {
    return absl::InvalidArgumentError(absl::StrCat(program_.map.Where(n.pos), ": ", AV(message)));
  }
  absl::Status TooDeep(const Node& n) const {
    return absl::ResourceExhaustedError(
        absl::StrCat(program_.map.Where(n.pos), ": evaluation nested deeper than ",
                     limits_.max_render_depth, " levels (recursive macro?)"));
  }
  absl::Status CheckSize(const Node& n, size_t size) const {
    if (size > limits_.max_output_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(program_.map.Where(n.pos), ": text exceeds ",
                                                       limits_.max_output_bytes, " bytes"));
    }
    return absl::OkStatus();
  }
  absl::Status CheckList(const Node& n, size_t size) const {
    if (size > limits_.max_list_size) {
      return absl::ResourceExhaustedError(absl::StrCat(program_.map.Where(n.pos), ": list exceeds ",
                                                       limits_.max_list_size, " elements"));
    }
    return absl::OkStatus();
  }
  absl::Status Append(const Node& n, std::string* out, std::string_view text) const {
    RETURN_IF_ERROR(CheckSize(n, out->size() + text.size()));
    out->append(text);
    return absl::OkStatus();
  }
  absl::Status CountIterations(const Node& n, size_t count) {
    iterations_ += static_cast<int64_t>(count);
    if (iterations_ > limits_.max_loop_iterations) {
      return absl::ResourceExhaustedError(absl::StrCat(program_.map.Where(n.pos), ": more than ",
                                                       limits_.max_loop_iterations,
                                                       " loop iterations"));
    }
    return absl::OkStatus();
  }

  // What `{{ v }}` writes for a defined, non-null value.
  absl::StatusOr<std::string> Print(const Node& n, const Value& v) {
    if (v.is(Kind::kArray) || v.container()) return Json(n, v, JsonOptions(), false);
    return Text(v);
  }

  // ------------------------------------------------------------------ statements

  absl::StatusOr<Flow> Exec(const std::vector<NodePtr>& body, const ScopePtr& scope,
                            std::string* out) {
    for (const NodePtr& node : body) {
      ASSIGN_OR_RETURN(Flow flow, ExecOne(*node, scope, out));
      if (flow != Flow::kNormal) return flow;
    }
    return Flow::kNormal;
  }

  absl::StatusOr<Flow> ExecOne(const Node& n, const ScopePtr& scope, std::string* out) {
    Depth depth(this);
    if (depth.exceeded()) return TooDeep(n);
    switch (n.kind) {
      case NodeKind::kText:
        RETURN_IF_ERROR(Append(n, out, n.str));
        return Flow::kNormal;
      case NodeKind::kIf: {
        ASSIGN_OR_RETURN(Value test, Eval(*n.kids[0], scope));
        return Exec(Truthy(test) ? n.body : n.other, scope, out);
      }
      case NodeKind::kFor:
        return ExecFor(n, scope, out);
      case NodeKind::kSet:
        return ExecSet(n, scope);
      case NodeKind::kMacro: {
        Value fn = Function(FunctionBox::Type::kMacro, n.str);
        fn.fn->node = &n;
        fn.fn->closure = scope;
        scope->vars[n.str] = std::move(fn);
        return Flow::kNormal;
      }
      case NodeKind::kCallBlock: {
        const Node& call = *n.kids[0];
        ASSIGN_OR_RETURN(Args args, EvalArgs(call.args, scope));
        ASSIGN_OR_RETURN(Value callee, Eval(*call.kids[0], scope));
        if (!callee.is(Kind::kFunction)) {
          return Error(call, absl::StrCat("cannot call a value of type ", TypeName(callee)));
        }
        Value caller = Function(FunctionBox::Type::kCaller, "caller");
        caller.fn->node = &n;
        caller.fn->closure = scope;
        ASSIGN_OR_RETURN(Value result, Invoke(call, callee, args, &caller));
        if (!result.nullish()) {
          ASSIGN_OR_RETURN(std::string text, Print(n, result));
          RETURN_IF_ERROR(Append(n, out, text));
        }
        return Flow::kNormal;
      }
      case NodeKind::kFilterBlock: {
        std::string text;
        ASSIGN_OR_RETURN(Flow flow, Exec(n.body, scope, &text));
        if (flow != Flow::kNormal) return flow;
        ASSIGN_OR_RETURN(Value result, ApplyFilter(Str(std::move(text)), *n.kids[0], scope));
        if (!result.nullish()) {
          ASSIGN_OR_RETURN(std::string text, Print(n, result));
          RETURN_IF_ERROR(Append(n, out, text));
        }
        return Flow::kNormal;
      }
      case NodeKind::kBreak:
        return Flow::kBreak;
      case NodeKind::kContinue:
        return Flow::kContinue;
      default: {
        ASSIGN_OR_RETURN(Value v, Eval(n, scope));
        if (!v.nullish()) {
          ASSIGN_OR_RETURN(std::string text, Print(n, v));
          RETURN_IF_ERROR(Append(n, out, text));
        }
        return Flow::kNormal;
      }
    }
  }

  absl::Status Bind(const Node& target, const Value& v, Scope* scope) {
    if (target.kind == NodeKind::kIdent) {
      scope->vars[target.str] = v;
      return absl::OkStatus();
    }
    for (size_t k = 0; k < target.kids.size(); ++k) {
      if (target.kids[k]->kind != NodeKind::kIdent) {
        return Error(*target.kids[k], "can only unpack into names");
      }
      scope->vars[target.kids[k]->str] = v.array->items[k];
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Flow> ExecFor(const Node& n, const ScopePtr& scope, std::string* out) {
    auto loop_scope = std::make_shared<Scope>(scope);
    const Node& var = *n.kids[0];
    const Node* iterable_node = n.kids[1].get();
    const Node* test = nullptr;
    if (iterable_node->kind == NodeKind::kSelect) {
      test = iterable_node->kids[1].get();
      iterable_node = iterable_node->kids[0].get();
    }
    ASSIGN_OR_RETURN(Value iterable, Eval(*iterable_node, loop_scope));
    std::vector<Value> candidates;
    if (iterable.is(Kind::kArray)) {
      candidates = iterable.array->items;
    } else if (iterable.dict()) {
      for (const auto& [k, v] : iterable.object->items) candidates.push_back(Str(k));
    } else {
      return Error(*iterable_node, absl::StrCat("cannot loop over a ", TypeName(iterable)));
    }
    RETURN_IF_ERROR(CountIterations(n, candidates.size()));
    std::vector<Value> items;
    if (var.kind == NodeKind::kIdent && test == nullptr) {
      items = std::move(candidates);
    } else {
      for (Value& item : candidates) {
        if (var.kind == NodeKind::kTuple) {
          if (!item.is(Kind::kArray)) {
            return Error(var, absl::StrCat("cannot unpack a ", TypeName(item)));
          }
          const size_t want = var.kids.size(), have = item.array->items.size();
          if (want != have) {
            return Error(var,
                         absl::StrCat("too ", want > have ? "few" : "many",
                                      " items to unpack (expected ", want, ", got ", have, ")"));
          }
        }
        if (test != nullptr) {
          auto test_scope = std::make_shared<Scope>(loop_scope);
          RETURN_IF_ERROR(Bind(var, item, test_scope.get()));
          ASSIGN_OR_RETURN(Value keep, Eval(*test, test_scope));
          if (!Truthy(keep)) continue;
        }
        items.push_back(std::move(item));
      }
    }
    bool none = true;
    const int64_t length = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < length; ++k) {
      Value loop = Object();
      ObjectBox& l = *loop.object;
      l.items.reserve(9);
      l.Set("index", Int(k + 1));
      l.Set("index0", Int(k));
      l.Set("revindex", Int(length - k));
      l.Set("revindex0", Int(length - k - 1));
      l.Set("first", Bool(k == 0));
      l.Set("last", Bool(k == length - 1));
      l.Set("length", Int(length));
      l.Set("previtem", k > 0 ? items[k - 1] : Undefined());
      l.Set("nextitem", k + 1 < length ? items[k + 1] : Undefined());
      loop_scope->vars["loop"] = std::move(loop);
      RETURN_IF_ERROR(Bind(var, items[k], loop_scope.get()));
      // An iteration left by break or continue contributes nothing (as in the oracle).
      std::string text;
      ASSIGN_OR_RETURN(Flow flow, Exec(n.body, loop_scope, &text));
      if (flow == Flow::kContinue) continue;
      if (flow == Flow::kBreak) break;
      RETURN_IF_ERROR(Append(n, out, text));
      none = false;
    }
    if (none) return Exec(n.other, loop_scope, out);
    return Flow::kNormal;
  }

  absl::StatusOr<Flow> ExecSet(const Node& n, const ScopePtr& scope) {
    Value rhs;
    if (n.kids.size() > 1) {
      ASSIGN_OR_RETURN(rhs, Eval(*n.kids[1], scope));
    } else {
      std::string text;
      ASSIGN_OR_RETURN(Flow flow, Exec(n.body, scope, &text));
      if (flow != Flow::kNormal) return flow;
      rhs = Str(std::move(text));
    }
    const Node& target = *n.kids[0];
    if (target.kind == NodeKind::kIdent) {
      scope->vars[target.str] = std::move(rhs);
    } else if (target.kind == NodeKind::kTuple) {
      if (!rhs.is(Kind::kArray)) return Error(n, absl::StrCat("cannot unpack a ", TypeName(rhs)));
      const size_t want = target.kids.size(), have = rhs.array->items.size();
      if (want != have) {
        return Error(n, absl::StrCat("too ", want > have ? "few" : "many", " items to unpack"));
      }
      RETURN_IF_ERROR(Bind(target, rhs, scope.get()));
    } else if (target.kind == NodeKind::kMember) {
      ASSIGN_OR_RETURN(Value object, Eval(*target.kids[0], scope));
      if (!object.is(Kind::kNamespace)) {
        return Error(target, "can only assign attributes of a namespace");
      }
      if (target.kids[1]->kind != NodeKind::kIdent || target.flag) {
        return Error(target, "can only assign a namespace attribute by name");
      }
      object.object->Set(target.kids[1]->str, std::move(rhs));
    } else {
      return Error(target, "invalid target of set");
    }
    return Flow::kNormal;
  }

  // ------------------------------------------------------------------ expressions

  absl::StatusOr<Args> EvalArgs(const std::vector<NodePtr>& nodes, const ScopePtr& scope) {
    Args args;
    for (const NodePtr& a : nodes) {
      if (a->kind == NodeKind::kKwarg) continue;
      ASSIGN_OR_RETURN(Value v, Eval(*a, scope));
      args.pos.push_back(std::move(v));
    }
    for (const NodePtr& a : nodes) {
      if (a->kind != NodeKind::kKwarg) continue;
      if (args.Kw(a->str) != nullptr) {
        return Error(*a, absl::StrCat("multiple values for keyword argument '", a->str, "'"));
      }
      ASSIGN_OR_RETURN(Value v, Eval(*a->kids[0], scope));
      args.kw.emplace_back(a->str, std::move(v));
    }
    return args;
  }

  absl::StatusOr<Value> Eval(const Node& n, const ScopePtr& scope) {
    Depth depth(this);
    if (depth.exceeded()) return TooDeep(n);
    switch (n.kind) {
      case NodeKind::kInt:
        return Int(n.i);
      case NodeKind::kFloat:
        return Float(n.f);
      case NodeKind::kString:
        return Str(n.str);
      case NodeKind::kIdent: {
        const Value* v = scope->Lookup(n.str);
        return v ? *v : Undefined();
      }
      case NodeKind::kArray:
      case NodeKind::kTuple: {
        std::vector<Value> items;
        for (const NodePtr& k : n.kids) {
          ASSIGN_OR_RETURN(Value v, Eval(*k, scope));
          items.push_back(std::move(v));
        }
        return Array(std::move(items), n.kind == NodeKind::kTuple);
      }
      case NodeKind::kObject: {
        Value obj = Object();
        for (size_t k = 0; k + 1 < n.kids.size(); k += 2) {
          ASSIGN_OR_RETURN(Value key, Eval(*n.kids[k], scope));
          if (!key.is(Kind::kString)) {
            return Error(*n.kids[k],
                         absl::StrCat("dict keys must be strings, got a ", TypeName(key)));
          }
          ASSIGN_OR_RETURN(Value v, Eval(*n.kids[k + 1], scope));
          obj.object->Set(key.s, std::move(v));
        }
        return obj;
      }
      case NodeKind::kMember:
        return EvalMember(n, scope);
      case NodeKind::kCall: {
        ASSIGN_OR_RETURN(Args args, EvalArgs(n.args, scope));
        ASSIGN_OR_RETURN(Value callee, Eval(*n.kids[0], scope));
        if (!callee.is(Kind::kFunction)) {
          return Error(n, absl::StrCat("cannot call a value of type ", TypeName(callee)));
        }
        return Invoke(n, callee, args, nullptr);
      }
      case NodeKind::kFilter: {
        ASSIGN_OR_RETURN(Value operand, Eval(*n.kids[0], scope));
        return ApplyFilter(std::move(operand), n, scope);
      }
      case NodeKind::kTest: {
        ASSIGN_OR_RETURN(Value operand, Eval(*n.kids[0], scope));
        ASSIGN_OR_RETURN(bool result, RunTest(n, n.str, operand, nullptr));
        return Bool(n.flag ? !result : result);
      }
      case NodeKind::kUnary: {
        ASSIGN_OR_RETURN(Value arg, Eval(*n.kids[0], scope));
        if (n.str == "not") return Bool(!Truthy(arg));
        const double sign = n.str == "-" ? -1 : 1;
        if (arg.is(Kind::kFloat)) return Float(sign * arg.f);
        if (arg.is(Kind::kInt) || arg.is(Kind::kBool)) {
          return Int(static_cast<int64_t>(sign) * (arg.is(Kind::kInt) ? arg.i : arg.b ? 1 : 0));
        }
        return Error(n, absl::StrCat("unary '", n.str, "' on a ", TypeName(arg)));
      }
      case NodeKind::kBinary:
        return EvalBinary(n, scope);
      case NodeKind::kTernary: {
        ASSIGN_OR_RETURN(Value cond, Eval(*n.kids[0], scope));
        return Eval(Truthy(cond) ? *n.kids[1] : *n.kids[2], scope);
      }
      case NodeKind::kSelect: {
        ASSIGN_OR_RETURN(Value cond, Eval(*n.kids[1], scope));
        if (!Truthy(cond)) return Undefined();
        return Eval(*n.kids[0], scope);
      }
      default:
        return Error(n, "statement where an expression was expected");
    }
  }

  static bool IsStringMethod(const std::string& name) {
    static const char* const kNames[] = {"upper",      "lower",  "strip",  "title",
                                         "capitalize", "rstrip", "lstrip", "startswith",
                                         "endswith",   "split",  "replace"};
    for (const char* k : kNames) {
      if (name == k) return true;
    }
    return false;
  }
  static bool IsDictMethod(const std::string& name) {
    return name == "get" || name == "items" || name == "keys" || name == "values" ||
           name == "dictsort";
  }
  static Value Method(const Value& receiver, const std::string& name) {
    Value fn = Function(FunctionBox::Type::kMethod, name);
    fn.fn->receiver = receiver;
    return fn;
  }
  // A type's built-in members (`.length`, methods), or undefined.
  static Value Builtin(const Value& v, const std::string& name) {
    if (v.is(Kind::kString)) {
      if (name == "length") return Int(static_cast<int64_t>(Utf16Length(v.s)));
      if (IsStringMethod(name)) return Method(v, name);
    } else if (v.is(Kind::kArray)) {
      if (name == "length") return Int(static_cast<int64_t>(v.array->items.size()));
    } else if (v.dict()) {
      if (IsDictMethod(name)) return Method(v, name);
    }
    return Undefined();
  }

  absl::StatusOr<Value> EvalSlice(const Node& n, const Value& object, const ScopePtr& scope) {
    if (!object.is(Kind::kArray) && !object.is(Kind::kString)) {
      return Error(n, absl::StrCat("cannot slice a ", TypeName(object)));
    }
    std::optional<int64_t> bounds[3];
    for (int k = 0; k < 3; ++k) {
      if (!n.kids[k]) continue;
      ASSIGN_OR_RETURN(Value b, Eval(*n.kids[k], scope));
      if (b.is(Kind::kUndefined)) continue;
      if (!b.is(Kind::kInt)) return Error(n, "slice bounds must be integers");
      bounds[k] = b.i;
    }
    const int64_t step = bounds[2].value_or(1);
    if (step == 0) return Error(n, "slice step cannot be zero");
    std::vector<std::string_view> cps;
    const int64_t len = object.is(Kind::kArray)
                            ? static_cast<int64_t>(object.array->items.size())
                            : static_cast<int64_t>((cps = CodePoints(object.s)).size());
    int64_t start, stop;
    if (step > 0) {
      start = bounds[0].value_or(0);
      start = start < 0 ? std::max<int64_t>(len + start, 0) : std::min(start, len);
      stop = bounds[1].value_or(len);
      stop = stop < 0 ? std::max<int64_t>(len + stop, 0) : std::min(stop, len);
    } else {
      start = bounds[0].value_or(len - 1);
      start = start < 0 ? std::max<int64_t>(len + start, -1) : std::min(start, len - 1);
      stop = bounds[1].value_or(-1);
      stop = stop < -1 ? std::max<int64_t>(len + stop, -1) : std::min(stop, len - 1);
    }
    std::vector<Value> items;
    std::string text;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
      if (object.is(Kind::kArray)) {
        items.push_back(object.array->items[static_cast<size_t>(k)]);
      } else {
        text.append(cps[static_cast<size_t>(k)]);
      }
    }
    if (object.is(Kind::kArray)) return Array(std::move(items));
    return Str(std::move(text));
  }

  absl::StatusOr<Value> EvalMember(const Node& n, const ScopePtr& scope) {
    ASSIGN_OR_RETURN(Value object, Eval(*n.kids[0], scope));
    const Node& prop_node = *n.kids[1];
    Value prop;
    if (n.flag) {
      if (prop_node.kind == NodeKind::kSlice) return EvalSlice(prop_node, object, scope);
      ASSIGN_OR_RETURN(prop, Eval(prop_node, scope));
    } else if (prop_node.kind == NodeKind::kInt) {
      prop = Int(prop_node.i);
    } else {
      prop = Str(prop_node.str);
    }
    if (object.container()) {
      if (!prop.is(Kind::kString)) {
        return Error(n,
                     absl::StrCat("cannot index a ", TypeName(object), " with a ", TypeName(prop)));
      }
      if (const Value* v = object.object->Find(prop.s)) return *v;
      return object.dict() ? Builtin(object, prop.s) : Undefined();
    }
    if (object.is(Kind::kArray) || object.is(Kind::kString)) {
      if (prop.is(Kind::kInt)) {
        if (object.is(Kind::kArray)) {
          const auto& items = object.array->items;
          const int64_t size = static_cast<int64_t>(items.size());
          const int64_t k = prop.i < 0 ? prop.i + size : prop.i;
          if (k < 0 || k >= size) return Undefined();
          return items[static_cast<size_t>(k)];
        }
        const std::vector<std::string_view> cps = CodePoints(object.s);
        const int64_t size = static_cast<int64_t>(cps.size());
        const int64_t k = prop.i < 0 ? prop.i + size : prop.i;
        if (k < 0 || k >= size) return Undefined();
        return Str(std::string(cps[static_cast<size_t>(k)]));
      }
      if (prop.is(Kind::kString)) return Builtin(object, prop.s);
      return Error(n,
                   absl::StrCat("cannot index a ", TypeName(object), " with a ", TypeName(prop)));
    }
    if (!prop.is(Kind::kString)) {
      return Error(n,
                   absl::StrCat("cannot index a ", TypeName(object), " with a ", TypeName(prop)));
    }
    return Undefined();
  }

  absl::StatusOr<Value> EvalBinary(const Node& n, const ScopePtr& scope) {
    const std::string& op = n.str;
    ASSIGN_OR_RETURN(Value left, Eval(*n.kids[0], scope));
    if (op == "and") return Truthy(left) ? Eval(*n.kids[1], scope) : left;
    if (op == "or") return Truthy(left) ? left : Eval(*n.kids[1], scope);
    ASSIGN_OR_RETURN(Value right, Eval(*n.kids[1], scope));
    if (op == "==") return Bool(LooseEquals(left, right));
    if (op == "!=") return Bool(!LooseEquals(left, right));
    const auto unsupported = [&]() {
      return Error(n, absl::StrCat("unsupported operator '", op, "' between a ", TypeName(left),
                                   " and a ", TypeName(right)));
    };
    if (left.number() && right.number() && op != "~" && op != "**") {
      const bool is_float = left.is(Kind::kFloat) || right.is(Kind::kFloat);
      const double a = left.num(), b = right.num();
      if (op == "+" || op == "-" || op == "*") {
        if (!is_float) {
          int64_t r;
          const bool overflow = op == "+"   ? __builtin_add_overflow(left.i, right.i, &r)
                                : op == "-" ? __builtin_sub_overflow(left.i, right.i, &r)
                                            : __builtin_mul_overflow(left.i, right.i, &r);
          if (overflow) return Error(n, "integer overflow");
          return Int(r);
        }
        return Float(op == "+" ? a + b : op == "-" ? a - b : a * b);
      }
      if (op == "/" || op == "//" || op == "%") {
        if (b == 0) return Error(n, "division by zero");
        if (op == "/") return Float(a / b);
        if (op == "//") {
          if (is_float) return Float(std::floor(a / b));
          std::optional<Value> r = IntFromDouble(std::floor(a / b));
          if (!r) return Error(n, "integer overflow");
          return *r;
        }
        if (is_float) return Float(std::fmod(a, b));
        if (right.i == -1) return Int(0);
        return Int(left.i % right.i);
      }
      if (op == "<") return Bool(a < b);
      if (op == ">") return Bool(a > b);
      if (op == "<=") return Bool(a <= b);
      if (op == ">=") return Bool(a >= b);
      return unsupported();
    }
    if (left.is(Kind::kUndefined) || right.is(Kind::kUndefined)) {
      if (right.is(Kind::kUndefined) && (op == "in" || op == "not in")) {
        return Bool(op == "not in");
      }
      if (op == "~" && !left.is(Kind::kNull) && !right.is(Kind::kNull)) {
        std::string s = RawText(left) + RawText(right);
        RETURN_IF_ERROR(CheckSize(n, s.size()));
        return Str(std::move(s));
      }
      return Error(n, absl::StrCat("unsupported operator '", op, "' on an undefined value"));
    }
    if (left.is(Kind::kNull) || right.is(Kind::kNull)) {
      return Error(n, absl::StrCat("unsupported operator '", op, "' on none"));
    }
    if (op == "~") {
      RETURN_IF_ERROR(CheckSize(n, left.s.size() + right.s.size()));
      std::string s = RawText(left) + RawText(right);
      RETURN_IF_ERROR(CheckSize(n, s.size()));
      return Str(std::move(s));
    }
    const auto numeric = [](const Value& v) { return v.number() || v.is(Kind::kBool); };
    if (op == "**" && numeric(left) && numeric(right)) {
      const double a = left.num(), b = right.num();
      if (a == 0 && b < 0) return Error(n, "0.0 cannot be raised to a negative power");
      const double r = std::pow(a, b);
      if (!std::isfinite(r)) return Error(n, "exponentiation result is not a finite real number");
      if (left.is(Kind::kFloat) || right.is(Kind::kFloat) || b < 0) return Float(r);
      std::optional<Value> ri = IntFromDouble(r);
      if (!ri) return Error(n, "integer overflow");
      return *ri;
    }
    if (left.is(Kind::kArray) && right.is(Kind::kArray)) {
      if (op == "+") {
        const size_t size = left.array->items.size() + right.array->items.size();
        RETURN_IF_ERROR(CheckList(n, size));
        std::vector<Value> items = left.array->items;
        items.insert(items.end(), right.array->items.begin(), right.array->items.end());
        return Array(std::move(items));
      }
    } else if (right.is(Kind::kArray)) {
      if (op == "in" || op == "not in") {
        bool member = false;
        for (const Value& x : right.array->items) {
          if (StrictEquals(x, left)) {
            member = true;
            break;
          }
        }
        return Bool(op == "in" ? member : !member);
      }
    }
    if ((left.is(Kind::kString) || right.is(Kind::kString)) && op == "+") {
      RETURN_IF_ERROR(CheckSize(n, left.s.size() + right.s.size()));
      std::string s = RawText(left) + RawText(right);
      RETURN_IF_ERROR(CheckSize(n, s.size()));
      return Str(std::move(s));
    }
    if (left.is(Kind::kString) && right.is(Kind::kString) && (op == "in" || op == "not in")) {
      const bool found = right.s.find(left.s) != std::string::npos;
      return Bool(op == "in" ? found : !found);
    }
    if (left.is(Kind::kString) && right.dict() && (op == "in" || op == "not in")) {
      const bool found = right.object->Find(left.s) != nullptr;
      return Bool(op == "in" ? found : !found);
    }
    return unsupported();
  }

  // ------------------------------------------------------------------ tests

  absl::StatusOr<bool> RunTest(const Node& n, const std::string& name, const Value& v,
                               const Value* other) {
    if (name == "boolean") return v.is(Kind::kBool);
    if (name == "callable") return v.is(Kind::kFunction);
    if (name == "odd" || name == "even") {
      if (!v.is(Kind::kInt))
        return Error(n, absl::StrCat("cannot test '", name, "' on a ", TypeName(v)));
      return (v.i % 2 != 0) == (name == "odd");
    }
    if (name == "false") return v.is(Kind::kBool) && !v.b;
    if (name == "true") return v.is(Kind::kBool) && v.b;
    if (name == "none") return v.is(Kind::kNull);
    if (name == "string") return v.is(Kind::kString);
    if (name == "number") return v.number();
    if (name == "integer") return v.is(Kind::kInt);
    if (name == "iterable") return v.is(Kind::kArray) || v.is(Kind::kString);
    if (name == "mapping") return v.dict();
    if (name == "sequence") return v.is(Kind::kArray) || v.dict() || v.is(Kind::kString);
    if (name == "lower") return v.is(Kind::kString) && v.s == AsciiLower(v.s);
    if (name == "upper") return v.is(Kind::kString) && v.s == AsciiUpper(v.s);
    if (name == "defined") return !v.is(Kind::kUndefined);
    if (name == "undefined") return v.is(Kind::kUndefined);
    if (name == "equalto" || name == "eq") {
      return other != nullptr ? StrictEquals(v, *other) : v.is(Kind::kUndefined);
    }
    return Error(n, absl::StrCat("unknown test '", name, "'"));
  }

  // ------------------------------------------------------------------ calls

  absl::StatusOr<Value> Invoke(const Node& n, const Value& callee, const Args& args,
                               const Value* caller) {
    const FunctionBox& fn = *callee.fn;
    switch (fn.type) {
      case FunctionBox::Type::kGlobal:
        return CallGlobal(n, fn.name, args);
      case FunctionBox::Type::kMethod:
        return CallMethod(n, fn.receiver, fn.name, args);
      case FunctionBox::Type::kMacro:
      case FunctionBox::Type::kCaller:
        return CallMacro(n, fn, args, caller);
    }
    return Undefined();
  }

  absl::StatusOr<Value> CallMacro(const Node& n, const FunctionBox& fn, const Args& args,
                                  const Value* caller) {
    const Node& def = *fn.node;
    const std::string display = fn.type == FunctionBox::Type::kMacro ? "'" + def.str + "'" : "None";
    ScopePtr parent = fn.closure;
    if (fn.type == FunctionBox::Type::kMacro) {
      parent = std::make_shared<Scope>(fn.closure);
      parent->vars["caller"] = caller != nullptr ? *caller : Undefined();
    }
    auto scope = std::make_shared<Scope>(parent);
    if (args.pos.size() > def.args.size()) {
      return Error(n, absl::StrCat("macro ", display, " takes not more than ", def.args.size(),
                                   " argument(s)"));
    }
    std::vector<bool> used(args.kw.size(), false);
    std::vector<const Node*> pending;
    for (size_t k = 0; k < def.args.size(); ++k) {
      const Node& param = *def.args[k];
      const Value* v = k < args.pos.size() ? &args.pos[k] : nullptr;
      if (v == nullptr) {
        for (size_t j = 0; j < args.kw.size(); ++j) {
          if (args.kw[j].first == param.str) {
            v = &args.kw[j].second;
            used[j] = true;
          }
        }
      }
      if (v == nullptr && param.kind == NodeKind::kKwarg) pending.push_back(&param);
      scope->vars[param.str] = v != nullptr ? *v : Undefined();
    }
    for (size_t j = 0; j < args.kw.size(); ++j) {
      if (!used[j]) {
        return Error(n, absl::StrCat("macro ", display, " takes no keyword argument '",
                                     args.kw[j].first, "'"));
      }
    }
    for (const Node* param : pending) {
      ASSIGN_OR_RETURN(Value v, Eval(*param->kids[0], scope));
      scope->vars[param->str] = std::move(v);
    }
    std::string text;
    ASSIGN_OR_RETURN(Flow flow, Exec(def.body, scope, &text));
    if (flow != Flow::kNormal) return Error(n, "break or continue outside a loop");
    return Str(std::move(text));
  }

  absl::StatusOr<Value> CallGlobal(const Node& n, const std::string& name, const Args& args) {
    if (name == "raise_exception") {
      std::string message;
      if (!args.pos.empty()) {
        message = args.pos[0].is(Kind::kNull) ? "null" : RawText(args.pos[0]);
      }
      absl::Status status = absl::InvalidArgumentError(message);
      status.SetPayload(kRaisedPayload, absl::Cord("1"));
      return status;
    }
    if (name == "range") {
      std::vector<int64_t> p;
      for (const Value& v : args.pos) {
        if (!v.is(Kind::kInt)) return Error(n, "range() arguments must be integers");
        p.push_back(v.i);
      }
      if (p.empty() || p.size() > 3) return Error(n, "range() takes 1 to 3 arguments");
      const int64_t start = p.size() == 1 ? 0 : p[0];
      const int64_t stop = p.size() == 1 ? p[0] : p[1];
      const int64_t step = p.size() == 3 ? p[2] : 1;
      if (step == 0) return Error(n, "range() step must not be zero");
      const double count = std::ceil((static_cast<double>(stop) - static_cast<double>(start)) /
                                     static_cast<double>(step));
      if (count > static_cast<double>(limits_.max_list_size)) {
        return CheckList(n, limits_.max_list_size + 1);
      }
      std::vector<Value> items;
      for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) items.push_back(Int(k));
      return Array(std::move(items));
    }
    if (name == "namespace") {
      if (args.pos.size() > 1) {
        return Error(n,
                     absl::StrCat("namespace expected at most 1 argument, got ", args.pos.size()));
      }
      Value ns = Object(Kind::kNamespace);
      if (args.pos.size() == 1) {
        const Value& src = args.pos[0];
        if (src.dict()) {
          for (const auto& [k, v] : src.object->items) ns.object->Set(k, v);
        } else if (src.is(Kind::kArray)) {
          for (const Value& pair : src.array->items) {
            if (!pair.is(Kind::kArray) || pair.array->items.size() != 2 ||
                !pair.array->items[0].is(Kind::kString)) {
              return Error(n, "namespace expected a dict or a list of [key, value] pairs");
            }
            ns.object->Set(pair.array->items[0].s, pair.array->items[1]);
          }
        } else {
          return Error(n, absl::StrCat("namespace cannot be made from a ", TypeName(src)));
        }
      }
      for (const auto& [k, v] : args.kw) ns.object->Set(k, v);
      return ns;
    }
    if (name == "strftime_now") {
      if (args.pos.empty() || !args.pos[0].is(Kind::kString)) {
        return Error(n, "strftime_now() expects a format string");
      }
      return Str(StrftimeNow(args.pos[0].s));
    }
    return Error(n, absl::StrCat("unknown function '", name, "'"));
  }

  static std::string Title(std::string_view s) {
    std::string r(s);
    for (size_t k = 0; k < r.size(); ++k) {
      const unsigned char c = r[k];
      if (IsWordByte(c) && (k == 0 || !IsWordByte(r[k - 1])) && c >= 'a' && c <= 'z') {
        r[k] = static_cast<char>(c - 'a' + 'A');
      }
    }
    return r;
  }
  static std::string Capitalize(std::string_view s) {
    if (s.empty()) return "";
    size_t len;
    DecodeAt(s, 0, &len);
    return AsciiUpper(s.substr(0, len)) + std::string(s.substr(len));
  }

  absl::StatusOr<Value> Replace(const Node& n, const std::string& s, const Args& args) {
    if (args.pos.size() < 2) return Error(n, "replace() requires at least two arguments");
    const Value& from = args.pos[0];
    const Value& to = args.pos[1];
    if (!from.is(Kind::kString) || !to.is(Kind::kString)) {
      return Error(n, "replace() arguments must be strings");
    }
    const Value* count_v = args.pos.size() > 2 ? &args.pos[2] : args.Kw("count");
    int64_t count = -1;
    if (count_v != nullptr && !count_v->is(Kind::kNull)) {
      if (!count_v->is(Kind::kInt)) return Error(n, "replace() count must be an integer");
      count = count_v->i;
    }
    if (count == 0) return Str(s);
    int64_t remaining = count < 0 ? std::numeric_limits<int64_t>::max() : count;
    std::string out;
    if (from.s.empty()) {
      const std::vector<std::string_view> cps = CodePoints(s);
      for (size_t k = 0; k <= cps.size(); ++k) {
        if (remaining > 0) {
          out += to.s;
          --remaining;
          RETURN_IF_ERROR(CheckSize(n, out.size()));
        }
        if (k < cps.size()) out.append(cps[k]);
      }
      return Str(std::move(out));
    }
    size_t at = 0;
    while (remaining > 0) {
      const size_t hit = s.find(from.s, at);
      if (hit == std::string::npos) break;
      out.append(s, at, hit - at);
      out += to.s;
      RETURN_IF_ERROR(CheckSize(n, out.size()));
      at = hit + from.s.size();
      --remaining;
    }
    out.append(s, at, std::string::npos);
    RETURN_IF_ERROR(CheckSize(n, out.size()));
    return Str(std::move(out));
  }

  absl::StatusOr<Value> Split(const Node& n, const std::string& s, const Args& args) {
    const Value* sep = args.pos.size() > 0 ? &args.pos[0] : nullptr;
    const Value* max_v = args.pos.size() > 1 ? &args.pos[1] : nullptr;
    if (sep != nullptr && !sep->is(Kind::kString) && !sep->is(Kind::kNull)) {
      return Error(n, "split() separator must be a string or none");
    }
    if (max_v != nullptr && !max_v->is(Kind::kInt)) {
      return Error(n, "split() maxsplit must be an integer");
    }
    const int64_t maxsplit = max_v != nullptr ? max_v->i : -1;
    std::vector<Value> parts;
    if (sep == nullptr || sep->is(Kind::kNull)) {
      const std::string_view text = TrimStart(s);
      size_t k = 0;
      while (k < text.size()) {
        const size_t start = k;
        while (k < text.size() && SpaceAt(text, k) == 0) ++k;
        if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) >= maxsplit) {
          parts.push_back(Str(std::string(text.substr(start))));
          break;
        }
        parts.push_back(Str(std::string(text.substr(start, k - start))));
        while (size_t w = SpaceAt(text, k)) k += w;
        RETURN_IF_ERROR(CheckList(n, parts.size()));
      }
    } else {
      if (sep->s.empty()) return Error(n, "split(): empty separator");
      size_t at = 0;
      while (true) {
        if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) >= maxsplit) {
          parts.push_back(Str(s.substr(at)));
          break;
        }
        const size_t hit = s.find(sep->s, at);
        if (hit == std::string::npos) {
          parts.push_back(Str(s.substr(at)));
          break;
        }
        parts.push_back(Str(s.substr(at, hit - at)));
        at = hit + sep->s.size();
        RETURN_IF_ERROR(CheckList(n, parts.size()));
      }
    }
    return Array(std::move(parts));
  }

  static absl::StatusOr<bool> Affix(const std::string& s, const Value& pattern, bool start,
                                    bool* bad) {
    const auto test = [&](const std::string& p) {
      if (p.size() > s.size()) return false;
      return start ? s.compare(0, p.size(), p) == 0
                   : s.compare(s.size() - p.size(), p.size(), p) == 0;
    };
    if (pattern.is(Kind::kString)) return test(pattern.s);
    if (pattern.is(Kind::kArray)) {
      for (const Value& item : pattern.array->items) {
        if (!item.is(Kind::kString)) {
          *bad = true;
          return false;
        }
        if (test(item.s)) return true;
      }
      return false;
    }
    *bad = true;
    return false;
  }

  absl::StatusOr<Value> DictSort(const Node& n, const Value& dict, const Args& args) {
    const Value* cs = args.Get(0, "case_sensitive");
    const Value* by = args.Get(1, "by");
    const Value* rev = args.Get(2, "reverse");
    if (cs != nullptr && !cs->is(Kind::kBool)) return Error(n, "case_sensitive must be a boolean");
    if (by != nullptr && (!by->is(Kind::kString) || (by->s != "key" && by->s != "value"))) {
      return Error(n, "by must be either 'key' or 'value'");
    }
    if (rev != nullptr && !rev->is(Kind::kBool)) return Error(n, "reverse must be a boolean");
    const size_t index = by != nullptr && by->s == "value" ? 1 : 0;
    std::vector<Value> items;
    for (const auto& [k, v] : dict.object->items) items.push_back(Array({Str(k), v}));
    absl::Status st = SortValues(
        &items, [&](const Value& pair) { return pair.array->items[index]; }, cs != nullptr && cs->b,
        rev != nullptr && rev->b);
    if (!st.ok()) return Error(n, std::string(st.message()));
    return Array(std::move(items));
  }

  absl::StatusOr<Value> CallMethod(const Node& n, const Value& self, const std::string& name,
                                   const Args& args) {
    if (self.is(Kind::kString)) {
      const std::string& s = self.s;
      if (name == "upper") return Str(AsciiUpper(s));
      if (name == "lower") return Str(AsciiLower(s));
      if (name == "strip") return Str(std::string(Trim(s)));
      if (name == "lstrip") return Str(std::string(TrimStart(s)));
      if (name == "rstrip") return Str(std::string(TrimEnd(s)));
      if (name == "title") return Str(Title(s));
      if (name == "capitalize") return Str(Capitalize(s));
      if (name == "startswith" || name == "endswith") {
        if (args.pos.empty()) return Error(n, absl::StrCat(name, "() requires an argument"));
        bool bad = false;
        ASSIGN_OR_RETURN(bool r, Affix(s, args.pos[0], name == "startswith", &bad));
        if (bad) return Error(n, absl::StrCat(name, "() expects a string or a tuple of strings"));
        return Bool(r);
      }
      if (name == "split") return Split(n, s, args);
      if (name == "replace") return Replace(n, s, args);
    } else if (self.dict()) {
      if (name == "get") {
        if (args.pos.empty() || !args.pos[0].is(Kind::kString)) {
          return Error(n, "get() expects a string key");
        }
        if (const Value* v = self.object->Find(args.pos[0].s)) return *v;
        return args.pos.size() > 1 ? args.pos[1] : Null();
      }
      if (name == "items") {
        std::vector<Value> items;
        for (const auto& [k, v] : self.object->items) items.push_back(Array({Str(k), v}));
        return Array(std::move(items));
      }
      if (name == "keys") {
        std::vector<Value> items;
        for (const auto& [k, v] : self.object->items) items.push_back(Str(k));
        return Array(std::move(items));
      }
      if (name == "values") {
        std::vector<Value> items;
        for (const auto& [k, v] : self.object->items) items.push_back(v);
        return Array(std::move(items));
      }
      if (name == "dictsort") return DictSort(n, self, args);
    }
    return Error(n, absl::StrCat("unknown method '", name, "'"));
  }

  // ------------------------------------------------------------------ filters

  absl::StatusOr<std::string> Json(const Node& n, const Value& v, const JsonOptions& o,
                                   bool undefined_as_null) {
    std::string out;
    absl::Status st = ToJson(v, o, 0, undefined_as_null, &out, limits_.max_output_bytes);
    if (!st.ok()) {
      return absl::Status(st.code(), absl::StrCat(program_.map.Where(n.pos), ": ", st.message()));
    }
    RETURN_IF_ERROR(CheckSize(n, out.size()));
    return out;
  }

  absl::StatusOr<Value> Indent(const Node& n, const std::string& s, const Value& width, bool first,
                               bool blank) {
    std::string unit;
    if (width.is(Kind::kString)) {
      unit = width.s;
    } else if (width.is(Kind::kInt)) {
      RETURN_IF_ERROR(CheckSize(n, static_cast<size_t>(std::max<int64_t>(0, width.i))));
      unit.assign(static_cast<size_t>(std::max<int64_t>(0, width.i)), ' ');
    } else {
      return Error(n, "indent width must be an integer or a string");
    }
    std::string out;
    size_t start = 0;
    for (size_t line = 0;; ++line) {
      const size_t nl = s.find('\n', start);
      const std::string_view text =
          std::string_view(s).substr(start, nl == std::string::npos ? nl : nl - start);
      if (!((!first && line == 0) || (!blank && text.empty()))) out += unit;
      out.append(text);
      RETURN_IF_ERROR(CheckSize(n, out.size()));
      if (nl == std::string::npos) break;
      out.push_back('\n');
      start = nl + 1;
    }
    return Str(std::move(out));
  }

  absl::StatusOr<Value> ApplyFilter(Value operand, const Node& f, const ScopePtr& scope) {
    const std::string& name = f.str;
    const auto cannot = [&]() {
      return Error(f,
                   absl::StrCat("filter '", name, "' cannot be applied to a ", TypeName(operand)));
    };
    const auto unknown = [&]() {
      return Error(f, absl::StrCat("unknown filter '", name, "' for a ", TypeName(operand)));
    };
    if (!f.flag) {
      if (name == "safe") return operand;
      if (name == "tojson") {
        ASSIGN_OR_RETURN(std::string s, Json(f, operand, JsonOptions(), true));
        return Str(std::move(s));
      }
      switch (operand.kind) {
        case Kind::kArray: {
          const auto& items = operand.array->items;
          if (name == "list") return operand;
          if (name == "first") return items.empty() ? Undefined() : items.front();
          if (name == "last") return items.empty() ? Undefined() : items.back();
          if (name == "length") return Int(static_cast<int64_t>(items.size()));
          if (name == "reverse") return Array(std::vector<Value>(items.rbegin(), items.rend()));
          if (name == "sort") {
            std::vector<Value> sorted = items;
            absl::Status st = SortValues(
                &sorted, [](const Value& v) { return v; }, false, false);
            if (!st.ok()) return Error(f, std::string(st.message()));
            return Array(std::move(sorted));
          }
          if (name == "join") {
            std::string s;
            for (const Value& v : items) {
              s += JoinPiece(v);
              RETURN_IF_ERROR(CheckSize(f, s.size()));
            }
            return Str(std::move(s));
          }
          if (name == "string") {
            ASSIGN_OR_RETURN(std::string s, Json(f, operand, JsonOptions(), false));
            return Str(std::move(s));
          }
          if (name == "unique") {
            std::vector<Value> out;
            for (const Value& v : items) {
              bool seen = false;
              for (const Value& u : out) {
                if (StrictEquals(u, v)) {
                  seen = true;
                  break;
                }
              }
              if (!seen) out.push_back(v);
            }
            return Array(std::move(out));
          }
          return unknown();
        }
        case Kind::kString: {
          const std::string& s = operand.s;
          if (name == "length") return Int(static_cast<int64_t>(Utf16Length(s)));
          if (name == "upper") return Str(AsciiUpper(s));
          if (name == "lower") return Str(AsciiLower(s));
          if (name == "title") return Str(Title(s));
          if (name == "capitalize") return Str(Capitalize(s));
          if (name == "trim") return Str(std::string(Trim(s)));
          if (name == "indent") return Indent(f, s, Int(4), false, false);
          if (name == "join" || name == "string") return operand;
          if (name == "int") {
            const std::optional<double> v = JsParseInt(s);
            std::optional<Value> r = IntFromDouble(v.value_or(0));
            if (!r) return Error(f, "integer out of range");
            return *r;
          }
          if (name == "float") return Float(JsParseFloat(s).value_or(0.0));
          return unknown();
        }
        case Kind::kInt:
        case Kind::kFloat: {
          const bool is_float = operand.is(Kind::kFloat);
          if (name == "abs") {
            if (is_float) return Float(std::fabs(operand.f));
            if (operand.i == std::numeric_limits<int64_t>::min())
              return Error(f, "integer overflow");
            return Int(operand.i < 0 ? -operand.i : operand.i);
          }
          if (name == "int") {
            if (!is_float) return operand;
            std::optional<Value> r = IntFromDouble(std::trunc(operand.f));
            if (!r) return Error(f, "integer out of range");
            return *r;
          }
          if (name == "float") return Float(operand.num());
          if (name == "string") return Str(Text(operand));
          return unknown();
        }
        case Kind::kObject: {
          if (name == "items" || name == "keys" || name == "values" || name == "get" ||
              name == "dictsort") {
            return CallMethod(f, operand, name, Args());
          }
          if (name == "length") return Int(static_cast<int64_t>(operand.object->items.size()));
          return unknown();
        }
        case Kind::kBool: {
          if (name == "bool") return operand;
          if (name == "int") return Int(operand.b ? 1 : 0);
          if (name == "float") return Float(operand.b ? 1.0 : 0.0);
          if (name == "string") return Str(operand.b ? "true" : "false");
          return unknown();
        }
        default:
          return cannot();
      }
    }

    // Called with (...).
    if (name == "tojson") {
      ASSIGN_OR_RETURN(Args args, EvalArgs(f.args, scope));
      JsonOptions o;
      if (const Value* v = args.Kw("indent"); v != nullptr && !v->is(Kind::kNull)) {
        if (!v->is(Kind::kInt)) return Error(f, "tojson: indent must be an integer");
        o.indent = v->i;
      }
      if (const Value* v = args.Kw("ensure_ascii")) {
        if (!v->is(Kind::kBool)) return Error(f, "tojson: ensure_ascii must be a boolean");
        o.ascii = v->b;
      }
      if (const Value* v = args.Kw("sort_keys")) {
        if (!v->is(Kind::kBool)) return Error(f, "tojson: sort_keys must be a boolean");
        o.sort_keys = v->b;
      }
      if (const Value* v = args.Kw("separators"); v != nullptr && !v->is(Kind::kNull)) {
        if (!v->is(Kind::kArray) || v->array->items.size() != 2 ||
            !v->array->items[0].is(Kind::kString) || !v->array->items[1].is(Kind::kString)) {
          return Error(f, "tojson: separators must be a tuple of two strings");
        }
        o.separators.emplace(v->array->items[0].s, v->array->items[1].s);
      }
      ASSIGN_OR_RETURN(std::string s, Json(f, operand, o, true));
      return Str(std::move(s));
    }
    if (name == "join") {
      std::vector<std::string> pieces;
      if (operand.is(Kind::kString)) {
        for (std::string_view cp : CodePoints(operand.s)) pieces.emplace_back(cp);
      } else if (operand.is(Kind::kArray)) {
        for (const Value& v : operand.array->items) pieces.push_back(JoinPiece(v));
      } else {
        return cannot();
      }
      ASSIGN_OR_RETURN(Args args, EvalArgs(f.args, scope));
      const Value* sep = args.Get(0, "separator");
      if (sep != nullptr && !sep->is(Kind::kString))
        return Error(f, "join: separator must be a string");
      std::string out;
      for (size_t k = 0; k < pieces.size(); ++k) {
        if (k > 0 && sep != nullptr) out += sep->s;
        out += pieces[k];
        RETURN_IF_ERROR(CheckSize(f, out.size()));
      }
      return Str(std::move(out));
    }
    if (name == "int" || name == "float") {
      ASSIGN_OR_RETURN(Args args, EvalArgs(f.args, scope));
      const bool to_int = name == "int";
      const Value* def = args.Get(0, "default");
      const Value fallback = def != nullptr ? *def : to_int ? Int(0) : Float(0.0);
      if (operand.is(Kind::kString)) {
        const std::optional<double> v = to_int ? JsParseInt(operand.s) : JsParseFloat(operand.s);
        if (!v) return fallback;
        if (!to_int) return Float(*v);
        std::optional<Value> r = IntFromDouble(*v);
        if (!r) return Error(f, "integer out of range");
        return *r;
      }
      if (operand.number()) {
        if (!to_int) return Float(operand.num());
        std::optional<Value> r = IntFromDouble(std::trunc(operand.num()));
        if (!r) return Error(f, "integer out of range");
        return *r;
      }
      if (operand.is(Kind::kBool)) return to_int ? Int(operand.b) : Float(operand.b ? 1 : 0);
      return cannot();
    }
    if (name == "default") {
      ASSIGN_OR_RETURN(Args args, EvalArgs(f.args, scope));
      const Value def = !args.pos.empty() ? args.pos[0] : Str("");
      const Value* boolean = args.Get(1, "boolean");
      if (boolean != nullptr && !boolean->is(Kind::kBool)) {
        return Error(f, "default: the boolean flag must be a boolean");
      }
      if (operand.is(Kind::kUndefined) || (boolean != nullptr && boolean->b && !Truthy(operand))) {
        return def;
      }
      return operand;
    }
    if (operand.is(Kind::kArray)) {
      const auto& items = operand.array->items;
      if (name == "sort") {
        ASSIGN_OR_RETURN(Args args, EvalArgs(f.args, scope));
        const Value* rev = args.Get(0, "reverse");
        const Value* cs = args.Get(1, "case_sensitive");
        const Value* attr = args.Get(2, "attribute");
        if (rev != nullptr && !rev->is(Kind::kBool))
          return Error(f, "sort: reverse must be a boolean");
        if (cs != nullptr && !cs->is(Kind::kBool)) {
          return Error(f, "sort: case_sensitive must be a boolean");
        }
        std::optional<std::string> path;
        if (attr != nullptr && !attr->is(Kind::kNull)) {
          if (attr->is(Kind::kString)) {
            path = attr->s;
          } else if (attr->is(Kind::kInt)) {
            path = std::to_string(attr->i);
          } else {
            return Error(f, "sort: attribute must be a string or an integer");
          }
        }
        std::vector<Value> sorted = items;
        absl::Status st = SortValues(
            &sorted, [&](const Value& v) { return path ? AttributePath(v, *path) : v; },
            cs != nullptr && cs->b, rev != nullptr && rev->b);
        if (!st.ok()) return Error(f, std::string(st.message()));
        return Array(std::move(sorted));
      }
      if (name == "selectattr" || name == "rejectattr") {
        const bool select = name == "selectattr";
        for (const Value& item : items) {
          if (!item.container()) return Error(f, absl::StrCat(name, " needs a list of dicts"));
        }
        for (const NodePtr& a : f.args) {
          if (a->kind != NodeKind::kString) {
            return Error(f, absl::StrCat("the arguments of ", name, " must be string literals"));
          }
        }
        if (f.args.empty()) return Error(f, absl::StrCat(name, " needs an attribute name"));
        const std::string& attr = f.args[0]->str;
        const std::string* test = f.args.size() > 1 ? &f.args[1]->str : nullptr;
        const Value other = f.args.size() > 2 ? Str(f.args[2]->str) : Undefined();
        std::vector<Value> out;
        for (const Value& item : items) {
          const Value* a = item.object->Find(attr);
          bool result = false;
          if (a != nullptr) {
            if (test != nullptr) {
              ASSIGN_OR_RETURN(result, RunTest(f, *test, *a, f.args.size() > 2 ? &other : nullptr));
            } else {
              result = Truthy(*a);
            }
          }
          if (result == select) out.push_back(item);
        }
        return Array(std::move(out));
      }
      if (name == "map") {
        ASSIGN_OR_RETURN(Args args, EvalArgs(f.args, scope));
        const Value* attr = args.Kw("attribute");
        if (attr == nullptr) return Error(f, "map is supported only with attribute=");
        if (!attr->is(Kind::kString)) return Error(f, "map: attribute must be a string");
        const Value* def = args.Kw("default");
        std::vector<Value> out;
        for (const Value& item : items) {
          if (!item.container()) return Error(f, "map: the items must be dicts");
          Value v = AttributePath(item, attr->s);
          out.push_back(v.is(Kind::kUndefined) && def != nullptr ? *def : std::move(v));
        }
        return Array(std::move(out));
      }
      return unknown();
    }
    if (operand.is(Kind::kString)) {
      if (name == "indent") {
        ASSIGN_OR_RETURN(Args args, EvalArgs(f.args, scope));
        const Value* width = args.Get(0, "width");
        const Value* first = args.Get(1, "first");
        const Value* blank = args.Get(2, "blank");
        return Indent(f, operand.s, width != nullptr ? *width : Int(4),
                      first != nullptr && RawTruthy(*first), blank != nullptr && RawTruthy(*blank));
      }
      if (name == "replace") {
        ASSIGN_OR_RETURN(Args args, EvalArgs(f.args, scope));
        return Replace(f, operand.s, args);
      }
      return unknown();
    }
    if (operand.dict()) {
      if (IsDictMethod(name)) {
        ASSIGN_OR_RETURN(Args args, EvalArgs(f.args, scope));
        return CallMethod(f, operand, name, args);
      }
      return unknown();
    }
    return cannot();
  }

  const Program& program_;
  const Limits& limits_;
  int depth_ = 0;
  int64_t iterations_ = 0;
};

}  // namespace
}  // namespace jinja_internal

// -----------------------------------------------------------------------------------------------
// Template.

absl::StatusOr<Template> Template::Parse(std::string_view source, const Limits& limits) {
  auto program = std::make_shared<jinja_internal::Program>();
  program->limits = limits;
  program->map.original = std::string(source);
  if (source.size() > limits.max_output_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrCat("template source exceeds ", limits.max_output_bytes, " bytes"));
  }
  if (!common::IsValidUtf8(source)) {
    return absl::InvalidArgumentError("the template is not valid UTF-8");
  }
  jinja_internal::Preprocess(&program->map);
  jinja_internal::Lexer lexer(program->map);
  ASSIGN_OR_RETURN(std::vector<jinja_internal::Token> tokens, lexer.Run());
  jinja_internal::Parser parser(program->map, tokens, limits.max_parse_depth);
  ASSIGN_OR_RETURN(program->body, parser.Run());
  return Template(std::move(program));
}

absl::StatusOr<std::string> Template::Render(const nlohmann::ordered_json& context) const {
  jinja_internal::Renderer renderer(*program_);
  return renderer.Run(context);
}

absl::StatusOr<std::string> Template::Render(const nlohmann::json& context) const {
  jinja_internal::Renderer renderer(*program_);
  return renderer.Run(context);
}

const Limits& Template::limits() const { return program_->limits; }

bool IsRaisedException(const absl::Status& status) {
  return !status.ok() && status.GetPayload(jinja_internal::kRaisedPayload).has_value();
}

}  // namespace retnet::chat
