// File: server/service.h
//
// The retnet.v1.RetNet gRPC service over an engine::Engine (callback API). It validates
// requests, maps session ids to the caller's key, converts to the engine's plain types, and
// streams tokens: a Generate stream writes whatever tokens have accumulated whenever its previous
// write completes (merging them into one TokenChunk), so a slow reader never blocks the engine.
//
// Ownership and threading: the service borrows the engine and the keys (they must outlive the
// server) and owns a small control executor (server/executor.h). Handlers run on gRPC's
// callback threads and never block there: whatever may wait for the engine loop or the disk
// (creating, forking, deleting, exporting, importing and restoring sessions, state-directory
// sync, preparing and submitting a turn, long tokenizations) runs on the executor, which
// finishes the call. A full executor queue answers RESOURCE_EXHAUSTED. Reactors are finished
// from the executor, the engine thread or the state directory's writers.
#ifndef RETNET_SERVER_SERVICE_H_
#define RETNET_SERVER_SERVICE_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "engine/engine.h"
#include "retnet/v1/retnet.grpc.pb.h"
#include "server/auth.h"
#include "server/executor.h"
#include "server/metrics.h"
#include "server/turn_stream.h"
#include "server/wire.h"

namespace retnet::server {

// A validated turn, ready for the engine.
struct Turn {
  engine::GenerateRequest request;
  std::string public_id;  // empty for a one-shot request
  bool created = false;
  int64_t hold = 0;  // SessionStore::Acquire's, released by the turn's Persist or Release
  bool token_bytes = false;  // GenerateRequest.return_token_bytes
};

// A Generate that names no session runs on a temporary session that the engine deletes when the
// generation ends (GenerateRequest.delete_session_at_end). Its internal id contains a space,
// which public ids cannot: it is never listed, saved to the state directory or restored.
inline constexpr char kOneShotTag[] = " one-shot ";
inline bool IsOneShotSession(const std::string& internal_id) {
  return internal_id.find(' ') != std::string::npos;
}

// Where sessions live outside the engine: the single server's state directory
// (server/state_dir.h) or the store replicas share (server/redis_store.h). The service syncs a
// session with it before using it, tells it about deletions and, with write-through, has each
// turn saved before the turn's end reaches the client. Implementations must be thread-safe
// (called from gRPC's threads, the control executor and the engine thread).
class SessionStore {
 public:
  virtual ~SessionStore() = default;
  // Makes the engine's copy of session `id` (internal, key-prefixed) current: restores it when
  // the engine does not hold it and a snapshot is stored; with a shared store, replaces or drops
  // the engine's copy when another replica has saved or deleted the session since. An error
  // means a stored snapshot exists but cannot be restored (the session must not be re-created),
  // or the store cannot be reached (UNAVAILABLE).
  virtual absl::Status Sync(const std::string& id) = 0;
  // Takes session `id` for one turn, then Sync()s it. A shared store grants it to one turn on
  // one replica at a time (a lease), waiting a bounded time while another turn holds it
  // (UNAVAILABLE after that). Returns a hold (0 when the store has no leases) that the turn's
  // Persist() releases, or Release() when the turn never reaches its end. May block: call it on
  // the control executor.
  virtual absl::StatusOr<int64_t> Acquire(const std::string& id) {
    absl::Status s = Sync(id);
    if (!s.ok()) return s;
    return 0;
  }
  // Gives up `hold` (from Acquire) of a turn that will not Persist. Returns at once.
  virtual void Release(const std::string& id, int64_t hold) {}
  // The session was deleted: drop its stored snapshot, so that no replica revives it. True when
  // there was one.
  virtual bool Forget(const std::string& id) = 0;
  // Whether every turn is saved before its end is sent.
  virtual bool write_through() const = 0;
  // Saves session `id` (off the calling thread), then calls `done` with the outcome; `hold` is
  // the turn's (from Acquire), released by the save, or 0 for a new session (create, fork,
  // import). A failed save is an error for the caller (the turn or the new session is not
  // durable): the store keeps the previous good snapshot and puts the session back to the state
  // it holds (a session that had none is removed), so every replica agrees on what was
  // acknowledged.
  virtual void Persist(const std::string& id, std::function<void(absl::Status)> done,
                       int64_t hold) = 0;
};

struct ServiceOptions {
  std::string checkpoint;     // reported by GetModelInfo
  std::string device, dtype;  // reported by GetModelInfo
  int64_t default_max_new_tokens = 256;
  int64_t snapshot_chunk_bytes = 1 << 20;
  int64_t max_snapshot_bytes = int64_t{4} << 30;
  Metrics* metrics = nullptr;     // not owned; may be null
  SessionStore* store = nullptr;  // not owned; may be null (no state directory)
  // The control executor: threads, and calls that may wait for one before RESOURCE_EXHAUSTED.
  int control_threads = 4;
  int64_t max_queued_control = 256;
};

// Every method is registered raw (ByteBuffer in and out) so that the service parses requests
// itself (server/wire.h): a request gRPC could not parse must be INVALID_ARGUMENT naming the
// field, never UNIMPLEMENTED, and a bad message later in a stream must fail the stream.
using RawRetNetService = retnet::v1::RetNet::WithRawCallbackMethod_Generate<
    retnet::v1::RetNet::WithRawCallbackMethod_Chat<
        retnet::v1::RetNet::WithRawCallbackMethod_CreateSession<
            retnet::v1::RetNet::WithRawCallbackMethod_GetSession<
                retnet::v1::RetNet::WithRawCallbackMethod_ListSessions<
                    retnet::v1::RetNet::WithRawCallbackMethod_ForkSession<
                        retnet::v1::RetNet::WithRawCallbackMethod_DeleteSession<
                            retnet::v1::RetNet::WithRawCallbackMethod_ExportSession<
                                retnet::v1::RetNet::WithRawCallbackMethod_ImportSession<
                                    retnet::v1::RetNet::WithRawCallbackMethod_Tokenize<
                                        retnet::v1::RetNet::WithRawCallbackMethod_Detokenize<
                                            retnet::v1::RetNet::WithRawCallbackMethod_GetModelInfo<
                                                retnet::v1::RetNet::Service>>>>>>>>>>>>;

class RetNetService final : public RawRetNetService {
 public:
  // The service answers UNAVAILABLE ("loading") until SetEngine() is called.
  RetNetService(const ApiKeys* keys, ServiceOptions options);
  ~RetNetService() override;  // Shutdown()
  // Once, when the model is loaded; `engine` and `store` (may be null: no state directory) must
  // outlive the server.
  void SetEngine(engine::Engine* engine, SessionStore* store = nullptr);

  // While draining, new work is refused with UNAVAILABLE.
  void set_draining(bool draining) { draining_.store(draining); }
  // Runs the queued control work to completion and refuses more (UNAVAILABLE). Call after the
  // gRPC server has stopped and before the engine and the store go away. Idempotent.
  void Shutdown();

  using Raw = grpc::ByteBuffer;
  grpc::ServerWriteReactor<Raw>* Generate(grpc::CallbackServerContext* context,
                                          const Raw* request) override;
  grpc::ServerBidiReactor<Raw, Raw>* Chat(grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* context, const Raw* request,
                                          Raw* response) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* context, const Raw* request,
                                       Raw* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* context, const Raw* request,
                                         Raw* response) override;
  grpc::ServerUnaryReactor* ForkSession(grpc::CallbackServerContext* context, const Raw* request,
                                        Raw* response) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* context, const Raw* request,
                                          Raw* response) override;
  grpc::ServerWriteReactor<Raw>* ExportSession(grpc::CallbackServerContext* context,
                                               const Raw* request) override;
  grpc::ServerReadReactor<Raw>* ImportSession(grpc::CallbackServerContext* context,
                                              Raw* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context, const Raw* request,
                                     Raw* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context, const Raw* request,
                                       Raw* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context, const Raw* request,
                                         Raw* response) override;

 private:
  // Validates a turn and resolves (or creates) its session; `fixed_session` pins a chat stream.
  // `one_shot`: a turn that names no session runs on a temporary one (Generate); otherwise it
  // creates a server-named session (a Chat stream's conversation).
  absl::StatusOr<Turn> PrepareTurn(grpc::CallbackServerContext* context, const std::string& prefix,
                                   const retnet::v1::GenerateRequest& request,
                                   const std::string& fixed_session, bool one_shot);

  // FAILED_PRECONDITION naming `what` when the model has no tokenizer (an ids-only checkpoint).
  absl::Status HasTokenizer(const char* what) const;

  // The engine's session, synced with the store first.
  absl::StatusOr<engine::SessionInfo> FindSession(const std::string& id) const;

  // Replies `status`; with write-through, an OK reply waits until session `id` is saved (and
  // carries the save's error when it failed).
  template <typename Response>
  void ReplySaved(UnaryReply<Response>* reply, const std::string& id,
                  const absl::Status& status) const;

  // Runs `work` (which answers `reply`) on the control executor, or answers `reply` with the
  // refusal when it cannot be queued.
  template <typename Response>
  void Offload(UnaryReply<Response>* reply, std::function<void()> work);

  // Parses the request and admits the caller: false (the reply is done) when either fails.
  template <typename Request, typename Response>
  bool Begin(grpc::CallbackServerContext* context, const Raw* in, Request* request,
             UnaryReply<Response>* reply, std::string* caller) const;

  // The write-through hook for a turn on session `id` holding `hold`; empty without
  // write-through.
  TurnStream::Persist PersistFor(const std::string& id, int64_t hold) const;

  // UNAVAILABLE while loading, then the caller's session-id prefix or UNAUTHENTICATED.
  absl::StatusOr<std::string> Admit(const grpc::ServerContextBase& context) const;

  engine::Engine* engine_ = nullptr;  // written once before ready_ is set
  SessionStore* store_ = nullptr;     // likewise
  bool add_bos_default_ = true;       // likewise: tokenizer_config.json's add_bos_token
  std::atomic<bool> ready_{false};
  const ApiKeys* const keys_;
  const ServiceOptions options_;
  std::atomic<bool> draining_{false};
  const std::unique_ptr<Executor> control_;  // last: stopped first
};

}  // namespace retnet::server

#endif  // RETNET_SERVER_SERVICE_H_
