// Internal to engine/: the session and request records shared by engine.cc and scheduler.cc.
#ifndef RETNET_ENGINE_ENGINE_INTERNAL_H_
#define RETNET_ENGINE_ENGINE_INTERNAL_H_

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "engine/engine.h"
#include "engine/sampling.h"
#include "engine/snapshot.h"
#include "engine/stop_matcher.h"
#include "model/retnet.h"

namespace retnet::engine {

struct Engine::Pool {
  at::Tensor state;
  // Engine thread: the pinned host buffer a snapshot of a device-resident session is copied into
  // (CUDA only; one session's state, allocated on first use and reused).
  at::Tensor staging;
};

// A control operation queued for the engine thread; the caller waits on `done`.
struct Engine::Command {
  const char* what = "";
  std::function<void()> fn;
  absl::Status status;  // OK when fn ran to the end
  absl::Notification done;
};

// What a snapshot takes from a session on the engine thread; the caller encodes it.
struct Engine::Captured {
  SnapshotData data;   // everything but the state when `spilled` is set
  at::Tensor spilled;  // the host copy of a spilled session (immutable): the caller reads it
};

// Guarded by Engine::mu_. Only the engine thread writes `slot`, `host_state` and `position`
// (and the state behind them), so it reads them without the lock.
struct Engine::Session {
  std::string id;
  int64_t slot = -1;               // device slot, or -1 when spilled
  at::Tensor host_state;           // [L, 1, H, d_k, d_v] on the CPU while spilled
  int64_t position = 0;            // tokens absorbed into the state
  std::optional<int64_t> pending;  // produced but not yet absorbed (first input of the next turn)
  uint64_t seed = 0;               // sampler RNG: (seed, counter)
  uint64_t counter = 0;
  std::vector<int64_t> history;  // the whole conversation (for penalties and snapshots)
  // The text absorbed (GenerateRequest::transcript_text and the replies); unset when unknown.
  std::optional<common::Transcript> transcript = common::Transcript{};
  bool busy = false;  // a generation is queued or running
  // Made by Submit (GenerateRequest.new_session) and not admitted yet: its state is all zeros
  // and has no storage, on the device or the host.
  bool unallocated = false;
  bool broken = false;  // an internal error left the state inconsistent: only Delete works
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
  // GenerateRequest::prefill_only: the prompt's last token, withheld from to_prefill; it becomes
  // the session's pending token once the rest is in the state.
  std::optional<int64_t> held;
  bool held_in_history = false;  // `held` is the session's old pending token (already recorded)
  size_t prefilled = 0;
  at::Tensor logits;  // [1, V] after the prompt, until the first token is sampled
  std::vector<int64_t> output;
  // The session's transcript with this turn's prompt and the reply so far; unset when unknown.
  std::optional<common::Transcript> transcript;
  StopMatcher matcher;
  FinishReason finish_reason = FinishReason::kLength;  // set by Deliver when it ends the request
};

}  // namespace retnet::engine

#endif  // RETNET_ENGINE_ENGINE_INTERNAL_H_
