// File: engine/stop_matcher.h
//
// Turns a stream of token bytes into text deltas that are safe to show: stop strings are matched
// on the detokenized text (across token boundaries), a partial stop string is never emitted, and
// every returned string is valid UTF-8: an incomplete sequence is held back until the character
// is complete, and ill-formed bytes become U+FFFD (common/utf8.h). Stop strings are matched on
// that repaired text, as HF and vLLM match them on decoded text.
//
// Plain value type, used by one generation at a time (the engine thread); not thread-safe.
#ifndef RETNET_ENGINE_STOP_MATCHER_H_
#define RETNET_ENGINE_STOP_MATCHER_H_

#include <string>
#include <vector>

#include "common/utf8.h"

namespace retnet::engine {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stop_strings);

  // Appends the bytes of one token. Returns the text that became safe to emit (possibly empty).
  // After a stop string is found, stopped() is true and the returned text ends right before it.
  std::string Append(const std::string& bytes);
  // Everything still held back (at the end of a generation that did not stop on a string); an
  // unfinished UTF-8 sequence becomes U+FFFD.
  std::string Flush();

  bool stopped() const { return stopped_; }
  const std::string& matched_stop() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  size_t max_stop_ = 0;
  common::Utf8Sanitizer utf8_;  // token bytes -> valid UTF-8
  std::string text_;            // all (repaired) text so far
  size_t emitted_ = 0;  // prefix of text_ already returned
  bool stopped_ = false;
  std::string matched_;
};

}  // namespace retnet::engine

#endif  // RETNET_ENGINE_STOP_MATCHER_H_
