#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <httplib.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <nlohmann/json.hpp>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/notification.h"
#include "chat/chat_template.h"
#include "common/status_macros.h"
#include "engine/engine.h"
#include "model/checkpoint.h"
#include "model/files.h"
#include "model/tokenizer.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/openai_api.h"
#include "server/redis_store.h"
#include "server/service.h"
#include "server/state_dir.h"

namespace retnet::server {

struct Server::Impl {
  ServerOptions options;
  std::string checkpoint;
  std::shared_ptr<const model::RetNet> model;
  std::unique_ptr<engine::Engine> engine;
  // Declared after the engine and before the gRPC server: destroyed after the server (whose
  // handlers use it) and before the engine (which its writer uses).
  std::unique_ptr<StateDirectory> state;  // null without --state-dir
  std::unique_ptr<RedisStore> redis;      // null without --session-store
  ApiKeys keys;
  std::unique_ptr<RetNetService> service;
  std::unique_ptr<grpc::Server> grpc_server;
  int port = 0;
  std::string model_line;
  Metrics metrics;
  std::unique_ptr<httplib::Server> http;
  std::thread http_thread;
  int metrics_port = 0;
  // The OpenAI-compatible API: its own HTTP server, over an in-process channel to the service.
  std::unique_ptr<OpenAiApi> api;
  std::unique_ptr<httplib::Server> api_http;
  std::thread api_thread;
  int http_port = 0;
  ~Impl() { StopApi(); }  // a failed Start() leaves the API's thread running
  void StopApi() {
    if (api_http == nullptr) return;
    api_http->stop();
    if (api_thread.joinable()) api_thread.join();
  }

  absl::Mutex mu;
  bool drained ABSL_GUARDED_BY(mu) = false;
  absl::Status drain_result ABSL_GUARDED_BY(mu);
  absl::Notification stop_housekeeping;
  std::thread housekeeping;

  SaveReport SnapshotAll() { return state ? state->SaveAll() : SaveReport{}; }

  // Periodic rounds on a fixed cadence: each starts `snapshot_interval` after the previous one
  // started (at once when that one took longer), so a change waits at most one interval for
  // the round that writes it.
  void Housekeeping() {
    const absl::Duration interval = options.snapshot_interval;
    absl::Time next = absl::Now() + interval;
    while (!stop_housekeeping.WaitForNotificationWithDeadline(next)) {
      const absl::Time start = absl::Now();
      const SaveReport r = SnapshotAll();
      if (r.written + r.failed > 0) {
        spdlog::debug("snapshot round: {} written, {} unchanged, {} busy, {} failed in {:.1f} ms",
                      r.written, r.unchanged, r.busy, r.failed,
                      absl::ToDoubleMilliseconds(absl::Now() - start));
      }
      next = std::max(next + interval, absl::Now());
    }
  }
};

namespace {

struct ChatSetup {
  chat::ChatTemplate chat_template;
  std::string bos_token, eos_token;
};

// tokenizer_config.json's special tokens are strings or AddedToken objects {"content": ...}.
std::string SpecialToken(const nlohmann::json& config, const char* name) {
  auto it = config.find(name);
  if (it == config.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    return (*it)["content"].get<std::string>();
  }
  return "";
}

// The chat template: `file` when given, else the checkpoint's tokenizer_config.json
// chat_template, else the built-in default; with the BOS and EOS strings templates use.
absl::StatusOr<ChatSetup> LoadChatSetup(const std::string& checkpoint, const std::string& file) {
  nlohmann::json config = nlohmann::json::object();
  auto text = model::ReadRegularFile(checkpoint + "/tokenizer_config.json", 64 << 20);
  if (text.ok()) {
    config = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(checkpoint, "/tokenizer_config.json: not a JSON object"));
    }
  } else if (!absl::IsNotFound(text.status())) {
    return text.status();
  }
  ChatSetup out{chat::ChatTemplate::Default(), SpecialToken(config, "bos_token"),
                SpecialToken(config, "eos_token")};
  if (!file.empty()) {
    ASSIGN_OR_RETURN(out.chat_template, chat::ChatTemplate::FromFile(file));
    spdlog::info("chat template: {}", file);
  } else if (config.contains("chat_template") && !config["chat_template"].is_null()) {
    auto t = chat::ChatTemplate::FromTokenizerConfig(config);
    if (!t.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          checkpoint, "/tokenizer_config.json: chat_template: ", t.status().message()));
    }
    out.chat_template = *std::move(t);
    spdlog::info("chat template: the checkpoint's (tokenizer_config.json)");
  } else {
    spdlog::info("chat template: the built-in default (ChatML); --chat-template FILE replaces it");
  }
  return out;
}

}  // namespace

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() { Drain(absl::ZeroDuration()).IgnoreError(); }

int Server::port() const { return impl_->port; }
int Server::metrics_port() const { return impl_->metrics_port; }
int Server::http_port() const { return impl_->http_port; }
int64_t Server::SnapshotAll() { return impl_->SnapshotAll().written; }
int64_t Server::EngineSessions() const { return impl_->engine->Stats().sessions; }
bool Server::WaitIdle(absl::Duration timeout) const { return impl_->engine->WaitIdle(timeout); }

std::string Server::Describe() const {
  const engine::PoolStats s = impl_->engine->Stats();
  return absl::StrFormat(
      "retnet-server listening on %s (port %d): %s from %s on %s/%s; %d session slots x %.2f MiB "
      "state, "
      "%d host spill places; state dir %s; session store %s; auth %s; tls %s; metrics %s; "
      "OpenAI API %s",
      impl_->options.listen, impl_->port, impl_->model_line, impl_->checkpoint,
      impl_->options.device, impl_->options.dtype, s.device_slots,
      s.state_bytes_per_session / 1048576.0, s.host_capacity,
      impl_->options.state_dir.empty()
          ? "(none)"
          : absl::StrCat(impl_->options.state_dir,
                         impl_->options.state_dir_write_through ? " (write-through)" : ""),
      impl_->redis ? impl_->redis->Describe() : "(none)",
      impl_->keys.enabled() ? "api keys" : "off", impl_->options.tls_cert.empty() ? "off" : "on",
      impl_->metrics_port > 0 ? absl::StrCat("http://",
                                             impl_->options.metrics_listen.substr(
                                                 0, impl_->options.metrics_listen.rfind(':')),
                                             ":", impl_->metrics_port, "/metrics")
                              : "off",
      impl_->http_port > 0
          ? absl::StrCat(
                "http://",
                impl_->options.http_listen.substr(0, impl_->options.http_listen.rfind(':')), ":",
                impl_->http_port, "/v1 as '", impl_->options.served_model_name, "'")
          : "off");
}

absl::StatusOr<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  // bf16 weights by default on a GPU (fp32 state and accumulation either way), fp32 on a CPU.
  if (impl->options.dtype == "auto") {
    impl->options.dtype = options.device.rfind("cuda", 0) == 0 ? "bfloat16" : "float32";
  }
  impl->checkpoint = options.checkpoint.empty() ? model::DefaultModelDir() : options.checkpoint;
  if (!options.api_keys_file.empty()) {
    ASSIGN_OR_RETURN(impl->keys, ApiKeys::Load(options.api_keys_file));
  }
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    return absl::InvalidArgumentError("tls: give both --tls-cert and --tls-key, or neither");
  }
  // Before the port is bound and the model loads: a state directory that cannot hold snapshots
  // would make every save fail later.
  if (!options.state_dir.empty()) RETURN_IF_ERROR(StateDirectory::Prepare(options.state_dir));
  RedisStoreOptions rso;
  if (!options.session_store.empty()) {
    if (!options.state_dir.empty()) {
      return absl::InvalidArgumentError(
          "--session-store and --state-dir: give one (replicas share sessions through the store; "
          "the state directory is a single server's)");
    }
    ASSIGN_OR_RETURN(rso.address, ParseRedisUrl(options.session_store));
    if (!options.session_store_password.empty())
      rso.address.password = options.session_store_password;
    rso.prefix = options.session_store_prefix;
    rso.lease_ttl = options.session_lease_ttl;
    rso.lease_wait = options.session_lease_wait;
    rso.timeout = options.session_store_timeout;
    rso.writers = options.state_dir_writers;
    rso.session_ttl = options.session_ttl;
  }
  ServiceOptions so;
  so.checkpoint = impl->checkpoint;
  so.device = options.device;
  so.dtype = impl->options.dtype;
  so.snapshot_chunk_bytes = options.snapshot_chunk_bytes;
  so.metrics = &impl->metrics;
  so.default_max_new_tokens = std::min(options.default_max_new_tokens, options.max_new_tokens);
  so.control_threads = static_cast<int>(options.control_threads);
  so.max_queued_control = options.max_queued_control;
  impl->service = std::make_unique<RetNetService>(&impl->keys, so);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (options.state_dir_writers < 1 || options.state_dir_writers > 64) {
    return absl::InvalidArgumentError("--state-dir-writers: between 1 and 64");
  }
  if (options.control_threads < 1 || options.control_threads > 256) {
    return absl::InvalidArgumentError("--control-threads: between 1 and 256");
  }
  if (options.max_queued_control < 1) {
    return absl::InvalidArgumentError("--max-queued-control: at least 1");
  }
  if (!options.tls_cert.empty()) {
    ASSIGN_OR_RETURN(std::string cert, ReadFileToString(options.tls_cert));
    ASSIGN_OR_RETURN(std::string key, ReadFileToString(options.tls_key));
    grpc::SslServerCredentialsOptions ssl;
    ssl.pem_key_cert_pairs.push_back({key, cert});
    creds = grpc::SslServerCredentials(ssl);
  }
  builder.AddListeningPort(options.listen, creds, &impl->port);
  builder.RegisterService(impl->service.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options.max_message_bytes));
  impl->grpc_server = builder.BuildAndStart();
  if (impl->grpc_server == nullptr || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options.listen));
  }
  // Listening already while the model loads: health says NOT_SERVING, RPCs get UNAVAILABLE.
  auto* health = impl->grpc_server->GetHealthCheckService();
  health->SetServingStatus(false);
  health->SetServingStatus("retnet.v1.RetNet", false);
  if (options.on_listening) options.on_listening(impl->port);
  if (impl->options.served_model_name.empty()) {
    const std::string& dir = impl->checkpoint;
    const size_t end = dir.find_last_not_of('/');
    const size_t slash = end == std::string::npos ? std::string::npos : dir.rfind('/', end);
    impl->options.served_model_name =
        options.checkpoint.empty()
            ? "retnet-default"
            : dir.substr(slash == std::string::npos ? 0 : slash + 1,
                         end == std::string::npos
                             ? 0
                             : end - (slash == std::string::npos ? 0 : slash + 1) + 1);
  }
  if (!options.http_listen.empty()) {  // answers 503 until the model is loaded
    const size_t colon = options.http_listen.rfind(':');
    if (colon == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("--http-listen '", options.http_listen, "': need host:port"));
    }
    if (options.http_threads < 1 || options.http_threads > 4096) {
      return absl::InvalidArgumentError("--http-threads: between 1 and 4096");
    }
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    OpenAiOptions ao;
    ao.served_model_name = impl->options.served_model_name;
    impl->api =
        std::make_unique<OpenAiApi>(impl->grpc_server->InProcessChannel(args), ao, &impl->metrics);
    impl->api_http = std::make_unique<httplib::Server>();
    const int threads = options.http_threads;
    impl->api_http->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    impl->api_http->set_tcp_nodelay(true);  // every event leaves at once (no Nagle delay)
    impl->api->Register(*impl->api_http);
    const std::string host = options.http_listen.substr(0, colon);
    const int want = std::atoi(options.http_listen.c_str() + colon + 1);
    impl->http_port = want == 0 ? impl->api_http->bind_to_any_port(host)
                                : (impl->api_http->bind_to_port(host, want) ? want : -1);
    if (impl->http_port <= 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot listen for the HTTP API on ", options.http_listen));
    }
    Impl* raw_api = impl.get();
    impl->api_thread = std::thread([raw_api] { raw_api->api_http->listen_after_bind(); });
  }

  model::ModelOptions model_options;
  ASSIGN_OR_RETURN(model_options.device, model::ParseDevice(options.device));
  ASSIGN_OR_RETURN(model_options.dtype, model::ParseDtype(impl->options.dtype));
  ASSIGN_OR_RETURN(auto model, model::LoadModel(impl->checkpoint, model_options));
  ASSIGN_OR_RETURN(auto tokenizer, model::LoadTokenizer(impl->checkpoint, model->config()));
  impl->model_line = model->config().Summary();
  impl->model = std::move(model);

  engine::EngineOptions eo;
  eo.max_sessions = options.max_sessions;
  eo.state_memory_bytes = options.state_memory_bytes;
  eo.max_host_sessions = options.max_host_sessions;
  eo.session_ttl = options.session_ttl;
  eo.max_prompt_tokens = options.max_prompt_tokens;
  eo.max_new_tokens_limit = options.max_new_tokens;
  eo.max_queued_requests = options.max_queued_requests;
  eo.intra_op_threads = options.intra_op_threads;
  ASSIGN_OR_RETURN(impl->engine, engine::Engine::Create(impl->model, std::move(tokenizer), eo));

  if (!options.state_dir.empty()) {
    StateDirectoryOptions sdo;
    sdo.shared = options.state_dir_write_through;
    sdo.writers = options.state_dir_writers;
    sdo.on_save = options.on_state_dir_save;
    ASSIGN_OR_RETURN(impl->state, StateDirectory::Open(options.state_dir, sdo, impl->engine.get()));
    const int64_t n = impl->state->RestoreAll();
    if (n > 0) spdlog::info("restored {} sessions from {}", n, options.state_dir);
  }
  if (!options.session_store.empty()) {
    rso.metrics = &impl->metrics;
    ASSIGN_OR_RETURN(impl->redis, RedisStore::Open(rso, impl->engine.get()));
  }

  impl->service->SetEngine(impl->engine.get(), impl->redis
                                                   ? static_cast<SessionStore*>(impl->redis.get())
                                                   : impl->state.get());
  if (impl->api != nullptr) {
    ASSIGN_OR_RETURN(ChatSetup chat, LoadChatSetup(impl->checkpoint, options.chat_template_file));
    impl->api->SetModel(&impl->engine->tokenizer(), std::move(chat.chat_template),
                        std::move(chat.bos_token), std::move(chat.eos_token),
                        impl->engine->model_summary().eos_token_ids,
                        [raw = impl.get()] { return raw->metrics.Render(raw->engine->Stats()); });
  }
  health->SetServingStatus(true);
  health->SetServingStatus("retnet.v1.RetNet", true);

  Impl* raw = impl.get();
  if (!options.metrics_listen.empty()) {
    const size_t colon = options.metrics_listen.rfind(':');
    if (colon == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("metrics address '", options.metrics_listen, "': need host:port"));
    }
    const std::string host = options.metrics_listen.substr(0, colon);
    const int want = std::atoi(options.metrics_listen.c_str() + colon + 1);
    impl->http = std::make_unique<httplib::Server>();
    impl->http->Get("/metrics", [raw](const httplib::Request&, httplib::Response& res) {
      res.set_content(raw->metrics.Render(raw->engine->Stats()), "text/plain; version=0.0.4");
    });
    impl->http->Get("/healthz", [raw](const httplib::Request&, httplib::Response& res) {
      absl::MutexLock lock(&raw->mu);
      res.status = raw->drained ? 503 : 200;
      res.set_content(raw->drained ? "draining\n" : "ok\n", "text/plain");
    });
    impl->metrics_port = want == 0 ? impl->http->bind_to_any_port(host)
                                   : (impl->http->bind_to_port(host, want) ? want : -1);
    if (impl->metrics_port <= 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot listen for metrics on ", options.metrics_listen));
    }
    impl->http_thread = std::thread([raw] { raw->http->listen_after_bind(); });
  }
  impl->housekeeping = std::thread([raw] { raw->Housekeeping(); });
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

absl::Status Server::Drain(absl::Duration grace) {
  {
    absl::MutexLock lock(&impl_->mu);
    if (impl_->drained) return impl_->drain_result;
    impl_->drained = true;
  }
  auto* health = impl_->grpc_server->GetHealthCheckService();
  health->SetServingStatus(false);
  impl_->service->set_draining(true);
  if (impl_->api != nullptr) impl_->api->set_draining();
  impl_->stop_housekeeping.Notify();
  if (impl_->housekeeping.joinable()) impl_->housekeeping.join();
  // Idle sessions are saved before the port closes: once a gateway can no longer reach this
  // replica, their snapshots are there for the next one.
  if (impl_->state) {
    const SaveReport r = impl_->SnapshotAll();
    spdlog::info("drain: {} of {} idle sessions saved before closing the port, {} failed",
                 r.saved(), r.sessions - r.busy, r.failed);
  }
  // The port closes now (new calls go elsewhere); running streams get the grace period, and a
  // finished turn's end is sent only once it is saved (write-through), so its session can
  // continue elsewhere from that turn. Streams still open at the deadline are cancelled.
  // The HTTP API's requests travel over in-process channels, which the shutdown would cut at
  // once: they get the grace first (new ones are refused meanwhile: 503).
  const absl::Time grace_end = absl::Now() + grace;
  if (impl_->api != nullptr && !impl_->api->WaitIdle(grace_end - absl::Now())) {
    spdlog::warn("drain: HTTP API requests still running at the end of the grace");
  }
  impl_->grpc_server->Shutdown(absl::ToChronoTime(std::max(grace_end, absl::Now())));
  impl_->grpc_server->Wait();
  // The HTTP API's calls went through the gRPC server: they have ended too.
  impl_->StopApi();
  // Control work still queued or running finishes now (it may queue saves, flushed below).
  impl_->service->Shutdown();
  spdlog::info("drain: gRPC stopped");
  // Cancelled streams cancelled their generations; the engine ends them within an iteration.
  if (!impl_->engine->WaitIdle(absl::Seconds(30))) spdlog::warn("drain: generations still running");
  absl::Status result;
  if (impl_->state) {
    impl_->state->Flush();
    // What changed during the drain, and what failed before: this round decides.
    const SaveReport r = impl_->SnapshotAll();
    const int64_t not_saved = r.sessions - r.saved();
    const std::string line = absl::StrFormat(
        "drain: %d of %d sessions saved to %s, %d failed (%d written now, %d unchanged since "
        "their last save, %d still generating)",
        r.saved(), r.sessions, impl_->state->dir(), not_saved, r.written, r.unchanged, r.busy);
    if (not_saved == 0) {
      spdlog::info("{}", line);
    } else {
      spdlog::error("{}", line);
      result = absl::DataLossError(line);
    }
    impl_->state->StopWriter();
  }
  if (impl_->redis) {
    // Every finished turn was written through before its end was sent; what is left are the
    // writes of the turns that ended during the drain.
    impl_->redis->Flush();
    impl_->redis->Stop();
    spdlog::info("drain: every acknowledged turn is in the session store {}",
                 impl_->redis->Describe());
  }
  health->Shutdown();
  if (impl_->http) {
    impl_->http->stop();
    if (impl_->http_thread.joinable()) impl_->http_thread.join();
  }
  impl_->engine.reset();
  absl::MutexLock lock(&impl_->mu);
  impl_->drain_result = result;
  return result;
}

}  // namespace retnet::server
