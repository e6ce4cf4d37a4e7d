// File: server/service.h
//
// The retnet.v1.RetNet gRPC service over an engine::Engine (callback API). It validates
// requests, maps session ids to the caller's key, converts to the engine's plain types, and
// streams tokens: a Generate stream writes whatever tokens have accumulated whenever its previous
// write completes (merging them into one TokenChunk), so a slow reader never blocks the engine.
//
// Ownership and threading: the service borrows the engine and the keys (they must outlive the
// server). Handlers run on gRPC's callback threads and never wait for the engine loop, except
// the short session lock of control operations.
#ifndef RETNET_SERVER_SERVICE_H_
#define RETNET_SERVER_SERVICE_H_

#include <atomic>
#include <functional>
#include <string>

#include "engine/engine.h"
#include "retnet/v1/retnet.grpc.pb.h"
#include "server/auth.h"
#include "server/metrics.h"
#include "server/turn_stream.h"

namespace retnet::server {

// A validated turn, ready for the engine.
struct Turn {
  engine::GenerateRequest request;
  std::string public_id;
  bool created = false;
};

// Where sessions live outside the engine: the state directory, which replicas may share. The
// service syncs a session with it before using it, tells it about deletions and, with write-
// through, has each turn saved before the turn's end reaches the client. Implementations must be
// thread-safe (called from gRPC's threads and the engine thread).
class SessionStore {
 public:
  virtual ~SessionStore() = default;
  // Makes the engine's copy of session `id` (internal, key-prefixed) current: restores it when
  // the engine does not hold it and a snapshot is stored; with a shared store, replaces or drops
  // the engine's copy when another replica has saved or deleted the session since. An error
  // means a stored snapshot exists but cannot be restored (the session must not be re-created).
  virtual absl::Status Sync(const std::string& id) = 0;
  // The session was deleted: drop its stored snapshot, so that no replica revives it. True when
  // there was one.
  virtual bool Forget(const std::string& id) = 0;
  // Whether every turn is saved before its end is sent (replicas sharing the store).
  virtual bool write_through() const = 0;
  // Saves session `id` (off the calling thread), then calls `done` (also when the save failed:
  // the store then removes the stale file, so no replica resumes from an older state).
  virtual void Persist(const std::string& id, std::function<void()> done) = 0;
};

struct ServiceOptions {
  std::string checkpoint;     // reported by GetModelInfo
  std::string device, dtype;  // reported by GetModelInfo
  int64_t default_max_new_tokens = 256;
  int64_t snapshot_chunk_bytes = 1 << 20;
  int64_t max_snapshot_bytes = int64_t{4} << 30;
  Metrics* metrics = nullptr;     // not owned; may be null
  SessionStore* store = nullptr;  // not owned; may be null (no state directory)
};

class RetNetService final : public retnet::v1::RetNet::CallbackService {
 public:
  // The service answers UNAVAILABLE ("loading") until SetEngine() is called.
  RetNetService(const ApiKeys* keys, ServiceOptions options);
  // Once, when the model is loaded; `engine` and `store` (may be null: no state directory) must
  // outlive the server.
  void SetEngine(engine::Engine* engine, SessionStore* store = nullptr);

  // While draining, new work is refused with UNAVAILABLE.
  void set_draining(bool draining) { draining_.store(draining); }

  grpc::ServerWriteReactor<retnet::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const retnet::v1::GenerateRequest* request) override;
  grpc::ServerBidiReactor<retnet::v1::ChatRequest, retnet::v1::GenerateResponse>* Chat(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* context,
                                          const retnet::v1::CreateSessionRequest* request,
                                          retnet::v1::Session* response) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* context,
                                       const retnet::v1::GetSessionRequest* request,
                                       retnet::v1::Session* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* context,
                                         const retnet::v1::ListSessionsRequest* request,
                                         retnet::v1::ListSessionsResponse* response) override;
  grpc::ServerUnaryReactor* ForkSession(grpc::CallbackServerContext* context,
                                        const retnet::v1::ForkSessionRequest* request,
                                        retnet::v1::Session* response) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* context,
                                          const retnet::v1::DeleteSessionRequest* request,
                                          retnet::v1::DeleteSessionResponse* response) override;
  grpc::ServerWriteReactor<retnet::v1::SnapshotChunk>* ExportSession(
      grpc::CallbackServerContext* context,
      const retnet::v1::ExportSessionRequest* request) override;
  grpc::ServerReadReactor<retnet::v1::ImportSessionRequest>* ImportSession(
      grpc::CallbackServerContext* context, retnet::v1::Session* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const retnet::v1::TokenizeRequest* request,
                                     retnet::v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const retnet::v1::DetokenizeRequest* request,
                                       retnet::v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const retnet::v1::GetModelInfoRequest* request,
                                         retnet::v1::ModelInfo* response) override;

 private:
  // Validates a turn and resolves (or creates) its session; `fixed_session` pins a chat stream.
  absl::StatusOr<Turn> PrepareTurn(grpc::CallbackServerContext* context, const std::string& prefix,
                                   const retnet::v1::GenerateRequest& request,
                                   const std::string& fixed_session);

  // The engine's session, synced with the store first.
  absl::StatusOr<engine::SessionInfo> FindSession(const std::string& id) const;

  // Replies `status`; with write-through, an OK reply waits until session `id` is saved.
  grpc::ServerUnaryReactor* ReplySaved(grpc::CallbackServerContext* context, const std::string& id,
                                       const absl::Status& status) const;

  // The write-through hook for a turn on session `id`; empty without write-through.
  TurnStream::Persist PersistFor(const std::string& id) const;

  // UNAVAILABLE while loading, then the caller's session-id prefix or UNAUTHENTICATED.
  absl::StatusOr<std::string> Admit(const grpc::ServerContextBase& context) const;

  engine::Engine* engine_ = nullptr;  // written once before ready_ is set
  SessionStore* store_ = nullptr;     // likewise
  std::atomic<bool> ready_{false};
  const ApiKeys* const keys_;
  const ServiceOptions options_;
  std::atomic<bool> draining_{false};
};

}  // namespace retnet::server

#endif  // RETNET_SERVER_SERVICE_H_
