// File: server/server.h
//
// The retnet-server process in a library: loads the model and tokenizer, builds the engine,
// restores sessions from the state directory, and serves retnet.v1.RetNet plus
// grpc.health.v1 (NOT_SERVING while loading and draining) and server reflection.
//
// Restart without loss: Drain() reports NOT_SERVING, refuses new work (new turns, new, forked
// and imported sessions: UNAVAILABLE; other calls are still answered), snapshots the idle
// sessions, closes the port, lets running calls finish until the grace deadline (cancelling the
// rest), then snapshots every session that changed and stops; it fails when a session could not
// be saved. Start() restores them. Periodic rounds start every `snapshot_interval` (a fixed
// cadence, start to start) and write only the sessions changed since their last save, which
// bounds what a crash can lose to one interval plus one round's writes; files are written
// atomically (server/state_dir.h).
//
// Write-through (`state_dir_write_through`): every turn is also saved before its end is sent,
// so a crash loses no acknowledged turn. A state directory belongs to one server at a time
// (an exclusive lock on `<dir>/.lock`; a second server on it is refused at start).
//
// Replicas share sessions through Redis (`session_store`, server/redis_store.h): a turn holds
// the session's lease, its snapshot is written through (fenced by the lease) before its end is
// sent, and a session is restored where it is next used. Nothing is restored at start.
//
// Threading: Start/Drain/Wait from the owning thread; the server runs on gRPC's threads, the
// engine thread, the service's control executor, the state directory's writers and one
// housekeeping thread.
#ifndef RETNET_SERVER_SERVER_H_
#define RETNET_SERVER_SERVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace retnet::server {

// The state directory's queued saves, for tests: (internal session id, queue order, event);
// see server/state_dir.h.
enum class SaveEvent : int;
using SaveHook = std::function<void(const std::string& id, int64_t seq, SaveEvent event)>;

struct ServerOptions {
  std::string checkpoint;  // empty = the built-in default model
  std::string listen = "0.0.0.0:50051";
  std::string device = "cpu";
  std::string dtype = "auto";  // auto = bfloat16 on cuda, float32 on cpu
  int64_t max_sessions = 64;
  int64_t state_memory_bytes = 0;
  int64_t max_host_sessions = 1024;
  absl::Duration session_ttl = absl::Minutes(30);
  std::string state_dir;                 // empty = no persistence
  bool state_dir_write_through = false;  // save every turn before its end is sent
  int state_dir_writers = 2;  // threads saving sessions (write-through and queued saves)
  // Replicas: "redis://[[user]:password@]host[:port][/db]" (empty = none; excludes state_dir);
  // the password, when given here, overrides the URL's.
  std::string session_store;
  std::string session_store_password;
  std::string session_store_prefix = "retnet:";
  absl::Duration session_lease_ttl = absl::Seconds(10);
  absl::Duration session_lease_wait = absl::Seconds(3);
  absl::Duration session_store_timeout = absl::Seconds(2);
  absl::Duration snapshot_interval = absl::Seconds(60);
  int64_t max_prompt_tokens = 32768;
  int64_t max_new_tokens = 4096;
  int64_t default_max_new_tokens = 256;
  int64_t max_queued_requests = 256;
  // Control work (session create/fork/delete/export/import, restores, turn preparation) runs on
  // this many threads, with at most `max_queued_control` calls waiting (RESOURCE_EXHAUSTED).
  int control_threads = 4;
  int64_t max_queued_control = 256;
  std::string api_keys_file;      // empty = no authentication
  std::string tls_cert, tls_key;  // both or neither
  int64_t max_message_bytes = 16 << 20;
  int64_t snapshot_chunk_bytes = 1 << 20;  // ExportSession message size
  // Prometheus /metrics and /healthz over HTTP ("host:port", port 0 = any; empty = off).
  std::string metrics_listen;
  // The OpenAI-compatible HTTP API (server/openai_api.h): "host:port" (port 0 = any; empty =
  // off), its worker threads (= concurrent requests), the model name it answers to (empty = the
  // checkpoint directory's name) and a Jinja chat template file replacing the checkpoint's.
  std::string http_listen;
  int http_threads = 64;
  std::string served_model_name;
  std::string chat_template_file;
  // Intra-op threads of the engine's tensor work (0 = LibTorch's default).
  int intra_op_threads = 0;
  // Called once the gRPC port is bound and before the model is loaded (health NOT_SERVING).
  std::function<void(int port)> on_listening;
  // Tests only: sees the state directory's queued saves (may be empty).
  SaveHook on_state_dir_save;
};

class Server {
 public:
  static absl::StatusOr<std::unique_ptr<Server>> Start(const ServerOptions& options);
  ~Server();

  int port() const;
  int metrics_port() const;      // 0 when metrics are off
  int http_port() const;         // 0 when the HTTP API is off
  std::string Describe() const;  // the startup line: model, device, capacity, address
  // Graceful stop; see the file comment. Idempotent (a repeated call returns the first one's
  // outcome). DATA_LOSS ("drain: N of M sessions saved, K failed") when the final snapshot
  // round could not save every session (the previous file of each of those is kept).
  absl::Status Drain(absl::Duration grace);
  // Snapshots every idle session changed since its last save to the state directory now;
  // returns how many were written.
  int64_t SnapshotAll();
  // Sessions the engine holds, one-shot requests' temporary ones included.
  int64_t EngineSessions() const;
  // Waits until no generation is queued or running; false on timeout.
  bool WaitIdle(absl::Duration timeout) const;

  struct Impl;

 private:
  explicit Server(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace retnet::server

#endif  // RETNET_SERVER_SERVER_H_
