// Internal to engine/: the session and request records shared by engine.cc and scheduler.cc.
#ifndef RETNET_ENGINE_ENGINE_INTERNAL_H_
#define RETNET_ENGINE_ENGINE_INTERNAL_H_

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/sampling.h"
#include "engine/stop_matcher.h"
#include "model/retnet.h"

namespace retnet::engine {

struct Engine::Pool {
  at::Tensor state;
};

// Guarded by Engine::mu_, except that the engine thread reads `slot` and `position` of a busy
// session without it (only the engine thread changes them while the session is busy).
struct Engine::Session {
  std::string id;
  int64_t slot = -1;               // device slot, or -1 when spilled
  at::Tensor host_state;           // [L, 1, H, d_k, d_v] on the CPU while spilled
  int64_t position = 0;            // tokens absorbed into the state
  std::optional<int64_t> pending;  // produced but not yet absorbed (first input of the next turn)
  uint64_t seed = 0;               // sampler RNG: (seed, counter)
  uint64_t counter = 0;
  std::vector<int64_t> history;  // the whole conversation (for penalties and snapshots)
  bool busy = false;             // a generation is queued or running
  bool broken = false;           // an internal error left the state inconsistent: only Delete works
  absl::Time created, last_used;
};

// Owned by the queue, then by the engine thread.
struct Engine::Request {
  explicit Request(std::vector<std::string> stops) : matcher(std::move(stops)) {}
  GenerateRequest req;
  std::shared_ptr<TokenSink> sink;
  std::shared_ptr<Generation> generation;
  Session* session = nullptr;  // busy, so never deleted while referenced
  int64_t prompt_tokens = 0;
  std::vector<int64_t> to_prefill;  // pending token (if any) + the new prompt
  bool pending_in_front = false;
  size_t prefilled = 0;
  at::Tensor logits;  // [1, V] after the prompt, until the first token is sampled
  std::vector<int64_t> output;
  StopMatcher matcher;
  FinishReason finish_reason = FinishReason::kLength;  // set by Deliver when it ends the request
};

}  // namespace retnet::engine

#endif  // RETNET_ENGINE_ENGINE_INTERNAL_H_
