#include "engine/stop_matcher.h"

#include <algorithm>


namespace retnet::engine {

StopMatcher::StopMatcher(std::vector<std::string> stop_strings) : stops_(std::move(stop_strings)) {
  for (const auto& s : stops_) max_stop_ = std::max(max_stop_, s.size());
}

std::string StopMatcher::Append(const std::string& bytes) {
  if (stopped_) return "";
  const size_t before = text_.size();
  text_ += utf8_.Append(bytes);
  // A stop string can only end inside the new text, so search from max_stop_ before it.
  const size_t from = before >= max_stop_ ? before - max_stop_ + 1 : 0;
  size_t best = std::string::npos;
  for (const auto& s : stops_) {
    const size_t at = text_.find(s, std::max(from, emitted_));
    if (at != std::string::npos && at < best) {
      best = at;
      matched_ = s;
    }
  }
  if (best != std::string::npos) {
    stopped_ = true;
    std::string out = text_.substr(emitted_, best - emitted_);
    emitted_ = best;
    return out;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const auto& s : stops_) {
    for (size_t n = std::min(s.size() - 1, text_.size() - emitted_); n > hold; --n) {
      if (text_.compare(text_.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
    }
  }
  // text_ is valid UTF-8 and a held suffix starts where a (valid UTF-8) stop string starts, so
  // the cut is on a character boundary.
  const size_t end = text_.size() - hold;
  std::string out = text_.substr(emitted_, end - emitted_);
  emitted_ = end;
  return out;
}

std::string StopMatcher::Flush() {
  if (stopped_) return "";
  text_ += utf8_.Finish();
  std::string out = text_.substr(emitted_);
  emitted_ = text_.size();
  return out;
}

}  // namespace retnet::engine
