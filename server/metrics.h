// File: server/metrics.h
//
// Prometheus metrics, kept by hand (no client library): latency histograms, counters by label,
// and gauges read from the engine at scrape time; Render() writes the text exposition format
// (version 0.0.4). Names follow vLLM's where they exist.
//
// Threading: all methods are thread-safe (one mutex; recording is a few additions).
#ifndef RETNET_SERVER_METRICS_H_
#define RETNET_SERVER_METRICS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "engine/engine.h"

namespace retnet::server {

class Metrics {
 public:
  Metrics();

  void ObserveTimeToFirstToken(double seconds);
  void ObserveInterTokenLatency(double seconds);
  void ObserveRequestLatency(double seconds);
  void AddGeneratedTokens(int64_t n);
  void AddPromptTokens(int64_t n);
  // One finished request, by its gRPC status code name ("OK", "INVALID_ARGUMENT", ...).
  void CountRequest(const std::string& code);
  // One OpenAI-compatible HTTP request, by endpoint ("/v1/completions") and HTTP status.
  void CountHttpRequest(const std::string& endpoint, int status);
  // The session store (--session-store): one call's latency by operation ("acquire", "write",
  // ...), a call that failed (Redis unreachable or refusing), a turn that took over a session
  // another replica wrote last, a turn refused because another turn held the session's lease,
  // and a lease lost during a turn (its write is refused).
  void EnableStoreMetrics();  // renders them (zero) before the first call
  void ObserveStore(const std::string& op, double seconds);
  void CountStoreError(const std::string& op);
  void CountLeaseHandover();
  void CountLeaseRefused();
  void CountLeaseLost();

  // The exposition text, with the engine's gauges as of now.
  std::string Render(const engine::PoolStats& stats) const;

 private:
  struct Histogram {
    std::vector<double> bounds;
    std::vector<uint64_t> counts;  // per bucket (non-cumulative), last = +Inf
    double sum = 0;
    uint64_t count = 0;
    void Observe(double v);
  };
  static void RenderHistogram(std::string& out, const std::string& name, const std::string& help,
                              const Histogram& h, const std::string& labels = "",
                              bool header = true);

  mutable absl::Mutex mu_;
  Histogram ttft_ ABSL_GUARDED_BY(mu_), itl_ ABSL_GUARDED_BY(mu_), e2e_ ABSL_GUARDED_BY(mu_);
  uint64_t generated_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t prompt_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<std::string, uint64_t> requests_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, int>, uint64_t> http_requests_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Histogram> store_seconds_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> store_errors_ ABSL_GUARDED_BY(mu_);
  uint64_t handovers_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t refused_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t lost_ ABSL_GUARDED_BY(mu_) = 0;
  bool store_used_ ABSL_GUARDED_BY(mu_) = false;
};

// gRPC status code names as Prometheus label values.
const char* StatusCodeName(int code);

}  // namespace retnet::server

#endif  // RETNET_SERVER_METRICS_H_
