// File: common/strings.h
//
// Small string helpers every layer shares: FNV-1a hashing, random hex ids, and the first line of
// an exception's message.
//
// Threading: pure functions (RandomHexId reads std::random_device, which is thread-safe per call).
#ifndef RETNET_COMMON_STRINGS_H_
#define RETNET_COMMON_STRINGS_H_

#include <cstdint>
#include <random>
#include <string>
#include <string_view>

namespace retnet::common {

inline constexpr uint64_t kFnv1aOffset = 14695981039346656037ull;

// 64-bit FNV-1a of `bytes`, continuing from `hash` (chain calls to hash several pieces).
inline uint64_t Fnv1a(std::string_view bytes, uint64_t hash = kFnv1aOffset) {
  for (unsigned char c : bytes) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return hash;
}

// `prefix` followed by `digits` random lowercase hex digits, e.g. RandomHexId("s-") = "s-3f09...".
inline std::string RandomHexId(std::string_view prefix, int digits = 16) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::random_device rd;
  std::string id(prefix);
  for (int i = 0; i < digits; ++i) id.push_back(kHex[rd() % 16]);
  return id;
}

// The first line of `text`: c10::Error::what() appends a C++ backtrace after the message.
inline std::string FirstLine(std::string_view text) {
  return std::string(text.substr(0, text.find('\n')));
}

}  // namespace retnet::common

#endif  // RETNET_COMMON_STRINGS_H_
