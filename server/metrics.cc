#include "server/metrics.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace retnet::server {

const char* StatusCodeName(int code) {
  static constexpr const char* kNames[] = {"OK",
                                           "CANCELLED",
                                           "UNKNOWN",
                                           "INVALID_ARGUMENT",
                                           "DEADLINE_EXCEEDED",
                                           "NOT_FOUND",
                                           "ALREADY_EXISTS",
                                           "PERMISSION_DENIED",
                                           "RESOURCE_EXHAUSTED",
                                           "FAILED_PRECONDITION",
                                           "ABORTED",
                                           "OUT_OF_RANGE",
                                           "UNIMPLEMENTED",
                                           "INTERNAL",
                                           "UNAVAILABLE",
                                           "DATA_LOSS",
                                           "UNAUTHENTICATED"};
  return code >= 0 && code <= 16 ? kNames[code] : "UNKNOWN";
}

void Metrics::Histogram::Observe(double v) {
  const size_t i = std::lower_bound(bounds.begin(), bounds.end(), v) - bounds.begin();
  ++counts[i];
  sum += v;
  ++count;
}

Metrics::Metrics() {
  const std::vector<double> latency = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                       0.5,   1,      2.5,   5,    10,    30,   60,  120};
  for (Histogram* h : {&ttft_, &itl_, &e2e_}) {
    h->bounds = latency;
    h->counts.assign(latency.size() + 1, 0);
  }
}

void Metrics::ObserveTimeToFirstToken(double s) {
  absl::MutexLock lock(&mu_);
  ttft_.Observe(s);
}
void Metrics::ObserveInterTokenLatency(double s) {
  absl::MutexLock lock(&mu_);
  itl_.Observe(s);
}
void Metrics::ObserveRequestLatency(double s) {
  absl::MutexLock lock(&mu_);
  e2e_.Observe(s);
}
void Metrics::AddGeneratedTokens(int64_t n) {
  absl::MutexLock lock(&mu_);
  generated_ += static_cast<uint64_t>(n);
}
void Metrics::AddPromptTokens(int64_t n) {
  absl::MutexLock lock(&mu_);
  prompt_ += static_cast<uint64_t>(n);
}
void Metrics::CountRequest(const std::string& code) {
  absl::MutexLock lock(&mu_);
  ++requests_[code];
}
void Metrics::CountHttpRequest(const std::string& endpoint, int status) {
  absl::MutexLock lock(&mu_);
  ++http_requests_[{endpoint, status}];
}

void Metrics::EnableStoreMetrics() {
  absl::MutexLock lock(&mu_);
  store_used_ = true;
}
void Metrics::ObserveStore(const std::string& op, double s) {
  absl::MutexLock lock(&mu_);
  store_used_ = true;
  auto it = store_seconds_.find(op);
  if (it == store_seconds_.end()) {
    Histogram h;
    h.bounds = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                0.025,  0.05,    0.1,    0.25,  0.5,    1,     2.5};
    h.counts.assign(h.bounds.size() + 1, 0);
    it = store_seconds_.emplace(op, std::move(h)).first;
  }
  it->second.Observe(s);
}
void Metrics::CountStoreError(const std::string& op) {
  absl::MutexLock lock(&mu_);
  ++store_errors_[op];
}
void Metrics::CountLeaseHandover() {
  absl::MutexLock lock(&mu_);
  ++handovers_;
}
void Metrics::CountLeaseRefused() {
  absl::MutexLock lock(&mu_);
  ++refused_;
}
void Metrics::CountLeaseLost() {
  absl::MutexLock lock(&mu_);
  ++lost_;
}

void Metrics::RenderHistogram(std::string& out, const std::string& name, const std::string& help,
                              const Histogram& h, const std::string& labels, bool header) {
  if (header) absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " histogram\n");
  const std::string pre = labels.empty() ? "" : absl::StrCat(labels, ",");
  const std::string own = labels.empty() ? "" : absl::StrCat("{", labels, "}");
  uint64_t cumulative = 0;
  for (size_t i = 0; i < h.bounds.size(); ++i) {
    cumulative += h.counts[i];
    absl::StrAppend(&out, name, "_bucket{", pre, "le=\"", absl::StrFormat("%g", h.bounds[i]),
                    "\"} ", cumulative, "\n");
  }
  absl::StrAppend(&out, name, "_bucket{", pre, "le=\"+Inf\"} ", h.count, "\n");
  absl::StrAppend(&out, name, "_sum", own, " ", absl::StrFormat("%.9g", h.sum), "\n", name,
                  "_count", own, " ", h.count, "\n");
}

std::string Metrics::Render(const engine::PoolStats& s) const {
  std::string out;
  auto gauge = [&](const std::string& name, const std::string& help, double v) {
    absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " gauge\n", name, " ",
                    absl::StrFormat("%.17g", v), "\n");
  };
  gauge("retnet_num_requests_running", "Generations decoding in the batch.", s.decoding);
  gauge("retnet_num_requests_waiting", "Generations waiting for admission.", s.queued);
  gauge("retnet_sessions_resident", "Sessions whose state is on the device.",
        s.sessions - s.spilled);
  gauge("retnet_sessions_spilled", "Idle sessions whose state is in host memory.", s.spilled);
  gauge("retnet_state_slots", "Device state slots.", s.device_slots);
  gauge("retnet_state_slots_free", "Free device state slots.", s.free_slots);
  gauge("retnet_state_bytes_per_session", "Recurrent state bytes of one session.",
        s.state_bytes_per_session);
  gauge("retnet_state_bytes_resident", "State bytes of the resident sessions.",
        static_cast<double>(s.sessions - s.spilled) * s.state_bytes_per_session);
  absl::MutexLock lock(&mu_);
  RenderHistogram(out, "retnet_time_to_first_token_seconds",
                  "Time from request arrival to its first token.", ttft_);
  RenderHistogram(out, "retnet_inter_token_latency_seconds",
                  "Time between consecutive tokens of a stream.", itl_);
  RenderHistogram(out, "retnet_e2e_request_latency_seconds",
                  "Time from request arrival to its end.", e2e_);
  absl::StrAppend(&out, "# HELP retnet_generation_tokens_total Tokens generated.\n",
                  "# TYPE retnet_generation_tokens_total counter\nretnet_generation_tokens_total ",
                  generated_, "\n");
  absl::StrAppend(&out, "# HELP retnet_prompt_tokens_total Prompt tokens prefilled.\n",
                  "# TYPE retnet_prompt_tokens_total counter\nretnet_prompt_tokens_total ", prompt_,
                  "\n");
  absl::StrAppend(
      &out, "# HELP retnet_requests_total Generate and Chat turns by final gRPC status code.\n",
      "# TYPE retnet_requests_total counter\n");
  for (const auto& [code, n] : requests_)
    absl::StrAppend(&out, "retnet_requests_total{code=\"", code, "\"} ", n, "\n");
  absl::StrAppend(&out,
                  "# HELP retnet_http_requests_total OpenAI-compatible HTTP requests by endpoint "
                  "and HTTP status (their turns are counted in retnet_requests_total too).\n",
                  "# TYPE retnet_http_requests_total counter\n");
  for (const auto& [key, n] : http_requests_) {
    absl::StrAppend(&out, "retnet_http_requests_total{endpoint=\"", key.first, "\",status=\"",
                    key.second, "\"} ", n, "\n");
  }
  if (store_used_) {
    bool first = true;
    for (const auto& [op, h] : store_seconds_) {
      RenderHistogram(out, "retnet_session_store_seconds",
                      "Session store (Redis) call latency by operation.", h,
                      absl::StrCat("op=\"", op, "\""), first);
      first = false;
    }
    absl::StrAppend(&out,
                    "# HELP retnet_session_store_errors_total Session store calls that failed "
                    "(unreachable or refused), by operation.\n",
                    "# TYPE retnet_session_store_errors_total counter\n");
    for (const auto& [op, n] : store_errors_)
      absl::StrAppend(&out, "retnet_session_store_errors_total{op=\"", op, "\"} ", n, "\n");
    auto counter = [&](const char* name, const char* help, uint64_t v) {
      absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " counter\n", name, " ",
                      v, "\n");
    };
    counter("retnet_session_lease_handovers_total",
            "Turns that took over a session another replica wrote last.", handovers_);
    counter("retnet_session_lease_refused_total",
            "Turns refused (UNAVAILABLE) because another turn held the session's lease.",
            refused_);
    counter("retnet_session_lease_lost_total",
            "Leases lost during a turn (the turn's write is refused).", lost_);
  }
  return out;
}

}  // namespace retnet::server
