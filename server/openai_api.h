// File: server/openai_api.h
//
// The OpenAI-compatible HTTP API (`--http-listen`): POST /v1/completions, POST
// /v1/chat/completions (streamed as server-sent events or not), GET /v1/models[/{id}], GET
// /health and GET /metrics (the same exposition as --metrics-listen, as vLLM serves it), served by
// cpp-httplib on its own port.
//
// It is a translation layer over this server's own gRPC service, called through an in-process
// channel (no socket): every request becomes retnet.v1 calls carrying the HTTP request's
// `Authorization` header as metadata, so keys, session prefixes, validation, admission,
// write-through persistence, draining and the gRPC metrics apply to both fronts alike. What is
// HTTP's own: OpenAI's JSON shapes and error bodies, chat templates (chat/), `n > 1` (the prompt
// is prefilled once into a temporary session, which is forked n - 1 times; each copy samples its
// own continuation) and chat sessions (`x-session-id`: a conversation continues only when the
// rendered messages extend the session's transcript, Session.transcript, and only the rest is
// prefilled; the transcript lives with the session, so any replica and a restarted server agree).
//
// Ownership and threading: the API keeps no per-session state and borrows the channel's server, the
// tokenizer and the metrics (they must outlive it). Handlers run on httplib's worker threads, one
// request per thread (so `--http-threads` bounds the concurrent requests), and block there; a
// choice's stream is read on a thread of its own. A client that goes away is noticed at the next
// write, which cancels the request's gRPC calls (the engine drops the generation at its next
// iteration).
#ifndef RETNET_SERVER_OPENAI_API_H_
#define RETNET_SERVER_OPENAI_API_H_

#include <grpcpp/channel.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "chat/chat_template.h"
#include "model/tokenizer.h"
#include "retnet/v1/retnet.grpc.pb.h"
#include "server/metrics.h"

namespace httplib {
class Server;
}

namespace retnet::server {

struct OpenAiOptions {
  std::string served_model_name = "retnet";  // `model` in requests and GET /v1/models
  int64_t max_n = 16;                        // upper limit of `n`
  int64_t max_body_bytes = 8 << 20;          // larger request bodies get 413
};

class OpenAiApi {
 public:
  // `channel`: an in-process channel to this server's RetNet service. `metrics` may be null.
  OpenAiApi(std::shared_ptr<grpc::Channel> channel, OpenAiOptions options, Metrics* metrics);
  ~OpenAiApi();

  // Once the model is loaded; until then requests get 503. `tokenizer` must outlive the API;
  // `eos_ids`: every id that ends a generation; `metrics_text` renders Prometheus' exposition
  // for GET /metrics (thread-safe).
  void SetModel(const model::Tokenizer* tokenizer, chat::ChatTemplate chat_template,
                std::string bos_token, std::string eos_token, std::vector<int64_t> eos_ids,
                std::function<std::string()> metrics_text);

  // GET /health answers 503 from now on (the gRPC service refuses new work itself).
  void set_draining() { draining_.store(true); }
  // Waits until no completion request is in flight (streams included); false on timeout. A
  // drain calls it before the gRPC server shuts down, which would cut the in-process calls.
  bool WaitIdle(absl::Duration timeout);
  // A request in flight while the returned handle lives.
  std::shared_ptr<void> BeginRequest();

  // Adds the routes to `server` (which must not outlive this object).
  void Register(httplib::Server& server);

  struct Call;  // one request in flight (openai_api.cc)

 private:
  void Completions(const std::string& body, const std::string& auth, const std::string& session,
                   bool chat, void* http_response);

  std::unique_ptr<retnet::v1::RetNet::Stub> stub_;
  const OpenAiOptions options_;
  Metrics* const metrics_;
  const int64_t created_unix_s_;

  // Written once by SetModel() before ready_ is set.
  const model::Tokenizer* tokenizer_ = nullptr;
  std::unique_ptr<chat::ChatTemplate> template_;
  std::string bos_token_, eos_token_;
  std::vector<int64_t> eos_ids_;
  std::function<std::string()> metrics_text_;
  std::atomic<bool> ready_{false};
  std::atomic<bool> draining_{false};

  absl::Mutex idle_mu_;
  int64_t in_flight_ ABSL_GUARDED_BY(idle_mu_) = 0;
};

}  // namespace retnet::server

#endif  // RETNET_SERVER_OPENAI_API_H_
