// Sessions, the state pool and the control operations. The engine loop is in scheduler.cc.
#include "engine/engine.h"

#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/strings.h"
#include "engine/engine_internal.h"
#include "engine/snapshot.h"

namespace retnet::engine {

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kDeadline:
      return "deadline";
    case FinishReason::kError:
      return "error";
  }
  return "?";
}

Engine::Engine(std::shared_ptr<const model::RetNet> model,
               std::shared_ptr<const model::Tokenizer> tokenizer, EngineOptions options)
    : model_(std::move(model)),
      tokenizer_(std::move(tokenizer)),
      options_(options),
      eos_id_(tokenizer_->eos_id() >= 0 ? tokenizer_->eos_id() : model_->config().eos_token_id) {
  if (eos_id_ >= 0) eos_ids_.push_back(eos_id_);
  for (int64_t id : model_->config().eos_token_ids) {
    if (std::find(eos_ids_.begin(), eos_ids_.end(), id) == eos_ids_.end()) eos_ids_.push_back(id);
  }
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    std::shared_ptr<const model::RetNet> model, std::shared_ptr<const model::Tokenizer> tokenizer,
    EngineOptions options) {
  if (model == nullptr || tokenizer == nullptr)
    return absl::InvalidArgumentError("engine: model and tokenizer required");
  if (!model->config().is_language_model()) {
    return absl::InvalidArgumentError(
        "engine: the model is a backbone (no vocabulary); serving needs a language model");
  }
  if (tokenizer->vocab_size() > model->config().vocab_size) {
    return absl::InvalidArgumentError(
        "engine: the tokenizer has more ids than the model's vocabulary");
  }
  if (options.prefill_token_budget <= 0)
    return absl::InvalidArgumentError("prefill_token_budget: must be positive");
  if (options.prefill_chunk_size <= 0)
    return absl::InvalidArgumentError("prefill_chunk_size: must be positive");
  if (options.max_queued_requests <= 0)
    return absl::InvalidArgumentError("max_queued_requests: must be positive");
  if (options.max_host_sessions < 0)
    return absl::InvalidArgumentError("max_host_sessions: must not be negative");
  const int64_t per_session = model->StateBytesPerSession();
  int64_t slots = options.max_sessions;
  if (options.state_memory_bytes > 0) slots = options.state_memory_bytes / per_session;
  if (slots <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("state pool: no session fits (", per_session,
                                                   " bytes per session, budget ",
                                                   options.state_memory_bytes, ")"));
  }
  std::unique_ptr<Engine> engine(new Engine(std::move(model), std::move(tokenizer), options));
  engine->slots_ = slots;
  engine->fingerprint_ = engine->model_->fingerprint();
  try {
    c10::InferenceMode guard;
    engine->pool_ = std::make_unique<Pool>();
    engine->pool_->state =
        at::zeros(engine->model_->StateShape(slots),
                  at::TensorOptions().dtype(at::kFloat).device(engine->model_->options().device));
  } catch (const std::exception& e) {
    return absl::ResourceExhaustedError(absl::StrCat("state pool of ", slots, " sessions (",
                                                     slots * per_session,
                                                     " bytes) could not be allocated"));
  }
  {
    absl::MutexLock lock(&engine->mu_);
    engine->slot_owner_.assign(slots, nullptr);
  }
  if (!options.start_paused) engine->Start();
  return engine;
}

void Engine::Start() {
  absl::MutexLock inline_lock(&inline_mu_);  // waits for commands running inline
  absl::MutexLock lock(&mu_);
  if (started_) return;
  started_ = true;
  thread_ = std::thread([this] { Loop(); });
}

Engine::~Engine() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    wake_.SignalAll();
  }
  if (thread_.joinable()) thread_.join();
  // The loop has exited: finish whatever was still queued or running.
  std::vector<std::unique_ptr<Request>> left;
  std::vector<std::shared_ptr<Command>> commands;
  {
    absl::MutexLock lock(&mu_);
    for (auto& r : queue_) left.push_back(std::move(r));
    queue_.clear();
    commands.swap(commands_);
  }
  for (auto& c : commands) {
    c->status = absl::UnavailableError("engine shutting down");
    c->done.Notify();
  }
  for (auto& r : prefilling_) left.push_back(std::move(r));
  for (auto& r : decoding_) left.push_back(std::move(r));
  prefilling_.clear();
  decoding_.clear();
  for (auto& r : left)
    FinishRequest(*r, FinishReason::kCancelled, absl::CancelledError("engine shutting down"));
}

ModelSummary Engine::model_summary() const {
  const model::ModelConfig& c = model_->config();
  ModelSummary m;
  m.family = model::FamilyName(c.family);
  m.layout = c.layout;
  m.num_layers = c.num_layers;
  m.hidden_size = c.hidden_size;
  m.num_heads = c.num_heads;
  m.head_k_dim = c.head_k_dim();
  m.head_v_dim = c.head_v_dim();
  m.vocab_size = c.vocab_size;
  m.parameters = model::ParameterCount(c);
  m.add_bos_token = c.add_bos_token;
  m.eos_token_ids = eos_ids_;
  return m;
}

int64_t Engine::model_vocab_size() const { return model_->config().vocab_size; }
int64_t Engine::model_state_bytes() const { return model_->StateBytesPerSession(); }

PoolStats Engine::Stats() const {
  absl::MutexLock lock(&mu_);
  PoolStats s;
  s.device_slots = slots_;
  s.free_slots = std::count(slot_owner_.begin(), slot_owner_.end(), nullptr);
  s.decoding = active_;
  s.sessions = static_cast<int64_t>(sessions_.size());
  s.spilled = spilled_;
  s.host_capacity = options_.max_host_sessions;
  s.state_bytes_per_session = model_->StateBytesPerSession();
  s.queued = static_cast<int64_t>(queue_.size());
  return s;
}

std::string Engine::NewId() { return common::RandomHexId("s-"); }

at::Tensor Engine::SlotView(int64_t slot) const { return pool_->state.narrow(1, slot, 1); }

SessionInfo Engine::Info(const Session& s) const {
  SessionInfo info;
  info.id = s.id;
  info.position = s.position;
  info.pending_token = s.pending;
  info.resident = s.slot >= 0;
  info.generating = s.busy;
  info.created = s.created;
  info.last_used = s.last_used;
  info.transcript = s.transcript;
  return info;
}

bool Engine::OnEngineThread() const { return loop_thread_.load() == std::this_thread::get_id(); }

absl::Status Engine::RunOnLoop(const char* what, std::function<void()> fn) {
  auto cmd = std::make_shared<Command>();
  cmd->what = what;
  cmd->fn = std::move(fn);
  auto run = [](Command& c) {
    // Tensor copies can throw (device memory): report them instead of unwinding into gRPC.
    try {
      c.fn();
    } catch (const std::exception& e) {
      c.status = absl::InternalError(absl::StrCat(c.what, ": ", common::FirstLine(e.what())));
    }
  };
  if (OnEngineThread()) {  // a sink calling back: the engine thread owns the pool already
    run(*cmd);
    return cmd->status;
  }
  {
    absl::MutexLock inline_lock(&inline_mu_);
    bool queued = false;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return absl::UnavailableError("engine shutting down");
      if (started_) {
        commands_.push_back(cmd);
        wake_.Signal();
        queued = true;
      }
    }
    if (!queued) {  // no engine thread yet: Start() waits for this
      c10::InferenceMode guard;
      run(*cmd);
      return cmd->status;
    }
  }
  cmd->done.WaitForNotification();
  return cmd->status;
}

void Engine::RunCommands() {
  std::vector<std::shared_ptr<Command>> commands;
  {
    absl::MutexLock lock(&mu_);
    commands.swap(commands_);
  }
  for (auto& c : commands) {
    try {
      c->fn();
    } catch (const std::exception& e) {
      c->status = absl::InternalError(absl::StrCat(c->what, ": ", common::FirstLine(e.what())));
    }
    c->done.Notify();
  }
}

// A free slot, spilling the least recently used idle resident session to host if needed. The
// spill copy runs without the lock: only this thread touches the pool, and a session that a
// Submit() marks busy meanwhile is only queued (admitted later, by this thread).
absl::StatusOr<int64_t> Engine::AcquireSlot(bool swapping_in, bool* all_busy) {
  Session* lru = nullptr;
  {
    absl::MutexLock lock(&mu_);
    for (int64_t i = slots_ - 1; i >= 0; --i) {
      if (slot_owner_[i] == nullptr) return i;
    }
    for (int64_t i = 0; i < slots_; ++i) {
      Session* s = slot_owner_[i];
      if (s != nullptr && !s->busy && (lru == nullptr || s->last_used < lru->last_used)) lru = s;
    }
    if (all_busy != nullptr) *all_busy = lru == nullptr;
    if (lru == nullptr || spilled_ - (swapping_in ? 1 : 0) >= options_.max_host_sessions) {
      return absl::ResourceExhaustedError(
          absl::StrCat("state pool full: ", slots_, " device slots of ",
                       model_->StateBytesPerSession(), " bytes, ", active_, " decoding, ", spilled_,
                       "/", options_.max_host_sessions, " sessions spilled to host"));
    }
  }
  c10::InferenceMode guard;
  const int64_t slot = lru->slot;
  at::Tensor host = at::empty(model_->StateShape(1), at::kFloat);  // contiguous
  host.copy_(SlotView(slot));
  absl::MutexLock lock(&mu_);
  lru->host_state = std::move(host);
  lru->slot = -1;
  slot_owner_[slot] = nullptr;
  ++spilled_;
  return slot;
}

absl::Status Engine::MakeResident(Session& s, bool* all_busy) {
  if (s.slot >= 0) return absl::OkStatus();
  if (s.unallocated) {  // a new session's first use: a zeroed slot
    ASSIGN_OR_RETURN(int64_t slot, AcquireSlot(/*swapping_in=*/false, all_busy));
    c10::InferenceMode guard;
    SlotView(slot).zero_();
    absl::MutexLock lock(&mu_);
    s.unallocated = false;
    s.slot = slot;
    slot_owner_[slot] = &s;
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(int64_t slot, AcquireSlot(/*swapping_in=*/true, all_busy));
  c10::InferenceMode guard;
  SlotView(slot).copy_(s.host_state);
  absl::MutexLock lock(&mu_);
  s.host_state = at::Tensor();
  s.slot = slot;
  slot_owner_[slot] = &s;
  --spilled_;
  return absl::OkStatus();
}

absl::StatusOr<Engine::Session*> Engine::NewSession(const std::string& requested, bool zero) {
  std::string id = requested.empty() ? NewId() : requested;
  if (id.size() > 128) return absl::InvalidArgumentError("session_id: at most 128 bytes");
  auto exists = [&] {
    return absl::AlreadyExistsError(absl::StrCat("session_id: '", id, "' already exists"));
  };
  {
    absl::MutexLock lock(&mu_);
    if (sessions_.count(id) != 0) return exists();
  }
  // Only this thread adds sessions, so the id is still free after the slot is found.
  ASSIGN_OR_RETURN(int64_t slot, AcquireSlot());
  if (zero) {
    c10::InferenceMode guard;
    SlotView(slot).zero_();
  }
  auto session = std::make_unique<Session>();
  session->id = id;
  session->slot = slot;
  session->created = session->last_used = absl::Now();
  std::random_device rd;
  session->seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  Session* raw = session.get();
  absl::MutexLock lock(&mu_);
  slot_owner_[slot] = raw;
  sessions_[id] = std::move(session);
  return raw;
}

absl::StatusOr<SessionInfo> Engine::CreateSession(const std::string& id) {
  absl::StatusOr<SessionInfo> result;
  RETURN_IF_ERROR(RunOnLoop("CreateSession", [&] {
    absl::StatusOr<Session*> s = NewSession(id);
    if (!s.ok()) {
      result = s.status();
      return;
    }
    absl::MutexLock lock(&mu_);
    result = Info(**s);
  }));
  return result;
}

absl::StatusOr<SessionInfo> Engine::GetSession(const std::string& id) const {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end())
    return absl::NotFoundError(absl::StrCat("session_id: '", id, "' not found"));
  return Info(*it->second);
}

std::vector<SessionInfo> Engine::ListSessions(const std::string& prefix) const {
  absl::MutexLock lock(&mu_);
  std::vector<SessionInfo> out;
  for (auto it = sessions_.lower_bound(prefix);
       it != sessions_.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    out.push_back(Info(*it->second));
  }
  return out;
}

absl::Status Engine::DeleteSession(const std::string& id) {
  absl::Status result;
  RETURN_IF_ERROR(RunOnLoop("DeleteSession", [&] { result = DeleteSessionOnLoop(id); }));
  return result;
}

absl::Status Engine::DeleteSessionOnLoop(const std::string& id) {
  std::unique_ptr<Session> gone;  // destroyed (its host copy freed) after the lock
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end())
    return absl::NotFoundError(absl::StrCat("session_id: '", id, "' not found"));
  if (it->second->busy)
    return absl::FailedPreconditionError(
        absl::StrCat("session '", id, "' is generating; cancel it first"));
  gone = EraseSessionLocked(it);
  return absl::OkStatus();
}

std::unique_ptr<Engine::Session> Engine::EraseSessionLocked(
    std::map<std::string, std::unique_ptr<Session>>::iterator it) {
  Session& s = *it->second;
  if (s.slot >= 0) {
    slot_owner_[s.slot] = nullptr;
  } else if (!s.unallocated) {
    --spilled_;
  }
  std::unique_ptr<Session> gone = std::move(it->second);
  sessions_.erase(it);
  return gone;
}

absl::StatusOr<SessionInfo> Engine::ForkSession(const std::string& source,
                                                const std::string& new_id) {
  absl::StatusOr<SessionInfo> result;
  RETURN_IF_ERROR(RunOnLoop("ForkSession", [&] { result = ForkSessionOnLoop(source, new_id); }));
  return result;
}

absl::StatusOr<SessionInfo> Engine::ForkSessionOnLoop(const std::string& source,
                                                      const std::string& new_id) {
  Session* src = nullptr;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(source);
    if (it == sessions_.end())
      return absl::NotFoundError(absl::StrCat("session_id: '", source, "' not found"));
    src = it->second.get();
    if (src->busy)
      return absl::FailedPreconditionError(absl::StrCat("session '", source, "' is generating"));
    if (src->broken) return absl::DataLossError(absl::StrCat("session '", source, "': state lost"));
  }
  // The source cannot go away (only this thread deletes) nor change (only this thread steps).
  // Finding the new slot may spill others, the source included, never a busy session.
  ASSIGN_OR_RETURN(Session * dst, NewSession(new_id, /*zero=*/false));
  {
    c10::InferenceMode guard;
    SlotView(dst->slot).copy_(src->slot >= 0 ? SlotView(src->slot) : src->host_state);
  }
  absl::MutexLock lock(&mu_);
  dst->position = src->position;
  dst->pending = src->pending;
  dst->seed = src->seed;
  dst->counter = src->counter;
  dst->history = src->history;
  dst->transcript = src->transcript;
  src->last_used = absl::Now();
  return Info(*dst);
}

absl::StatusOr<std::string> Engine::SnapshotSession(const std::string& id) {
  Captured captured;
  absl::Status status;
  RETURN_IF_ERROR(RunOnLoop("SnapshotSession", [&] { status = CaptureOnLoop(id, &captured); }));
  RETURN_IF_ERROR(status);
  // This thread, not the engine's: the host copy of a spilled session, encoding, checksum.
  if (captured.spilled.defined()) {
    const at::Tensor h = captured.spilled.contiguous();
    captured.data.state.assign(static_cast<const char*>(h.data_ptr()), h.numel() * sizeof(float));
  }
  return EncodeSnapshot(captured.data);
}

absl::Status Engine::CaptureOnLoop(const std::string& id, Captured* out) {
  const Session* s = nullptr;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end())
      return absl::NotFoundError(absl::StrCat("session_id: '", id, "' not found"));
    s = it->second.get();
    if (s->busy)
      return absl::FailedPreconditionError(absl::StrCat("session '", id, "' is generating"));
    if (s->broken) return absl::DataLossError(absl::StrCat("session '", id, "': state lost"));
    const model::ModelConfig& c = model_->config();
    SnapshotData& d = out->data;
    d.fingerprint = fingerprint_;
    d.layers = c.num_layers;
    d.heads = c.num_heads;
    d.d_k = c.head_k_dim();
    d.d_v = c.head_v_dim();
    d.position = s->position;
    d.pending_token = s->pending;
    d.seed = s->seed;
    d.counter = s->counter;
    d.history = s->history;
    d.transcript = s->transcript;
  }
  // Only this thread changes the state, so it is copied without the lock.
  if (s->slot < 0) {
    out->spilled = s->host_state;  // never written in place: the caller copies it
    return absl::OkStatus();
  }
  c10::InferenceMode guard;
  const int64_t bytes = model_->StateBytesPerSession();
  out->data.state.resize(bytes);
  at::Tensor dst = at::from_blob(out->data.state.data(), model_->StateShape(1), at::kFloat);
  if (pool_->state.is_cuda()) {
    // One device-to-host copy into pinned memory (full speed), then into the caller's buffer.
    if (!pool_->staging.defined()) {
      pool_->staging = at::empty(model_->StateShape(1),
                                 at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
    }
    pool_->staging.copy_(SlotView(s->slot));
    dst.copy_(pool_->staging);
  } else {
    dst.copy_(SlotView(s->slot));
  }
  return absl::OkStatus();
}

absl::StatusOr<SessionInfo> Engine::RestoreSession(const std::string& snapshot,
                                                   const std::string& new_id) {
  // Decoding (checksum) and validation run on this thread.
  ASSIGN_OR_RETURN(SnapshotData d, DecodeSnapshot(snapshot));
  const model::ModelConfig& c = model_->config();
  if (d.fingerprint != fingerprint_) {
    return absl::InvalidArgumentError(
        "snapshot: taken with a different model (fingerprint mismatch)");
  }
  if (d.layers != c.num_layers || d.heads != c.num_heads || d.d_k != c.head_k_dim() ||
      d.d_v != c.head_v_dim() || d.dtype != 0 ||
      static_cast<int64_t>(d.state.size()) != model_->StateBytesPerSession()) {
    return absl::InvalidArgumentError("snapshot: state dimensions do not match this model");
  }
  if (d.position < 0 ||
      (d.pending_token && (*d.pending_token < 0 || *d.pending_token >= c.vocab_size))) {
    return absl::InvalidArgumentError("snapshot: invalid position or pending token");
  }
  // The history is the conversation: every absorbed token plus the pending one.
  if (static_cast<int64_t>(d.history.size()) != d.position + (d.pending_token ? 1 : 0)) {
    return absl::InvalidArgumentError("snapshot: token history does not match the position");
  }
  for (int64_t t : d.history) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError("snapshot: token history holds an invalid id");
    }
  }
  absl::StatusOr<SessionInfo> result;
  RETURN_IF_ERROR(RunOnLoop("RestoreSession", [&] {
    absl::StatusOr<Session*> s = NewSession(new_id, /*zero=*/false);
    if (!s.ok()) {
      result = s.status();
      return;
    }
    {
      c10::InferenceMode guard;
      SlotView((*s)->slot).copy_(at::from_blob(d.state.data(), model_->StateShape(1), at::kFloat));
    }
    absl::MutexLock lock(&mu_);
    (*s)->position = d.position;
    (*s)->pending = d.pending_token;
    (*s)->seed = d.seed;
    (*s)->counter = d.counter;
    (*s)->history = std::move(d.history);
    (*s)->transcript = d.transcript;
    result = Info(**s);
  }));
  return result;
}

bool Engine::WaitIdle(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(absl::Condition(
                                  +[](const int64_t* busy) { return *busy == 0; }, &busy_),
                              timeout);
}

int64_t Engine::ExpireIdleSessions(absl::Time now) {
  int64_t n = 0;
  if (!RunOnLoop("ExpireIdleSessions", [&] { n = ExpireOnLoop(now); }).ok()) return 0;
  return n;
}

int64_t Engine::ExpireOnLoop(absl::Time now) {
  std::vector<std::unique_ptr<Session>> gone;  // destroyed after the lock
  absl::MutexLock lock(&mu_);
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    Session& s = *it->second;
    if (!s.busy && now - s.last_used > options_.session_ttl) {
      gone.push_back(EraseSessionLocked(it++));
    } else {
      ++it;
    }
  }
  return static_cast<int64_t>(gone.size());
}

absl::StatusOr<std::shared_ptr<Generation>> Engine::Submit(GenerateRequest request,
                                                           std::shared_ptr<TokenSink> sink) {
  const model::ModelConfig& c = model_->config();
  RETURN_IF_ERROR(ValidateSamplingParams(request.sampling, c.vocab_size));
  if (request.sampling.max_new_tokens > options_.max_new_tokens_limit) {
    return absl::InvalidArgumentError(absl::StrCat("stopping.max_new_tokens: at most ",
                                                   options_.max_new_tokens_limit, ", got ",
                                                   request.sampling.max_new_tokens));
  }
  if (static_cast<int64_t>(request.prompt.size()) > options_.max_prompt_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("prompt: ", request.prompt.size(),
                                                   " tokens exceed the limit of ",
                                                   options_.max_prompt_tokens));
  }
  for (int64_t t : request.prompt) {
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt: token id ", t, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  if (sink == nullptr) return absl::InvalidArgumentError("sink: required");
  if (request.new_session && request.session_id.size() > 128)
    return absl::InvalidArgumentError("session_id: at most 128 bytes");
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(request.session_id);
  auto check_transcript =
      [&request](const std::optional<common::Transcript>& current) -> absl::Status {
    if (!request.expect_transcript.has_value() || current == request.expect_transcript)
      return absl::OkStatus();
    const common::Transcript& want = *request.expect_transcript;
    return absl::AbortedError(absl::StrCat(
        "expect_transcript: the session's transcript is ",
        current ? absl::StrCat(current->length, " bytes, digest ", absl::Hex(current->digest))
                : std::string("unknown"),
        ", not ", want.length, " bytes, digest ", absl::Hex(want.digest)));
  };
  if (request.new_session) {
    if (it != sessions_.end()) {
      return absl::AlreadyExistsError(
          absl::StrCat("session_id: '", request.session_id, "' already exists"));
    }
    if (request.prompt.empty())
      return absl::InvalidArgumentError("prompt: must not be empty for a new session");
    RETURN_IF_ERROR(check_transcript(common::Transcript{}));
    if (static_cast<int64_t>(queue_.size()) >= options_.max_queued_requests) {
      return absl::ResourceExhaustedError(absl::StrCat("admission queue full (", queue_.size(),
                                                       " waiting, limit ",
                                                       options_.max_queued_requests, ")"));
    }
    auto session = std::make_unique<Session>();
    session->id = request.session_id;
    session->unallocated = true;
    session->created = session->last_used = absl::Now();
    std::random_device rd;
    session->seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    it = sessions_.emplace(request.session_id, std::move(session)).first;
  }
  if (it == sessions_.end()) {
    return absl::NotFoundError(absl::StrCat("session_id: '", request.session_id, "' not found"));
  }
  Session& s = *it->second;
  if (s.busy) {
    return absl::FailedPreconditionError(absl::StrCat(
        "session '", s.id, "' is already generating (one generation per session at a time)"));
  }
  if (s.broken) {
    return absl::DataLossError(
        absl::StrCat("session '", s.id, "': its state was lost in an internal error; delete it"));
  }
  if (request.prompt.empty() && !s.pending.has_value()) {
    return absl::InvalidArgumentError(
        "prompt: must not be empty (the session has no pending token to continue from)");
  }
  RETURN_IF_ERROR(check_transcript(s.transcript));
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queued_requests) {
    return absl::ResourceExhaustedError(absl::StrCat("admission queue full (", queue_.size(),
                                                     " waiting, limit ",
                                                     options_.max_queued_requests, ")"));
  }
  auto r = std::make_unique<Request>(request.sampling.stop_strings);
  r->session = &s;
  r->sink = std::move(sink);
  r->generation = std::make_shared<Generation>();
  r->prompt_tokens = static_cast<int64_t>(request.prompt.size());
  if (s.transcript.has_value() && request.transcript_text.has_value()) {
    r->transcript = s.transcript;
    r->transcript->Append(*request.transcript_text);
  }
  r->req = std::move(request);
  s.busy = true;
  ++busy_;
  auto generation = r->generation;
  queue_.push_back(std::move(r));
  wake_.Signal();
  return generation;
}

}  // namespace retnet::engine
