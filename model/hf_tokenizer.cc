// File: model/hf_tokenizer.cc
//
// HF tokenizer.json / GPT-2 vocab.json + merges.txt (see hf_tokenizer.h). Pipeline of Encode:
// split on raw added tokens -> normalize -> split on normalized added tokens -> pre-tokenize
// -> BPE per pre-token. Decode: tokens -> decoder chain -> valid UTF-8.
//
// No torch headers here (compiled without the precompiled header).
#include "model/hf_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <sys/stat.h>
#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <exception>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status_macros.h"
#include "common/utf8.h"
#include "model/files.h"

namespace retnet::model {
namespace {

using Json = nlohmann::json;

constexpr uint64_t kMaxFileBytes = uint64_t{256} << 20;  // the largest real ones are ~40 MB
constexpr int kMaxNesting = 32;
constexpr size_t kCacheCapacity = 20000;
constexpr size_t kMaxCachedWordBytes = 256;

// ---------------------------------------------------------------------------------------------
// Files.

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  return ReadRegularFile(path, kMaxFileBytes);
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

std::string DirName(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// ---------------------------------------------------------------------------------------------
// UTF-8 helpers (inputs are validated before they reach these).

uint32_t NextCodePoint(std::string_view s, size_t* i) {
  const auto b = [&](size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[k])); };
  const uint32_t c = b(*i);
  if (c < 0x80) {
    *i += 1;
    return c;
  }
  if (c < 0xE0 && *i + 1 < s.size()) {
    const uint32_t cp = ((c & 0x1F) << 6) | (b(*i + 1) & 0x3F);
    *i += 2;
    return cp;
  }
  if (c < 0xF0 && *i + 2 < s.size()) {
    const uint32_t cp = ((c & 0x0F) << 12) | ((b(*i + 1) & 0x3F) << 6) | (b(*i + 2) & 0x3F);
    *i += 3;
    return cp;
  }
  if (*i + 3 < s.size()) {
    const uint32_t cp = ((c & 0x07) << 18) | ((b(*i + 1) & 0x3F) << 12) |
                        ((b(*i + 2) & 0x3F) << 6) | (b(*i + 3) & 0x3F);
    *i += 4;
    return cp;
  }
  *i = s.size();
  return 0xFFFD;
}

std::u16string ToUtf16(std::string_view s) {
  std::u16string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const uint32_t cp = NextCodePoint(s, &i);
    if (cp < 0x10000) {
      out.push_back(static_cast<char16_t>(cp));
    } else {
      out.push_back(static_cast<char16_t>(0xD800 + ((cp - 0x10000) >> 10)));
      out.push_back(static_cast<char16_t>(0xDC00 + ((cp - 0x10000) & 0x3FF)));
    }
  }
  return out;
}

std::string FromUtf16(const char16_t* s, size_t n) {
  std::string out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t cp = s[i];
    if (cp >= 0xD800 && cp < 0xDC00 && i + 1 < n && s[i + 1] >= 0xDC00 && s[i + 1] < 0xE000) {
      cp = 0x10000 + ((cp - 0xD800) << 10) + (s[i + 1] - 0xDC00);
      ++i;
    }
    common::AppendUtf8(&out, cp);
  }
  return out;
}

bool IsWhiteSpace(uint32_t cp) { return u_isUWhiteSpace(static_cast<UChar32>(cp)) != 0; }
bool IsNumeric(uint32_t cp) { return (U_GET_GC_MASK(static_cast<UChar32>(cp)) & U_GC_N_MASK) != 0; }
bool IsPunctuation(uint32_t cp) {
  if (cp < 0x80 && std::ispunct(static_cast<int>(cp))) return true;
  return (U_GET_GC_MASK(static_cast<UChar32>(cp)) & U_GC_P_MASK) != 0;
}
bool IsMark(uint32_t cp) { return (U_GET_GC_MASK(static_cast<UChar32>(cp)) & U_GC_M_MASK) != 0; }

// GPT-2's byte <-> printable character map.
struct ByteMap {
  std::string byte_to_char[256];  // UTF-8 of the character for each byte
  std::unordered_map<uint32_t, int> char_to_byte;
  ByteMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      common::AppendUtf8(&byte_to_char[b], cp);
      char_to_byte[cp] = b;
    }
  }
};

const ByteMap& Bytes() {
  static const ByteMap* map = new ByteMap();
  return *map;
}

// Maps a byte-level token back to raw bytes; a character outside the map keeps the token's own
// UTF-8 (as HF does).
std::string ByteLevelToBytes(std::string_view token) {
  std::string out;
  out.reserve(token.size());
  const auto& map = Bytes().char_to_byte;
  for (size_t i = 0; i < token.size();) {
    const uint32_t cp = NextCodePoint(token, &i);
    auto it = map.find(cp);
    if (it == map.end()) return std::string(token);
    out.push_back(static_cast<char>(it->second));
  }
  return out;
}

std::string ByteFallbackName(unsigned char b) { return absl::StrFormat("<0x%02X>", b); }

// "<0xNN>" -> NN, else -1.
int ParseByteToken(std::string_view t) {
  if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return -1;
  int v = 0;
  for (size_t k = 3; k < 5; ++k) {
    const char c = t[k];
    int d;
    if (c >= '0' && c <= '9') {
      d = c - '0';
    } else if (c >= 'A' && c <= 'F') {
      d = c - 'A' + 10;
    } else if (c >= 'a' && c <= 'f') {
      d = c - 'a' + 10;
    } else {
      return -1;
    }
    v = v * 16 + d;
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Regexes (PCRE2, UTF + Unicode properties, JIT when available). Immutable and shareable; each
// search allocates its own match data.

class Regex {
 public:
  static absl::StatusOr<std::shared_ptr<const Regex>> Compile(std::string_view pattern,
                                                              bool literal) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    // PCRE2_LITERAL admits no PCRE2_UCP (nothing in a literal depends on it).
    const uint32_t options = literal ? PCRE2_UTF | PCRE2_LITERAL : PCRE2_UTF | PCRE2_UCP;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     options, &error, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(error, msg, sizeof(msg));
      return absl::InvalidArgumentError(absl::StrCat("regex /", std::string(pattern),
                                                     "/ at offset ", offset, ": ",
                                                     reinterpret_cast<char*>(msg)));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter on failure
    return std::shared_ptr<const Regex>(new Regex(code));
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Non-empty matches, left to right, as [begin, end) byte offsets. `s` must be valid UTF-8.
  absl::Status FindAll(std::string_view s, std::vector<std::pair<size_t, size_t>>* out) const {
    out->clear();
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    if (md == nullptr) return absl::ResourceExhaustedError("regex: out of memory");
    size_t pos = 0;
    absl::Status status;
    bool checked = false;
    while (pos <= s.size()) {
      const uint32_t opts = checked ? PCRE2_NO_UTF_CHECK : 0;
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, opts, md,
                           nullptr);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
        rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                         opts | PCRE2_NO_JIT, md, nullptr);
      }
      checked = true;
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof(msg));
        status = absl::InvalidArgumentError(
            absl::StrCat("regex match failed: ", reinterpret_cast<char*>(msg)));
        break;
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t b = ov[0], e = ov[1];
      if (e > b) {
        out->emplace_back(b, e);
        pos = e;
      } else {
        // An empty match: step over one character.
        if (b >= s.size()) break;
        size_t next = b;
        NextCodePoint(s, &next);
        pos = next;
      }
    }
    pcre2_match_data_free(md);
    return status;
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

// ---------------------------------------------------------------------------------------------
// JSON field helpers: every error names the field.

absl::Status FieldError(const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", what));
}

absl::StatusOr<std::string> GetString(const Json& obj, const std::string& key,
                                      const std::string& field,
                                      std::optional<std::string> fallback = std::nullopt) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    if (fallback) return *fallback;
    return FieldError(field + "." + key, "missing");
  }
  if (!it->is_string()) return FieldError(field + "." + key, "not a string");
  return it->get<std::string>();
}

absl::StatusOr<bool> GetBool(const Json& obj, const std::string& key, const std::string& field,
                             bool fallback) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return FieldError(field + "." + key, "not a boolean");
  return it->get<bool>();
}

absl::StatusOr<int64_t> GetInt(const Json& obj, const std::string& key, const std::string& field,
                               int64_t fallback) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_number_integer()) return FieldError(field + "." + key, "not an integer");
  return it->get<int64_t>();
}

// A `pattern` object: {"String": s} or {"Regex": r}.
absl::StatusOr<std::shared_ptr<const Regex>> GetPattern(const Json& obj, const std::string& field) {
  auto it = obj.find("pattern");
  if (it == obj.end() || !it->is_object()) return FieldError(field + ".pattern", "missing");
  const std::string f = field + ".pattern";
  if (it->contains("String")) {
    ASSIGN_OR_RETURN(std::string s, GetString(*it, "String", f));
    auto re = Regex::Compile(s, /*literal=*/true);
    if (!re.ok()) return FieldError(f + ".String", std::string(re.status().message()));
    return re;
  }
  if (it->contains("Regex")) {
    ASSIGN_OR_RETURN(std::string s, GetString(*it, "Regex", f));
    auto re = Regex::Compile(s, /*literal=*/false);
    if (!re.ok()) return FieldError(f + ".Regex", std::string(re.status().message()));
    return re;
  }
  return FieldError(f, "neither String nor Regex");
}

absl::Status CheckUtf8(std::string_view s, const std::string& field) {
  if (!common::IsValidUtf8(s)) return FieldError(field, "not valid UTF-8");
  return absl::OkStatus();
}

// Replaces every match of `re` in `s` by `content`.
absl::Status ReplaceAll(const Regex& re, const std::string& content, std::string* s) {
  std::vector<std::pair<size_t, size_t>> m;
  RETURN_IF_ERROR(re.FindAll(*s, &m));
  if (m.empty()) return absl::OkStatus();
  std::string out;
  size_t prev = 0;
  for (auto [b, e] : m) {
    out.append(*s, prev, b - prev);
    out += content;
    prev = e;
  }
  out.append(*s, prev, std::string::npos);
  *s = std::move(out);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Normalizers.

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual absl::Status Apply(std::string* s) const = 0;
};

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(const UNormalizer2* n) : n_(n) {}
  absl::Status Apply(std::string* s) const override {
    const std::u16string in = ToUtf16(*s);
    UErrorCode err = U_ZERO_ERROR;
    const int32_t need = unorm2_normalize(n_, reinterpret_cast<const UChar*>(in.data()),
                                          static_cast<int32_t>(in.size()), nullptr, 0, &err);
    if (err != U_BUFFER_OVERFLOW_ERROR && U_FAILURE(err)) {
      return absl::InternalError(absl::StrCat("unicode normalization: ", u_errorName(err)));
    }
    std::u16string out(static_cast<size_t>(need), u'\0');
    err = U_ZERO_ERROR;
    unorm2_normalize(n_, reinterpret_cast<const UChar*>(in.data()), static_cast<int32_t>(in.size()),
                     reinterpret_cast<UChar*>(out.data()), need, &err);
    if (U_FAILURE(err)) {
      return absl::InternalError(absl::StrCat("unicode normalization: ", u_errorName(err)));
    }
    *s = FromUtf16(out.data(), out.size());
    return absl::OkStatus();
  }

 private:
  const UNormalizer2* n_;  // owned by ICU
};

class LowercaseNormalizer final : public Normalizer {
 public:
  absl::Status Apply(std::string* s) const override {
    const std::u16string in = ToUtf16(*s);
    UErrorCode err = U_ZERO_ERROR;
    const int32_t need = u_strToLower(nullptr, 0, reinterpret_cast<const UChar*>(in.data()),
                                      static_cast<int32_t>(in.size()), "", &err);
    if (err != U_BUFFER_OVERFLOW_ERROR && U_FAILURE(err)) {
      return absl::InternalError(absl::StrCat("lowercase: ", u_errorName(err)));
    }
    std::u16string out(static_cast<size_t>(need), u'\0');
    err = U_ZERO_ERROR;
    u_strToLower(reinterpret_cast<UChar*>(out.data()), need,
                 reinterpret_cast<const UChar*>(in.data()), static_cast<int32_t>(in.size()), "",
                 &err);
    if (U_FAILURE(err)) return absl::InternalError(absl::StrCat("lowercase: ", u_errorName(err)));
    *s = FromUtf16(out.data(), out.size());
    return absl::OkStatus();
  }
};

class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  absl::Status Apply(std::string* s) const override {
    size_t b = 0, e = s->size();
    if (left_) {
      while (b < e) {
        size_t i = b;
        if (!IsWhiteSpace(NextCodePoint(*s, &i))) break;
        b = i;
      }
    }
    if (right_) {
      while (e > b) {
        size_t start = e - 1;
        while (start > b && (static_cast<unsigned char>((*s)[start]) & 0xC0) == 0x80) --start;
        size_t i = start;
        if (!IsWhiteSpace(NextCodePoint(*s, &i))) break;
        e = start;
      }
    }
    *s = s->substr(b, e - b);
    return absl::OkStatus();
  }

 private:
  bool left_, right_;
};

class StripAccentsNormalizer final : public Normalizer {
 public:
  absl::Status Apply(std::string* s) const override {
    std::string out;
    out.reserve(s->size());
    for (size_t i = 0; i < s->size();) {
      const size_t start = i;
      const uint32_t cp = NextCodePoint(*s, &i);
      if (!IsMark(cp)) out.append(*s, start, i - start);
    }
    *s = std::move(out);
    return absl::OkStatus();
  }
};

class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(std::shared_ptr<const Regex> re, std::string content)
      : re_(std::move(re)), content_(std::move(content)) {}
  absl::Status Apply(std::string* s) const override { return ReplaceAll(*re_, content_, s); }

 private:
  std::shared_ptr<const Regex> re_;
  std::string content_;
};

class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  absl::Status Apply(std::string* s) const override {
    if (!s->empty()) s->insert(0, prefix_);
    return absl::OkStatus();
  }

 private:
  std::string prefix_;
};

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  absl::Status Apply(std::string* s) const override {
    for (const auto& p : parts_) RETURN_IF_ERROR(p->Apply(s));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const Json& j, const std::string& field,
                                                            int depth) {
  if (depth > kMaxNesting) return FieldError(field, "nested too deeply");
  if (!j.is_object()) return FieldError(field, "not an object");
  ASSIGN_OR_RETURN(std::string type, GetString(j, "type", field));
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    UErrorCode err = U_ZERO_ERROR;
    const UNormalizer2* n = type == "NFC"    ? unorm2_getNFCInstance(&err)
                            : type == "NFD"  ? unorm2_getNFDInstance(&err)
                            : type == "NFKC" ? unorm2_getNFKCInstance(&err)
                                             : unorm2_getNFKDInstance(&err);
    if (U_FAILURE(err) || n == nullptr) {
      return absl::InternalError(absl::StrCat(field, ": ICU ", type, ": ", u_errorName(err)));
    }
    return std::make_unique<UnicodeNormalizer>(n);
  }
  if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>();
  if (type == "StripAccents") return std::make_unique<StripAccentsNormalizer>();
  if (type == "Strip") {
    ASSIGN_OR_RETURN(bool left, GetBool(j, "strip_left", field, true));
    ASSIGN_OR_RETURN(bool right, GetBool(j, "strip_right", field, true));
    return std::make_unique<StripNormalizer>(left, right);
  }
  if (type == "Replace") {
    ASSIGN_OR_RETURN(auto re, GetPattern(j, field));
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", field));
    RETURN_IF_ERROR(CheckUtf8(content, field + ".content"));
    return std::make_unique<ReplaceNormalizer>(std::move(re), std::move(content));
  }
  if (type == "Prepend") {
    ASSIGN_OR_RETURN(std::string prefix, GetString(j, "prepend", field));
    RETURN_IF_ERROR(CheckUtf8(prefix, field + ".prepend"));
    return std::make_unique<PrependNormalizer>(std::move(prefix));
  }
  if (type == "Sequence") {
    auto it = j.find("normalizers");
    if (it == j.end() || !it->is_array()) return FieldError(field + ".normalizers", "not an array");
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (size_t i = 0; i < it->size(); ++i) {
      const std::string f = absl::StrCat(field, ".normalizers[", i, "]");
      if ((*it)[i].is_null()) continue;
      ASSIGN_OR_RETURN(auto p, ParseNormalizer((*it)[i], f, depth + 1));
      parts.push_back(std::move(p));
    }
    return std::make_unique<SequenceNormalizer>(std::move(parts));
  }
  return FieldError(field + ".type", absl::StrCat("'", type, "' is not supported"));
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers: a list of pieces in, a list out. `at_start`: the piece begins at offset 0 of
// the input (Metaspace's prepend_scheme "first").

struct Piece {
  std::string text;
  bool at_start = false;
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

absl::StatusOr<Behavior> ParseBehavior(const Json& j, const std::string& field, Behavior fallback) {
  auto it = j.find("behavior");
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_string()) return FieldError(field + ".behavior", "not a string");
  const std::string b = it->get<std::string>();
  if (b == "Removed") return Behavior::kRemoved;
  if (b == "Isolated") return Behavior::kIsolated;
  if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::kMergedWithNext;
  if (b == "Contiguous") return Behavior::kContiguous;
  return FieldError(field + ".behavior", absl::StrCat("unknown behavior '", b, "'"));
}

struct Seg {
  size_t b, e;
  bool match;
};

// Covering segments from a list of matches.
std::vector<Seg> SegmentsFromMatches(size_t n, const std::vector<std::pair<size_t, size_t>>& m) {
  std::vector<Seg> segs;
  size_t prev = 0;
  for (auto [b, e] : m) {
    if (b > prev) segs.push_back({prev, b, false});
    segs.push_back({b, e, true});
    prev = e;
  }
  if (prev < n) segs.push_back({prev, n, false});
  return segs;
}

// Each character for which `pred` holds is a match of its own; the rest are runs.
template <typename Pred>
std::vector<Seg> SegmentsFromChars(std::string_view s, Pred pred) {
  std::vector<Seg> segs;
  for (size_t i = 0; i < s.size();) {
    const size_t start = i;
    const bool m = pred(NextCodePoint(s, &i));
    if (!m && !segs.empty() && !segs.back().match) {
      segs.back().e = i;
    } else {
      segs.push_back({start, i, m});
    }
  }
  return segs;
}

void EmitSplit(const Piece& p, std::vector<Seg> segs, Behavior behavior, bool invert,
               std::vector<Piece>* out) {
  if (invert) {
    for (auto& s : segs) s.match = !s.match;
  }
  std::vector<std::pair<size_t, size_t>> r;
  bool prev = false;
  switch (behavior) {
    case Behavior::kRemoved:
      for (const auto& s : segs) {
        if (!s.match) r.emplace_back(s.b, s.e);
      }
      break;
    case Behavior::kIsolated:
      for (const auto& s : segs) r.emplace_back(s.b, s.e);
      break;
    case Behavior::kContiguous:
      for (const auto& s : segs) {
        if (s.match == prev && !r.empty()) {
          r.back().second = s.e;
        } else {
          r.emplace_back(s.b, s.e);
        }
        prev = s.match;
      }
      break;
    case Behavior::kMergedWithPrevious:
      for (const auto& s : segs) {
        if (s.match && !prev && !r.empty()) {
          r.back().second = s.e;
        } else {
          r.emplace_back(s.b, s.e);
        }
        prev = s.match;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->match && !prev && !r.empty()) {
          r.back().first = it->b;
        } else {
          r.emplace_back(it->b, it->e);
        }
        prev = it->match;
      }
      std::reverse(r.begin(), r.end());
      break;
  }
  for (auto [b, e] : r) {
    if (e > b) out->push_back({p.text.substr(b, e - b), p.at_start && b == 0});
  }
}

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual absl::Status Apply(std::vector<Piece>* pieces) const = 0;
};

const char kGpt2Pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::shared_ptr<const Regex> re)
      : add_prefix_space_(add_prefix_space), re_(std::move(re)) {}
  absl::Status Apply(std::vector<Piece>* pieces) const override {
    std::vector<Piece> split;
    std::vector<std::pair<size_t, size_t>> m;
    for (Piece& p : *pieces) {
      if (add_prefix_space_ && (p.text.empty() || p.text[0] != ' ')) p.text.insert(0, " ");
      if (re_ == nullptr) {
        split.push_back(std::move(p));
        continue;
      }
      RETURN_IF_ERROR(re_->FindAll(p.text, &m));
      EmitSplit(p, SegmentsFromMatches(p.text.size(), m), Behavior::kIsolated, false, &split);
    }
    const ByteMap& map = Bytes();
    for (Piece& p : split) {
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (unsigned char c : p.text) mapped += map.byte_to_char[c];
      p.text = std::move(mapped);
    }
    *pieces = std::move(split);
    return absl::OkStatus();
  }

 private:
  bool add_prefix_space_;
  std::shared_ptr<const Regex> re_;  // null: no split
};

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(std::shared_ptr<const Regex> re, Behavior behavior, bool invert)
      : re_(std::move(re)), behavior_(behavior), invert_(invert) {}
  absl::Status Apply(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    std::vector<std::pair<size_t, size_t>> m;
    for (const Piece& p : *pieces) {
      RETURN_IF_ERROR(re_->FindAll(p.text, &m));
      EmitSplit(p, SegmentsFromMatches(p.text.size(), m), behavior_, invert_, &out);
    }
    *pieces = std::move(out);
    return absl::OkStatus();
  }

 private:
  std::shared_ptr<const Regex> re_;
  Behavior behavior_;
  bool invert_;
};

// Splits on characters (Digits, Punctuation, WhitespaceSplit, CharDelimiterSplit).
template <typename Pred>
class CharSplitPreTokenizer final : public PreTokenizer {
 public:
  CharSplitPreTokenizer(Pred pred, Behavior behavior) : pred_(pred), behavior_(behavior) {}
  absl::Status Apply(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    for (const Piece& p : *pieces) {
      EmitSplit(p, SegmentsFromChars(p.text, pred_), behavior_, false, &out);
    }
    *pieces = std::move(out);
    return absl::OkStatus();
  }

 private:
  Pred pred_;
  Behavior behavior_;
};

template <typename Pred>
std::unique_ptr<PreTokenizer> MakeCharSplit(Pred pred, Behavior behavior) {
  return std::make_unique<CharSplitPreTokenizer<Pred>>(pred, behavior);
}

enum class PrependScheme { kAlways, kFirst, kNever };

class MetaspacePreTokenizer final : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {}
  absl::Status Apply(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    for (Piece& p : *pieces) {
      std::string t;
      t.reserve(p.text.size() + replacement_.size());
      for (char c : p.text) {
        if (c == ' ') {
          t += replacement_;
        } else {
          t.push_back(c);
        }
      }
      const bool starts = t.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts &&
          (scheme_ == PrependScheme::kAlways || (scheme_ == PrependScheme::kFirst && p.at_start))) {
        t.insert(0, replacement_);
      }
      p.text = std::move(t);
      if (!split_) {
        out.push_back(std::move(p));
        continue;
      }
      // Split before each replacement character (MergedWithNext).
      std::vector<Seg> segs;
      size_t prev = 0;
      for (size_t at = p.text.find(replacement_); at != std::string::npos;
           at = p.text.find(replacement_, at + replacement_.size())) {
        if (at > prev) segs.push_back({prev, at, false});
        segs.push_back({at, at + replacement_.size(), true});
        prev = at + replacement_.size();
      }
      if (prev < p.text.size()) segs.push_back({prev, p.text.size(), false});
      EmitSplit(p, std::move(segs), Behavior::kMergedWithNext, false, &out);
    }
    *pieces = std::move(out);
    return absl::OkStatus();
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

// Keeps only the matches of a regex (Whitespace: \w+|[^\w\s]+).
class MatchesPreTokenizer final : public PreTokenizer {
 public:
  explicit MatchesPreTokenizer(std::shared_ptr<const Regex> re) : re_(std::move(re)) {}
  absl::Status Apply(std::vector<Piece>* pieces) const override {
    std::vector<Piece> out;
    std::vector<std::pair<size_t, size_t>> m;
    for (const Piece& p : *pieces) {
      RETURN_IF_ERROR(re_->FindAll(p.text, &m));
      EmitSplit(p, SegmentsFromMatches(p.text.size(), m), Behavior::kRemoved, true, &out);
    }
    *pieces = std::move(out);
    return absl::OkStatus();
  }

 private:
  std::shared_ptr<const Regex> re_;
};

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  absl::Status Apply(std::vector<Piece>* pieces) const override {
    for (const auto& p : parts_) RETURN_IF_ERROR(p->Apply(pieces));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const Json& j,
                                                                const std::string& field,
                                                                int depth) {
  if (depth > kMaxNesting) return FieldError(field, "nested too deeply");
  if (!j.is_object()) return FieldError(field, "not an object");
  ASSIGN_OR_RETURN(std::string type, GetString(j, "type", field));
  if (type == "ByteLevel") {
    ASSIGN_OR_RETURN(bool prefix, GetBool(j, "add_prefix_space", field, true));
    ASSIGN_OR_RETURN(bool use_regex, GetBool(j, "use_regex", field, true));
    std::shared_ptr<const Regex> re;
    if (use_regex) {
      auto r = Regex::Compile(kGpt2Pattern, false);
      if (!r.ok()) return r.status();
      re = *r;
    }
    return std::make_unique<ByteLevelPreTokenizer>(prefix, std::move(re));
  }
  if (type == "Split") {
    ASSIGN_OR_RETURN(auto re, GetPattern(j, field));
    ASSIGN_OR_RETURN(Behavior behavior, ParseBehavior(j, field, Behavior::kRemoved));
    if (!j.contains("behavior")) return FieldError(field + ".behavior", "missing");
    ASSIGN_OR_RETURN(bool invert, GetBool(j, "invert", field, false));
    return std::make_unique<SplitPreTokenizer>(std::move(re), behavior, invert);
  }
  if (type == "Metaspace") {
    ASSIGN_OR_RETURN(std::string replacement, GetString(j, "replacement", field, "\xE2\x96\x81"));
    RETURN_IF_ERROR(CheckUtf8(replacement, field + ".replacement"));
    if (replacement.empty()) return FieldError(field + ".replacement", "empty");
    PrependScheme scheme = PrependScheme::kAlways;
    if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
      ASSIGN_OR_RETURN(std::string s, GetString(j, "prepend_scheme", field));
      if (s == "always") {
        scheme = PrependScheme::kAlways;
      } else if (s == "first") {
        scheme = PrependScheme::kFirst;
      } else if (s == "never") {
        scheme = PrependScheme::kNever;
      } else {
        return FieldError(field + ".prepend_scheme", absl::StrCat("unknown scheme '", s, "'"));
      }
    } else {
      ASSIGN_OR_RETURN(bool prefix, GetBool(j, "add_prefix_space", field, true));
      scheme = prefix ? PrependScheme::kAlways : PrependScheme::kNever;
    }
    ASSIGN_OR_RETURN(bool split, GetBool(j, "split", field, true));
    return std::make_unique<MetaspacePreTokenizer>(std::move(replacement), scheme, split);
  }
  if (type == "Digits") {
    ASSIGN_OR_RETURN(bool individual, GetBool(j, "individual_digits", field, false));
    return MakeCharSplit(IsNumeric, individual ? Behavior::kIsolated : Behavior::kContiguous);
  }
  if (type == "Punctuation") {
    ASSIGN_OR_RETURN(Behavior behavior, ParseBehavior(j, field, Behavior::kIsolated));
    return MakeCharSplit(IsPunctuation, behavior);
  }
  if (type == "WhitespaceSplit") return MakeCharSplit(IsWhiteSpace, Behavior::kRemoved);
  if (type == "CharDelimiterSplit") {
    ASSIGN_OR_RETURN(std::string d, GetString(j, "delimiter", field));
    size_t i = 0;
    if (d.empty() || !common::IsValidUtf8(d) || (NextCodePoint(d, &i), i != d.size())) {
      return FieldError(field + ".delimiter", "not one character");
    }
    i = 0;
    const uint32_t cp = NextCodePoint(d, &i);
    return MakeCharSplit([cp](uint32_t c) { return c == cp; }, Behavior::kRemoved);
  }
  if (type == "Whitespace") {
    ASSIGN_OR_RETURN(auto re, Regex::Compile("\\w+|[^\\w\\s]+", false));
    return std::make_unique<MatchesPreTokenizer>(std::move(re));
  }
  if (type == "Sequence") {
    auto it = j.find("pretokenizers");
    if (it == j.end() || !it->is_array()) {
      return FieldError(field + ".pretokenizers", "not an array");
    }
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (size_t i = 0; i < it->size(); ++i) {
      if ((*it)[i].is_null()) continue;
      ASSIGN_OR_RETURN(
          auto p,
          ParsePreTokenizer((*it)[i], absl::StrCat(field, ".pretokenizers[", i, "]"), depth + 1));
      parts.push_back(std::move(p));
    }
    return std::make_unique<SequencePreTokenizer>(std::move(parts));
  }
  return FieldError(field + ".type", absl::StrCat("'", type, "' is not supported"));
}

// ---------------------------------------------------------------------------------------------
// Decoders: a list of token strings in, a list out. ApplyOne() is the per-token part (no
// positional effect such as stripping the first space), used for TokenBytes().

struct DecTok {
  std::string text;
  bool added = false;  // an added token's content: ByteLevel leaves it as it is
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual absl::Status Apply(std::vector<DecTok>* toks) const = 0;
  virtual void ApplyOne(std::string* token) const = 0;
};

class ByteLevelDecoder final : public Decoder {
 public:
  absl::Status Apply(std::vector<DecTok>* toks) const override {
    std::vector<DecTok> out;
    std::string run;
    bool in_run = false;
    for (DecTok& t : *toks) {
      if (t.added) {
        if (in_run) out.push_back({common::SanitizeUtf8(run), false});
        run.clear();
        in_run = false;
        out.push_back(std::move(t));
      } else {
        run += ByteLevelToBytes(t.text);
        in_run = true;
      }
    }
    if (in_run) out.push_back({common::SanitizeUtf8(run), false});
    *toks = std::move(out);
    return absl::OkStatus();
  }
  void ApplyOne(std::string* token) const override { *token = ByteLevelToBytes(*token); }
};

class ByteFallbackDecoder final : public Decoder {
 public:
  absl::Status Apply(std::vector<DecTok>* toks) const override {
    std::vector<DecTok> out;
    std::string bytes;
    const auto flush = [&] {
      if (bytes.empty()) return;
      if (common::IsValidUtf8(bytes)) {
        out.push_back({bytes, false});
      } else {
        // As HF: one U+FFFD per byte of an invalid run.
        for (size_t k = 0; k < bytes.size(); ++k) {
          out.push_back({common::kReplacementCharacter, false});
        }
      }
      bytes.clear();
    };
    for (DecTok& t : *toks) {
      const int b = t.added ? -1 : ParseByteToken(t.text);
      if (b >= 0) {
        bytes.push_back(static_cast<char>(b));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    *toks = std::move(out);
    return absl::OkStatus();
  }
  void ApplyOne(std::string* token) const override {
    const int b = ParseByteToken(*token);
    if (b >= 0) *token = std::string(1, static_cast<char>(b));
  }
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(std::shared_ptr<const Regex> re, std::string content)
      : re_(std::move(re)), content_(std::move(content)) {}
  absl::Status Apply(std::vector<DecTok>* toks) const override {
    for (DecTok& t : *toks) {
      if (!common::IsValidUtf8(t.text)) continue;
      RETURN_IF_ERROR(ReplaceAll(*re_, content_, &t.text));
    }
    return absl::OkStatus();
  }
  void ApplyOne(std::string* token) const override {
    if (common::IsValidUtf8(*token)) ReplaceAll(*re_, content_, token).IgnoreError();
  }

 private:
  std::shared_ptr<const Regex> re_;
  std::string content_;
};

void ReplaceLiteral(std::string* s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  size_t prev = 0;
  for (size_t at = s->find(from); at != std::string::npos; at = s->find(from, prev)) {
    out.append(*s, prev, at - prev);
    out += to;
    prev = at + from.size();
  }
  out.append(*s, prev, std::string::npos);
  *s = std::move(out);
}

class MetaspaceDecoder final : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool strip_first)
      : replacement_(std::move(replacement)), strip_first_(strip_first) {}
  absl::Status Apply(std::vector<DecTok>* toks) const override {
    for (size_t i = 0; i < toks->size(); ++i) {
      std::string& t = (*toks)[i].text;
      ReplaceLiteral(&t, replacement_, " ");
      if (i == 0 && strip_first_ && !t.empty() && t[0] == ' ') t.erase(0, 1);
    }
    return absl::OkStatus();
  }
  void ApplyOne(std::string* token) const override { ReplaceLiteral(token, replacement_, " "); }

 private:
  std::string replacement_;
  bool strip_first_;
};

class StripDecoder final : public Decoder {
 public:
  StripDecoder(std::string content, int64_t start, int64_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  absl::Status Apply(std::vector<DecTok>* toks) const override {
    for (DecTok& t : *toks) {
      std::string& s = t.text;
      size_t b = 0, e = s.size();
      for (int64_t k = 0; k < start_ && b + content_.size() <= e; ++k) {
        if (s.compare(b, content_.size(), content_) != 0) break;
        b += content_.size();
      }
      for (int64_t k = 0; k < stop_ && e >= b + content_.size(); ++k) {
        if (s.compare(e - content_.size(), content_.size(), content_) != 0) break;
        e -= content_.size();
      }
      s = s.substr(b, e - b);
    }
    return absl::OkStatus();
  }
  void ApplyOne(std::string*) const override {}

 private:
  std::string content_;
  int64_t start_, stop_;
};

class FuseDecoder final : public Decoder {
 public:
  absl::Status Apply(std::vector<DecTok>* toks) const override {
    std::string all;
    for (const DecTok& t : *toks) all += t.text;
    toks->clear();
    toks->push_back({std::move(all), false});
    return absl::OkStatus();
  }
  void ApplyOne(std::string*) const override {}
};

class BpeSuffixDecoder final : public Decoder {
 public:
  explicit BpeSuffixDecoder(std::string suffix) : suffix_(std::move(suffix)) {}
  absl::Status Apply(std::vector<DecTok>* toks) const override {
    for (size_t i = 0; i < toks->size(); ++i) {
      ReplaceLiteral(&(*toks)[i].text, suffix_, i + 1 == toks->size() ? "" : " ");
    }
    return absl::OkStatus();
  }
  void ApplyOne(std::string* token) const override { ReplaceLiteral(token, suffix_, " "); }

 private:
  std::string suffix_;
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts)
      : parts_(std::move(parts)) {}
  absl::Status Apply(std::vector<DecTok>* toks) const override {
    for (const auto& p : parts_) RETURN_IF_ERROR(p->Apply(toks));
    return absl::OkStatus();
  }
  void ApplyOne(std::string* token) const override {
    for (const auto& p : parts_) p->ApplyOne(token);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const Json& j, const std::string& field,
                                                      int depth) {
  if (depth > kMaxNesting) return FieldError(field, "nested too deeply");
  if (!j.is_object()) return FieldError(field, "not an object");
  ASSIGN_OR_RETURN(std::string type, GetString(j, "type", field));
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Replace") {
    ASSIGN_OR_RETURN(auto re, GetPattern(j, field));
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", field));
    RETURN_IF_ERROR(CheckUtf8(content, field + ".content"));
    return std::make_unique<ReplaceDecoder>(std::move(re), std::move(content));
  }
  if (type == "Strip") {
    ASSIGN_OR_RETURN(std::string content, GetString(j, "content", field));
    RETURN_IF_ERROR(CheckUtf8(content, field + ".content"));
    if (content.empty()) return FieldError(field + ".content", "empty");
    ASSIGN_OR_RETURN(int64_t start, GetInt(j, "start", field, 0));
    ASSIGN_OR_RETURN(int64_t stop, GetInt(j, "stop", field, 0));
    if (start < 0 || stop < 0) return FieldError(field, "start/stop must not be negative");
    return std::make_unique<StripDecoder>(std::move(content), start, stop);
  }
  if (type == "Metaspace") {
    ASSIGN_OR_RETURN(std::string replacement, GetString(j, "replacement", field, "\xE2\x96\x81"));
    RETURN_IF_ERROR(CheckUtf8(replacement, field + ".replacement"));
    if (replacement.empty()) return FieldError(field + ".replacement", "empty");
    bool strip_first = true;
    if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
      ASSIGN_OR_RETURN(std::string s, GetString(j, "prepend_scheme", field));
      if (s != "always" && s != "first" && s != "never") {
        return FieldError(field + ".prepend_scheme", absl::StrCat("unknown scheme '", s, "'"));
      }
      strip_first = s != "never";
    } else {
      ASSIGN_OR_RETURN(strip_first, GetBool(j, "add_prefix_space", field, true));
    }
    return std::make_unique<MetaspaceDecoder>(std::move(replacement), strip_first);
  }
  if (type == "BPEDecoder") {
    ASSIGN_OR_RETURN(std::string suffix, GetString(j, "suffix", field, "</w>"));
    return std::make_unique<BpeSuffixDecoder>(std::move(suffix));
  }
  if (type == "Sequence") {
    auto it = j.find("decoders");
    if (it == j.end() || !it->is_array()) return FieldError(field + ".decoders", "not an array");
    std::vector<std::unique_ptr<Decoder>> parts;
    for (size_t i = 0; i < it->size(); ++i) {
      if ((*it)[i].is_null()) continue;
      ASSIGN_OR_RETURN(
          auto p, ParseDecoder((*it)[i], absl::StrCat(field, ".decoders[", i, "]"), depth + 1));
      parts.push_back(std::move(p));
    }
    return std::make_unique<SequenceDecoder>(std::move(parts));
  }
  return FieldError(field + ".type", absl::StrCat("'", type, "' is not supported"));
}

// ---------------------------------------------------------------------------------------------
// Added tokens: a byte trie for leftmost-longest matching.

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, normalized = false, single_word = false;
};

class Trie {
 public:
  void Insert(std::string_view s, int value) {
    int node = 0;
    for (unsigned char c : s) {
      auto it = nodes_[node].next.find(c);
      if (it == nodes_[node].next.end()) {
        nodes_.emplace_back();
        it = nodes_[node].next.emplace(c, static_cast<int>(nodes_.size() - 1)).first;
      }
      node = it->second;
    }
    nodes_[node].value = value;
  }
  bool empty() const { return nodes_.size() == 1; }
  // Longest match at s[pos]: (value, length) or (-1, 0).
  std::pair<int, size_t> Longest(std::string_view s, size_t pos) const {
    int node = 0;
    std::pair<int, size_t> best{-1, 0};
    for (size_t i = pos; i < s.size(); ++i) {
      auto it = nodes_[node].next.find(static_cast<unsigned char>(s[i]));
      if (it == nodes_[node].next.end()) break;
      node = it->second;
      if (nodes_[node].value >= 0) best = {nodes_[node].value, i + 1 - pos};
    }
    return best;
  }

 private:
  struct Node {
    absl::flat_hash_map<unsigned char, int> next;
    int value = -1;
  };
  std::vector<Node> nodes_ = std::vector<Node>(1);
};

struct Section {
  std::string text;
  int added = -1;  // index into added tokens, or -1
  bool at_start = false;
};

// ---------------------------------------------------------------------------------------------
// The tokenizer.

class HfTokenizer final : public Tokenizer {
 public:
  std::string kind() const override { return kind_; }
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }
  int64_t bos_id() const override { return bos_; }
  int64_t eos_id() const override { return eos_; }

  absl::StatusOr<std::vector<int64_t>> Encode(std::string_view text) const override {
    if (!common::IsValidUtf8(text)) {
      return absl::InvalidArgumentError("tokenizer: the text is not valid UTF-8");
    }
    std::vector<int64_t> ids;
    std::vector<Section> sections;
    SplitAdded(text, raw_trie_, /*at_start=*/true, &sections);
    std::vector<Section> subs;
    std::vector<Piece> pieces;
    for (Section& sec : sections) {
      if (sec.added >= 0) {
        ids.push_back(added_[sec.added].id);
        continue;
      }
      if (sec.text.empty()) continue;
      if (normalizer_ != nullptr) {
        RETURN_IF_ERROR(normalizer_->Apply(&sec.text));
        if (sec.text.empty()) continue;
      }
      subs.clear();
      SplitAdded(sec.text, normalized_trie_, sec.at_start, &subs);
      for (Section& sub : subs) {
        if (sub.added >= 0) {
          ids.push_back(added_[sub.added].id);
          continue;
        }
        if (sub.text.empty()) continue;
        pieces.clear();
        pieces.push_back({std::move(sub.text), sub.at_start});
        if (pre_tokenizer_ != nullptr) RETURN_IF_ERROR(pre_tokenizer_->Apply(&pieces));
        for (const Piece& p : pieces) TokenizeWord(p.text, &ids);
      }
    }
    return ids;
  }

  std::string TokenBytes(int64_t id) const override {
    if (id < 0 || id >= vocab_size()) return "";
    return token_bytes_[static_cast<size_t>(id)];
  }

  std::string Decode(const std::vector<int64_t>& ids) const override {
    std::vector<DecTok> toks;
    toks.reserve(ids.size());
    for (int64_t id : ids) {
      if (id < 0 || id >= vocab_size()) continue;
      const size_t i = static_cast<size_t>(id);
      if (!has_token_[i] || is_special_[i]) continue;
      toks.push_back({id_to_token_[i], is_added_[i]});
    }
    std::string text;
    if (decoder_ == nullptr) {
      for (size_t i = 0; i < toks.size(); ++i) {
        if (i > 0) text += ' ';
        text += toks[i].text;
      }
    } else {
      if (!decoder_->Apply(&toks).ok()) return Tokenizer::Decode(ids);
      for (const DecTok& t : toks) text += t.text;
    }
    return common::SanitizeUtf8(text);
  }

  // Built by the loaders below.
  std::string kind_ = "hf";
  int64_t bos_ = -1, eos_ = -1;
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<Decoder> decoder_;
  // BPE.
  absl::flat_hash_map<std::string, int32_t> vocab_;
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a, b) -> (rank, id)
  int32_t unk_id_ = -1;
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
  std::string prefix_, suffix_;  // continuing_subword_prefix, end_of_word_suffix
  int32_t byte_ids_[256];
  // Ids.
  std::vector<std::string> id_to_token_;
  std::vector<std::string> token_bytes_;
  std::vector<bool> has_token_, is_added_, is_special_;
  std::vector<AddedToken> added_;
  Trie raw_trie_, normalized_trie_;

  void Finish() {
    for (int b = 0; b < 256; ++b) {
      auto it = vocab_.find(ByteFallbackName(static_cast<unsigned char>(b)));
      byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
    }
    token_bytes_.assign(id_to_token_.size(), "");
    for (size_t i = 0; i < id_to_token_.size(); ++i) {
      if (!has_token_[i] || is_special_[i]) continue;
      if (is_added_[i]) {
        token_bytes_[i] = id_to_token_[i];
        continue;
      }
      std::string t = id_to_token_[i];
      if (decoder_ != nullptr) decoder_->ApplyOne(&t);
      token_bytes_[i] = std::move(t);
    }
  }

 private:
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  static bool IsWordChar(uint32_t cp) {
    return cp == '_' || u_hasBinaryProperty(static_cast<UChar32>(cp), UCHAR_ALPHABETIC) ||
           IsMark(cp) || u_charType(static_cast<UChar32>(cp)) == U_DECIMAL_DIGIT_NUMBER ||
           u_charType(static_cast<UChar32>(cp)) == U_CONNECTOR_PUNCTUATION;
  }

  // Splits `s` on the added tokens of `trie`, applying lstrip/rstrip/single_word.
  void SplitAdded(std::string_view s, const Trie& trie, bool at_start,
                  std::vector<Section>* out) const {
    if (trie.empty()) {
      out->push_back({std::string(s), -1, at_start});
      return;
    }
    size_t start = 0;
    size_t i = 0;
    bool strip_next = false;
    const auto push_text = [&](size_t b, size_t e, bool lstrip_after) {
      std::string_view t = s.substr(b, e - b);
      if (strip_next) {
        size_t k = 0;
        while (k < t.size()) {
          size_t n = k;
          if (!IsWhiteSpace(NextCodePoint(t, &n))) break;
          k = n;
        }
        b += k;
        t.remove_prefix(k);
      }
      if (lstrip_after) {
        while (!t.empty()) {
          size_t st = t.size() - 1;
          while (st > 0 && (static_cast<unsigned char>(t[st]) & 0xC0) == 0x80) --st;
          size_t n = st;
          if (!IsWhiteSpace(NextCodePoint(t, &n))) break;
          t.remove_suffix(t.size() - st);
        }
      }
      if (!t.empty()) out->push_back({std::string(t), -1, at_start && b == 0});
    };
    while (i < s.size()) {
      auto [value, len] = trie.Longest(s, i);
      if (value >= 0) {
        const AddedToken& tok = added_[static_cast<size_t>(value)];
        bool ok = true;
        if (tok.single_word) {
          if (i > 0) {
            size_t st = i - 1;
            while (st > 0 && (static_cast<unsigned char>(s[st]) & 0xC0) == 0x80) --st;
            size_t n = st;
            if (IsWordChar(NextCodePoint(s, &n))) ok = false;
          }
          if (i + len < s.size()) {
            size_t n = i + len;
            if (IsWordChar(NextCodePoint(s, &n))) ok = false;
          }
        }
        if (ok) {
          push_text(start, i, tok.lstrip);
          out->push_back({"", value, at_start && i == 0});
          strip_next = tok.rstrip;
          i += len;
          start = i;
          continue;
        }
      }
      NextCodePoint(s, &i);
    }
    push_text(start, s.size(), false);
  }

  // BPE on one pre-token; appends ids.
  void TokenizeWord(const std::string& word, std::vector<int64_t>* ids) const {
    if (ignore_merges_) {
      auto it = vocab_.find(word);
      if (it != vocab_.end()) {
        ids->push_back(it->second);
        return;
      }
    }
    const bool cacheable = word.size() <= kMaxCachedWordBytes;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mu_);
      auto it = cache_.find(word);
      if (it != cache_.end()) {
        ids->insert(ids->end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> result = MergeWord(word);
    ids->insert(ids->end(), result.begin(), result.end());
    if (cacheable) {
      std::lock_guard<std::mutex> lock(cache_mu_);
      if (cache_.size() < kCacheCapacity) cache_.emplace(word, std::move(result));
    }
  }

  std::vector<int32_t> MergeWord(std::string_view w) const {
    struct Symbol {
      int32_t id;
      int32_t prev, next;
      bool alive;
    };
    std::vector<Symbol> sym;
    sym.reserve(w.size());
    const auto add = [&](int32_t id) {
      const int32_t n = static_cast<int32_t>(sym.size());
      sym.push_back({id, n - 1, n + 1, true});
    };
    int32_t pending_unk = -1;  // fuse_unk: one unk for a run of unknown characters
    std::string s;
    for (size_t i = 0; i < w.size();) {
      const size_t b = i;
      NextCodePoint(w, &i);
      s.assign(w.data() + b, i - b);
      if (b > 0 && !prefix_.empty()) s.insert(0, prefix_);
      if (i == w.size() && !suffix_.empty()) s += suffix_;
      auto it = vocab_.find(s);
      if (it != vocab_.end()) {
        if (pending_unk >= 0) add(pending_unk);
        pending_unk = -1;
        add(it->second);
        continue;
      }
      if (byte_fallback_) {
        bool all = true;
        for (unsigned char c : s) all = all && byte_ids_[c] >= 0;
        if (all) {
          if (pending_unk >= 0) add(pending_unk);
          pending_unk = -1;
          for (unsigned char c : s) add(byte_ids_[c]);
          continue;
        }
      }
      if (unk_id_ >= 0) {
        if (pending_unk >= 0 && !fuse_unk_) add(pending_unk);
        pending_unk = unk_id_;
      }
      // No unk token: the character is dropped (as HF does).
    }
    if (pending_unk >= 0) add(pending_unk);
    if (sym.empty()) return {};
    sym.back().next = -1;

    struct Candidate {
      int32_t rank, pos, new_id;
      bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
    const auto consider = [&](int32_t pos) {
      const int32_t next = sym[pos].next;
      if (next < 0) return;
      auto it = merges_.find(PairKey(sym[pos].id, sym[next].id));
      if (it != merges_.end()) queue.push({it->second.first, pos, it->second.second});
    };
    for (int32_t p = 0; p + 1 < static_cast<int32_t>(sym.size()); ++p) consider(p);
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& left = sym[top.pos];
      if (!left.alive || left.next < 0) continue;
      const int32_t r = left.next;
      auto it = merges_.find(PairKey(left.id, sym[r].id));
      if (it == merges_.end() || it->second.second != top.new_id) continue;  // stale
      left.id = top.new_id;
      sym[r].alive = false;
      left.next = sym[r].next;
      if (left.next >= 0) sym[left.next].prev = top.pos;
      if (left.prev >= 0) consider(left.prev);
      consider(top.pos);
    }
    std::vector<int32_t> out;
    for (int32_t p = 0; p >= 0; p = sym[p].next) out.push_back(sym[p].id);
    return out;
  }

  mutable std::mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_;
};

// ---------------------------------------------------------------------------------------------
// Building.

absl::StatusOr<Json> ParseJson(std::string_view text, std::string_view name) {
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(name), ": not valid JSON: ", e.what()));
  }
}

absl::Status Prefixed(std::string_view name, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat(std::string(name), ": ", s.message()));
}

// Sizes the id tables once every id is known; ids must be dense enough that the tables are
// bounded by the file's own size.
absl::Status SizeTables(HfTokenizer* t, int64_t max_id, size_t entries) {
  if (max_id < 0) return FieldError("model.vocab", "empty vocabulary");
  if (static_cast<uint64_t>(max_id) >= 4 * static_cast<uint64_t>(entries) + 1024) {
    return FieldError("model.vocab",
                      absl::StrCat("id ", max_id, " is far beyond the ", entries, " entries"));
  }
  const size_t n = static_cast<size_t>(max_id) + 1;
  t->id_to_token_.assign(n, "");
  t->has_token_.assign(n, false);
  t->is_added_.assign(n, false);
  t->is_special_.assign(n, false);
  return absl::OkStatus();
}

absl::Status AddMerge(HfTokenizer* t, const std::string& a, const std::string& b, size_t rank,
                      const std::string& field) {
  auto ia = t->vocab_.find(a);
  if (ia == t->vocab_.end())
    return FieldError(field, absl::StrCat("'", a, "' is not in the vocab"));
  auto ib = t->vocab_.find(b);
  if (ib == t->vocab_.end())
    return FieldError(field, absl::StrCat("'", b, "' is not in the vocab"));
  std::string merged = a;
  if (!t->prefix_.empty() && b.compare(0, t->prefix_.size(), t->prefix_) == 0) {
    merged += b.substr(t->prefix_.size());
  } else {
    merged += b;
  }
  auto im = t->vocab_.find(merged);
  if (im == t->vocab_.end()) {
    return FieldError(field, absl::StrCat("the merged token '", merged, "' is not in the vocab"));
  }
  if (rank > static_cast<size_t>(INT32_MAX)) return FieldError(field, "too many merges");
  const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                       static_cast<uint32_t>(ib->second);
  t->merges_[key] = {static_cast<int32_t>(rank), im->second};
  return absl::OkStatus();
}

// Reads a vocab object {token: id}.
absl::Status ReadVocab(const Json& v, const std::string& field, HfTokenizer* t, int64_t* max_id) {
  if (!v.is_object()) return FieldError(field, "not an object");
  t->vocab_.reserve(v.size());
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (!it.value().is_number_integer()) {
      return FieldError(absl::StrCat(field, "[\"", it.key(), "\"]"), "not an integer id");
    }
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > INT32_MAX) {
      return FieldError(absl::StrCat(field, "[\"", it.key(), "\"]"),
                        absl::StrCat("id ", id, " is out of range"));
    }
    RETURN_IF_ERROR(CheckUtf8(it.key(), field));
    t->vocab_[it.key()] = static_cast<int32_t>(id);
    *max_id = std::max(*max_id, id);
  }
  return absl::OkStatus();
}

absl::Status FillVocabTables(HfTokenizer* t) {
  for (const auto& [tok, id] : t->vocab_) {
    t->id_to_token_[static_cast<size_t>(id)] = tok;
    t->has_token_[static_cast<size_t>(id)] = true;
  }
  return absl::OkStatus();
}

absl::Status ReadAddedTokens(const Json& root, HfTokenizer* t, int64_t* max_id) {
  auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_array()) return FieldError("added_tokens", "not an array");
  for (size_t i = 0; i < it->size(); ++i) {
    const std::string f = absl::StrCat("added_tokens[", i, "]");
    const Json& a = (*it)[i];
    if (!a.is_object()) return FieldError(f, "not an object");
    AddedToken tok;
    ASSIGN_OR_RETURN(int64_t id, GetInt(a, "id", f, -1));
    if (id < 0 || id > INT32_MAX) return FieldError(f + ".id", "missing or out of range");
    tok.id = static_cast<int32_t>(id);
    ASSIGN_OR_RETURN(tok.content, GetString(a, "content", f));
    RETURN_IF_ERROR(CheckUtf8(tok.content, f + ".content"));
    if (tok.content.empty()) return FieldError(f + ".content", "empty");
    ASSIGN_OR_RETURN(tok.special, GetBool(a, "special", f, false));
    ASSIGN_OR_RETURN(tok.lstrip, GetBool(a, "lstrip", f, false));
    ASSIGN_OR_RETURN(tok.rstrip, GetBool(a, "rstrip", f, false));
    ASSIGN_OR_RETURN(tok.single_word, GetBool(a, "single_word", f, false));
    ASSIGN_OR_RETURN(tok.normalized, GetBool(a, "normalized", f, !tok.special));
    *max_id = std::max(*max_id, id);
    t->added_.push_back(std::move(tok));
  }
  return absl::OkStatus();
}

absl::Status FinishAddedTokens(HfTokenizer* t) {
  for (size_t i = 0; i < t->added_.size(); ++i) {
    const AddedToken& tok = t->added_[i];
    const size_t id = static_cast<size_t>(tok.id);
    t->id_to_token_[id] = tok.content;
    t->has_token_[id] = true;
    t->is_added_[id] = true;
    t->is_special_[id] = tok.special;
    if (tok.normalized && t->normalizer_ != nullptr) {
      std::string n = tok.content;
      RETURN_IF_ERROR(t->normalizer_->Apply(&n));
      if (!n.empty()) t->normalized_trie_.Insert(n, static_cast<int>(i));
    } else {
      t->raw_trie_.Insert(tok.content, static_cast<int>(i));
    }
  }
  return absl::OkStatus();
}

// The id of a special-token name (an added token first, then the vocab), or -1.
int64_t FindToken(const HfTokenizer& t, const std::string& name) {
  for (const AddedToken& a : t.added_) {
    if (a.content == name) return a.id;
  }
  auto it = t.vocab_.find(name);
  return it == t.vocab_.end() ? -1 : it->second;
}

absl::Status SetBosEos(HfTokenizer* t, std::string_view config_json, std::string_view config_name) {
  std::optional<std::string> bos, eos;
  if (!config_json.empty()) {
    ASSIGN_OR_RETURN(Json c, ParseJson(config_json, config_name));
    if (!c.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(config_name), ": not a JSON object"));
    }
    for (const char* key : {"bos_token", "eos_token"}) {
      auto it = c.find(key);
      if (it == c.end() || it->is_null()) continue;
      std::string name;
      if (it->is_string()) {
        name = it->get<std::string>();
      } else if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
        name = (*it)["content"].get<std::string>();
      } else {
        return absl::InvalidArgumentError(absl::StrCat(std::string(config_name), ": ", key,
                                                       ": not a string or {\"content\": string}"));
      }
      (std::string(key) == "bos_token" ? bos : eos) = name;
    }
  }
  if (bos) {
    t->bos_ = FindToken(*t, *bos);
  } else {
    for (const char* name : {"<s>", "<|begin_of_text|>", "<|endoftext|>"}) {
      if ((t->bos_ = FindToken(*t, name)) >= 0) break;
    }
  }
  if (eos) {
    t->eos_ = FindToken(*t, *eos);
  } else {
    for (const char* name : {"<|endoftext|>", "</s>", "<|end_of_text|>"}) {
      if ((t->eos_ = FindToken(*t, name)) >= 0) break;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Tokenizer>> BuildFromJson(const Json& root) {
  if (!root.is_object()) return FieldError("(root)", "not a JSON object");
  auto t = std::make_unique<HfTokenizer>();
  auto model_it = root.find("model");
  if (model_it == root.end() || !model_it->is_object()) return FieldError("model", "missing");
  const Json& model = *model_it;
  if (model.contains("type")) {
    ASSIGN_OR_RETURN(std::string type, GetString(model, "type", "model"));
    if (type != "BPE") {
      return FieldError("model.type", absl::StrCat("'", type, "' is not supported (only BPE)"));
    }
  }
  ASSIGN_OR_RETURN(t->byte_fallback_, GetBool(model, "byte_fallback", "model", false));
  ASSIGN_OR_RETURN(t->fuse_unk_, GetBool(model, "fuse_unk", "model", false));
  ASSIGN_OR_RETURN(t->ignore_merges_, GetBool(model, "ignore_merges", "model", false));
  ASSIGN_OR_RETURN(t->prefix_, GetString(model, "continuing_subword_prefix", "model", ""));
  ASSIGN_OR_RETURN(t->suffix_, GetString(model, "end_of_word_suffix", "model", ""));
  if (model.contains("dropout") && !model["dropout"].is_null()) {
    if (!model["dropout"].is_number()) return FieldError("model.dropout", "not a number");
    if (model["dropout"].get<double>() != 0.0) {
      return FieldError("model.dropout", "BPE dropout is not supported");
    }
  }
  auto vocab_it = model.find("vocab");
  if (vocab_it == model.end()) return FieldError("model.vocab", "missing");
  int64_t max_id = -1;
  RETURN_IF_ERROR(ReadVocab(*vocab_it, "model.vocab", t.get(), &max_id));
  RETURN_IF_ERROR(ReadAddedTokens(root, t.get(), &max_id));
  RETURN_IF_ERROR(SizeTables(t.get(), max_id, t->vocab_.size() + t->added_.size()));
  RETURN_IF_ERROR(FillVocabTables(t.get()));
  if (model.contains("unk_token") && !model["unk_token"].is_null()) {
    ASSIGN_OR_RETURN(std::string unk, GetString(model, "unk_token", "model"));
    auto it = t->vocab_.find(unk);
    if (it == t->vocab_.end()) {
      return FieldError("model.unk_token", absl::StrCat("'", unk, "' is not in the vocab"));
    }
    t->unk_id_ = it->second;
  }
  auto merges_it = model.find("merges");
  if (merges_it != model.end() && !merges_it->is_null()) {
    if (!merges_it->is_array()) return FieldError("model.merges", "not an array");
    t->merges_.reserve(merges_it->size());
    for (size_t i = 0; i < merges_it->size(); ++i) {
      const Json& m = (*merges_it)[i];
      const std::string f = absl::StrCat("model.merges[", i, "]");
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
          return FieldError(f, "not two tokens separated by one space");
        }
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        return FieldError(f, "neither \"a b\" nor [a, b]");
      }
      RETURN_IF_ERROR(AddMerge(t.get(), a, b, i, f));
    }
  }
  const auto section = [&](const char* key) -> const Json* {
    auto it = root.find(key);
    return it == root.end() || it->is_null() ? nullptr : &*it;
  };
  if (const Json* n = section("normalizer")) {
    ASSIGN_OR_RETURN(t->normalizer_, ParseNormalizer(*n, "normalizer", 0));
  }
  if (const Json* p = section("pre_tokenizer")) {
    ASSIGN_OR_RETURN(t->pre_tokenizer_, ParsePreTokenizer(*p, "pre_tokenizer", 0));
  }
  if (const Json* d = section("decoder")) {
    ASSIGN_OR_RETURN(t->decoder_, ParseDecoder(*d, "decoder", 0));
  }
  RETURN_IF_ERROR(FinishAddedTokens(t.get()));
  t->Finish();
  return std::unique_ptr<HfTokenizer>(std::move(t));
}

HfTokenizer* AsHf(Tokenizer* t) { return static_cast<HfTokenizer*>(t); }

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseHfTokenizerJson(std::string_view json,
                                                                std::string_view name,
                                                                std::string_view config_json,
                                                                std::string_view config_name) {
  try {
    ASSIGN_OR_RETURN(Json root, ParseJson(json, name));
    auto tok = BuildFromJson(root);
    if (!tok.ok()) return Prefixed(name, tok.status());
    RETURN_IF_ERROR(SetBosEos(AsHf(tok->get()), config_json,
                              config_name.empty() ? "tokenizer_config.json" : config_name));
    return tok;
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(name), ": ", e.what()));
  }
}

namespace {

absl::StatusOr<std::string> ReadConfigNextTo(const std::string& path, std::string* config_path) {
  *config_path = DirName(path) + "/tokenizer_config.json";
  if (!Exists(*config_path)) return std::string();
  return ReadFile(*config_path);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizerJson(const std::string& path) {
  ASSIGN_OR_RETURN(std::string json, ReadFile(path));
  std::string config_path;
  ASSIGN_OR_RETURN(std::string config, ReadConfigNextTo(path, &config_path));
  return ParseHfTokenizerJson(json, path, config, config_path);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadGpt2Tokenizer(const std::string& vocab_path,
                                                             const std::string& merges_path) {
  ASSIGN_OR_RETURN(std::string vocab_text, ReadFile(vocab_path));
  ASSIGN_OR_RETURN(std::string merges_text, ReadFile(merges_path));
  std::string config_path;
  ASSIGN_OR_RETURN(std::string config, ReadConfigNextTo(vocab_path, &config_path));
  try {
    ASSIGN_OR_RETURN(Json vocab, ParseJson(vocab_text, vocab_path));
    auto t = std::make_unique<HfTokenizer>();
    t->kind_ = "gpt2";
    int64_t max_id = -1;
    if (absl::Status s = ReadVocab(vocab, "(root)", t.get(), &max_id); !s.ok()) {
      return Prefixed(vocab_path, s);
    }
    if (auto it = t->vocab_.find("<|endoftext|>"); it != t->vocab_.end()) {
      AddedToken eot;
      eot.content = "<|endoftext|>";
      eot.id = it->second;
      eot.special = true;
      t->added_.push_back(eot);
    }
    if (absl::Status s = SizeTables(t.get(), max_id, t->vocab_.size()); !s.ok()) {
      return Prefixed(vocab_path, s);
    }
    RETURN_IF_ERROR(FillVocabTables(t.get()));
    size_t rank = 0, line_no = 0;
    for (size_t pos = 0; pos < merges_text.size();) {
      size_t end = merges_text.find('\n', pos);
      if (end == std::string::npos) end = merges_text.size();
      std::string line = merges_text.substr(pos, end - pos);
      pos = end + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
      const std::string f = absl::StrCat("line ", line_no);
      const size_t sp = line.find(' ');
      if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos) {
        return Prefixed(merges_path, FieldError(f, "not two tokens separated by one space"));
      }
      if (absl::Status s = AddMerge(t.get(), line.substr(0, sp), line.substr(sp + 1), rank++, f);
          !s.ok()) {
        return Prefixed(merges_path, s);
      }
    }
    ASSIGN_OR_RETURN(auto re, Regex::Compile(kGpt2Pattern, false));
    t->pre_tokenizer_ = std::make_unique<ByteLevelPreTokenizer>(false, std::move(re));
    t->decoder_ = std::make_unique<ByteLevelDecoder>();
    RETURN_IF_ERROR(FinishAddedTokens(t.get()));
    t->Finish();
    RETURN_IF_ERROR(SetBosEos(t.get(), config, config_path));
    return std::unique_ptr<Tokenizer>(std::move(t));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(vocab_path, ": ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadHfTokenizerDir(const std::string& dir) {
  const std::string json = dir + "/tokenizer.json";
  if (Exists(json)) return LoadHfTokenizerJson(json);
  const std::string vocab = dir + "/vocab.json", merges = dir + "/merges.txt";
  if (Exists(vocab) || Exists(merges)) {
    if (!Exists(vocab))
      return absl::InvalidArgumentError(absl::StrCat(vocab, ": missing (", merges, " is present)"));
    if (!Exists(merges))
      return absl::InvalidArgumentError(absl::StrCat(merges, ": missing (", vocab, " is present)"));
    return LoadGpt2Tokenizer(vocab, merges);
  }
  return absl::NotFoundError(
      absl::StrCat(dir, ": no tokenizer.json and no vocab.json + merges.txt"));
}

}  // namespace retnet::model
