#include "server/service.h"

#include <chrono>
#include <memory>
#include <optional>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "server/status.h"

namespace retnet::server {
namespace {

namespace v1 = ::retnet::v1;

std::string RandomId() {
  std::random_device rd;
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id = "s-";
  for (int i = 0; i < 16; ++i) id.push_back(kHex[rd() % 16]);
  return id;
}

int64_t UnixMs(absl::Time t) { return absl::ToUnixMillis(t); }

void ToProto(const engine::SessionInfo& info, const std::string& prefix, v1::Session* out) {
  out->set_session_id(info.id.substr(prefix.size()));
  out->set_position(info.position);
  if (info.pending_token) out->set_pending_token(*info.pending_token);
  out->set_resident(info.resident);
  out->set_generating(info.generating);
  out->set_created_unix_ms(UnixMs(info.created));
  out->set_last_used_unix_ms(UnixMs(info.last_used));
}

grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* context, const absl::Status& status) {
  auto* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpc(status));
  return reactor;
}

absl::Status CheckSessionId(const std::string& id, const char* field) {
  if (id.size() > 96) return absl::InvalidArgumentError(absl::StrCat(field, ": at most 96 bytes"));
  for (unsigned char c : id) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": printable ASCII without spaces only"));
    }
  }
  return absl::OkStatus();
}

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

v1::FinishReason ToProto(engine::FinishReason r) {
  switch (r) {
    case engine::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kEos:
      return v1::FINISH_REASON_EOS_TOKEN;
    case engine::FinishReason::kStop:
      return v1::FINISH_REASON_STOP_SEQUENCE;
    case engine::FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case engine::FinishReason::kDeadline:
      return v1::FINISH_REASON_DEADLINE;
    case engine::FinishReason::kError:
      return v1::FINISH_REASON_ERROR;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

class GenerateReactor;

// The engine's sink for one stream. It outlives the reactor if needed: the reactor detaches
// itself in OnDone, after which events are dropped.
class SinkBridge final : public engine::TokenSink {
 public:
  explicit SinkBridge(GenerateReactor* reactor) : reactor_(reactor) {}
  void OnToken(engine::TokenEvent event) override;
  void OnFinish(engine::Finish finish) override;
  void Detach() {
    absl::MutexLock lock(&mu_);
    reactor_ = nullptr;
  }

 private:
  absl::Mutex mu_;
  GenerateReactor* reactor_ ABSL_GUARDED_BY(mu_);
};

class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(grpc::CallbackServerContext* context, std::string session_id,
                  bool created_session)
      : context_(context), session_id_(std::move(session_id)), created_(created_session) {}

  void Start(engine::Engine* engine, engine::GenerateRequest request) {
    bridge_ = std::make_shared<SinkBridge>(this);
    const std::string internal_id = request.session_id;
    auto generation = engine->Submit(std::move(request), bridge_);
    if (!generation.ok()) {
      if (created_) (void)engine->DeleteSession(internal_id);
      End(ToGrpc(generation.status()));
      return;
    }
    absl::MutexLock lock(&mu_);
    generation_ = *generation;
    if (client_gone_) generation_->Cancel();
  }

  // Engine thread.
  void Push(engine::TokenEvent e) {
    {
      absl::MutexLock lock(&mu_);
      if (!first_token_) first_token_ = absl::Now();
      v1::Token* t = pending_.add_tokens();
      t->set_id(e.token);
      t->set_text(std::move(e.text));
      if (e.logprob != 0 || !e.top_logprobs.empty()) t->set_logprob(e.logprob);
      for (const auto& [id, lp] : e.top_logprobs) {
        auto* top = t->add_top_logprobs();
        top->set_id(id);
        top->set_logprob(lp);
      }
    }
    Pump();
  }

  void Done(engine::Finish f) {
    {
      absl::MutexLock lock(&mu_);
      if (f.reason == engine::FinishReason::kError) {
        end_status_ = ToGrpc(f.status);
      } else if (client_gone_) {
        end_status_ = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
      } else if (f.reason == engine::FinishReason::kDeadline) {
        end_status_ =
            grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                         absl::StrCat("deadline exceeded after ", f.completion_tokens, " tokens"));
      } else {
        final_.emplace();
        v1::Final* fin = final_->mutable_final();
        fin->set_finish_reason(ToProto(f.reason));
        fin->set_text(f.text);
        fin->set_stop_sequence(f.stop_string);
        fin->set_session_id(session_id_);
        auto* usage = fin->mutable_usage();
        usage->set_prompt_tokens(f.prompt_tokens);
        usage->set_completion_tokens(f.completion_tokens);
        usage->set_session_tokens_total(f.position + (f.completion_tokens > 0 ? 1 : 0));
        const absl::Time now = absl::Now();
        fin->mutable_timings()->set_first_token_ns(
            first_token_ ? absl::ToInt64Nanoseconds(*first_token_ - arrival_) : 0);
        fin->mutable_timings()->set_total_ns(absl::ToInt64Nanoseconds(now - arrival_));
        end_status_ = grpc::Status::OK;
      }
      ended_ = true;
    }
    Pump();
  }

  void set_state_bytes(int64_t bytes) { state_bytes_ = bytes; }

  // Ends the RPC before anything was submitted.
  void End(grpc::Status status) {
    {
      absl::MutexLock lock(&mu_);
      end_status_ = std::move(status);
      ended_ = true;
    }
    Pump();
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        client_gone_ = true;
        if (generation_) generation_->Cancel();
      }
    }
    Pump();
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    client_gone_ = true;
    if (generation_) generation_->Cancel();
  }

  void OnDone() override {
    if (bridge_) bridge_->Detach();
    delete this;
  }

 private:
  // Starts the next write or the finish, if none is in flight. One write at a time; tokens that
  // arrive meanwhile are merged into the next chunk.
  void Pump() {
    enum { kNothing, kWrite, kWriteAndFinish, kFinish } action = kNothing;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || finished_) return;
      if (pending_.tokens_size() > 0 && !client_gone_) {
        *out_.mutable_chunk() = std::move(pending_);
        pending_.Clear();
        writing_ = true;
        action = kWrite;
      } else if (ended_) {
        finished_ = true;
        status = end_status_;
        if (final_ && !client_gone_ && status.ok()) {
          if (state_bytes_ > 0)
            final_->mutable_final()->mutable_usage()->set_state_bytes(state_bytes_);
          out_ = std::move(*final_);
          action = kWriteAndFinish;
        } else {
          action = kFinish;
        }
      }
    }
    if (action == kWrite) StartWrite(&out_);
    if (action == kWriteAndFinish) StartWriteAndFinish(&out_, grpc::WriteOptions(), status);
    if (action == kFinish) Finish(status);
  }

  grpc::CallbackServerContext* context_;
  const std::string session_id_;
  const bool created_;
  const absl::Time arrival_ = absl::Now();
  int64_t state_bytes_ = 0;
  std::shared_ptr<SinkBridge> bridge_;

  absl::Mutex mu_;
  std::shared_ptr<engine::Generation> generation_ ABSL_GUARDED_BY(mu_);
  v1::TokenChunk pending_ ABSL_GUARDED_BY(mu_);
  std::optional<v1::GenerateResponse> final_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::Time> first_token_ ABSL_GUARDED_BY(mu_);
  grpc::Status end_status_ ABSL_GUARDED_BY(mu_);
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool client_gone_ ABSL_GUARDED_BY(mu_) = false;
  v1::GenerateResponse out_;  // the message of the write in flight
};

void SinkBridge::OnToken(engine::TokenEvent event) {
  absl::MutexLock lock(&mu_);
  if (reactor_ != nullptr) reactor_->Push(std::move(event));
}

void SinkBridge::OnFinish(engine::Finish finish) {
  absl::MutexLock lock(&mu_);
  if (reactor_ != nullptr) reactor_->Done(std::move(finish));
}

class ExportReactor final : public grpc::ServerWriteReactor<v1::SnapshotChunk> {
 public:
  ExportReactor(std::string data, int64_t chunk) : data_(std::move(data)), chunk_(chunk) { Next(); }
  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
      return;
    }
    Next();
  }
  void OnDone() override { delete this; }

 private:
  void Next() {
    if (sent_ >= data_.size()) {
      Finish(grpc::Status::OK);
      return;
    }
    const size_t n = std::min<size_t>(chunk_, data_.size() - sent_);
    msg_.Clear();
    if (sent_ == 0) msg_.set_total_bytes(static_cast<int64_t>(data_.size()));
    msg_.set_data(data_.substr(sent_, n));
    sent_ += n;
    StartWrite(&msg_);
  }
  const std::string data_;
  const int64_t chunk_;
  size_t sent_ = 0;
  v1::SnapshotChunk msg_;
};

class ImportReactor final : public grpc::ServerReadReactor<v1::ImportSessionRequest> {
 public:
  ImportReactor(engine::Engine* engine, std::string prefix, int64_t max_bytes,
                v1::Session* response)
      : engine_(engine), prefix_(std::move(prefix)), max_bytes_(max_bytes), response_(response) {
    StartRead(&msg_);
  }
  void OnReadDone(bool ok) override {
    if (ok) {
      if (first_) {
        first_ = false;
        id_ = msg_.session_id();
      }
      if (static_cast<int64_t>(data_.size() + msg_.data().size()) > max_bytes_) {
        Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                            "data: snapshot exceeds the size limit"));
        return;
      }
      data_ += msg_.data();
      StartRead(&msg_);
      return;
    }
    absl::Status check = CheckSessionId(id_, "session_id");
    if (!check.ok()) {
      Finish(ToGrpc(check));
      return;
    }
    auto info = engine_->RestoreSession(data_, id_.empty() ? prefix_ + RandomId() : prefix_ + id_);
    if (info.ok()) ToProto(*info, prefix_, response_);
    Finish(ToGrpc(info.status()));
  }
  void OnDone() override { delete this; }

 private:
  engine::Engine* engine_;
  const std::string prefix_;
  const int64_t max_bytes_;
  v1::Session* response_;
  v1::ImportSessionRequest msg_;
  bool first_ = true;
  std::string id_;
  std::string data_;
};

}  // namespace

RetNetService::RetNetService(engine::Engine* engine, const ApiKeys* keys, ServiceOptions options)
    : engine_(engine), keys_(keys), options_(std::move(options)) {}

grpc::ServerWriteReactor<v1::GenerateResponse>* RetNetService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto caller = keys_->Authenticate(*context);
  auto fail = [&](const absl::Status& s) {
    auto* r = new GenerateReactor(context, "", false);
    r->End(ToGrpc(s));
    return r;
  };
  if (!caller.ok()) return fail(caller.status());
  if (draining_.load())
    return fail(absl::UnavailableError("server is draining; retry on another replica"));
  const std::string& prefix = *caller;
  auto sampling = ConvertSampling(*request, options_.default_max_new_tokens);
  if (!sampling.ok()) return fail(sampling.status());
  absl::Status id_check = CheckSessionId(request->session_id(), "session_id");
  if (!id_check.ok()) return fail(id_check);

  // Resolve or create the session.
  std::string public_id = request->session_id();
  bool created = false;
  absl::StatusOr<engine::SessionInfo> info;
  if (public_id.empty()) {
    public_id = RandomId();
    info = engine_->CreateSession(prefix + public_id);
    created = true;
  } else {
    info = engine_->GetSession(prefix + public_id);
    if (absl::IsNotFound(info.status()) && request->create_session()) {
      info = engine_->CreateSession(prefix + public_id);
      created = true;
    }
  }
  if (!info.ok()) return fail(info.status());

  engine::GenerateRequest req;
  req.session_id = prefix + public_id;
  req.sampling = *std::move(sampling);
  const model::Tokenizer& tok = engine_->tokenizer();
  const bool fresh = info->position == 0 && !info->pending_token.has_value();
  if (fresh && (!request->has_add_bos() || request->add_bos()) && tok.bos_id() >= 0)
    req.prompt.push_back(tok.bos_id());
  if (request->has_text()) {
    auto ids = tok.Encode(request->text());
    if (!ids.ok()) {
      if (created) (void)engine_->DeleteSession(req.session_id);
      return fail(ids.status());
    }
    req.prompt.insert(req.prompt.end(), ids->begin(), ids->end());
  } else if (request->has_tokens()) {
    req.prompt.insert(req.prompt.end(), request->tokens().ids().begin(),
                      request->tokens().ids().end());
  }
  if (context->deadline() != std::chrono::system_clock::time_point::max()) {
    req.deadline = absl::FromChrono(context->deadline());
  }
  auto* reactor = new GenerateReactor(context, public_id, created);
  reactor->set_state_bytes(engine_->model_state_bytes());
  reactor->Start(engine_, std::move(req));
  return reactor;
}

grpc::ServerUnaryReactor* RetNetService::CreateSession(grpc::CallbackServerContext* context,
                                                       const v1::CreateSessionRequest* request,
                                                       v1::Session* response) {
  auto caller = keys_->Authenticate(*context);
  if (!caller.ok()) return Reply(context, caller.status());
  if (draining_.load()) return Reply(context, absl::UnavailableError("server is draining"));
  absl::Status check = CheckSessionId(request->session_id(), "session_id");
  if (!check.ok()) return Reply(context, check);
  const std::string id = request->session_id().empty() ? RandomId() : request->session_id();
  auto info = engine_->CreateSession(*caller + id);
  if (info.ok()) ToProto(*info, *caller, response);
  return Reply(context, info.status());
}

grpc::ServerUnaryReactor* RetNetService::GetSession(grpc::CallbackServerContext* context,
                                                    const v1::GetSessionRequest* request,
                                                    v1::Session* response) {
  auto caller = keys_->Authenticate(*context);
  if (!caller.ok()) return Reply(context, caller.status());
  auto info = engine_->GetSession(*caller + request->session_id());
  if (info.ok()) ToProto(*info, *caller, response);
  return Reply(context, info.status());
}

grpc::ServerUnaryReactor* RetNetService::ListSessions(grpc::CallbackServerContext* context,
                                                      const v1::ListSessionsRequest* request,
                                                      v1::ListSessionsResponse* response) {
  auto caller = keys_->Authenticate(*context);
  if (!caller.ok()) return Reply(context, caller.status());
  for (const auto& info : engine_->ListSessions(*caller)) {
    // Without keys, the keyed sessions ("k<tag>/...") stay invisible too.
    if (caller->empty() && info.id.find('/') != std::string::npos) continue;
    ToProto(info, *caller, response->add_sessions());
  }
  return Reply(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* RetNetService::ForkSession(grpc::CallbackServerContext* context,
                                                     const v1::ForkSessionRequest* request,
                                                     v1::Session* response) {
  auto caller = keys_->Authenticate(*context);
  if (!caller.ok()) return Reply(context, caller.status());
  absl::Status check = CheckSessionId(request->new_session_id(), "new_session_id");
  if (!check.ok()) return Reply(context, check);
  const std::string id = request->new_session_id().empty() ? RandomId() : request->new_session_id();
  auto info = engine_->ForkSession(*caller + request->session_id(), *caller + id);
  if (info.ok()) ToProto(*info, *caller, response);
  return Reply(context, info.status());
}

grpc::ServerUnaryReactor* RetNetService::DeleteSession(grpc::CallbackServerContext* context,
                                                       const v1::DeleteSessionRequest* request,
                                                       v1::DeleteSessionResponse* response) {
  auto caller = keys_->Authenticate(*context);
  if (!caller.ok()) return Reply(context, caller.status());
  return Reply(context, engine_->DeleteSession(*caller + request->session_id()));
}

grpc::ServerWriteReactor<v1::SnapshotChunk>* RetNetService::ExportSession(
    grpc::CallbackServerContext* context, const v1::ExportSessionRequest* request) {
  auto caller = keys_->Authenticate(*context);
  absl::StatusOr<std::string> snapshot =
      caller.ok() ? engine_->SnapshotSession(*caller + request->session_id()) : caller.status();
  if (!snapshot.ok()) {
    class Failed final : public grpc::ServerWriteReactor<v1::SnapshotChunk> {
     public:
      explicit Failed(const absl::Status& s) { Finish(ToGrpc(s)); }
      void OnDone() override { delete this; }
    };
    return new Failed(snapshot.status());
  }
  return new ExportReactor(*std::move(snapshot), options_.snapshot_chunk_bytes);
}

grpc::ServerReadReactor<v1::ImportSessionRequest>* RetNetService::ImportSession(
    grpc::CallbackServerContext* context, v1::Session* response) {
  auto caller = keys_->Authenticate(*context);
  if (!caller.ok() || draining_.load()) {
    class Failed final : public grpc::ServerReadReactor<v1::ImportSessionRequest> {
     public:
      explicit Failed(const absl::Status& s) { Finish(ToGrpc(s)); }
      void OnDone() override { delete this; }
    };
    return new Failed(caller.ok() ? absl::UnavailableError("server is draining") : caller.status());
  }
  return new ImportReactor(engine_, *caller, options_.max_snapshot_bytes, response);
}

grpc::ServerUnaryReactor* RetNetService::Tokenize(grpc::CallbackServerContext* context,
                                                  const v1::TokenizeRequest* request,
                                                  v1::TokenizeResponse* response) {
  auto caller = keys_->Authenticate(*context);
  if (!caller.ok()) return Reply(context, caller.status());
  const model::Tokenizer& tok = engine_->tokenizer();
  auto ids = tok.Encode(request->text());
  if (!ids.ok()) return Reply(context, ids.status());
  if (request->add_bos() && tok.bos_id() >= 0) response->add_ids(tok.bos_id());
  for (int64_t id : *ids) response->add_ids(id);
  return Reply(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* RetNetService::Detokenize(grpc::CallbackServerContext* context,
                                                    const v1::DetokenizeRequest* request,
                                                    v1::DetokenizeResponse* response) {
  auto caller = keys_->Authenticate(*context);
  if (!caller.ok()) return Reply(context, caller.status());
  const int64_t vocab = engine_->model_vocab_size();
  std::vector<int64_t> ids;
  for (int64_t id : request->ids()) {
    if (id < 0 || id >= vocab) {
      return Reply(context,
                   absl::InvalidArgumentError(absl::StrCat(
                       "ids: token id ", id, " is outside the vocabulary [0, ", vocab, ")")));
    }
    ids.push_back(id);
  }
  response->set_text(engine_->tokenizer().Decode(ids));
  return Reply(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* RetNetService::GetModelInfo(grpc::CallbackServerContext* context,
                                                      const v1::GetModelInfoRequest* request,
                                                      v1::ModelInfo* response) {
  auto caller = keys_->Authenticate(*context);
  if (!caller.ok()) return Reply(context, caller.status());
  const engine::ModelSummary m = engine_->model_summary();
  const engine::PoolStats stats = engine_->Stats();
  response->set_family(m.family);
  response->set_layout(m.layout);
  response->set_checkpoint(options_.checkpoint);
  response->set_num_layers(m.num_layers);
  response->set_hidden_size(m.hidden_size);
  response->set_num_heads(m.num_heads);
  response->set_head_k_dim(m.head_k_dim);
  response->set_head_v_dim(m.head_v_dim);
  response->set_vocab_size(m.vocab_size);
  response->set_parameters(m.parameters);
  response->set_dtype(options_.dtype);
  response->set_device(options_.device);
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
  return Reply(context, absl::OkStatus());
}

}  // namespace retnet::server
