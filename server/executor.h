// File: server/executor.h
//
// A small bounded executor: a fixed pool of threads and a bounded FIFO queue of work. The gRPC
// service runs on it everything a callback reaction must not wait for (engine control calls,
// state-directory sync and restore, imports, long tokenizations) and finishes the reactor from
// the work itself.
//
//   Executor control("control", /*threads=*/4, /*max_queued=*/256);
//   absl::Status queued = control.Submit([reply] { reply->Done(SlowThing()); });
//   if (!queued.ok()) reply->Done(queued);  // RESOURCE_EXHAUSTED or UNAVAILABLE, see Submit()
//
// Ownership and threading: the executor owns its threads; Submit() and Shutdown() are
// thread-safe. Work runs on the pool's threads, one item per thread at a time, in queue order
// (items start in FIFO order; with more than one thread they may finish in any order). Work
// must not call Shutdown() (it would wait for itself); it may Submit() more work.
#ifndef RETNET_SERVER_EXECUTOR_H_
#define RETNET_SERVER_EXECUTOR_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace retnet::server {

class Executor {
 public:
  // Starts `threads` (at least 1) threads; at most `max_queued` (at least 1) items wait for
  // one. `name` appears in the refusal messages.
  Executor(std::string name, int threads, int64_t max_queued);
  ~Executor();  // Shutdown()
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Queues `work`. RESOURCE_EXHAUSTED when `max_queued` items are already waiting (the work is
  // not run; the caller answers its RPC with this status), UNAVAILABLE after Shutdown().
  absl::Status Submit(std::function<void()> work);

  // Refuses new work, runs every queued item to completion and joins the threads. Idempotent.
  void Shutdown();

  int64_t queued() const;

 private:
  void Loop();

  const std::string name_;
  const int64_t max_queued_;
  mutable absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;  // started in the constructor, joined by Shutdown()
  absl::Mutex join_mu_;               // serializes Shutdown() callers
};

}  // namespace retnet::server

#endif  // RETNET_SERVER_EXECUTOR_H_
