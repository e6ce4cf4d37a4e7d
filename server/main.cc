// retnet-server: serves a RetNet checkpoint (default: the built-in model) over gRPC.
// Every flag has an environment-variable equivalent (shown in --help).
#include <pthread.h>
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>

#include "server/server.h"
#include "server/wire.h"

int main(int argc, char** argv) {
  retnet::server::ServerOptions o;
  double ttl_s = 1800, snapshot_s = 60, grace_s = 10, state_mb = 0;
  int64_t lease_ttl_ms = 10000, lease_wait_ms = 3000, store_timeout_ms = 2000;
  std::string log_level = "info", port_file, http_port_file;
  o.http_listen = "0.0.0.0:8000";
  bool json_logs = false;
  CLI::App app{
      "retnet-server: RetNet language models over gRPC, with sessions that keep their recurrent "
      "state."};
  app.add_option("--checkpoint", o.checkpoint, "checkpoint directory (default: built-in model)")
      ->envname("RETNET_CHECKPOINT");
  app.add_option("--listen", o.listen, "listen address")
      ->envname("RETNET_LISTEN")
      ->capture_default_str();
  app.add_option("--device", o.device, "cpu | cuda[:N]")
      ->envname("RETNET_DEVICE")
      ->capture_default_str();
  app.add_option("--dtype", o.dtype,
                 "weights: auto (bfloat16 on cuda, else float32) | float32 | bfloat16 | float16")
      ->envname("RETNET_DTYPE")
      ->capture_default_str();
  app.add_option("--max-sessions", o.max_sessions, "device state slots")
      ->envname("RETNET_MAX_SESSIONS")
      ->capture_default_str();
  app.add_option("--state-memory-mb", state_mb,
                 "state pool budget in MiB (overrides --max-sessions)")
      ->envname("RETNET_STATE_MEMORY_MB");
  app.add_option("--max-host-sessions", o.max_host_sessions, "idle sessions spilled to host memory")
      ->envname("RETNET_MAX_HOST_SESSIONS")
      ->capture_default_str();
  app.add_option("--session-ttl-s", ttl_s, "idle session lifetime (seconds)")
      ->envname("RETNET_SESSION_TTL_S")
      ->capture_default_str();
  app.add_option("--state-dir", o.state_dir,
                 "directory for session snapshots (restart without loss)")
      ->envname("RETNET_STATE_DIR");
  app.add_flag("--state-dir-write-through", o.state_dir_write_through,
               "save every turn to --state-dir before its end is sent (a crash loses no "
               "acknowledged turn)")
      ->envname("RETNET_STATE_DIR_WRITE_THROUGH");
  bool removed_shared = false;
  app.add_flag("--state-dir-shared", removed_shared, "removed: use --session-store")
      ->envname("RETNET_STATE_DIR_SHARED")
      ->group("");
  app.add_option("--session-store", o.session_store,
                 "replicas share sessions here: redis://[[user]:password@]host[:port][/db]")
      ->envname("RETNET_SESSION_STORE");
  app.add_option("--session-store-prefix", o.session_store_prefix, "prefix of the store's keys")
      ->envname("RETNET_SESSION_STORE_PREFIX")
      ->capture_default_str();
  app.add_option("--session-lease-ttl-ms", lease_ttl_ms,
                 "a session's lease lifetime; the replica holding it renews it every third")
      ->envname("RETNET_SESSION_LEASE_TTL_MS")
      ->capture_default_str();
  app.add_option("--session-lease-wait-ms", lease_wait_ms,
                 "how long a turn waits for a lease another turn holds before UNAVAILABLE")
      ->envname("RETNET_SESSION_LEASE_WAIT_MS")
      ->capture_default_str();
  app.add_option("--session-store-timeout-ms", store_timeout_ms,
                 "connect and command timeout of the session store")
      ->envname("RETNET_SESSION_STORE_TIMEOUT_MS")
      ->capture_default_str();
  app.add_option("--state-dir-writers", o.state_dir_writers,
                 "threads writing session snapshots (one session is never written by two at once)")
      ->envname("RETNET_STATE_DIR_WRITERS")
      ->capture_default_str();
  app.add_option("--snapshot-interval-s", snapshot_s, "periodic snapshot interval")
      ->envname("RETNET_SNAPSHOT_INTERVAL_S")
      ->capture_default_str();
  app.add_option("--max-prompt-tokens", o.max_prompt_tokens, "prompt length limit")
      ->envname("RETNET_MAX_PROMPT_TOKENS")
      ->capture_default_str();
  app.add_option("--max-new-tokens", o.max_new_tokens, "limit on max_new_tokens")
      ->envname("RETNET_MAX_NEW_TOKENS")
      ->capture_default_str();
  app.add_option("--default-max-new-tokens", o.default_max_new_tokens, "when a request gives none")
      ->envname("RETNET_DEFAULT_MAX_NEW_TOKENS")
      ->capture_default_str();
  app.add_option("--max-queued-requests", o.max_queued_requests, "admission queue")
      ->envname("RETNET_MAX_QUEUED_REQUESTS")
      ->capture_default_str();
  app.add_option("--control-threads", o.control_threads,
                 "threads for session control work (create, fork, export, import, restore)")
      ->envname("RETNET_CONTROL_THREADS")
      ->capture_default_str();
  app.add_option("--max-queued-control", o.max_queued_control,
                 "control calls waiting for a thread; more are refused (RESOURCE_EXHAUSTED)")
      ->envname("RETNET_MAX_QUEUED_CONTROL")
      ->capture_default_str();
  o.metrics_listen = "0.0.0.0:9100";
  app.add_option("--metrics-listen", o.metrics_listen,
                 "Prometheus /metrics and /healthz address (empty = off)")
      ->envname("RETNET_METRICS_LISTEN")
      ->capture_default_str();
  app.add_option("--api-keys-file", o.api_keys_file, "one key per line; enables bearer-token auth")
      ->envname("RETNET_API_KEYS_FILE");
  app.add_option("--tls-cert", o.tls_cert, "PEM certificate chain")->envname("RETNET_TLS_CERT");
  app.add_option("--tls-key", o.tls_key, "PEM private key")->envname("RETNET_TLS_KEY");
  app.add_option("--max-message-bytes", o.max_message_bytes, "gRPC message size limit")
      ->envname("RETNET_MAX_MESSAGE_BYTES")
      ->capture_default_str();
  app.add_option("--drain-grace-s", grace_s, "on SIGTERM, time running generations get to finish")
      ->envname("RETNET_DRAIN_GRACE_S")
      ->capture_default_str();
  app.add_option("--port-file", port_file, "write the bound port here (useful with :0)")
      ->envname("RETNET_PORT_FILE");
  app.add_option("--http-listen", o.http_listen,
                 "OpenAI-compatible HTTP API address (/v1/completions, /v1/chat/completions, "
                 "/v1/models; empty = off)")
      ->envname("RETNET_HTTP_LISTEN")
      ->capture_default_str();
  app.add_option("--http-threads", o.http_threads,
                 "HTTP API worker threads (= requests served at once; more wait)")
      ->envname("RETNET_HTTP_THREADS")
      ->capture_default_str();
  app.add_option("--served-model-name", o.served_model_name,
                 "the HTTP API's model name (default: the checkpoint directory's name, "
                 "retnet-default for the built-in model)")
      ->envname("RETNET_SERVED_MODEL_NAME");
  app.add_option("--chat-template", o.chat_template_file,
                 "Jinja chat template file (default: the checkpoint's tokenizer_config.json "
                 "chat_template, else ChatML)")
      ->envname("RETNET_CHAT_TEMPLATE");
  app.add_option("--http-port-file", http_port_file, "write the HTTP API's bound port here")
      ->envname("RETNET_HTTP_PORT_FILE");
  app.add_option("--threads", o.intra_op_threads,
                 "intra-op threads for the model's tensor work (0 = LibTorch's default, which "
                 "counts physical cores)")
      ->envname("RETNET_THREADS")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace|debug|info|warn|error")
      ->envname("RETNET_LOG_LEVEL")
      ->capture_default_str();
  app.add_flag("--json-logs", json_logs, "log as JSON lines")->envname("RETNET_JSON_LOGS");
  CLI11_PARSE(app, argc, argv);

  auto logger = spdlog::stderr_color_mt("retnet-server");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(log_level));
  if (json_logs) {
    retnet::server::UseJsonLogs();
  }
  if (removed_shared) {
    spdlog::error(
        "--state-dir-shared was removed: two replicas on one directory could lose an "
        "acknowledged turn. Replicas share sessions through --session-store redis://HOST:PORT "
        "(deploy/README.md); --state-dir is one server's");
    return 2;
  }
  if (const char* pw = std::getenv("RETNET_SESSION_STORE_PASSWORD"); pw != nullptr) {
    o.session_store_password = pw;
  }
  o.session_lease_ttl = absl::Milliseconds(lease_ttl_ms);
  o.session_lease_wait = absl::Milliseconds(lease_wait_ms);
  o.session_store_timeout = absl::Milliseconds(store_timeout_ms);
  o.session_ttl = absl::Seconds(ttl_s);
  o.snapshot_interval = absl::Seconds(snapshot_s);
  o.state_memory_bytes = static_cast<int64_t>(state_mb * 1048576.0);

  // SIGTERM/SIGINT are blocked in every thread (the mask is inherited by the threads the server
  // starts) and taken synchronously by sigwait below: no work in a signal handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto server = retnet::server::Server::Start(o);
  if (!server.ok()) {
    spdlog::error("{}", std::string(server.status().message()));
    return 1;
  }
  spdlog::info("{}", (*server)->Describe());
  if (!port_file.empty()) {
    std::ofstream(port_file + ".tmp") << (*server)->port() << "\n";
    std::rename((port_file + ".tmp").c_str(), port_file.c_str());
  }
  if (!http_port_file.empty()) {
    std::ofstream(http_port_file + ".tmp") << (*server)->http_port() << "\n";
    std::rename((http_port_file + ".tmp").c_str(), http_port_file.c_str());
  }
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  spdlog::info("draining (grace {} s)", grace_s);
  // Exit status 1 when a session could not be saved (Drain logged how many).
  const absl::Status drained = (*server)->Drain(absl::Seconds(grace_s));
  spdlog::info("stopped");
  return drained.ok() ? 0 : 1;
}
