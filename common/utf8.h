// File: common/utf8.h
//
// UTF-8 validation and repair for every string that crosses the wire. proto3 `string` fields
// must hold valid UTF-8 (strict parsers reject the whole message otherwise), but token bytes
// do not: a byte-level token can be half a character, and a turn can end inside one.
//
//  - IsValidUtf8(): the exact rule protobuf applies (Unicode Table 3-7: no overlongs, no
//    surrogates, nothing above U+10FFFF).
//  - Utf8Sanitizer: a streaming repair. Append() returns the longest valid text it can release:
//    an incomplete sequence at the end is held back for the next call, and every ill-formed
//    sequence becomes U+FFFD, one per maximal subpart (the Unicode "best practice" that Rust's
//    from_utf8_lossy, and so HF's tokenizers and vLLM's detokenizer, follow). Finish() releases
//    what is held back (an unfinished sequence becomes one U+FFFD).
//
// Pure functions and a plain value type; not thread-safe per instance.
#ifndef RETNET_COMMON_UTF8_H_
#define RETNET_COMMON_UTF8_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace retnet::common {

inline constexpr char kReplacementCharacter[] = "\xEF\xBF\xBD";  // U+FFFD

namespace utf8_internal {

enum class Step { kValid, kInvalid, kIncomplete };

// Examines the sequence starting at s[i]. kValid: *len is the character's length. kInvalid: *len
// is the length of the maximal subpart to replace (>= 1). kIncomplete: the input ends inside a
// sequence that is valid so far.
inline Step Examine(std::string_view s, size_t i, size_t* len) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  if (c < 0x80) {
    *len = 1;
    return Step::kValid;
  }
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    need = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 3;
    if (c == 0xE0) lo = 0xA0;  // no overlongs
    if (c == 0xED) hi = 0x9F;  // no surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 4;
    if (c == 0xF0) lo = 0x90;  // no overlongs
    if (c == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    *len = 1;  // a continuation byte, C0/C1 or F5..FF
    return Step::kInvalid;
  }
  for (size_t k = 1; k < need; ++k) {
    if (i + k >= s.size()) return Step::kIncomplete;
    const unsigned char b = byte(i + k);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) {
      *len = k;
      return Step::kInvalid;
    }
  }
  *len = need;
  return Step::kValid;
}

}  // namespace utf8_internal

inline bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    // Fast path over ASCII.
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    if (utf8_internal::Examine(s, i, &len) != utf8_internal::Step::kValid) return false;
    i += len;
  }
  return true;
}

class Utf8Sanitizer {
 public:
  // The valid text that `bytes` (after what was held back) releases.
  std::string Append(std::string_view bytes) {
    std::string in = std::move(held_);
    held_.clear();
    in.append(bytes.data(), bytes.size());
    std::string out;
    out.reserve(in.size());
    size_t i = 0;
    while (i < in.size()) {
      size_t len = 0;
      switch (utf8_internal::Examine(in, i, &len)) {
        case utf8_internal::Step::kValid:
          out.append(in, i, len);
          i += len;
          break;
        case utf8_internal::Step::kInvalid:
          out += kReplacementCharacter;
          i += len;
          break;
        case utf8_internal::Step::kIncomplete:
          held_ = in.substr(i);
          return out;
      }
    }
    return out;
  }
  // Releases what is held back: an unfinished sequence becomes one U+FFFD.
  std::string Finish() {
    const bool had = !held_.empty();
    held_.clear();
    return had ? kReplacementCharacter : "";
  }
  // Bytes held back (0 to 3).
  size_t held() const { return held_.size(); }

 private:
  std::string held_;
};

// The whole of `bytes`, repaired.
inline std::string SanitizeUtf8(std::string_view bytes) {
  Utf8Sanitizer s;
  std::string out = s.Append(bytes);
  out += s.Finish();
  return out;
}

// Appends code point `cp` (at most U+10FFFF, not a surrogate: the caller's to check) as UTF-8.
inline void AppendUtf8(std::string* out, uint32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

}  // namespace retnet::common

#endif  // RETNET_COMMON_UTF8_H_
