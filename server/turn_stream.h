// File: server/turn_stream.h
//
// One turn's output on its way from the engine thread to a gRPC stream. The engine calls the
// TokenSink methods; the owning reactor calls Next() whenever no write is in flight. Tokens that
// arrive while a write is in flight accumulate and leave as ONE merged TokenChunk, so a slow
// reader gets fewer, larger messages and never slows the engine. The turn ends with a Final
// message (finish reason, usage, timings) or an error status.
//
// Delivery: the engine thread only moves each token event into a vector under the lock (once per
// step per stream) and wakes the reactor when that vector was empty, i.e. once per write, not
// per token; the TokenChunk protobuf, the latency metrics and the serialisation are built in
// Next(), outside the lock, by whichever thread pumps the reactor (a gRPC thread whenever a
// write is in flight: OnWriteDone pumps).
//
// Threading: the sink methods run on the engine thread, the others on gRPC threads. Next() is
// called by one thread at a time (the reactor's lock). The wake callback (the reactor's Pump) is
// called without the data lock held, under a separate lock that Detach() also takes, so a
// detached reactor is never called again.
#ifndef RETNET_SERVER_TURN_STREAM_H_
#define RETNET_SERVER_TURN_STREAM_H_

#include <grpcpp/support/status.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "engine/engine.h"
#include "retnet/v1/retnet.pb.h"
#include "server/metrics.h"
#include "server/status.h"
#include "server/wire.h"

namespace retnet::server {

retnet::v1::FinishReason ToProto(engine::FinishReason r);

// One turn's output on its way from the engine thread to a stream: tokens accumulate while a
// write is in flight and leave as one merged TokenChunk; the turn ends with a Final message or
// an error status. Not a reactor itself: the Generate and Chat reactors drive it.
class TurnStream : public engine::TokenSink, public std::enable_shared_from_this<TurnStream> {
 public:
  // What the reactor must do next (computed under the lock, done outside it).
  enum class Action { kNothing, kWriteChunk, kWriteFinal, kEndWithStatus };

  // `metrics` (may be null, not owned) receives this turn's latencies, tokens and status.
  TurnStream(std::string session_id, int64_t state_bytes, Metrics* metrics = nullptr)
      : session_id_(std::move(session_id)), state_bytes_(state_bytes), metrics_(metrics) {}
  // The turn's log line (server/wire.h LogCall) is written once, when its end is handed to the
  // reactor, or when the stream goes away before that.
  ~TurnStream() override {
    absl::MutexLock lock(&mu_);
    LogOnce(grpc::StatusCode::CANCELLED);
  }

  // The RPC named in the log line ("Generate" unless set; "Chat" for chat turns).
  void SetMethod(const char* method) {
    absl::MutexLock lock(&mu_);
    method_ = method;
  }

  // Wakes the owning reactor; set once, cleared (under the lock) when the reactor is done.
  void Attach(std::function<void()> wake) {
    absl::MutexLock lock(&wake_mu_);
    wake_ = std::move(wake);
  }
  // After Detach() returns, the reactor is never called again.
  void Detach() {
    absl::MutexLock lock(&wake_mu_);
    wake_ = nullptr;
  }
  // Write-through persistence: when the turn ends, its end (Final or status) is held back until
  // `persist` has saved the session and called the function it is given with the outcome; a
  // failed save replaces a Final with that error (the turn is not durable). Set before Submit.
  using Persist = std::function<void(std::function<void(absl::Status)> release)>;
  void SetPersist(Persist persist) {
    absl::MutexLock lock(&mu_);
    persist_ = std::move(persist);
  }
  // Send each token's exact bytes too (GenerateRequest.return_token_bytes). Set before Submit.
  void SetTokenBytes(bool on) {
    absl::MutexLock lock(&mu_);
    token_bytes_ = on;
  }
  void SetGeneration(std::shared_ptr<engine::Generation> g) {
    absl::MutexLock lock(&mu_);
    generation_ = std::move(g);
    if (client_gone_) generation_->Cancel();
  }
  void ClientGone() {
    absl::MutexLock lock(&mu_);
    client_gone_ = true;
    if (generation_) generation_->Cancel();
  }
  void Fail(grpc::Status status) {
    absl::MutexLock lock(&mu_);
    if (metrics_ != nullptr) metrics_->CountRequest(StatusCodeName(status.error_code()));
    end_status_ = std::move(status);
    ended_ = true;
  }

  void OnToken(engine::TokenEvent e) override {
    bool first = false;
    {
      absl::MutexLock lock(&mu_);
      const absl::Time now = absl::Now();
      if (!first_token_) first_token_ = now;
      first = events_.empty();
      events_.push_back(std::move(e));
      times_.push_back(now);
    }
    if (first) Wake();  // otherwise the reactor has not taken the previous ones yet
  }
  void OnFinish(engine::Finish f) override {
    Persist persist = End(std::move(f));
    if (!persist) {
      Wake();
      return;
    }
    std::weak_ptr<TurnStream> weak = weak_from_this();
    persist([weak](absl::Status saved) {
      if (auto self = weak.lock()) {
        {
          absl::MutexLock lock(&self->mu_);
          self->held_ = false;
          if (!saved.ok() && self->end_status_.ok()) {
            self->final_.reset();
            self->end_status_ = ToGrpc(saved);
          }
        }
        self->Wake();
      }
    });
  }

 private:
  // The reactor's Pump takes its own lock and then mu_, so it is called with mu_ released; the
  // separate wake_mu_ keeps the reactor alive during the call.
  void Wake() {
    absl::MutexLock lock(&wake_mu_);
    if (wake_) wake_();
  }

  // Returns the persist hook when the end must wait for it.
  Persist End(engine::Finish f) {
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
      retnet::v1::Final* fin = final_->mutable_final();
      fin->set_finish_reason(ToProto(f.reason));
      fin->set_text(f.text);
      fin->set_stop_sequence(f.stop_string);
      fin->set_session_id(session_id_);
      if (f.transcript) {
        fin->mutable_transcript()->set_length(f.transcript->length);
        fin->mutable_transcript()->set_digest(f.transcript->digest);
      }
      auto* usage = fin->mutable_usage();
      usage->set_prompt_tokens(f.prompt_tokens);
      usage->set_completion_tokens(f.completion_tokens);
      usage->set_session_tokens_total(f.position + (f.completion_tokens > 0 ? 1 : 0));
      usage->set_state_bytes(state_bytes_);
      fin->mutable_timings()->set_first_token_ns(
          first_token_ ? absl::ToInt64Nanoseconds(*first_token_ - arrival_) : 0);
      fin->mutable_timings()->set_total_ns(absl::ToInt64Nanoseconds(absl::Now() - arrival_));
      end_status_ = grpc::Status::OK;
    }
    ended_ = true;
    if (metrics_ != nullptr) {
      metrics_->AddGeneratedTokens(f.completion_tokens);
      metrics_->AddPromptTokens(f.prompt_tokens);
      metrics_->ObserveRequestLatency(absl::ToDoubleSeconds(absl::Now() - arrival_));
      metrics_->CountRequest(StatusCodeName(end_status_.error_code()));
    }
    prompt_tokens_ = f.prompt_tokens;
    completion_tokens_ = f.completion_tokens;
    held_ = static_cast<bool>(persist_);
    return persist_;
  }

  // Builds the chunk for `events` (taken from events_) and records their latencies.
  void BuildChunk(std::vector<engine::TokenEvent>& events, const std::vector<absl::Time>& times,
                  bool token_bytes, retnet::v1::TokenChunk* chunk) {
    for (size_t i = 0; i < events.size(); ++i) {
      engine::TokenEvent& e = events[i];
      if (metrics_ != nullptr) {
        if (!last_token_) {
          metrics_->ObserveTimeToFirstToken(absl::ToDoubleSeconds(times[i] - arrival_));
        } else {
          metrics_->ObserveInterTokenLatency(absl::ToDoubleSeconds(times[i] - *last_token_));
        }
      }
      last_token_ = times[i];
      retnet::v1::Token* t = chunk->add_tokens();
      t->set_id(e.token);
      t->set_text(std::move(e.text));
      if (e.has_logprob) t->set_logprob(e.logprob);
      if (token_bytes) t->set_token_bytes(std::move(e.bytes));
      for (const auto& [id, lp] : e.top_logprobs) {
        auto* top = t->add_top_logprobs();
        top->set_id(id);
        top->set_logprob(lp);
      }
    }
  }

  void LogOnce(grpc::StatusCode code) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (logged_) return;
    logged_ = true;
    LogCall(method_, session_id_, code, prompt_tokens_, completion_tokens_, arrival_);
  }

 public:
  // Called by the reactor when no write is in flight. Fills `out` for kWriteChunk/kWriteFinal,
  // `status` for kEndWithStatus. After kWriteFinal or kEndWithStatus the turn is over.
  Action Next(retnet::v1::GenerateResponse* out, grpc::Status* status) {
    bool token_bytes = false;
    {
      absl::MutexLock lock(&mu_);
      if (over_) return Action::kNothing;
      if (!events_.empty() && !client_gone_) {
        taken_.swap(events_);
        taken_times_.swap(times_);
        token_bytes = token_bytes_;
      } else {
        events_.clear();  // the client is gone: nobody reads them
        times_.clear();
        if (!ended_ || held_) return Action::kNothing;
        return EndLocked(out, status);
      }
    }
    // Outside the lock: the engine thread keeps appending to events_ meanwhile.
    out->Clear();
    BuildChunk(taken_, taken_times_, token_bytes, out->mutable_chunk());
    taken_.clear();
    taken_times_.clear();
    return Action::kWriteChunk;
  }

 private:
  Action EndLocked(retnet::v1::GenerateResponse* out, grpc::Status* status)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    over_ = true;
    if (final_ && !client_gone_) {
      *out = std::move(*final_);
      LogOnce(grpc::StatusCode::OK);
      return Action::kWriteFinal;
    }
    *status =
        end_status_.ok() ? grpc::Status(grpc::StatusCode::CANCELLED, "cancelled") : end_status_;
    LogOnce(status->error_code());
    return Action::kEndWithStatus;
  }

 private:
  const std::string session_id_;
  const int64_t state_bytes_;
  Metrics* const metrics_;
  const absl::Time arrival_ = absl::Now();
  // Used by Next() only (one caller at a time), outside mu_.
  std::optional<absl::Time> last_token_;
  std::vector<engine::TokenEvent> taken_;
  std::vector<absl::Time> taken_times_;
  absl::Mutex wake_mu_;
  std::function<void()> wake_ ABSL_GUARDED_BY(wake_mu_);
  absl::Mutex mu_;
  std::shared_ptr<engine::Generation> generation_ ABSL_GUARDED_BY(mu_);
  Persist persist_ ABSL_GUARDED_BY(mu_);
  bool held_ ABSL_GUARDED_BY(mu_) = false;  // the end waits for persist_
  bool token_bytes_ ABSL_GUARDED_BY(mu_) = false;
  const char* method_ ABSL_GUARDED_BY(mu_) = "Generate";
  int64_t prompt_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t completion_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  bool logged_ ABSL_GUARDED_BY(mu_) = false;
  // Produced, not yet taken by Next(), and when each arrived.
  std::vector<engine::TokenEvent> events_ ABSL_GUARDED_BY(mu_);
  std::vector<absl::Time> times_ ABSL_GUARDED_BY(mu_);
  std::optional<retnet::v1::GenerateResponse> final_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::Time> first_token_ ABSL_GUARDED_BY(mu_);
  grpc::Status end_status_ ABSL_GUARDED_BY(mu_);
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  bool over_ ABSL_GUARDED_BY(mu_) = false;
  bool client_gone_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace retnet::server

#endif  // RETNET_SERVER_TURN_STREAM_H_
