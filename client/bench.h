// File: client/bench.h
//
// `retnet-client bench`: a load generator for retnet-serve that measures what serving users care
// about, with the definitions of vLLM's benchmark_serving:
//   TTFT  send -> first streamed token;      ITL  gap between consecutive tokens (tokens that
//   E2EL  send -> Final message;             arrive merged in one message share its gap evenly);
//   TPOT  (E2EL - TTFT) / (output tokens - 1), per request;
//   throughput = completed requests (and output tokens) / measured duration; goodput = requests
//   per second that met every given latency target.
// Timestamps are taken the moment each streamed message is read.
//
// Load shapes: closed loop (`concurrency` virtual users, each starting its next session as soon
// as the last ends) or open loop (virtual users arrive as a Poisson process at `request_rate`
// per second; `concurrency` caps how many run at once). A virtual user holds one session for
// `turns` turns; follow-up turns are reported separately. Prompts are random token ids (never
// BOS/EOS) and every request asks for an exact output length (ignore_eos).
//
// Threading: RunBench blocks; it runs one thread per active virtual user plus a progress thread.
#ifndef RETNET_CLIENT_BENCH_H_
#define RETNET_CLIENT_BENCH_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/client.h"
#include "nlohmann/json.hpp"

namespace retnet::client {

// "N" or "MIN:MAX" (inclusive, drawn uniformly per request).
struct Range {
  int64_t min = 0, max = 0;
};
absl::StatusOr<Range> ParseRange(const std::string& text, const std::string& field);

struct BenchOptions {
  int64_t concurrency = 8;      // closed loop: users at once; open loop: cap on users at once
  double request_rate = 0;      // > 0: open loop, users arriving per second (Poisson)
  int64_t num_requests = 0;     // stop after this many measured requests (turns); 0 = no limit
  double duration_s = 0;        // stop starting requests after this long; 0 = no limit
  int64_t warmup_requests = 0;  // run first, not measured
  Range prompt_tokens{32, 32};
  Range output_tokens{64, 64};
  int64_t turns = 1;
  double temperature = 0;
  uint64_t seed = 1;
  // Latency targets for goodput, in ms (0 = not a target).
  double slo_ttft_ms = 0, slo_tpot_ms = 0, slo_e2el_ms = 0;
  bool progress = false;       // live progress line on stderr
  std::string session_prefix;  // default: "bench-" + a random tag
  // "grpc" (retnet.v1 Generate) or "openai": streamed POST /v1/completions to `http_target`
  // (host:port) with token-id prompts, x-session-id sessions and stream_options.include_usage,
  // as `vllm bench serve` measures an OpenAI server: one ITL per server-sent event, the output
  // token count from the usage. The gRPC `--target` still answers GetModelInfo and deletes the
  // sessions afterwards. `api_key` is sent as "Authorization: Bearer".
  std::string api = "grpc";
  std::string http_target;
  std::string api_key;
};

struct RequestRecord {
  int64_t index = 0;  // order of sending
  int64_t user = 0;
  int64_t turn = 0;  // 0 = a session's first turn
  std::string session_id;
  double start_s = 0;  // since the measurement began
  double ttft_s = -1, e2el_s = -1;
  std::vector<double> itl_s;
  int64_t prompt_tokens = 0;
  int64_t output_tokens = 0;        // counted from the stream
  int64_t usage_output_tokens = 0;  // what the Final message said
  absl::StatusCode code = absl::StatusCode::kOk;
  std::string error;
};

struct BenchResult {
  BenchOptions options;
  std::string target;
  double duration_s = 0;
  std::vector<RequestRecord> records;
};

absl::StatusOr<BenchResult> RunBench(const Client& client, const BenchOptions& options);

nlohmann::json ReportJson(const BenchResult& result);
std::string ReportTable(const BenchResult& result);
std::string ReportCsv(const BenchResult& result);

// Mean, std, min, max and percentiles (linear interpolation) of `values`.
struct Summary {
  int64_t count = 0;
  double mean = 0, std = 0, min = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};
Summary Summarize(std::vector<double> values);

}  // namespace retnet::client

#endif  // RETNET_CLIENT_BENCH_H_
