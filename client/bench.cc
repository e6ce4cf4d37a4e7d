#include "client/bench.h"

#include <httplib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <limits>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace retnet::client {
namespace {

using SteadyClock = std::chrono::steady_clock;

double Seconds(SteadyClock::duration d) { return std::chrono::duration<double>(d).count(); }

std::string CodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

// The shared state of one run.
class Run {
 public:
  Run(const Client& client, const BenchOptions& options, const v1::ModelInfo& info)
      : client_(client), o_(options), info_(info) {}

  void Measure() {
    tokens_.store(0);  // the progress line counts measured tokens only
    start_ = SteadyClock::now();
    std::thread progress;
    if (o_.progress) progress = std::thread([this] { Progress(); });
    if (o_.request_rate > 0) {
      OpenLoop();
    } else {
      std::vector<std::thread> users;
      for (int64_t i = 0; i < o_.concurrency; ++i) {
        users.emplace_back([this] {
          while (true) {
            const int64_t user = next_user_.fetch_add(1);
            if (!RunUser(user)) break;
          }
        });
      }
      for (auto& t : users) t.join();
    }
    end_ = SteadyClock::now();
    {
      std::lock_guard<std::mutex> lock(mu_);
      finished_ = true;
    }
    cv_.notify_all();
    if (progress.joinable()) progress.join();
  }

  // Warm-up requests: single turns, not recorded.
  void Warmup() {
    std::atomic<int64_t> left{o_.warmup_requests};
    std::vector<std::thread> threads;
    for (int64_t i = 0; i < std::min(o_.concurrency, o_.warmup_requests); ++i) {
      threads.emplace_back([&, i] {
        while (left.fetch_sub(1) > 0) {
          const std::string id = absl::StrCat(prefix_, "-warmup-", i);
          RequestRecord r;
          Turn(-1 - i, 0, id, &r);
          (void)client_.DeleteSession(id);
        }
      });
    }
    for (auto& t : threads) t.join();
  }

  void set_prefix(std::string prefix) { prefix_ = std::move(prefix); }
  double duration_s() const { return Seconds(end_ - start_); }
  std::vector<RequestRecord> TakeRecords() {
    std::lock_guard<std::mutex> lock(mu_);
    std::sort(records_.begin(), records_.end(),
              [](const RequestRecord& a, const RequestRecord& b) { return a.index < b.index; });
    return std::move(records_);
  }

 private:
  bool TimeIsUp() const {
    return o_.duration_s > 0 && Seconds(SteadyClock::now() - start_) >= o_.duration_s;
  }

  // Claims the right to send one more measured request.
  bool Claim(int64_t* index) {
    if (TimeIsUp()) return false;
    *index = sent_.fetch_add(1);
    if (o_.num_requests > 0 && *index >= o_.num_requests) return false;
    return true;
  }

  // One virtual user: a session for up to `turns` turns. False when no request could be claimed.
  bool RunUser(int64_t user) {
    const std::string id = absl::StrCat(prefix_, "-u", user);
    bool any = false;
    for (int64_t turn = 0; turn < o_.turns; ++turn) {
      RequestRecord r;
      if (!Claim(&r.index)) break;
      any = true;
      Turn(user, turn, id, &r);
      const bool ok = r.code == absl::StatusCode::kOk;
      {
        std::lock_guard<std::mutex> lock(mu_);
        records_.push_back(std::move(r));
      }
      done_.fetch_add(1);
      if (!ok) break;  // the session's state is no longer what the next turn assumes
    }
    if (any) (void)client_.DeleteSession(id);
    return any;
  }

  void Turn(int64_t user, int64_t turn, const std::string& id, RequestRecord* r) {
    std::mt19937_64 rng(o_.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(user) * 1000003u +
                        static_cast<uint64_t>(turn));
    auto draw = [&](const Range& range) {
      return std::uniform_int_distribution<int64_t>(range.min, range.max)(rng);
    };
    const int64_t prompt_len = draw(o_.prompt_tokens);
    const int64_t output_len = draw(o_.output_tokens);
    v1::GenerateRequest req;
    req.set_session_id(id);
    req.set_create_session(turn == 0);
    std::uniform_int_distribution<int64_t> token(0, info_.vocab_size() - 1);
    for (int64_t i = 0; i < prompt_len; ++i) {
      int64_t t = token(rng);
      while (t == info_.bos_token_id() || t == info_.eos_token_id()) t = token(rng);
      req.mutable_tokens()->add_ids(t);
    }
    req.mutable_sampling()->set_temperature(o_.temperature);
    req.mutable_sampling()->set_seed(o_.seed + static_cast<uint64_t>(user));
    req.mutable_stopping()->set_max_new_tokens(output_len);
    req.mutable_stopping()->set_ignore_eos(true);

    r->user = user;
    r->turn = turn;
    r->session_id = id;
    r->prompt_tokens = prompt_len;
    if (o_.api == "openai") return TurnHttp(req, r);
    grpc::ClientContext ctx;
    client_.Prepare(&ctx, id);
    const SteadyClock::time_point sent = SteadyClock::now();
    r->start_s = Seconds(sent - start_);
    auto reader = client_.StartGenerate(&ctx, req);
    Received<v1::GenerateResponse> received;
    const v1::GenerateResponse& msg = received.message;
    SteadyClock::time_point last = sent;
    bool final_seen = false;
    bool unparsable = false;
    while (reader->Read(&received)) {
      if (!received.parsed) {  // cancel at once: the server would keep streaming until deadline
        unparsable = true;
        ctx.TryCancel();
        break;
      }
      const SteadyClock::time_point now = SteadyClock::now();
      if (msg.has_chunk()) {
        const int n = msg.chunk().tokens_size();
        if (n == 0) continue;
        if (r->output_tokens == 0) {
          r->ttft_s = Seconds(now - sent);
        } else {
          const double gap = Seconds(now - last) / n;
          for (int i = 0; i < n; ++i) r->itl_s.push_back(gap);
        }
        r->output_tokens += n;
        tokens_.fetch_add(n);
        last = now;
      } else if (msg.has_final()) {
        r->e2el_s = Seconds(now - sent);
        r->usage_output_tokens = msg.final().usage().completion_tokens();
        final_seen = true;
      }
    }
    const grpc::Status status = reader->Finish();
    if (unparsable) {
      const absl::Status bad = UnparsableResponse<v1::GenerateResponse>("Generate");
      r->code = bad.code();
      r->error = std::string(bad.message());
    } else if (!status.ok()) {
      r->code = static_cast<absl::StatusCode>(status.error_code());
      r->error = status.error_message();
    } else if (!final_seen) {
      r->code = absl::StatusCode::kDataLoss;
      r->error = "stream ended without a Final message";
    }
  }

  // The same turn as a streamed OpenAI completion: ITL per server-sent event (the events carry
  // text, not token counts), output tokens from the usage chunk.
  void TurnHttp(const v1::GenerateRequest& req, RequestRecord* r) {
    nlohmann::json body = {
        {"prompt", std::vector<int64_t>(req.tokens().ids().begin(), req.tokens().ids().end())},
        {"max_tokens", req.stopping().max_new_tokens()},
        {"temperature", req.sampling().temperature()},
        {"seed", req.sampling().seed()},
        {"ignore_eos", true},
        {"stream", true},
        {"stream_options", {{"include_usage", true}}}};
    const size_t colon = o_.http_target.rfind(':');
    httplib::Client http(o_.http_target.substr(0, colon),
                         std::atoi(o_.http_target.c_str() + colon + 1));
    http.set_read_timeout(300, 0);
    http.set_tcp_nodelay(true);
    httplib::Headers headers = {{"x-session-id", req.session_id()}};
    if (!o_.api_key.empty()) headers.emplace("Authorization", "Bearer " + o_.api_key);
    std::string buffer;
    bool done = false;
    std::string error;
    const SteadyClock::time_point sent = SteadyClock::now();
    r->start_s = Seconds(sent - start_);
    SteadyClock::time_point last = sent;
    int64_t events = 0;
    httplib::Request hr;
    hr.method = "POST";
    hr.path = "/v1/completions";
    hr.headers = headers;
    hr.body = body.dump();
    hr.set_header("Content-Type", "application/json");
    hr.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
      buffer.append(data, n);
      size_t end;
      while ((end = buffer.find("\n\n")) != std::string::npos) {
        const std::string event = buffer.substr(0, end);
        buffer.erase(0, end + 2);
        if (!absl::StartsWith(event, "data: ")) continue;
        if (event == "data: [DONE]") {
          done = true;
          continue;
        }
        auto j = nlohmann::json::parse(event.substr(6), nullptr, false);
        if (j.is_discarded()) {
          error = "an event that is not JSON";
          return false;
        }
        const SteadyClock::time_point now = SteadyClock::now();
        if (j.contains("error")) {
          error = j["error"].value("message", "error event");
          continue;
        }
        if (j.contains("usage") && j["usage"].is_object()) {
          r->usage_output_tokens = j["usage"].value("completion_tokens", int64_t{0});
          r->e2el_s = Seconds(now - sent);
        }
        if (!j.contains("choices") || j["choices"].empty()) continue;
        const std::string text = j["choices"][0].value("text", "");
        if (text.empty() && j["choices"][0]["finish_reason"].is_null()) continue;
        if (events == 0) {
          r->ttft_s = Seconds(now - sent);
        } else {
          r->itl_s.push_back(Seconds(now - last));
        }
        ++events;
        tokens_.fetch_add(1);
        last = now;
      }
      return true;
    };
    httplib::Response res;
    httplib::Error err = httplib::Error::Success;
    const bool ok = http.send(hr, res, err);
    r->output_tokens = r->usage_output_tokens;
    if (!ok || res.status != 200) {
      r->code = res.status == 429   ? absl::StatusCode::kResourceExhausted
                : res.status == 503 ? absl::StatusCode::kUnavailable
                                    : absl::StatusCode::kUnknown;
      r->error = ok ? absl::StrCat("HTTP ", res.status, " ", res.body)
                    : absl::StrCat("HTTP error ", static_cast<int>(err));
    } else if (!error.empty() || !done) {
      r->code = absl::StatusCode::kDataLoss;
      r->error = error.empty() ? "stream ended without [DONE]" : error;
    }
  }

  // Users arrive as a Poisson process (the first at t = 0) and queue for `concurrency` workers.
  void OpenLoop() {
    std::mt19937_64 rng(o_.seed);
    std::exponential_distribution<double> gap(o_.request_rate);
    std::mutex mu;
    std::condition_variable cv;
    std::deque<int64_t> arrived;
    bool closed = false;
    std::vector<std::thread> workers;
    for (int64_t i = 0; i < o_.concurrency; ++i) {
      workers.emplace_back([&] {
        while (true) {
          int64_t user = 0;
          {
            std::unique_lock<std::mutex> lock(mu);
            cv.wait(lock, [&] { return closed || !arrived.empty(); });
            if (arrived.empty()) return;
            user = arrived.front();
            arrived.pop_front();
          }
          RunUser(user);
        }
      });
    }
    const SteadyClock::time_point deadline =
        o_.duration_s > 0 ? start_ + std::chrono::duration_cast<SteadyClock::duration>(
                                         std::chrono::duration<double>(o_.duration_s))
                          : SteadyClock::time_point::max();
    // Enough users for the request count (each sends up to `turns` requests).
    const int64_t users = o_.num_requests > 0 ? (o_.num_requests + o_.turns - 1) / o_.turns
                                              : std::numeric_limits<int64_t>::max();
    SteadyClock::time_point next = start_;
    for (int64_t user = 0; user < users && next < deadline; ++user) {
      std::this_thread::sleep_until(next);  // the arrival process itself, not synchronisation
      {
        std::lock_guard<std::mutex> lock(mu);
        arrived.push_back(user);
      }
      cv.notify_one();
      next += std::chrono::duration_cast<SteadyClock::duration>(
          std::chrono::duration<double>(gap(rng)));
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      closed = true;
    }
    cv.notify_all();
    for (auto& t : workers) t.join();
  }

  void Progress() {
    const bool by_count = o_.num_requests > 0;
    std::unique_lock<std::mutex> lock(mu_);
    while (!finished_) {
      cv_.wait_for(lock, std::chrono::milliseconds(250));
      const double elapsed = Seconds(SteadyClock::now() - start_);
      const int64_t done = done_.load();
      double fraction = by_count ? static_cast<double>(done) / o_.num_requests
                                 : (o_.duration_s > 0 ? elapsed / o_.duration_s : 0);
      fraction = std::min(1.0, std::max(0.0, fraction));
      const int width = 30, filled = static_cast<int>(fraction * width);
      std::fprintf(stderr, "\r[%s%s] %5.1f%%  %lld requests  %.1f s  %.0f tok/s ",
                   std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                   100 * fraction, static_cast<long long>(done), elapsed,
                   elapsed > 0 ? tokens_.load() / elapsed : 0.0);
      std::fflush(stderr);
    }
    std::fprintf(stderr, "\n");
  }

  const Client& client_;
  const BenchOptions& o_;
  const v1::ModelInfo& info_;
  std::string prefix_;
  SteadyClock::time_point start_, end_;
  std::atomic<int64_t> next_user_{0}, sent_{0}, done_{0}, tokens_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool finished_ = false;
  std::vector<RequestRecord> records_;
};

double Tpot(const RequestRecord& r) {
  return r.output_tokens > 1 ? (r.e2el_s - r.ttft_s) / (r.output_tokens - 1) : -1;
}

bool MeetsSlo(const RequestRecord& r, const BenchOptions& o) {
  if (r.code != absl::StatusCode::kOk) return false;
  if (o.slo_ttft_ms > 0 && r.ttft_s * 1e3 > o.slo_ttft_ms) return false;
  if (o.slo_e2el_ms > 0 && r.e2el_s * 1e3 > o.slo_e2el_ms) return false;
  const double tpot = Tpot(r);
  if (o.slo_tpot_ms > 0 && tpot >= 0 && tpot * 1e3 > o.slo_tpot_ms) return false;
  return true;
}

bool HasSlo(const BenchOptions& o) {
  return o.slo_ttft_ms > 0 || o.slo_tpot_ms > 0 || o.slo_e2el_ms > 0;
}

nlohmann::json SummaryJson(const Summary& s) {
  return {{"count", s.count}, {"mean", s.mean}, {"std", s.std}, {"min", s.min},
          {"p50", s.p50},     {"p90", s.p90},   {"p99", s.p99}, {"max", s.max}};
}

// Latency metrics (ms) over the completed requests that `pick` selects.
template <typename Pick>
nlohmann::json LatencyJson(const std::vector<RequestRecord>& records, Pick pick) {
  std::vector<double> ttft, tpot, itl, e2el;
  for (const auto& r : records) {
    if (r.code != absl::StatusCode::kOk || !pick(r)) continue;
    if (r.ttft_s >= 0) ttft.push_back(r.ttft_s * 1e3);
    if (Tpot(r) >= 0) tpot.push_back(Tpot(r) * 1e3);
    for (double g : r.itl_s) itl.push_back(g * 1e3);
    e2el.push_back(r.e2el_s * 1e3);
  }
  return {{"ttft_ms", SummaryJson(Summarize(ttft))},
          {"tpot_ms", SummaryJson(Summarize(tpot))},
          {"itl_ms", SummaryJson(Summarize(itl))},
          {"e2el_ms", SummaryJson(Summarize(e2el))}};
}

}  // namespace

absl::StatusOr<Range> ParseRange(const std::string& text, const std::string& field) {
  Range r;
  const size_t colon = text.find(':');
  bool ok = colon == std::string::npos ? absl::SimpleAtoi(text, &r.min)
                                       : absl::SimpleAtoi(text.substr(0, colon), &r.min) &&
                                             absl::SimpleAtoi(text.substr(colon + 1), &r.max);
  if (colon == std::string::npos) r.max = r.min;
  if (!ok || r.min < 1 || r.max < r.min) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": want N or MIN:MAX with 1 <= MIN <= MAX, got '", text, "'"));
  }
  return r;
}

Summary Summarize(std::vector<double> v) {
  Summary s;
  s.count = static_cast<int64_t>(v.size());
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / v.size();
  double var = 0;
  for (double x : v) var += (x - s.mean) * (x - s.mean);
  s.std = std::sqrt(var / v.size());
  auto pct = [&](double p) {
    const double pos = p / 100.0 * (v.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(pos));
    const size_t hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (v[hi] - v[lo]) * (pos - lo);
  };
  s.min = v.front();
  s.max = v.back();
  s.p50 = pct(50);
  s.p90 = pct(90);
  s.p99 = pct(99);
  return s;
}

absl::StatusOr<BenchResult> RunBench(const Client& client, const BenchOptions& options) {
  if (options.concurrency < 1) return absl::InvalidArgumentError("--concurrency: must be >= 1");
  if (options.turns < 1) return absl::InvalidArgumentError("--turns: must be >= 1");
  if (options.request_rate < 0) return absl::InvalidArgumentError("--rate: must be >= 0");
  if (options.num_requests <= 0 && options.duration_s <= 0) {
    return absl::InvalidArgumentError("give --requests N or --duration S (or both)");
  }
  absl::StatusOr<v1::ModelInfo> info = client.GetModelInfo();
  if (!info.ok()) return info.status();
  if (info->vocab_size() < 3) return absl::FailedPreconditionError("model vocabulary too small");
  BenchResult result;
  result.options = options;
  result.target = options.api == "openai"
                      ? absl::StrCat("http://", options.http_target, "/v1/completions (OpenAI API)")
                      : client.options().target;
  std::string prefix = options.session_prefix;
  if (prefix.empty()) prefix = "bench-" + NewSessionId().substr(2, 8);
  Run run(client, result.options, *info);
  run.set_prefix(prefix);
  if (options.warmup_requests > 0) run.Warmup();
  run.Measure();
  result.duration_s = run.duration_s();
  result.records = run.TakeRecords();
  return result;
}

nlohmann::json ReportJson(const BenchResult& res) {
  const BenchOptions& o = res.options;
  int64_t ok = 0, prompt = 0, output = 0, good = 0, mismatches = 0;
  std::map<std::string, int64_t> errors;
  for (const auto& r : res.records) {
    if (r.code == absl::StatusCode::kOk) {
      ++ok;
      prompt += r.prompt_tokens;
      output += r.output_tokens;
      if (r.output_tokens != r.usage_output_tokens) ++mismatches;
      if (MeetsSlo(r, o)) ++good;
    } else {
      ++errors[CodeName(r.code)];
    }
  }
  const double d = res.duration_s > 0 ? res.duration_s : 1e-9;
  nlohmann::json j;
  j["target"] = res.target;
  j["config"] = {{"mode", o.request_rate > 0 ? "open" : "closed"},
                 {"concurrency", o.concurrency},
                 {"request_rate", o.request_rate},
                 {"requests", o.num_requests},
                 {"duration_s", o.duration_s},
                 {"warmup_requests", o.warmup_requests},
                 {"prompt_tokens", {o.prompt_tokens.min, o.prompt_tokens.max}},
                 {"output_tokens", {o.output_tokens.min, o.output_tokens.max}},
                 {"turns", o.turns},
                 {"temperature", o.temperature},
                 {"seed", o.seed}};
  j["duration_s"] = res.duration_s;
  j["requests"] = {{"sent", static_cast<int64_t>(res.records.size())},
                   {"completed", ok},
                   {"failed", static_cast<int64_t>(res.records.size()) - ok}};
  j["errors"] = errors;
  j["prompt_tokens"] = prompt;
  j["output_tokens"] = output;
  j["token_count_mismatches"] = mismatches;
  j["request_throughput"] = ok / d;
  j["output_token_throughput"] = output / d;
  j["total_token_throughput"] = (prompt + output) / d;
  if (HasSlo(o)) {
    j["goodput"] = {
        {"requests_per_s", good / d},
        {"requests", good},
        {"slo_ms", {{"ttft", o.slo_ttft_ms}, {"tpot", o.slo_tpot_ms}, {"e2el", o.slo_e2el_ms}}}};
  } else {
    j["goodput"] = nullptr;
  }
  j["latency"] = LatencyJson(res.records, [](const RequestRecord&) { return true; });
  if (o.turns > 1) {
    j["first_turns"] = LatencyJson(res.records, [](const RequestRecord& r) { return r.turn == 0; });
    j["followup_turns"] =
        LatencyJson(res.records, [](const RequestRecord& r) { return r.turn > 0; });
  }
  return j;
}

std::string ReportTable(const BenchResult& res) {
  const nlohmann::json j = ReportJson(res);
  const BenchOptions& o = res.options;
  std::ostringstream out;
  auto range = [](const Range& r) {
    return r.min == r.max ? absl::StrCat(r.min) : absl::StrCat(r.min, "-", r.max);
  };
  out << "retnet-client bench against " << res.target << "\n";
  if (o.request_rate > 0) {
    out << absl::StrFormat("load: open loop, %.2f users/s (Poisson), at most %d at once",
                           o.request_rate, o.concurrency);
  } else {
    out << absl::StrFormat("load: closed loop, %d concurrent users", o.concurrency);
  }
  out << absl::StrFormat("; %d turn(s) per session; prompt %s tokens, output %s tokens\n", o.turns,
                         range(o.prompt_tokens), range(o.output_tokens));
  out << absl::StrFormat("duration %.2f s; requests sent %d, completed %d, failed %d\n",
                         res.duration_s, j["requests"]["sent"].get<int64_t>(),
                         j["requests"]["completed"].get<int64_t>(),
                         j["requests"]["failed"].get<int64_t>());
  out << absl::StrFormat("request throughput   %10.2f req/s\n",
                         j["request_throughput"].get<double>());
  out << absl::StrFormat("output tokens        %10.1f tok/s\n",
                         j["output_token_throughput"].get<double>());
  out << absl::StrFormat("total tokens         %10.1f tok/s\n",
                         j["total_token_throughput"].get<double>());
  if (!j["goodput"].is_null()) {
    out << absl::StrFormat("goodput              %10.2f req/s (%d requests met every target)\n",
                           j["goodput"]["requests_per_s"].get<double>(),
                           j["goodput"]["requests"].get<int64_t>());
  }
  auto table = [&](const std::string& title, const nlohmann::json& lat) {
    out << "\n" << title << "\n";
    out << "| metric (ms) | count | mean | p50 | p90 | p99 | min | max |\n";
    out << "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (const char* key : {"ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"}) {
      const auto& s = lat[key];
      std::string name(key);
      name = name.substr(0, name.size() - 3);
      for (auto& c : name) c = static_cast<char>(std::toupper(c));
      out << absl::StrFormat("| %s | %d | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f |\n", name,
                             s["count"].get<int64_t>(), s["mean"].get<double>(),
                             s["p50"].get<double>(), s["p90"].get<double>(), s["p99"].get<double>(),
                             s["min"].get<double>(), s["max"].get<double>());
    }
  };
  table("all requests", j["latency"]);
  if (o.turns > 1) {
    table("first turns (prefill of a new session)", j["first_turns"]);
    table("follow-up turns (prefill of the new tokens only, state kept on the server)",
          j["followup_turns"]);
  }
  if (!j["errors"].empty()) {
    out << "\nerrors by status code:";
    for (auto it = j["errors"].begin(); it != j["errors"].end(); ++it) {
      out << " " << it.key() << " " << it.value().get<int64_t>();
    }
    out << "\n";
  }
  return out.str();
}

std::string ReportCsv(const BenchResult& res) {
  std::ostringstream out;
  out << "index,user,turn,session_id,start_s,ttft_ms,tpot_ms,e2el_ms,prompt_tokens,output_tokens,"
         "status\n";
  auto ms = [](double s) { return s < 0 ? std::string() : absl::StrFormat("%.3f", s * 1e3); };
  for (const auto& r : res.records) {
    const bool ok = r.code == absl::StatusCode::kOk;
    out << absl::StrFormat("%d,%d,%d,\"%s\",%.6f,%s,%s,%s,%d,%d,%s\n", r.index, r.user, r.turn,
                           r.session_id, r.start_s, ok ? ms(r.ttft_s) : "", ok ? ms(Tpot(r)) : "",
                           ok ? ms(r.e2el_s) : "", r.prompt_tokens, r.output_tokens,
                           CodeName(r.code));
  }
  return out.str();
}

}  // namespace retnet::client
