// File: engine/engine.h
//
// The serving engine: sessions whose recurrent state stays on the model's device between
// requests, advanced together by batched recurrent steps. It knows the model API and nothing of
// gRPC; the server drives it through this narrow interface.
//
// Sessions and state
//   A state pool [layers, slots, H, d_k, d_v] fp32 is allocated once on the device (capacity from
//   EngineOptions). Idle sessions spill to host memory, least recently used first, when a slot is
//   needed, and come back on use; the host holds at most `max_host_sessions`. A session keeps its
//   slot while it is resident: one step advances the slots of every decoding session in place
//   (RetNet::Step with per-row slots), so sessions joining or leaving the batch copy no state.
//   Idle sessions expire after `session_ttl`.
//
// One owner: only the engine thread touches the state pool. Create, fork, delete, snapshot,
// restore and expiry are commands the engine thread runs between two iterations (the caller
// waits for its own command; when the engine was created paused and not yet started, the caller
// runs it itself). A snapshot is a device-to-host copy on the engine thread; its encoding and
// checksum run on the caller's thread, as does decoding a snapshot to restore. Spilling and
// reloading happen on the engine thread too. The engine lock (session metadata) is held for
// bookkeeping only, never across a tensor copy or a model call.
//
// What a session's state contains (the conversation): every prompt token and every token the
// model produced, including the EOS / stop token / the tokens of a matched stop string, and
// including tokens produced but not yet delivered when a generation is cancelled or hits its
// deadline. The last produced token is absorbed lazily (it becomes the first input of the next
// turn), so `position` counts absorbed tokens and `pending_token` is the one still to absorb.
// A follow-up turn prefills only its new tokens onto the state.
//
// Scheduling (one engine thread per device; see scheduler.cc)
//   Each iteration runs the queued control commands, admits queued requests (a new session of a
//   one-shot request waits in the queue while every slot holds a busy session), spends at most
//   `prefill_token_budget` prompt tokens on chunkwise prefill (long prompts continue next
//   iteration, so decoding sessions keep a bounded inter-token latency), runs one batched recurrent
//   step for every decoding session, samples on the device and pushes the tokens to each request's
//   sink. Only the sampled ids (and requested log probabilities) are copied to the host.
//
// engine.h includes no torch header (the model and the pool are forward-declared), so the gRPC
// layer compiles without ATen.
//
// Threading: all public methods are thread-safe. Submit(), GetSession(), ListSessions(), Stats()
// and WaitIdle() never wait for the engine loop. The control operations (create, delete, fork,
// snapshot, restore, expiry) wait for the loop to run them: at most one iteration (one prefill
// budget and one step) plus the commands queued before them; they return UNAVAILABLE once the
// engine is shutting down. Called from a sink (the engine thread itself) they run at once.
// Sinks are called on the engine thread and must not block.
#ifndef RETNET_ENGINE_ENGINE_H_
#define RETNET_ENGINE_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/transcript.h"
#include "engine/sampling_params.h"
#include "model/tokenizer.h"

namespace at {
class Tensor;
}  // namespace at
namespace retnet::model {
class RetNet;
}  // namespace retnet::model

namespace retnet::engine {

struct SampleResult;

struct EngineOptions {
  // Device slots: `max_sessions`, or, when `state_memory_bytes` > 0, as many as fit in it.
  int64_t max_sessions = 64;
  int64_t state_memory_bytes = 0;
  // Idle sessions kept in host memory once the device slots are full (0 = no spilling).
  int64_t max_host_sessions = 1024;
  absl::Duration session_ttl = absl::Minutes(30);
  // Prompt tokens prefilled per engine iteration (across requests), and the chunk size.
  int64_t prefill_token_budget = 512;
  int64_t prefill_chunk_size = 64;
  // Requests waiting for admission; more are refused with RESOURCE_EXHAUSTED.
  int64_t max_queued_requests = 256;
  int64_t max_prompt_tokens = 32768;
  int64_t max_new_tokens_limit = 4096;
  // Create() does not start the engine thread; Start() does (warm-up first, or tests).
  bool start_paused = false;
  // Intra-op (OpenMP) threads of the engine thread's tensor work; 0 = LibTorch's default, which
  // counts physical cores and may be fewer than the CPUs the process may use.
  int intra_op_threads = 0;
};

enum class FinishReason { kLength, kStop, kEos, kCancelled, kDeadline, kError };
const char* FinishReasonName(FinishReason r);

struct TokenEvent {
  int64_t token = -1;
  // Newly safe text, always valid UTF-8 (may be empty: held back for an unfinished character or a
  // partial stop string).
  std::string text;
  std::string bytes;         // the token's exact bytes (empty for special tokens)
  bool has_logprob = false;  // the request asked for log probabilities
  float logprob = 0;
  std::vector<std::pair<int64_t, float>> top_logprobs;
};

struct Finish {
  FinishReason reason = FinishReason::kLength;
  absl::Status status;      // OK unless kError (or a request refused at admission)
  std::string text;         // trailing text released at the end (valid UTF-8)
  std::string stop_string;  // the matched stop string, for kStop by string
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  int64_t position = 0;  // the session's absorbed-token count afterwards
  // The session's transcript afterwards (GenerateRequest::transcript_text); unset when unknown.
  std::optional<common::Transcript> transcript;
};

// Receives one generation's output on the engine thread. Implementations must not block.
class TokenSink {
 public:
  virtual ~TokenSink() = default;
  virtual void OnToken(TokenEvent event) = 0;
  virtual void OnFinish(Finish finish) = 0;  // exactly once, last
};

struct GenerateRequest {
  std::string session_id;
  std::vector<int64_t> prompt;  // new tokens for this turn (may be empty on a continuing turn)
  SamplingParams sampling;
  std::optional<absl::Time> deadline;
  // Create `session_id` as a new, empty session (ALREADY_EXISTS if taken). It costs nothing until
  // admitted, then takes a device slot; while every slot is busy it waits in the queue.
  bool new_session = false;
  // Delete the session when this generation ends, before the sink's OnFinish (a one-shot request
  // that named no session: it leaves nothing behind, whatever way it ends).
  bool delete_session_at_end = false;
  // Absorb the prompt and generate nothing: every token but the last enters the state and the
  // last one stays pending, so that the next turn (or each fork of the session) samples its own
  // first token from it. The sink gets no token and one Finish (kLength, 0 completion tokens).
  bool prefill_only = false;
  // Run only when the session's transcript is this one (ABORTED otherwise, naming both): a
  // client that checked its text against the transcript knows the turn continues that text.
  std::optional<common::Transcript> expect_transcript = std::nullopt;
  // What this turn's prompt adds to the session's transcript; its reply's text (every
  // TokenEvent::text and Finish::text) follows. Unset: the transcript becomes unknown (a prompt of
  // token ids that stand for no text). A turn that does not end normally (cancelled, deadline,
  // error) after touching the state also leaves it unknown; one refused before that leaves it.
  std::optional<std::string> transcript_text = std::nullopt;
};

// A submitted generation; Cancel() is safe from any thread at any time.
class Generation {
 public:
  void Cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

 private:
  std::atomic<bool> cancelled_{false};
};

struct SessionInfo {
  std::string id;
  int64_t position = 0;
  std::optional<int64_t> pending_token;
  bool resident = false;  // on the device (else spilled to host)
  bool generating = false;
  absl::Time created, last_used;
  std::optional<common::Transcript> transcript;  // unset when unknown
};

struct PoolStats {
  int64_t device_slots = 0;
  int64_t free_slots = 0;
  int64_t decoding = 0;
  int64_t sessions = 0;
  int64_t spilled = 0;
  int64_t host_capacity = 0;
  int64_t state_bytes_per_session = 0;
  int64_t queued = 0;
};

// What the gRPC layer reports about the model, without touching the model API.
struct ModelSummary {
  std::string family, layout;
  int64_t num_layers = 0, hidden_size = 0, num_heads = 0, head_k_dim = 0, head_v_dim = 0;
  int64_t vocab_size = 0, parameters = 0;
  int add_bos_token = -1;              // tokenizer_config.json: 1 / 0, -1 when it does not say
  std::vector<int64_t> eos_token_ids;  // every id that ends a generation
};

class Engine {
 public:
  // Allocates the pool and starts the engine thread.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      std::shared_ptr<const model::RetNet> model, std::shared_ptr<const model::Tokenizer> tokenizer,
      EngineOptions options);
  // Starts the engine thread if Create() was asked to start paused; no-op otherwise.
  void Start();
  ~Engine();  // cancels running generations (their sinks get kCancelled) and joins the thread
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const model::RetNet& model() const { return *model_; }
  const model::Tokenizer& tokenizer() const { return *tokenizer_; }
  const EngineOptions& options() const { return options_; }
  ModelSummary model_summary() const;
  int64_t model_vocab_size() const;
  int64_t model_state_bytes() const;
  PoolStats Stats() const;

  // Sessions. An empty id asks for a generated one. ALREADY_EXISTS, RESOURCE_EXHAUSTED (with the
  // numbers) when neither a device slot nor a host place can be found.
  absl::StatusOr<SessionInfo> CreateSession(const std::string& id = "");
  absl::StatusOr<SessionInfo> GetSession(const std::string& id) const;
  // Every session whose id starts with `prefix` ("" = all), sorted by id.
  std::vector<SessionInfo> ListSessions(const std::string& prefix = "") const;
  // FAILED_PRECONDITION while generating.
  absl::Status DeleteSession(const std::string& id);
  absl::StatusOr<SessionInfo> ForkSession(const std::string& source,
                                          const std::string& new_id = "");
  // A versioned byte string: header (model fingerprint, dims, dtype, position, pending token,
  // sampler seed/counter, token history), the state, a checksum.
  absl::StatusOr<std::string> SnapshotSession(const std::string& id);
  // INVALID_ARGUMENT for a corrupted snapshot or one from another model.
  absl::StatusOr<SessionInfo> RestoreSession(const std::string& snapshot,
                                             const std::string& new_id = "");
  // Waits until no generation is queued or running; false on timeout.
  bool WaitIdle(absl::Duration timeout) const;
  // Expires idle sessions unused for longer than the TTL as of `now`; returns how many.
  int64_t ExpireIdleSessions(absl::Time now);

  // Queues a generation. INVALID_ARGUMENT for bad parameters (naming the field), NOT_FOUND for
  // an unknown session, FAILED_PRECONDITION if the session is already generating,
  // RESOURCE_EXHAUSTED when the admission queue is full. On success the sink receives the tokens.
  absl::StatusOr<std::shared_ptr<Generation>> Submit(GenerateRequest request,
                                                     std::shared_ptr<TokenSink> sink);

  // A 64-bit fingerprint of the model (config and weights) stored in snapshots.
  uint64_t model_fingerprint() const { return fingerprint_; }

 private:
  struct Session;
  struct Request;
  struct Command;
  Engine(std::shared_ptr<const model::RetNet> model,
         std::shared_ptr<const model::Tokenizer> tokenizer, EngineOptions options);

  void Loop();
  // One iteration; returns false when there was nothing to do.
  bool Iterate();
  // Runs `fn` on the engine thread between iterations and waits for it; inline when the thread
  // has not been started or when called on it. UNAVAILABLE when the engine is stopping, INTERNAL
  // (prefixed with `what`) when `fn` throws.
  absl::Status RunOnLoop(const char* what, std::function<void()> fn)
      ABSL_LOCKS_EXCLUDED(mu_, inline_mu_);
  // Engine thread: runs the commands queued so far.
  void RunCommands() ABSL_LOCKS_EXCLUDED(mu_);
  bool OnEngineThread() const;
  void Prefill();
  void Decode();
  void FinishRequest(Request& r, FinishReason reason, absl::Status status = absl::OkStatus());
  void RestorePending(Request& r);
  // The commands, run by the engine thread (the *OnLoop functions take mu_ themselves).
  absl::StatusOr<SessionInfo> ForkSessionOnLoop(const std::string& source,
                                                const std::string& new_id);
  absl::Status DeleteSessionOnLoop(const std::string& id);
  // Removes an idle session from the maps; the caller destroys it after releasing mu_.
  std::unique_ptr<Session> EraseSessionLocked(
      std::map<std::string, std::unique_ptr<Session>>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  struct Captured;
  absl::Status CaptureOnLoop(const std::string& id, Captured* out);
  int64_t ExpireOnLoop(absl::Time now);
  void FailAll(const std::string& what);
  // Handles one sampled token for a request: stop checks, sink. Returns true if it finished.
  bool Deliver(Request& r, const SampleResult& sample);

  // Engine thread. `swapping_in`: the caller brings a spilled session back, so spilling another
  // one does not grow the host population. Returns a free slot for the caller to assign.
  // `all_busy` (if given) is set when it failed because every slot holds a busy session: a
  // generation that needs one can wait for the next iteration.
  absl::StatusOr<int64_t> AcquireSlot(bool swapping_in = false, bool* all_busy = nullptr)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status MakeResident(Session& s, bool* all_busy = nullptr) ABSL_LOCKS_EXCLUDED(mu_);
  at::Tensor SlotView(int64_t slot) const;
  // Engine thread: a new session with a zeroed slot; `zero` = false when the caller overwrites
  // the slot anyway (fork, restore).
  absl::StatusOr<Session*> NewSession(const std::string& id, bool zero = true)
      ABSL_LOCKS_EXCLUDED(mu_);
  SessionInfo Info(const Session& s) const;
  std::string NewId();

  const std::shared_ptr<const model::RetNet> model_;
  const std::shared_ptr<const model::Tokenizer> tokenizer_;
  const EngineOptions options_;
  const int64_t eos_id_;  // the tokenizer's EOS, else the config's; -1 when neither has one
  // Every id that ends a generation: eos_id_ and the checkpoint's EOS list (generation config).
  std::vector<int64_t> eos_ids_;
  int64_t slots_ = 0;
  uint64_t fingerprint_ = 0;
  struct Pool;
  std::unique_ptr<Pool> pool_;  // the state tensor [L, slots, H, d_k, d_v] fp32 on the device

  // Serialises commands run inline (engine not started) with Start().
  absl::Mutex inline_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  mutable absl::Mutex mu_;
  absl::CondVar wake_;
  std::vector<std::shared_ptr<Command>> commands_ ABSL_GUARDED_BY(mu_);
  std::atomic<std::thread::id> loop_thread_{};
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, std::unique_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  // nullptr = free. Written only by the engine thread (under mu_), so it reads it without.
  std::vector<Session*> slot_owner_ ABSL_GUARDED_BY(mu_);
  int64_t active_ ABSL_GUARDED_BY(mu_) = 0;  // number of decoding sessions
  int64_t spilled_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t busy_ ABSL_GUARDED_BY(mu_) = 0;  // sessions with a generation queued or running
  std::vector<std::unique_ptr<Request>> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;

  // Owned by the engine thread.
  std::vector<std::unique_ptr<Request>> prefilling_;
  std::vector<std::unique_ptr<Request>> decoding_;  // row b decodes in slot b
  absl::Time next_expiry_;

  std::thread thread_;
};

}  // namespace retnet::engine

#endif  // RETNET_ENGINE_ENGINE_H_
