// File: common/transcript.h
//
// A session's transcript: the text it has absorbed (its prompts' text and its replies' text as
// streamed), kept as a byte length and a 64-bit FNV-1a digest rather than the text itself. A
// client that holds a conversation as text checks that its next text starts with what the
// session holds (same length prefix, same digest) and sends only the rest; the OpenAI chat front
// does so on whichever replica a request lands. FNV-1a is not a cryptographic hash: a caller who
// forges a collision only confuses its own session.
//
// Threading: a plain value type.
#ifndef RETNET_COMMON_TRANSCRIPT_H_
#define RETNET_COMMON_TRANSCRIPT_H_

#include <cstdint>
#include <string_view>

#include "common/strings.h"

namespace retnet::common {

struct Transcript {
  int64_t length = 0;              // bytes
  uint64_t digest = kFnv1aOffset;  // FNV-1a 64 of those bytes (the offset basis when empty)

  static Transcript Of(std::string_view text) {
    Transcript t;
    t.Append(text);
    return t;
  }
  void Append(std::string_view text) {
    length += static_cast<int64_t>(text.size());
    digest = Fnv1a(text, digest);
  }
  // Whether `text` starts with the text this transcript stands for.
  bool IsPrefixOf(std::string_view text) const {
    return length <= static_cast<int64_t>(text.size()) &&
           Fnv1a(text.substr(0, static_cast<size_t>(length))) == digest;
  }
  bool operator==(const Transcript& o) const { return length == o.length && digest == o.digest; }
  bool operator!=(const Transcript& o) const { return !(*this == o); }
};

}  // namespace retnet::common

#endif  // RETNET_COMMON_TRANSCRIPT_H_
