#include "server/service.h"

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/status_macros.h"
#include "common/strings.h"
#include "common/utf8.h"
#include "server/executor.h"
#include "server/status.h"
#include "server/turn_stream.h"
#include "server/wire.h"

namespace retnet::server {
namespace {

namespace v1 = ::retnet::v1;

std::string RandomId() { return common::RandomHexId("s-"); }

// Tokenize/Detokenize calls up to this size are answered on the reaction (microseconds); longer
// ones go to the control executor.
constexpr size_t kInlineTokenizeBytes = 4096;
constexpr size_t kInlineDetokenizeIds = 4096;

int64_t UnixMs(absl::Time t) { return absl::ToUnixMillis(t); }

void ToProto(const engine::SessionInfo& info, const std::string& prefix, v1::Session* out) {
  out->set_session_id(info.id.substr(prefix.size()));
  out->set_position(info.position);
  if (info.pending_token) out->set_pending_token(*info.pending_token);
  out->set_resident(info.resident);
  out->set_generating(info.generating);
  out->set_created_unix_ms(UnixMs(info.created));
  out->set_last_used_unix_ms(UnixMs(info.last_used));
  if (info.transcript) {
    out->mutable_transcript()->set_length(info.transcript->length);
    out->mutable_transcript()->set_digest(info.transcript->digest);
  }
}

// Session ids: at most 96 bytes of printable ASCII without spaces or '/' ('/' separates the
// key tag of keyed callers internally). Empty means "server-generated" where `optional`. Messages
// never repeat an invalid id.
constexpr size_t kMaxSessionIdBytes = 96;

absl::Status CheckSessionId(const std::string& id, const char* field, bool optional = true) {
  if (id.empty()) {
    return optional ? absl::OkStatus()
                    : absl::InvalidArgumentError(absl::StrCat(field, ": required"));
  }
  if (id.size() > kMaxSessionIdBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": at most ", kMaxSessionIdBytes, " bytes, got ", id.size()));
  }
  for (unsigned char c : id) {
    if (c < 0x21 || c > 0x7e || c == '/') {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": printable ASCII without spaces or '/' only"));
    }
  }
  return absl::OkStatus();
}

// Checks a unary call's required `session_id` and names it in the call's log line; false when
// the call was answered (INVALID_ARGUMENT).
template <typename Reply>
bool RequireSessionId(const std::string& id, Reply* reply) {
  if (absl::Status check = CheckSessionId(id, "session_id", /*optional=*/false); !check.ok()) {
    reply->Done(check);
    return false;
  }
  reply->set_session(id);
  return true;
}

// A streaming call that ends at once with an error.
template <typename Base>
class Refused final : public Base {
 public:
  Refused(const char* method, const absl::Status& s) {
    const grpc::Status reply = ToGrpc(s);
    LogCall(method, "", reply.error_code(), -1, -1, absl::Now());
    this->Finish(reply);
  }
  void OnDone() override { delete this; }
};

absl::StatusOr<engine::SamplingParams> ConvertSampling(const v1::GenerateRequest& req,
                                                       int64_t default_max) {
  engine::SamplingParams p;
  const v1::SamplingParams& s = req.sampling();
  if (s.has_temperature()) p.temperature = s.temperature();
  p.top_k = s.top_k();
  if (s.has_top_p()) p.top_p = s.top_p();
  p.min_p = s.min_p();
  if (s.has_repetition_penalty()) p.repetition_penalty = s.repetition_penalty();
  p.presence_penalty = s.presence_penalty();
  p.frequency_penalty = s.frequency_penalty();
  for (const auto& [id, bias] : s.logit_bias()) p.logit_bias.emplace_back(id, bias);
  std::sort(p.logit_bias.begin(), p.logit_bias.end());
  if (s.has_seed()) p.seed = s.seed();
  const v1::StoppingCriteria& stop = req.stopping();
  if (stop.max_new_tokens() < 0)
    return absl::InvalidArgumentError("stopping.max_new_tokens: must not be negative");
  p.max_new_tokens = stop.max_new_tokens() == 0 ? default_max : stop.max_new_tokens();
  p.min_tokens = stop.min_tokens();
  p.stop_token_ids.assign(stop.stop_token_ids().begin(), stop.stop_token_ids().end());
  p.stop_strings.assign(stop.stop().begin(), stop.stop().end());
  p.ignore_eos = stop.ignore_eos();
  p.logprobs = req.has_logprobs() ? req.logprobs() : -1;
  return p;
}

// Generate: the turn is prepared on the control executor (it may create or restore the session,
// tokenize a long prompt and submit, which can all wait for the engine loop or the disk); the
// executor's work then starts the stream with Start() or ends it with Fail().
class GenerateReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  // Ends at once with `status`.
  GenerateReactor(const absl::Status& status, Metrics* metrics) : metrics_(metrics) {
    Fail(status);
  }
  // Waits for exactly one Start() or Fail(), normally from the control executor.
  explicit GenerateReactor(Metrics* metrics) : metrics_(metrics) {}

  void Fail(const absl::Status& status) {
    auto stream = std::make_shared<TurnStream>("", 0, metrics_);
    stream->Fail(ToGrpc(status));
    {
      absl::MutexLock lock(&mu_);
      stream_ = std::move(stream);
    }
    Pump();
    Release();
  }

  void Start(engine::Engine* engine, Turn turn, const TurnStream::Persist& persist) {
    auto stream =
        std::make_shared<TurnStream>(turn.public_id, engine->model_state_bytes(), metrics_);
    stream->Attach([this] { Pump(); });
    if (persist) stream->SetPersist(persist);
    stream->SetTokenBytes(turn.token_bytes);
    const std::string internal_id = turn.request.session_id;
    bool cancelled = false;
    {
      absl::MutexLock lock(&mu_);
      stream_ = stream;
      cancelled = cancelled_;
    }
    if (cancelled) stream->ClientGone();  // the generation is cancelled as soon as it exists
    // Accepted: the headers go out now, which commits the call on the client side, so a client's
    // retry policy (UNAVAILABLE) can only ever re-send a call that was refused, never a turn.
    StartSendInitialMetadata();
    auto generation = engine->Submit(std::move(turn.request), stream);
    if (!generation.ok()) {
      if (turn.created) (void)engine->DeleteSession(internal_id);
      // Never started: the save (unchanged, or gone) gives the turn's claim back.
      if (persist) persist([](absl::Status) {});
      stream->Fail(ToGrpc(generation.status()));
    } else {
      stream->SetGeneration(*generation);
    }
    Pump();
    Release();
  }

  void OnWriteDone(bool ok) override {
    std::shared_ptr<TurnStream> stream;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      stream = stream_;
    }
    if (!ok && stream) stream->ClientGone();
    Pump();
  }
  void OnCancel() override {
    std::shared_ptr<TurnStream> stream;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      stream = stream_;
    }
    if (stream) stream->ClientGone();
  }
  void OnDone() override {
    std::shared_ptr<TurnStream> stream;
    {
      absl::MutexLock lock(&mu_);
      stream = stream_;
    }
    if (stream) stream->Detach();
    bool last = false;
    {
      absl::MutexLock lock(&mu_);
      gone_ = true;
      last = !held_;
    }
    if (last) delete this;
  }

 private:
  // Start() or Fail() is done with `this`: gRPC may have finished the call meanwhile (OnDone
  // leaves the delete to whoever is last).
  void Release() {
    bool last = false;
    {
      absl::MutexLock lock(&mu_);
      held_ = false;
      last = gone_;
    }
    if (last) delete this;
  }

  // One write at a time; the finish after the last one.
  void Pump() {
    absl::MutexLock lock(&mu_);
    if (writing_ || done_ || !stream_) return;
    grpc::Status status;
    switch (stream_->Next(&out_, &status)) {
      case TurnStream::Action::kNothing:
        return;
      case TurnStream::Action::kWriteChunk:
        writing_ = true;
        SerializeTo(out_, &out_buf_);
        StartWrite(&out_buf_);
        return;
      case TurnStream::Action::kWriteFinal:
        done_ = true;
        SerializeTo(out_, &out_buf_);
        StartWriteAndFinish(&out_buf_, grpc::WriteOptions(), grpc::Status::OK);
        return;
      case TurnStream::Action::kEndWithStatus:
        done_ = true;
        Finish(status);
        return;
    }
  }

  Metrics* const metrics_;
  absl::Mutex mu_;
  std::shared_ptr<TurnStream> stream_ ABSL_GUARDED_BY(mu_);  // set by Start() or Fail()
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  bool held_ ABSL_GUARDED_BY(mu_) = true;   // until Start() or Fail() returns
  bool gone_ ABSL_GUARDED_BY(mu_) = false;  // OnDone() ran
  v1::GenerateResponse out_ ABSL_GUARDED_BY(mu_);
  grpc::ByteBuffer out_buf_ ABSL_GUARDED_BY(mu_);  // the write in flight
};

// Chat: turns arrive on the read side; each is generated and streamed like Generate, ending with
// its Final; then the next turn is read. The first turn's session is the stream's session.
// Rules kept here: one write and one read in flight at most; Finish exactly once and never while
// a write is in flight (a status that arrives then waits for OnWriteDone); a finished turn's
// stream is detached before the next turn replaces it. Each turn is prepared and submitted on
// the control executor (see GenerateReactor); while that work runs it holds the reactor, and
// OnDone leaves the delete to it.
class ChatReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  using Prepare =
      std::function<absl::StatusOr<Turn>(const v1::GenerateRequest&, const std::string& session)>;
  using PersistFor =
      std::function<TurnStream::Persist(const std::string& internal_id, int64_t hold)>;

  ChatReactor(engine::Engine* engine, Executor* control, Prepare prepare, PersistFor persist_for,
              Metrics* metrics)
      : engine_(engine),
        control_(control),
        prepare_(std::move(prepare)),
        persist_for_(std::move(persist_for)),
        metrics_(metrics) {
    StartRead(&in_buf_);
  }

  // Reads are one at a time, so this never runs concurrently with itself, nor with a turn's
  // preparation (the next read starts when the turn is over). Streams are attached and detached
  // without holding mu_: the engine calls Pump (which takes mu_) while holding a stream's wake
  // lock.
  void OnReadDone(bool ok) override {
    std::string session;
    std::shared_ptr<TurnStream> previous;
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      if (!ok) {  // the client closed its side: finish once the current turn is over
        closed_ = true;
        MaybeFinishLocked();
        return;
      }
      session = session_;
      previous = std::move(stream_);
    }
    if (previous) previous->Detach();  // its turn is over
    // A message that cannot be parsed ends the stream with an error (never taken for the
    // client closing its side).
    v1::ChatRequest in;
    absl::Status parsed = ParseRequest(in_buf_, &in);
    in_buf_.Clear();
    if (!parsed.ok()) {
      StartTurn(parsed, session);
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      ++holds_;
    }
    absl::Status queued = control_->Submit([this, turn = std::move(*in.mutable_turn()), session] {
      bool finished = false;
      {
        absl::MutexLock lock(&mu_);
        finished = finished_;
      }
      // Cancelled while queued: nothing is prepared (no session is created or restored).
      if (!finished) StartTurn(prepare_(turn, session), session);
      Release();
    });
    if (!queued.ok()) {
      StartTurn(queued, session);
      Release();
    }
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
        return;
      }
      if (deferred_status_) {
        FinishLocked(*deferred_status_);
        return;
      }
      MaybeFinishLocked();
    }
    Pump();
  }
  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    EndLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
  }
  void OnDone() override {
    std::shared_ptr<TurnStream> stream;
    {
      absl::MutexLock lock(&mu_);
      stream = stream_;
    }
    if (stream) stream->Detach();
    bool last = false;
    {
      absl::MutexLock lock(&mu_);
      gone_ = true;
      last = holds_ == 0;
    }
    if (last) delete this;
  }

 private:
  // A turn's preparation is done with `this` (see OnDone).
  void Release() {
    bool last = false;
    {
      absl::MutexLock lock(&mu_);
      last = --holds_ == 0 && gone_;
    }
    if (last) delete this;
  }

  // Starts the prepared turn (or ends the stream with its error). On the control executor, or
  // on the reaction for an error.
  void StartTurn(absl::StatusOr<Turn> turn, const std::string& session) {
    if (!turn.ok()) {
      absl::MutexLock lock(&mu_);
      const grpc::Status reply = ToGrpc(turn.status());
      LogCall("Chat", session, reply.error_code(), -1, -1, absl::Now());
      EndLocked(reply);
      return;
    }
    auto stream =
        std::make_shared<TurnStream>(turn->public_id, engine_->model_state_bytes(), metrics_);
    stream->SetMethod("Chat");
    stream->SetTokenBytes(turn->token_bytes);
    stream->Attach([this] { Pump(); });
    const std::string internal_id = turn->request.session_id;
    TurnStream::Persist persist = persist_for_(internal_id, turn->hold);
    if (persist) stream->SetPersist(persist);
    // A turn that never starts still saves (unchanged, or gone) and so gives its claim back.
    auto never_started = [&persist] {
      if (persist) persist([](absl::Status) {});
    };
    bool abandoned = false;
    {
      absl::MutexLock lock(&mu_);
      abandoned = finished_;
      if (!abandoned) {
        if (session_.empty()) session_ = turn->public_id;
        stream_ = stream;
        in_turn_ = true;
        if (!metadata_sent_) {
          // The first accepted turn commits the call (see GenerateReactor).
          metadata_sent_ = true;
          StartSendInitialMetadata();
        }
      }
    }
    if (abandoned) {  // cancelled while the turn was prepared: it never starts
      if (turn->created) (void)engine_->DeleteSession(internal_id);
      never_started();
      return;
    }
    auto generation = engine_->Submit(std::move(turn->request), stream);
    if (!generation.ok()) {
      if (turn->created) (void)engine_->DeleteSession(internal_id);
      never_started();
    }
    absl::MutexLock lock(&mu_);
    if (!generation.ok()) {
      in_turn_ = false;
      EndLocked(ToGrpc(generation.status()));
      return;
    }
    stream->SetGeneration(*generation);
  }

  void Pump() {
    absl::MutexLock lock(&mu_);
    if (writing_ || finished_ || !in_turn_) return;
    grpc::Status status;
    switch (stream_->Next(&out_, &status)) {
      case TurnStream::Action::kNothing:
        return;
      case TurnStream::Action::kWriteChunk:
        writing_ = true;
        SerializeTo(out_, &out_buf_);
        StartWrite(&out_buf_);
        return;
      case TurnStream::Action::kWriteFinal:  // the turn is over: answer it, read the next
        writing_ = true;
        in_turn_ = false;
        SerializeTo(out_, &out_buf_);
        StartWrite(&out_buf_);
        if (!closed_) StartRead(&in_buf_);
        return;
      case TurnStream::Action::kEndWithStatus:
        in_turn_ = false;
        FinishLocked(status);
        return;
    }
  }
  void MaybeFinishLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (closed_ && !in_turn_ && !writing_) FinishLocked(grpc::Status::OK);
  }
  // Ends the RPC now, or after the write in flight.
  void EndLocked(grpc::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (stream_ && in_turn_) stream_->ClientGone();
    if (writing_) {
      if (!deferred_status_) deferred_status_ = std::move(status);
    } else {
      FinishLocked(std::move(status));
    }
  }
  void FinishLocked(grpc::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    if (stream_ && in_turn_) stream_->ClientGone();
    Finish(std::move(status));
  }

  engine::Engine* const engine_;
  Executor* const control_;
  const Prepare prepare_;
  const PersistFor persist_for_;
  Metrics* const metrics_;
  absl::Mutex mu_;
  int holds_ ABSL_GUARDED_BY(mu_) = 0;      // turn preparations queued or running
  bool gone_ ABSL_GUARDED_BY(mu_) = false;  // OnDone() ran
  std::string session_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<TurnStream> stream_ ABSL_GUARDED_BY(mu_);
  std::optional<grpc::Status> deferred_status_ ABSL_GUARDED_BY(mu_);
  bool in_turn_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool metadata_sent_ ABSL_GUARDED_BY(mu_) = false;
  grpc::ByteBuffer in_buf_;  // the read in flight
  v1::GenerateResponse out_;
  grpc::ByteBuffer out_buf_;  // the write in flight
};

// ExportSession: the snapshot is taken on the control executor, which then calls Send() (or
// Refuse()); nothing is written before that, so the reactor cannot finish before it.
class ExportReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  explicit ExportReactor(int64_t chunk) : chunk_(chunk) {}
  // Exactly one of these, once.
  void Send(std::string data, std::string session) {
    data_ = std::move(data);
    session_ = std::move(session);
    Next();
  }
  void Refuse(const absl::Status& s) {
    const grpc::Status reply = ToGrpc(s);
    LogCall("ExportSession", "", reply.error_code(), -1, -1, start_);
    Finish(reply);
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      LogCall("ExportSession", session_, grpc::StatusCode::CANCELLED, -1, -1, start_);
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
      return;
    }
    Next();
  }
  void OnDone() override { delete this; }

 private:
  // The last thing it does is start a write or finish: `this` may be gone right after.
  void Next() {
    if (sent_ >= data_.size()) {
      LogCall("ExportSession", session_, grpc::StatusCode::OK, -1, -1, start_);
      Finish(grpc::Status::OK);
      return;
    }
    const size_t n = std::min<size_t>(chunk_, data_.size() - sent_);
    v1::SnapshotChunk msg;
    if (sent_ == 0) msg.set_total_bytes(static_cast<int64_t>(data_.size()));
    msg.set_data(data_.substr(sent_, n));
    sent_ += n;
    SerializeTo(msg, &buf_);
    StartWrite(&buf_);
  }
  // Set once by Send(), before the first write; read by the write reactions after it.
  std::string data_;
  std::string session_;
  const int64_t chunk_;
  const absl::Time start_ = absl::Now();
  size_t sent_ = 0;
  grpc::ByteBuffer buf_;  // the write in flight
};

class ImportReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  // `store` (may be null): with write-through, the imported session is saved before the reply.
  // The restore (and the save) run on `control`: only End() finishes the call, so the reactor
  // outlives that work.
  ImportReactor(grpc::CallbackServerContext* context, engine::Engine* engine, SessionStore* store,
                Executor* control, std::string prefix, int64_t max_bytes,
                grpc::ByteBuffer* response)
      : context_(context),
        engine_(engine),
        store_(store),
        control_(control),
        prefix_(std::move(prefix)),
        max_bytes_(max_bytes),
        response_(response) {
    StartRead(&in_buf_);
  }
  void OnReadDone(bool ok) override {
    if (ok) {
      // A message that cannot be parsed fails the import (never taken for the end of it).
      v1::ImportSessionRequest msg;
      absl::Status parsed = ParseRequest(in_buf_, &msg);
      in_buf_.Clear();
      if (!parsed.ok()) {
        End(parsed);
        return;
      }
      if (first_) {
        first_ = false;
        absl::Status check = CheckSessionId(msg.session_id(), "session_id");
        if (!check.ok()) {
          End(check);
          return;
        }
        id_ = msg.session_id();
      } else if (!msg.session_id().empty() && msg.session_id() != id_) {
        End(absl::InvalidArgumentError("session_id: only the first message may set it"));
        return;
      }
      if (static_cast<int64_t>(data_.size() + msg.data().size()) > max_bytes_) {
        End(absl::InvalidArgumentError(
            absl::StrCat("data: snapshot exceeds the size limit of ", max_bytes_, " bytes")));
        return;
      }
      data_ += msg.data();
      StartRead(&in_buf_);
      return;
    }
    // The stream ended: a client that cancelled did not close it, so nothing is committed.
    if (context_->IsCancelled()) {
      End(absl::CancelledError("cancelled by the client; nothing was imported"));
      return;
    }
    if (id_.empty()) id_ = RandomId();
    absl::Status queued = control_->Submit([this] { Restore(); });
    if (!queued.ok()) End(queued);
  }
  void OnDone() override { delete this; }

 private:
  // On the control executor.
  void Restore() {
    const std::string id = prefix_ + id_;
    auto info = engine_->RestoreSession(data_, id);
    if (info.ok()) ToProto(*info, prefix_, &session_);
    if (info.ok() && store_ != nullptr && store_->write_through()) {
      store_->Persist(
          id, [this](absl::Status saved) { End(saved); }, /*hold=*/0);
      return;  // `this` may be gone already
    }
    End(info.status());
  }

  // Finishes the call: the last thing done with `this`.
  void End(const absl::Status& status) {
    if (status.ok()) SerializeTo(session_, response_);
    const grpc::Status reply = ToGrpc(status);
    LogCall("ImportSession", id_, reply.error_code(), -1, -1, start_);
    Finish(reply);
  }

  grpc::CallbackServerContext* const context_;
  engine::Engine* engine_;
  SessionStore* const store_;
  Executor* const control_;
  const std::string prefix_;
  const int64_t max_bytes_;
  grpc::ByteBuffer* const response_;
  const absl::Time start_ = absl::Now();
  grpc::ByteBuffer in_buf_;  // the read in flight
  v1::Session session_;
  bool first_ = true;
  std::string id_;
  std::string data_;
};

}  // namespace

RetNetService::RetNetService(const ApiKeys* keys, ServiceOptions options)
    : keys_(keys),
      options_(std::move(options)),
      control_(std::make_unique<Executor>("control", options_.control_threads,
                                          options_.max_queued_control)) {
  RouteProtobufLogsToSpdlog();
}

RetNetService::~RetNetService() { Shutdown(); }

void RetNetService::Shutdown() { control_->Shutdown(); }

template <typename Response>
void RetNetService::Offload(UnaryReply<Response>* reply, std::function<void()> work) {
  absl::Status queued = control_->Submit(std::move(work));
  if (!queued.ok()) reply->Done(queued);
}

void RetNetService::SetEngine(engine::Engine* engine, SessionStore* store) {
  engine_ = engine;
  store_ = store;
  add_bos_default_ = engine->model_summary().add_bos_token != 0;
  ready_.store(true, std::memory_order_release);
}

absl::StatusOr<engine::SessionInfo> RetNetService::FindSession(const std::string& id) const {
  if (store_ != nullptr) RETURN_IF_ERROR(store_->Sync(id));
  return engine_->GetSession(id);
}

template <typename Response>
void RetNetService::ReplySaved(UnaryReply<Response>* reply, const std::string& id,
                               const absl::Status& status) const {
  if (!status.ok() || store_ == nullptr || !store_->write_through()) {
    reply->Done(status);
    return;
  }
  // A new session (fork, create) is in the shared directory before the caller hears of it: its
  // next call may reach another replica.
  store_->Persist(
      id, [reply](absl::Status saved) { reply->Done(saved); }, /*hold=*/0);
}

template <typename Request, typename Response>
bool RetNetService::Begin(grpc::CallbackServerContext* context, const Raw* in, Request* request,
                          UnaryReply<Response>* reply, std::string* caller) const {
  absl::Status parsed = ParseRequest(*in, request);
  if (!parsed.ok()) {
    reply->Done(parsed);
    return false;
  }
  auto admitted = Admit(*context);
  if (!admitted.ok()) {
    reply->Done(admitted.status());
    return false;
  }
  *caller = *std::move(admitted);
  return true;
}

TurnStream::Persist RetNetService::PersistFor(const std::string& id, int64_t hold) const {
  if (store_ == nullptr || !store_->write_through()) return nullptr;
  SessionStore* store = store_;
  return [store, id, hold](std::function<void(absl::Status)> release) {
    store->Persist(id, std::move(release), hold);
  };
}

absl::StatusOr<std::string> RetNetService::Admit(const grpc::ServerContextBase& context) const {
  if (!ready_.load(std::memory_order_acquire)) {
    return absl::UnavailableError("server is loading the model; retry shortly");
  }
  return keys_->Authenticate(context);
}

absl::Status RetNetService::HasTokenizer(const char* what) const {
  if (engine_->tokenizer().kind() != "none") return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      what, ": the model has no tokenizer (ids only): send prompts as token ids (tokens.ids)"));
}

absl::StatusOr<Turn> RetNetService::PrepareTurn(grpc::CallbackServerContext* context,
                                                const std::string& prefix,
                                                const v1::GenerateRequest& request,
                                                const std::string& fixed_session, bool one_shot) {
  if (draining_.load())
    return absl::UnavailableError("server is draining; retry on another replica");
  ASSIGN_OR_RETURN(engine::SamplingParams sampling,
                   ConvertSampling(request, options_.default_max_new_tokens));
  if (request.has_text()) RETURN_IF_ERROR(HasTokenizer("text"));
  if (!sampling.stop_strings.empty()) {
    RETURN_IF_ERROR(HasTokenizer("stopping.stop (use stopping.stop_token_ids)"));
  }
  std::string public_id = fixed_session.empty() ? request.session_id() : fixed_session;
  if (!fixed_session.empty() && !request.session_id().empty() &&
      request.session_id() != fixed_session) {
    return absl::InvalidArgumentError(
        "turn.session_id: a chat stream stays on its first turn's session");
  }
  RETURN_IF_ERROR(CheckSessionId(public_id, "session_id"));
  if (request.has_expect_transcript() && request.expect_transcript().length() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("expect_transcript.length: must be >= 0, got ",
                                                   request.expect_transcript().length()));
  }
  if (request.prefill_only() && public_id.empty()) {
    return absl::InvalidArgumentError(
        "prefill_only: needs a session_id (a one-shot request would keep nothing)");
  }
  // Resolve or create the session.
  Turn turn;
  absl::StatusOr<engine::SessionInfo> info;
  std::string internal_id = prefix + public_id;
  if (public_id.empty() && one_shot) {
    // The engine creates it at submission and deletes it at the end: nothing is left, and it
    // takes a device slot only once admitted (it waits in the queue while every slot is busy).
    internal_id = absl::StrCat(prefix, kOneShotTag, RandomId());
    info = engine::SessionInfo{};
    turn.request.new_session = true;
    turn.request.delete_session_at_end = true;
  } else if (public_id.empty()) {
    public_id = RandomId();
    internal_id = prefix + public_id;
    if (store_ != nullptr && store_->write_through()) {
      ASSIGN_OR_RETURN(turn.hold, store_->Acquire(internal_id));
    }
    info = engine_->CreateSession(internal_id);
    turn.created = true;
  } else {
    if (store_ != nullptr) {
      // The turn's claim on the session (with replicas: its lease), then the engine's copy.
      ASSIGN_OR_RETURN(turn.hold, store_->Acquire(internal_id));
      info = engine_->GetSession(internal_id);
    } else {
      info = engine_->GetSession(internal_id);
    }
    if (absl::IsNotFound(info.status()) && request.create_session()) {
      info = engine_->CreateSession(prefix + public_id);
      turn.created = true;
    }
  }
  // Every way out below but the turn's start gives the claim back.
  absl::Cleanup release = [&] {
    if (turn.hold != 0) store_->Release(internal_id, turn.hold);
  };
  if (!info.ok()) return info.status();
  turn.public_id = public_id;
  turn.token_bytes = request.return_token_bytes();
  if (request.delete_session_at_end() && !turn.request.delete_session_at_end) {
    // Gone at the end in the engine; its stored snapshot goes now, so no replica revives it.
    turn.request.delete_session_at_end = true;
    if (store_ != nullptr) (void)store_->Forget(prefix + public_id);
  }
  engine::GenerateRequest& req = turn.request;
  req.prefill_only = request.prefill_only();
  req.session_id = internal_id;
  req.sampling = std::move(sampling);
  const model::Tokenizer& tok = engine_->tokenizer();
  const bool fresh = info->position == 0 && !info->pending_token.has_value();
  // Unset: what the checkpoint's tokenizer_config.json says (add_bos_token), else yes.
  const bool add_bos = request.has_add_bos() ? request.add_bos() : add_bos_default_;
  if (fresh && add_bos && tok.bos_id() >= 0) {
    req.prompt.push_back(tok.bos_id());
  }
  if (request.has_text()) {
    auto ids = tok.Encode(request.text());
    if (!ids.ok()) {
      if (turn.created) (void)engine_->DeleteSession(req.session_id);
      return ids.status();
    }
    req.prompt.insert(req.prompt.end(), ids->begin(), ids->end());
  } else if (request.has_tokens()) {
    const int64_t vocab = engine_->model_vocab_size();
    for (int i = 0; i < request.tokens().ids_size(); ++i) {
      const int64_t id = request.tokens().ids(i);
      if (id < 0 || id >= vocab) {
        if (turn.created) (void)engine_->DeleteSession(req.session_id);
        return absl::InvalidArgumentError(absl::StrCat(
            "tokens.ids[", i, "]: ", id, " is outside the vocabulary [0, ", vocab, ")"));
      }
    }
    req.prompt.insert(req.prompt.end(), request.tokens().ids().begin(),
                      request.tokens().ids().end());
  }
  if (request.has_expect_transcript()) {
    req.expect_transcript = common::Transcript{request.expect_transcript().length(),
                                               request.expect_transcript().digest()};
  }
  if (request.has_transcript_text()) {
    req.transcript_text = request.transcript_text();
  } else if (!request.has_tokens()) {
    req.transcript_text = request.text();  // "" without a prompt (a continuing turn)
  }
  if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    req.deadline = absl::FromChrono(context->deadline());
  }
  std::move(release).Cancel();
  return turn;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* RetNetService::Generate(
    grpc::CallbackServerContext* context, const Raw* in) {
  v1::GenerateRequest request;
  absl::Status parsed = ParseRequest(*in, &request);
  if (!parsed.ok()) return new GenerateReactor(parsed, options_.metrics);
  auto caller = Admit(*context);
  if (!caller.ok()) return new GenerateReactor(caller.status(), options_.metrics);
  auto* reactor = new GenerateReactor(options_.metrics);
  absl::Status queued = control_->Submit(
      [this, reactor, context, prefix = *std::move(caller), request = std::move(request)] {
        // Cancelled while queued: nothing is prepared (no session is created or restored).
        if (context->IsCancelled()) {
          reactor->Fail(absl::CancelledError("cancelled by the client"));
          return;
        }
        auto turn = PrepareTurn(context, prefix, request, "", /*one_shot=*/true);
        if (!turn.ok()) {
          reactor->Fail(turn.status());
          return;
        }
        const std::string id = turn->request.session_id;
        // A one-shot request's session is gone at its end; a named session deleted at the
        // end still gives its claim back through the (then empty) save.
        const TurnStream::Persist persist = turn->request.delete_session_at_end && turn->hold == 0
                                                ? nullptr
                                                : PersistFor(id, turn->hold);
        reactor->Start(engine_, *std::move(turn), persist);
      });
  if (!queued.ok()) reactor->Fail(queued);
  return reactor;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* RetNetService::Chat(
    grpc::CallbackServerContext* context) {
  auto caller = Admit(*context);
  if (!caller.ok()) {
    return new Refused<grpc::ServerBidiReactor<Raw, Raw>>("Chat", caller.status());
  }
  const std::string prefix = *caller;
  return new ChatReactor(
      engine_, control_.get(),
      [this, context, prefix](const v1::GenerateRequest& turn, const std::string& session) {
        return PrepareTurn(context, prefix, turn, session, /*one_shot=*/false);
      },
      [this](const std::string& id, int64_t hold) { return PersistFor(id, hold); },
      options_.metrics);
}

grpc::ServerUnaryReactor* RetNetService::CreateSession(grpc::CallbackServerContext* context,
                                                       const Raw* in, Raw* out) {
  auto* reply = new UnaryReply<v1::Session>("CreateSession", out);
  v1::CreateSessionRequest request;
  std::string caller;
  if (!Begin(context, in, &request, reply, &caller)) return reply;
  if (draining_.load()) {
    reply->Done(absl::UnavailableError("server is draining; retry on another replica"));
    return reply;
  }
  absl::Status check = CheckSessionId(request.session_id(), "session_id");
  if (!check.ok()) {
    reply->Done(check);
    return reply;
  }
  const bool named = !request.session_id().empty();
  const std::string id = named ? request.session_id() : RandomId();
  reply->set_session(id);
  Offload(reply, [this, reply, caller, id, named] {
    if (named) {
      auto existing = FindSession(caller + id);
      if (existing.ok()) {
        reply->Done(absl::AlreadyExistsError(absl::StrCat("session '", id, "' exists")));
        return;
      }
      if (!absl::IsNotFound(existing.status())) {
        reply->Done(existing.status());
        return;
      }
    }
    auto info = engine_->CreateSession(caller + id);
    if (info.ok()) ToProto(*info, caller, reply->response());
    ReplySaved(reply, caller + id, info.status());
  });
  return reply;
}

grpc::ServerUnaryReactor* RetNetService::GetSession(grpc::CallbackServerContext* context,
                                                    const Raw* in, Raw* out) {
  auto* reply = new UnaryReply<v1::Session>("GetSession", out);
  v1::GetSessionRequest request;
  std::string caller;
  if (!Begin(context, in, &request, reply, &caller) ||
      !RequireSessionId(request.session_id(), reply)) {
    return reply;
  }
  auto get = [this, reply, id = caller + request.session_id(), caller] {
    auto info = FindSession(id);
    if (info.ok()) ToProto(*info, caller, reply->response());
    reply->Done(info.status());
  };
  // Without a state directory this is a lookup; with one it may restore the session.
  if (store_ == nullptr) {
    get();
  } else {
    Offload(reply, std::move(get));
  }
  return reply;
}

grpc::ServerUnaryReactor* RetNetService::ListSessions(grpc::CallbackServerContext* context,
                                                      const Raw* in, Raw* out) {
  auto* reply = new UnaryReply<v1::ListSessionsResponse>("ListSessions", out);
  v1::ListSessionsRequest request;
  std::string caller;
  if (!Begin(context, in, &request, reply, &caller)) return reply;
  for (const auto& info : engine_->ListSessions(caller)) {
    // Without keys, the keyed sessions ("k<tag>/...") stay invisible too.
    if (caller.empty() && info.id.find('/') != std::string::npos) continue;
    if (IsOneShotSession(info.id)) continue;  // a one-shot request's, gone when it ends
    ToProto(info, caller, reply->response()->add_sessions());
  }
  reply->Done(absl::OkStatus());
  return reply;
}

grpc::ServerUnaryReactor* RetNetService::ForkSession(grpc::CallbackServerContext* context,
                                                     const Raw* in, Raw* out) {
  auto* reply = new UnaryReply<v1::Session>("ForkSession", out);
  v1::ForkSessionRequest request;
  std::string caller;
  if (!Begin(context, in, &request, reply, &caller)) return reply;
  absl::Status check = CheckSessionId(request.session_id(), "session_id", /*optional=*/false);
  if (check.ok()) check = CheckSessionId(request.new_session_id(), "new_session_id");
  if (!check.ok()) {
    reply->Done(check);
    return reply;
  }
  if (draining_.load()) {
    reply->Done(absl::UnavailableError("server is draining; retry on another replica"));
    return reply;
  }
  const std::string id = request.new_session_id().empty() ? RandomId() : request.new_session_id();
  reply->set_session(request.session_id());
  Offload(reply, [this, reply, caller, source_id = caller + request.session_id(), id] {
    auto source = FindSession(source_id);
    if (!source.ok()) {
      reply->Done(source.status());
      return;
    }
    auto info = engine_->ForkSession(source_id, caller + id);
    if (info.ok()) ToProto(*info, caller, reply->response());
    ReplySaved(reply, caller + id, info.status());
  });
  return reply;
}

grpc::ServerUnaryReactor* RetNetService::DeleteSession(grpc::CallbackServerContext* context,
                                                       const Raw* in, Raw* out) {
  auto* reply = new UnaryReply<v1::DeleteSessionResponse>("DeleteSession", out);
  v1::DeleteSessionRequest request;
  std::string caller;
  if (!Begin(context, in, &request, reply, &caller) ||
      !RequireSessionId(request.session_id(), reply)) {
    return reply;
  }
  Offload(reply, [this, reply, id = caller + request.session_id()] {
    absl::Status deleted = engine_->DeleteSession(id);
    // A session another replica left in the shared state directory is deleted there too; a
    // refused delete (busy) leaves the snapshot alone.
    if (deleted.ok() || absl::IsNotFound(deleted)) {
      const bool stored = store_ != nullptr && store_->Forget(id);
      if (absl::IsNotFound(deleted) && stored) deleted = absl::OkStatus();
    }
    reply->Done(deleted);
  });
  return reply;
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* RetNetService::ExportSession(
    grpc::CallbackServerContext* context, const Raw* in) {
  v1::ExportSessionRequest request;
  absl::StatusOr<std::string> caller = [&]() -> absl::StatusOr<std::string> {
    RETURN_IF_ERROR(ParseRequest(*in, &request));
    ASSIGN_OR_RETURN(std::string caller, Admit(*context));
    RETURN_IF_ERROR(CheckSessionId(request.session_id(), "session_id", /*optional=*/false));
    return caller;
  }();
  auto* reactor = new ExportReactor(options_.snapshot_chunk_bytes);
  if (!caller.ok()) {
    reactor->Refuse(caller.status());
    return reactor;
  }
  absl::Status queued = control_->Submit(
      [this, reactor, id = *caller + request.session_id(), session = request.session_id()] {
        absl::StatusOr<std::string> snapshot = [&]() -> absl::StatusOr<std::string> {
          RETURN_IF_ERROR(FindSession(id).status());
          return engine_->SnapshotSession(id);
        }();
        if (snapshot.ok()) {
          reactor->Send(*std::move(snapshot), session);
        } else {
          reactor->Refuse(snapshot.status());
        }
      });
  if (!queued.ok()) reactor->Refuse(queued);
  return reactor;
}

grpc::ServerReadReactor<grpc::ByteBuffer>* RetNetService::ImportSession(
    grpc::CallbackServerContext* context, Raw* out) {
  auto caller = Admit(*context);
  if (!caller.ok() || draining_.load()) {
    return new Refused<grpc::ServerReadReactor<Raw>>(
        "ImportSession", caller.ok() ? absl::UnavailableError("server is draining; retry on "
                                                              "another replica")
                                     : caller.status());
  }
  // A snapshot is the state plus a header and the token history: bound what one call may buffer.
  const int64_t limit =
      std::min<int64_t>(options_.max_snapshot_bytes, engine_->model_state_bytes() + (64 << 20));
  return new ImportReactor(context, engine_, store_, control_.get(), *caller, limit, out);
}

grpc::ServerUnaryReactor* RetNetService::Tokenize(grpc::CallbackServerContext* context,
                                                  const Raw* in, Raw* out) {
  auto* reply = new UnaryReply<v1::TokenizeResponse>("Tokenize", out);
  auto request = std::make_shared<v1::TokenizeRequest>();
  std::string caller;
  if (!Begin(context, in, request.get(), reply, &caller)) return reply;
  if (absl::Status has = HasTokenizer("Tokenize"); !has.ok()) {
    reply->Done(has);
    return reply;
  }
  auto tokenize = [this, reply, request] {
    const model::Tokenizer& tok = engine_->tokenizer();
    auto ids = tok.Encode(request->text());
    if (!ids.ok()) {
      reply->Done(ids.status());
      return;
    }
    if (request->add_bos() && tok.bos_id() >= 0) reply->response()->add_ids(tok.bos_id());
    for (int64_t id : *ids) reply->response()->add_ids(id);
    reply->Done(absl::OkStatus());
  };
  if (request->text().size() <= kInlineTokenizeBytes) {
    tokenize();
  } else {
    Offload(reply, std::move(tokenize));
  }
  return reply;
}

grpc::ServerUnaryReactor* RetNetService::Detokenize(grpc::CallbackServerContext* context,
                                                    const Raw* in, Raw* out) {
  auto* reply = new UnaryReply<v1::DetokenizeResponse>("Detokenize", out);
  v1::DetokenizeRequest request;
  std::string caller;
  if (!Begin(context, in, &request, reply, &caller)) return reply;
  if (absl::Status has = HasTokenizer("Detokenize"); !has.ok()) {
    reply->Done(has);
    return reply;
  }
  const int64_t vocab = engine_->model_vocab_size();
  auto ids = std::make_shared<std::vector<int64_t>>();
  ids->reserve(request.ids_size());
  for (int64_t id : request.ids()) {
    if (id < 0 || id >= vocab) {
      reply->Done(absl::InvalidArgumentError(
          absl::StrCat("ids: token id ", id, " is outside the vocabulary [0, ", vocab, ")")));
      return reply;
    }
    ids->push_back(id);
  }
  auto detokenize = [this, reply, ids] {
    std::string raw = engine_->tokenizer().Decode(*ids);
    reply->response()->set_text(common::SanitizeUtf8(raw));
    reply->response()->set_raw(std::move(raw));
    reply->Done(absl::OkStatus());
  };
  if (ids->size() <= kInlineDetokenizeIds) {
    detokenize();
  } else {
    Offload(reply, std::move(detokenize));
  }
  return reply;
}

grpc::ServerUnaryReactor* RetNetService::GetModelInfo(grpc::CallbackServerContext* context,
                                                      const Raw* in, Raw* out) {
  auto* reply = new UnaryReply<v1::ModelInfo>("GetModelInfo", out);
  v1::GetModelInfoRequest request;
  std::string caller;
  if (!Begin(context, in, &request, reply, &caller)) return reply;
  v1::ModelInfo* response = reply->response();
  const engine::ModelSummary m = engine_->model_summary();
  const engine::PoolStats stats = engine_->Stats();
  // Strings that come from the operator (a checkpoint path, a config) are repaired: every
  // string on the wire is valid UTF-8.
  response->set_family(common::SanitizeUtf8(m.family));
  response->set_layout(common::SanitizeUtf8(m.layout));
  response->set_checkpoint(common::SanitizeUtf8(options_.checkpoint));
  response->set_num_layers(m.num_layers);
  response->set_hidden_size(m.hidden_size);
  response->set_num_heads(m.num_heads);
  response->set_head_k_dim(m.head_k_dim);
  response->set_head_v_dim(m.head_v_dim);
  response->set_vocab_size(m.vocab_size);
  response->set_parameters(m.parameters);
  response->set_dtype(common::SanitizeUtf8(options_.dtype));
  response->set_device(common::SanitizeUtf8(options_.device));
  response->set_tokenizer(engine_->tokenizer().kind());
  response->set_bos_token_id(engine_->tokenizer().bos_id());
  response->set_eos_token_id(engine_->tokenizer().eos_id());
  response->set_state_bytes_per_session(stats.state_bytes_per_session);
  response->set_device_slots(stats.device_slots);
  response->set_free_slots(stats.free_slots);
  response->set_max_host_sessions(stats.host_capacity);
  response->set_max_prompt_tokens(engine_->options().max_prompt_tokens);
  response->set_max_new_tokens(engine_->options().max_new_tokens_limit);
  for (const char* ext : {"session", "session.fork", "session.snapshot"})
    response->add_extensions(ext);
  reply->Done(absl::OkStatus());
  return reply;
}

}  // namespace retnet::server
