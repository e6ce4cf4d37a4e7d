// File: engine/stop_matcher.h
//
// Turns a stream of token bytes into text deltas that are safe to show: stop strings are matched
// on the detokenized text (across token boundaries), a partial stop string is never emitted, and
// incomplete UTF-8 sequences are held back until the character is complete.
//
// Plain value type, used by one generation at a time (the engine thread); not thread-safe.
#ifndef RETNET_ENGINE_STOP_MATCHER_H_
#define RETNET_ENGINE_STOP_MATCHER_H_

#include <string>
#include <vector>

namespace retnet::engine {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stop_strings);

  // Appends the bytes of one token. Returns the text that became safe to emit (possibly empty).
  // After a stop string is found, stopped() is true and the returned text ends right before it.
  std::string Append(const std::string& bytes);
  // Everything still held back (at the end of a generation that did not stop on a string).
  std::string Flush();

  bool stopped() const { return stopped_; }
  const std::string& matched_stop() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  size_t max_stop_ = 0;
  std::string text_;    // all bytes so far
  size_t emitted_ = 0;  // prefix of text_ already returned
  bool stopped_ = false;
  std::string matched_;
};

}  // namespace retnet::engine

#endif  // RETNET_ENGINE_STOP_MATCHER_H_
