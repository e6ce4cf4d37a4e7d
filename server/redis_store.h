// File: server/redis_store.h
//
// Sessions shared by replicas through Redis (`--session-store redis://...`): for each session an
// ownership lease and its latest acknowledged snapshot, so that any replica can continue any
// session and no acknowledged turn is ever lost when the gateway moves a session.
//
// Keys (`<prefix>` is "retnet:" by default; `<h>` is the session's internal id in hex, inside a
// hash tag so that one session's keys share a Redis Cluster slot):
//   <prefix>{<h>}:lease  hash {owner, token}, with a TTL: who may write the session now
//   <prefix>{<h>}:snap   the snapshot (engine::Engine::SnapshotSession's bytes)
//   <prefix>{<h>}:meta   hash {token: the last fencing token issued, version: bumped by every
//                        write and delete, fence: the token of the last write, writer}
// A session's snap and meta expire `session_ttl` after its last write (the engine's idle
// lifetime), so the store forgets sessions as the engine does.
// Every change is one server-side Lua script, so each is atomic in Redis.
//
// A turn (Acquire ... Persist or Release):
//  - Acquire takes the session's lease for this process (owner "<host>/<pid>/<random>"): a free
//    lease gets the next fencing token (meta.token + 1, never reused, so tokens only grow); a
//    lease another owner holds is retried until `lease_wait` has passed, then the turn is
//    refused with UNAVAILABLE (clients retry). Then the engine's copy is made current: when the
//    stored version differs from the one this process last wrote or read, the stored snapshot
//    replaces the engine's copy (or the copy is dropped: the session was deleted elsewhere).
//  - While held, a renewer thread extends the lease every ttl/3.
//  - Persist writes the snapshot with a script that checks, in Redis, that the lease is still
//    this owner's with this token and that no later token has written, and releases the lease
//    in the same step. A write refused there (the lease expired and another replica took it) or
//    that fails (Redis unreachable) is an error for the turn (UNAVAILABLE), and the engine's copy
//    is dropped, so the session continues, here or anywhere, from its last acknowledged state.
//  - A turn that ends without a Persist (refused before it started) calls Release.
// A process holds at most one turn per session: a second local Acquire of the same session
// waits (within `lease_wait`) for the first one's write.
//
// Without a turn: Sync (reads: GetSession, ExportSession, a fork's source) makes the engine's
// copy current without a lease; Persist without a hold (a created, forked or imported session)
// writes only when no other owner holds the lease and no snapshot this process has not seen
// exists (ALREADY_EXISTS); Forget deletes the snapshot and the lease (an in-flight turn
// elsewhere then fails its write) and leaves a tombstone (meta) for a day so that versions and
// tokens keep growing.
//
// Connections: a small pool of blocking hiredis connections (connect and command timeout
// `timeout`), reconnected on the next call after an error. Redis unreachable is UNAVAILABLE
// ("session store ...: <reason>") for the call, never a crash; service resumes when it is back.
//
// Threading: every method is thread-safe. Acquire, Sync and Forget block on Redis (call them on
// the control executor); Persist and Release return at once and run on `writers` threads,
// calling `done` there. The engine must outlive this object; Stop() before it goes.
#ifndef RETNET_SERVER_REDIS_STORE_H_
#define RETNET_SERVER_REDIS_STORE_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "server/metrics.h"
#include "server/service.h"

struct redisContext;

namespace retnet::server {

// Where Redis is: `redis://[[user]:password@]host[:port][/db]` (port 6379, db 0 by default).
struct RedisAddress {
  std::string host;
  int port = 6379;
  int db = 0;
  std::string user, password;
  std::string Describe() const;  // "redis://host:port/db" (no credentials)
};
// INVALID_ARGUMENT naming `--session-store` and what is wrong (rediss:// is refused: this
// build's hiredis has no TLS).
absl::StatusOr<RedisAddress> ParseRedisUrl(const std::string& url);

struct RedisStoreOptions {
  RedisAddress address;
  std::string prefix = "retnet:";
  absl::Duration lease_ttl = absl::Seconds(10);
  absl::Duration lease_wait = absl::Seconds(3);
  absl::Duration timeout = absl::Seconds(2);  // connect and per command
  // A stored session idle this long (no write) expires, as in the engine (0 = never).
  absl::Duration session_ttl = absl::ZeroDuration();
  int writers = 2;
  Metrics* metrics = nullptr;  // not owned; may be null
};

class RedisStore final : public SessionStore {
 public:
  // Checks the options and connects once: wrong credentials or a database Redis refuses fail
  // here (INVALID_ARGUMENT); Redis unreachable is only logged (calls answer UNAVAILABLE until it
  // is back).
  static absl::StatusOr<std::unique_ptr<RedisStore>> Open(RedisStoreOptions options,
                                                          engine::Engine* engine);
  ~RedisStore() override;  // Stop()

  absl::StatusOr<int64_t> Acquire(const std::string& id) override;
  void Release(const std::string& id, int64_t hold) override;
  absl::Status Sync(const std::string& id) override;
  bool Forget(const std::string& id) override;
  bool write_through() const override { return true; }
  void Persist(const std::string& id, std::function<void(absl::Status)> done,
               int64_t hold) override;

  // Waits until every queued write and release is done (their callbacks included).
  void Flush();
  // Flush(), then stops the writers and the renewer; leases still held are released. Idempotent.
  void Stop();

  const std::string& owner() const { return owner_; }
  std::string Describe() const { return options_.address.Describe(); }

 private:
  class Connection;
  class Reply;
  // What this process knows of one session (under mu_).
  struct Entry {
    int64_t hold = 0;     // the turn holding it here (0 = none)
    int64_t token = 0;    // the lease's fencing token while held
    int64_t version = 0;  // the stored version the engine's copy equals (when known)
    bool known = false;   // whether `version` describes the engine's copy
  };
  struct Job {
    std::string id;
    int64_t hold = 0;
    bool write = false;  // else a release
    std::function<void(absl::Status)> done;
  };

  RedisStore(RedisStoreOptions options, engine::Engine* engine);

  // Runs a script (EVALSHA, loading it when Redis does not know it) on a pooled connection.
  absl::StatusOr<Reply> Eval(int script, const std::string& id, std::vector<std::string> args,
                             const char* op);
  // Runs `call` on a pooled connection, once more on a new one when a pooled one turns out
  // closed; records the op's latency and errors; UNAVAILABLE for a failed connection or an
  // error reply that is not one of the scripts' own ("RETNET ...").
  absl::StatusOr<Reply> Run(const char* op,
                            const std::function<absl::StatusOr<Reply>(Connection*)>& call);
  // An idle pooled connection (*pooled = true) or a new one; pooled == nullptr: always new.
  std::unique_ptr<Connection> Take(absl::Status* error, bool* pooled);
  void Give(std::unique_ptr<Connection> c);
  std::string Key(const std::string& id, const char* what) const;

  // Makes the engine's copy equal stored `version` (`has`: a snapshot is stored). Under the
  // session's stripe lock.
  absl::Status Align(const std::string& id, int64_t version, bool has);
  // Drops the engine's copy and what is known of it (after a failed or refused write).
  void Drop(const std::string& id);
  absl::Status Write(const Job& job);
  absl::Mutex& Stripe(const std::string& id);
  void WriterLoop();
  void RenewLoop();

  const RedisStoreOptions options_;
  engine::Engine* const engine_;
  const std::string owner_;
  Metrics* const metrics_;

  absl::Mutex pool_mu_;
  std::vector<std::unique_ptr<Connection>> idle_ ABSL_GUARDED_BY(pool_mu_);

  // Serializes engine-copy changes of one session (a few sessions share a stripe).
  std::array<absl::Mutex, 64> stripes_;

  absl::Mutex mu_;
  std::map<std::string, Entry> entries_ ABSL_GUARDED_BY(mu_);
  int64_t next_hold_ ABSL_GUARDED_BY(mu_) = 0;
  std::atomic<int64_t> pending_seq_{0};  // names each write's pending key

  absl::Mutex queue_mu_;
  std::deque<Job> queue_ ABSL_GUARDED_BY(queue_mu_);
  int64_t running_ ABSL_GUARDED_BY(queue_mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(queue_mu_) = false;
  std::vector<std::thread> writers_;
  absl::Notification stop_renew_;
  std::thread renewer_;
  absl::Mutex stop_mu_;
};

}  // namespace retnet::server

#endif  // RETNET_SERVER_REDIS_STORE_H_
