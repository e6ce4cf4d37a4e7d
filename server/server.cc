#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <httplib.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/notification.h"
#include "common/status_macros.h"
#include "engine/engine.h"
#include "model/checkpoint.h"
#include "model/tokenizer.h"
#include "server/auth.h"
#include "server/metrics.h"
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
  ApiKeys keys;
  std::unique_ptr<RetNetService> service;
  std::unique_ptr<grpc::Server> grpc_server;
  int port = 0;
  std::string model_line;
  Metrics metrics;
  std::unique_ptr<httplib::Server> http;
  std::thread http_thread;
  int metrics_port = 0;

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

Server::Server(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Server::~Server() { Drain(absl::ZeroDuration()).IgnoreError(); }

int Server::port() const { return impl_->port; }
int Server::metrics_port() const { return impl_->metrics_port; }
int64_t Server::SnapshotAll() { return impl_->SnapshotAll().written; }
int64_t Server::EngineSessions() const { return impl_->engine->Stats().sessions; }
bool Server::WaitIdle(absl::Duration timeout) const { return impl_->engine->WaitIdle(timeout); }

std::string Server::Describe() const {
  const engine::PoolStats s = impl_->engine->Stats();
  return absl::StrFormat(
      "retnet-server listening on %s (port %d): %s from %s on %s/%s; %d session slots x %.2f MiB "
      "state, "
      "%d host spill places; state dir %s; auth %s; tls %s; metrics %s",
      impl_->options.listen, impl_->port, impl_->model_line, impl_->checkpoint,
      impl_->options.device, impl_->options.dtype, s.device_slots,
      s.state_bytes_per_session / 1048576.0, s.host_capacity,
      impl_->options.state_dir.empty() ? "(none)" : impl_->options.state_dir,
      impl_->keys.enabled() ? "api keys" : "off", impl_->options.tls_cert.empty() ? "off" : "on",
      impl_->metrics_port > 0 ? absl::StrCat("http://",
                                             impl_->options.metrics_listen.substr(
                                                 0, impl_->options.metrics_listen.rfind(':')),
                                             ":", impl_->metrics_port, "/metrics")
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
  ASSIGN_OR_RETURN(impl->engine, engine::Engine::Create(impl->model, std::move(tokenizer), eo));

  if (!options.state_dir.empty()) {
    StateDirectoryOptions sdo;
    sdo.shared = options.state_dir_shared;
    sdo.writers = options.state_dir_writers;
    sdo.on_save = options.on_state_dir_save;
    ASSIGN_OR_RETURN(impl->state, StateDirectory::Open(options.state_dir, sdo, impl->engine.get()));
    if (!options.state_dir_shared) {  // shared: each session is restored where it is next used
      const int64_t n = impl->state->RestoreAll();
      if (n > 0) spdlog::info("restored {} sessions from {}", n, options.state_dir);
    }
  }

  impl->service->SetEngine(impl->engine.get(), impl->state.get());
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
  impl_->grpc_server->Shutdown(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(grace));
  impl_->grpc_server->Wait();
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
