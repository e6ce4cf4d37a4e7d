// retnet-client: the command-line client and load generator for retnet-serve.
//
//   retnet-client [--target HOST:PORT] generate "And God said" --max-new-tokens 60
//   retnet-client chat --session demo
//   retnet-client session list | info ID | fork ID [NEW] | delete ID | export ID FILE | import FILE
//   retnet-client tokenize TEXT | detokenize IDS... | model | health
//   retnet-client bench --concurrency 8 --duration 30 --json report.json
//
// Exit status: 0 success; 1 health check not SERVING or a bench with no request completed;
// 2 usage error; 3 local error (a file);
// 64 + the gRPC status code when the server refused a call (e.g. 69 NOT_FOUND, 72
// RESOURCE_EXHAUSTED, 78 UNAVAILABLE). Errors are one line on stderr plus a hint.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/bench.h"
#include "client/client.h"
#include "client/instant_server.h"
#include "nlohmann/json.hpp"

namespace {

using retnet::client::Client;
namespace v1 = ::retnet::v1;

constexpr int kExitNotServing = 1;
constexpr int kExitUsage = 2;
constexpr int kExitLocal = 3;
constexpr int kExitRpcBase = 64;

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "retnet-client: %s: %s\n", absl::StatusCodeToString(status.code()).c_str(),
               std::string(status.message()).c_str());
  const std::string hint = retnet::client::Explain(status);
  if (!hint.empty()) std::fprintf(stderr, "  hint: %s\n", hint.c_str());
  return kExitRpcBase + static_cast<int>(status.code());
}

int FailLocal(const std::string& message) {
  std::fprintf(stderr, "retnet-client: %s\n", message.c_str());
  return kExitLocal;
}

int FailUsage(const std::string& message) {
  std::fprintf(stderr, "retnet-client: %s\n", message.c_str());
  return kExitUsage;
}

// Sampling and stopping flags shared by generate and chat; NaN/-1 = not given (server default).
struct TurnFlags {
  double temperature = NAN, top_p = NAN, min_p = 0, repetition_penalty = NAN;
  double presence_penalty = 0, frequency_penalty = 0;
  int64_t top_k = 0, max_new_tokens = 0, min_tokens = 0, seed = -1, logprobs = -1;
  std::vector<std::string> stop, logit_bias;
  std::vector<int64_t> stop_token_ids;
  bool ignore_eos = false, no_bos = false;

  void Register(CLI::App* app) {
    app->add_option("--temperature", temperature, "0 = greedy (server default 1.0)");
    app->add_option("--top-k", top_k, "0 = off");
    app->add_option("--top-p", top_p, "nucleus sampling, (0, 1]");
    app->add_option("--min-p", min_p, "[0, 1)");
    app->add_option("--repetition-penalty", repetition_penalty, "1.0 = off");
    app->add_option("--presence-penalty", presence_penalty, "[-2, 2]");
    app->add_option("--frequency-penalty", frequency_penalty, "[-2, 2]");
    app->add_option("--logit-bias", logit_bias, "ID:BIAS (repeatable)");
    app->add_option("--seed", seed, "reproducible sampling");
    app->add_option("--max-new-tokens", max_new_tokens, "0 = server default");
    app->add_option("--min-tokens", min_tokens, "tokens before EOS/stop may end the turn");
    app->add_option("--stop", stop, "stop string (repeatable)");
    app->add_option("--stop-token-id", stop_token_ids, "stop token id (repeatable)");
    app->add_flag("--ignore-eos", ignore_eos, "keep going past EOS");
    app->add_option("--logprobs", logprobs, "0 = chosen token, N in [1, 20] = plus top N");
    app->add_flag("--no-bos", no_bos, "do not prepend BOS on a new session's first turn");
  }

  absl::Status Apply(v1::GenerateRequest* req) const {
    v1::SamplingParams* s = req->mutable_sampling();
    if (!std::isnan(temperature)) s->set_temperature(temperature);
    s->set_top_k(top_k);
    if (!std::isnan(top_p)) s->set_top_p(top_p);
    s->set_min_p(min_p);
    if (!std::isnan(repetition_penalty)) s->set_repetition_penalty(repetition_penalty);
    s->set_presence_penalty(presence_penalty);
    s->set_frequency_penalty(frequency_penalty);
    for (const std::string& lb : logit_bias) {
      std::vector<std::string> parts = absl::StrSplit(lb, ':');
      int64_t id = 0;
      double bias = 0;
      if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &id) ||
          !absl::SimpleAtod(parts[1], &bias)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--logit-bias: want ID:BIAS, got '", lb, "'"));
      }
      (*s->mutable_logit_bias())[id] = bias;
    }
    if (seed >= 0) s->set_seed(static_cast<uint64_t>(seed));
    v1::StoppingCriteria* st = req->mutable_stopping();
    st->set_max_new_tokens(max_new_tokens);
    st->set_min_tokens(min_tokens);
    for (const auto& x : stop) st->add_stop(x);
    for (int64_t id : stop_token_ids) st->add_stop_token_ids(id);
    st->set_ignore_eos(ignore_eos);
    if (logprobs >= 0) req->set_logprobs(static_cast<int32_t>(logprobs));
    if (no_bos) req->set_add_bos(false);
    return absl::OkStatus();
  }
};

absl::StatusOr<std::vector<int64_t>> ParseIds(const std::string& text, const std::string& field) {
  std::vector<int64_t> ids;
  for (absl::string_view piece :
       absl::StrSplit(text, absl::ByAnyChar(", \n\t"), absl::SkipEmpty())) {
    int64_t id = 0;
    if (!absl::SimpleAtoi(piece, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": not a token id: '", std::string(piece), "'"));
    }
    ids.push_back(id);
  }
  return ids;
}

std::string ReadAll(std::istream& in) {
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

nlohmann::json TurnJson(const retnet::client::TurnResult& r, const std::vector<v1::Token>& tokens,
                        bool with_logprobs) {
  nlohmann::json j;
  j["session_id"] = r.final.session_id();
  j["tokens"] = r.tokens;
  j["text"] = r.text;
  j["finish_reason"] = retnet::client::FinishReasonName(r.final.finish_reason());
  j["stop_sequence"] = r.final.stop_sequence();
  const v1::Usage& u = r.final.usage();
  j["usage"] = {{"prompt_tokens", u.prompt_tokens()},
                {"completion_tokens", u.completion_tokens()},
                {"session_tokens_total", u.session_tokens_total()},
                {"state_bytes", u.state_bytes()}};
  j["timings"] = {{"first_token_ms", r.final.timings().first_token_ns() / 1e6},
                  {"total_ms", r.final.timings().total_ns() / 1e6}};
  if (with_logprobs) {
    nlohmann::json lp = nlohmann::json::array();
    for (const v1::Token& t : tokens) {
      nlohmann::json e = {{"id", t.id()}, {"logprob", t.logprob()}};
      nlohmann::json top = nlohmann::json::array();
      for (const auto& tl : t.top_logprobs())
        top.push_back({{"id", tl.id()}, {"logprob", tl.logprob()}});
      e["top"] = top;
      lp.push_back(e);
    }
    j["logprobs"] = lp;
  }
  return j;
}

void PrintTurnStats(const retnet::client::TurnResult& r) {
  const v1::Final& f = r.final;
  const double total_s = f.timings().total_ns() / 1e9;
  // A one-shot request (no --session) leaves no session behind: the server sends no id.
  const std::string where =
      f.session_id().empty() ? std::string("one-shot") : "session " + f.session_id();
  std::fprintf(stderr, "[%s: %lld tokens, %s%s, first token %.1f ms, %.1f tok/s]\n", where.c_str(),
               static_cast<long long>(f.usage().completion_tokens()),
               retnet::client::FinishReasonName(f.finish_reason()).c_str(),
               f.stop_sequence().empty() ? "" : (" '" + f.stop_sequence() + "'").c_str(),
               f.timings().first_token_ns() / 1e6,
               total_s > 0 ? f.usage().completion_tokens() / total_s : 0.0);
}

void PrintSession(const v1::Session& s, bool json) {
  if (json) {
    nlohmann::json j = {{"session_id", s.session_id()},
                        {"position", s.position()},
                        {"resident", s.resident()},
                        {"generating", s.generating()},
                        {"created_unix_ms", s.created_unix_ms()},
                        {"last_used_unix_ms", s.last_used_unix_ms()}};
    j["pending_token"] = s.has_pending_token() ? nlohmann::json(s.pending_token()) : nullptr;
    std::cout << j.dump() << "\n";
    return;
  }
  std::cout << absl::StrFormat(
      "%-24s position %-8d %-9s %s%s\n", s.session_id(), s.position(),
      s.resident() ? "resident" : "spilled", s.generating() ? "generating" : "idle",
      s.has_pending_token() ? absl::StrCat(", pending token ", s.pending_token()) : "");
}

// ---------------------------------------------------------------------------------------------
// chat: one Chat stream per session; each input line is one turn.

class ChatRepl {
 public:
  ChatRepl(const Client& client, const TurnFlags& flags, std::string session)
      : client_(client), flags_(flags), session_(std::move(session)) {}

  int Run() {
    const bool tty = ::isatty(0) != 0;
    if (tty) {
      std::printf("chat on session %s (/info, /fork [ID], /quit, /help)\n", session_.c_str());
    }
    int rc = 0;
    std::string line;
    while (true) {
      if (tty) {
        std::printf("> ");
        std::fflush(stdout);
      }
      if (!std::getline(std::cin, line)) break;
      if (line.empty()) continue;
      if (line[0] == '/') {
        if (!Command(line, &rc)) break;
        continue;
      }
      absl::Status s = Turn(line);
      if (!s.ok()) rc = Fail(s);
    }
    Close();
    return rc;
  }

 private:
  // False = quit.
  bool Command(const std::string& line, int* rc) {
    std::vector<std::string> words = absl::StrSplit(line, ' ', absl::SkipEmpty());
    const std::string& cmd = words[0];
    if (cmd == "/quit" || cmd == "/exit") return false;
    if (cmd == "/help") {
      std::printf(
          "/info        the session's position and state\n"
          "/fork [ID]   copy the session (state, sampler, history) and continue on the copy\n"
          "/quit        leave (the session stays on the server)\n");
    } else if (cmd == "/info") {
      auto s = client_.GetSession(session_);
      if (s.ok()) {
        PrintSession(*s, false);
      } else {
        *rc = Fail(s.status());
      }
    } else if (cmd == "/fork") {
      Close();
      const std::string target = words.size() > 1 ? words[1] : retnet::client::NewSessionId();
      auto s = client_.ForkSession(session_, target);
      if (s.ok()) {
        std::printf("forked %s -> %s; now on %s\n", session_.c_str(), s->session_id().c_str(),
                    s->session_id().c_str());
        session_ = s->session_id();
        started_ = true;  // the fork exists
      } else {
        *rc = Fail(s.status());
      }
    } else {
      std::printf("unknown command %s (try /help)\n", cmd.c_str());
    }
    std::fflush(stdout);
    return true;
  }

  absl::Status Turn(const std::string& text) {
    if (stream_ == nullptr) {
      ctx_ = std::make_unique<grpc::ClientContext>();
      // A chat stream lives as long as the conversation: no deadline on it.
      client_.Prepare(ctx_.get(), session_);
      ctx_->set_deadline(std::chrono::system_clock::time_point::max());
      stream_ = client_.StartChat(ctx_.get());
    }
    v1::ChatRequest req;
    v1::GenerateRequest* turn = req.mutable_turn();
    turn->set_session_id(session_);
    // Only the REPL's first turn may create the session: later, a session that expired (or was
    // deleted) is reported as NOT_FOUND instead of silently starting over.
    turn->set_create_session(!started_);
    turn->set_text(text);
    if (absl::Status s = flags_.Apply(turn); !s.ok()) return s;
    if (!stream_->Write(req)) return Finish();
    retnet::client::Received<v1::GenerateResponse> received;
    const v1::GenerateResponse& msg = received.message;
    while (stream_->Read(&received)) {
      if (!received.parsed) {
        ctx_->TryCancel();
        (void)stream_->Finish();
        stream_.reset();
        ctx_.reset();
        std::printf("\n");
        return retnet::client::UnparsableResponse<v1::GenerateResponse>("Chat");
      }
      if (msg.has_chunk()) {
        for (const auto& t : msg.chunk().tokens())
          std::fwrite(t.text().data(), 1, t.text().size(), stdout);
        std::fflush(stdout);
      } else if (msg.has_final()) {
        std::printf("%s\n", msg.final().text().c_str());
        std::fflush(stdout);
        started_ = true;
        return absl::OkStatus();
      }
    }
    return Finish();
  }

  // Ends the current stream; its status when the server ended it with an error.
  absl::Status Finish() {
    if (stream_ == nullptr) return absl::OkStatus();
    grpc::Status s = stream_->Finish();
    stream_.reset();
    ctx_.reset();
    std::printf("\n");
    if (s.ok()) return absl::UnavailableError("the chat stream ended unexpectedly");
    return retnet::client::FromGrpc(s);
  }

  void Close() {
    if (stream_ == nullptr) return;
    stream_->WritesDone();
    (void)stream_->Finish();
    stream_.reset();
    ctx_.reset();
  }

  const Client& client_;
  const TurnFlags& flags_;
  std::string session_;
  bool started_ = false;  // a turn has run (or the session was forked into existence)
  std::unique_ptr<grpc::ClientContext> ctx_;
  std::unique_ptr<Client::ChatStream> stream_;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"retnet-client: talk to and load-test a retnet-serve server"};
  app.require_subcommand(1);
  retnet::client::ConnectionOptions conn;
  double timeout_s = 300;
  app.add_option("--target", conn.target, "server address host:port")
      ->envname("RETNET_TARGET")
      ->capture_default_str();
  app.add_flag("--tls", conn.tls, "use TLS (system roots unless --tls-ca)");
  app.add_option("--tls-ca", conn.tls_ca_file, "PEM root certificates (implies --tls)")
      ->envname("RETNET_TLS_CA");
  app.add_option("--tls-server-name", conn.tls_server_name, "name to check in the certificate");
  app.add_option("--api-key", conn.api_key, "bearer token")->envname("RETNET_API_KEY");
  app.add_option("--timeout", timeout_s, "per-call deadline in seconds")->capture_default_str();
  app.add_option("--retries", conn.retries,
                 "retries of a call refused with UNAVAILABLE (0-4; bench defaults to 0)")
      ->envname("RETNET_RETRIES")
      ->capture_default_str();

  // generate
  CLI::App* gen = app.add_subcommand("generate", "stream one turn's tokens to the terminal");
  std::string prompt, token_list, session;
  bool json = false, verbose = false;
  TurnFlags gen_flags;
  gen->add_option("prompt", prompt, "prompt text ('-' = read standard input)");
  gen->add_option("--tokens", token_list, "prompt as token ids, e.g. '256,72,105'");
  gen->add_option("--session", session,
                  "continue this session (created if missing; default: a one-shot request "
                  "that leaves no session behind)");
  gen->add_flag("--json", json, "print one JSON object (token ids, text, usage) at the end");
  bool gen_raw = false;
  gen->add_flag("--raw", gen_raw,
                "stream the tokens' exact bytes (Token.token_bytes) instead of their UTF-8 text; "
                "with --json, adds token_bytes_hex");
  gen->add_flag("--verbose,-v", verbose, "print the turn's statistics on stderr");
  gen_flags.Register(gen);

  // chat
  CLI::App* chat = app.add_subcommand("chat", "interactive multi-turn conversation on a session");
  std::string chat_session;
  TurnFlags chat_flags;
  chat->add_option("--session", chat_session, "session to use (default: a new one)");
  chat_flags.Register(chat);

  // session
  CLI::App* sess = app.add_subcommand("session", "manage sessions");
  sess->require_subcommand(1);
  bool sess_json = false;
  sess->add_flag("--json", sess_json, "JSON output");
  CLI::App* s_list = sess->add_subcommand("list", "list sessions");
  std::string s_id, s_new, s_file;
  CLI::App* s_info = sess->add_subcommand("info", "one session");
  s_info->add_option("id", s_id)->required();
  CLI::App* s_fork = sess->add_subcommand("fork", "copy a session");
  s_fork->add_option("id", s_id)->required();
  s_fork->add_option("new_id", s_new, "default: server-generated");
  CLI::App* s_delete = sess->add_subcommand("delete", "delete a session");
  s_delete->add_option("id", s_id)->required();
  CLI::App* s_export = sess->add_subcommand("export", "save a session's snapshot to a file");
  s_export->add_option("id", s_id)->required();
  s_export->add_option("file", s_file)->required();
  CLI::App* s_import = sess->add_subcommand("import", "restore a snapshot file as a session");
  s_import->add_option("file", s_file)->required();
  s_import->add_option("--id", s_id, "session id (default: server-generated)");
  for (CLI::App* sub : sess->get_subcommands({})) sub->fallthrough();  // --json after the verb

  // tokenize / detokenize / model / health
  CLI::App* tok = app.add_subcommand("tokenize", "text to token ids");
  std::string tok_text;
  bool tok_bos = false, tok_json = false;
  tok->add_option("text", tok_text)->required();
  tok->add_flag("--add-bos", tok_bos, "prepend BOS");
  tok->add_flag("--json", tok_json, "JSON output");
  CLI::App* detok = app.add_subcommand("detokenize", "token ids to text");
  std::vector<std::string> detok_ids;
  detok->add_option("ids", detok_ids, "ids (space or comma separated)")->required();
  bool detok_raw = false;
  detok->add_flag("--raw", detok_raw,
                  "write the tokens' exact bytes (no newline); the default prints valid UTF-8 text "
                  "with U+FFFD for ill-formed bytes");
  CLI::App* model = app.add_subcommand("model", "what the server serves");
  bool model_json = false;
  model->add_flag("--json", model_json, "JSON output");
  CLI::App* health = app.add_subcommand("health", "exit 0 when the server reports SERVING");
  std::string health_service;
  health->add_option("--service", health_service, "service name (default: the whole server)");

  // bench
  CLI::App* bench =
      app.add_subcommand("bench", "load test: TTFT, ITL, TPOT, E2E latency, throughput");
  retnet::client::BenchOptions bo;
  std::string prompt_range = "32", output_range = "64", json_out, csv_out;
  bool no_progress = false, self_test = false;
  bench
      ->add_option("--concurrency,-c", bo.concurrency,
                   "closed loop: concurrent users; open loop: at most this many at once")
      ->capture_default_str();
  bench
      ->add_option("--rate", bo.request_rate,
                   "open loop: users arriving per second (Poisson); 0 = closed loop")
      ->capture_default_str();
  bench->add_option("--requests,-n", bo.num_requests, "measured requests (turns)");
  bench->add_option("--duration", bo.duration_s, "seconds to keep starting requests");
  bench->add_option("--warmup", bo.warmup_requests, "unmeasured requests first")
      ->capture_default_str();
  bench->add_option("--prompt-tokens", prompt_range, "N or MIN:MAX")->capture_default_str();
  bench->add_option("--output-tokens", output_range, "N or MIN:MAX")->capture_default_str();
  bench->add_option("--turns", bo.turns, "turns per session (follow-ups reported apart)")
      ->capture_default_str();
  bench->add_option("--temperature", bo.temperature)->capture_default_str();
  bench->add_option("--seed", bo.seed)->capture_default_str();
  bench->add_option("--slo-ttft-ms", bo.slo_ttft_ms, "goodput target for TTFT");
  bench->add_option("--slo-tpot-ms", bo.slo_tpot_ms, "goodput target for TPOT");
  bench->add_option("--slo-e2el-ms", bo.slo_e2el_ms, "goodput target for E2E latency");
  bench->add_option("--session-prefix", bo.session_prefix, "session id prefix");
  bench->add_option("--json", json_out, "write the JSON report here ('-' = stdout)");
  bench->add_option("--csv", csv_out, "write one line per request here");
  bench->add_flag("--no-progress", no_progress, "no live progress line");
  bench
      ->add_option("--api", bo.api,
                   "grpc | openai (streamed POST /v1/completions to --http-target)")
      ->check(CLI::IsMember({"grpc", "openai"}))
      ->capture_default_str();
  bench->add_option("--http-target", bo.http_target,
                    "--api openai: the HTTP API's host:port (default: --target's host, port 8000)");
  bench->add_flag("--self-test", self_test,
                  "measure against a built-in server that streams instantly (the tool's overhead)");

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }
  if (!(timeout_s > 0)) return FailUsage("--timeout: must be > 0");
  conn.timeout = absl::Seconds(timeout_s);
  // A probe answers fast or not at all (Docker and Kubernetes have their own timeouts too), and
  // a probe that retries would hide what it probes.
  if (health->parsed() && app.count("--timeout") == 0) conn.timeout = absl::Seconds(5);
  if (health->parsed() && app.count("--retries") == 0) conn.retries = 0;
  // A measurement counts refusals as errors unless retries are asked for.
  if (bench->parsed() && app.count("--retries") == 0 && std::getenv("RETNET_RETRIES") == nullptr) {
    conn.retries = 0;
  }

  std::unique_ptr<retnet::client::InstantServer> instant;
  if (bench->parsed() && self_test) {
    auto started = retnet::client::InstantServer::Start();
    if (!started.ok()) return Fail(started.status());
    instant = std::move(*started);
    conn.target = absl::StrCat("127.0.0.1:", instant->port());
    conn.tls = false;
    conn.tls_ca_file.clear();
  }
  auto connected = Client::Connect(conn);
  if (!connected.ok()) return Fail(connected.status());
  const Client& client = *connected;

  if (gen->parsed()) {
    v1::GenerateRequest req;
    // Without --session: a one-shot request, which leaves no session on the server.
    req.set_session_id(session);
    req.set_create_session(!session.empty());
    if (!token_list.empty()) {
      if (!prompt.empty()) return FailUsage("give a prompt text or --tokens, not both");
      auto ids = ParseIds(token_list, "--tokens");
      if (!ids.ok()) return FailUsage(std::string(ids.status().message()));
      for (int64_t id : *ids) req.mutable_tokens()->add_ids(id);
    } else {
      req.set_text(prompt == "-" ? ReadAll(std::cin) : prompt);
    }
    if (absl::Status s = gen_flags.Apply(&req); !s.ok()) return FailUsage(std::string(s.message()));
    req.set_return_token_bytes(gen_raw);
    std::vector<v1::Token> tokens;
    auto result = client.Generate(req, [&](const v1::TokenChunk& chunk) {
      for (const auto& t : chunk.tokens()) {
        if (json) {
          tokens.push_back(t);
        } else {
          const std::string& out = gen_raw ? t.token_bytes() : t.text();
          std::fwrite(out.data(), 1, out.size(), stdout);
        }
      }
      if (!json) std::fflush(stdout);
    });
    if (!result.ok()) {
      if (!json) std::printf("\n");
      return Fail(result.status());
    }
    if (json) {
      nlohmann::json j = TurnJson(*result, tokens, req.has_logprobs());
      if (gen_raw) {
        nlohmann::json hex = nlohmann::json::array();
        for (const v1::Token& t : tokens) hex.push_back(absl::BytesToHexString(t.token_bytes()));
        j["token_bytes_hex"] = hex;
      }
      std::cout << j.dump() << "\n";
    } else if (gen_raw) {  // Final.text repeats bytes the tokens already carried
      std::printf("\n");
      if (verbose || ::isatty(2)) PrintTurnStats(*result);
    } else {
      std::printf("%s\n", result->final.text().c_str());
      if (verbose || ::isatty(2)) PrintTurnStats(*result);
    }
    return 0;
  }

  if (chat->parsed()) {
    v1::GenerateRequest probe;
    if (absl::Status s = chat_flags.Apply(&probe); !s.ok()) {
      return FailUsage(std::string(s.message()));
    }
    ChatRepl repl(client, chat_flags,
                  chat_session.empty() ? retnet::client::NewSessionId() : chat_session);
    return repl.Run();
  }

  if (sess->parsed()) {
    if (s_list->parsed()) {
      auto list = client.ListSessions();
      if (!list.ok()) return Fail(list.status());
      for (const auto& s : *list) PrintSession(s, sess_json);
      return 0;
    }
    if (s_info->parsed() || s_fork->parsed()) {
      auto s = s_info->parsed() ? client.GetSession(s_id) : client.ForkSession(s_id, s_new);
      if (!s.ok()) return Fail(s.status());
      PrintSession(*s, sess_json);
      return 0;
    }
    if (s_delete->parsed()) {
      absl::Status s = client.DeleteSession(s_id);
      return s.ok() ? 0 : Fail(s);
    }
    if (s_export->parsed()) {
      auto data = client.ExportSession(s_id);
      if (!data.ok()) return Fail(data.status());
      const std::string tmp = s_file + ".tmp";
      {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        out.write(data->data(), static_cast<std::streamsize>(data->size()));
        if (!out.flush()) return FailLocal(absl::StrCat(s_file, ": cannot write"));
      }
      if (std::rename(tmp.c_str(), s_file.c_str()) != 0) {
        return FailLocal(absl::StrCat(s_file, ": cannot write"));
      }
      std::fprintf(stderr, "exported %s: %zu bytes to %s\n", s_id.c_str(), data->size(),
                   s_file.c_str());
      return 0;
    }
    if (s_import->parsed()) {
      std::ifstream in(s_file, std::ios::binary);
      if (!in) return FailLocal(absl::StrCat(s_file, ": cannot read"));
      auto s = client.ImportSession(s_id, ReadAll(in));
      if (!s.ok()) return Fail(s.status());
      PrintSession(*s, sess_json);
      return 0;
    }
  }

  if (tok->parsed()) {
    auto ids = client.Tokenize(tok_text, tok_bos);
    if (!ids.ok()) return Fail(ids.status());
    if (tok_json) {
      std::cout << nlohmann::json{{"ids", *ids}}.dump() << "\n";
    } else {
      std::vector<std::string> parts;
      for (int64_t id : *ids) parts.push_back(absl::StrCat(id));
      std::cout << absl::StrJoin(parts, " ") << "\n";
    }
    return 0;
  }
  if (detok->parsed()) {
    std::vector<int64_t> ids;
    for (const auto& piece : detok_ids) {
      auto parsed = ParseIds(piece, "ids");
      if (!parsed.ok()) return FailUsage(std::string(parsed.status().message()));
      ids.insert(ids.end(), parsed->begin(), parsed->end());
    }
    auto resp = client.Detokenize(ids);
    if (!resp.ok()) return Fail(resp.status());
    if (detok_raw) {  // the exact bytes, no newline
      std::cout.write(resp->raw().data(), static_cast<std::streamsize>(resp->raw().size()));
    } else {
      std::cout << resp->text() << "\n";
    }
    return 0;
  }
  if (model->parsed()) {
    auto info = client.GetModelInfo();
    if (!info.ok()) return Fail(info.status());
    if (model_json) {
      const v1::ModelInfo& m = *info;
      nlohmann::json j = {
          {"family", m.family()},
          {"layout", m.layout()},
          {"checkpoint", m.checkpoint()},
          {"num_layers", m.num_layers()},
          {"hidden_size", m.hidden_size()},
          {"num_heads", m.num_heads()},
          {"head_k_dim", m.head_k_dim()},
          {"head_v_dim", m.head_v_dim()},
          {"vocab_size", m.vocab_size()},
          {"parameters", m.parameters()},
          {"dtype", m.dtype()},
          {"device", m.device()},
          {"tokenizer", m.tokenizer()},
          {"bos_token_id", m.bos_token_id()},
          {"eos_token_id", m.eos_token_id()},
          {"state_bytes_per_session", m.state_bytes_per_session()},
          {"device_slots", m.device_slots()},
          {"free_slots", m.free_slots()},
          {"max_host_sessions", m.max_host_sessions()},
          {"max_prompt_tokens", m.max_prompt_tokens()},
          {"max_new_tokens", m.max_new_tokens()},
          {"extensions", std::vector<std::string>(m.extensions().begin(), m.extensions().end())}};
      std::cout << j.dump(2) << "\n";
    } else {
      std::cout << info->DebugString();
    }
    return 0;
  }
  if (health->parsed()) {
    auto serving = client.CheckHealth(health_service);
    if (!serving.ok()) return Fail(serving.status());
    std::cout << (*serving ? "SERVING" : "NOT_SERVING") << "\n";
    return *serving ? 0 : kExitNotServing;
  }

  if (bench->parsed()) {
    auto pr = retnet::client::ParseRange(prompt_range, "--prompt-tokens");
    if (!pr.ok()) return FailUsage(std::string(pr.status().message()));
    auto orr = retnet::client::ParseRange(output_range, "--output-tokens");
    if (!orr.ok()) return FailUsage(std::string(orr.status().message()));
    bo.prompt_tokens = *pr;
    bo.output_tokens = *orr;
    if (bo.num_requests <= 0 && bo.duration_s <= 0) bo.num_requests = 16 * bo.concurrency;
    bo.progress = !no_progress && ::isatty(2) != 0;
    bo.api_key = conn.api_key;
    if (bo.api == "openai" && bo.http_target.empty()) {
      bo.http_target = conn.target.substr(0, conn.target.rfind(':')) + ":8000";
    }
    auto result = retnet::client::RunBench(client, bo);
    if (!result.ok()) {
      return result.status().code() == absl::StatusCode::kInvalidArgument
                 ? FailUsage(std::string(result.status().message()))
                 : Fail(result.status());
    }
    if (self_test) {
      result->target = "the built-in instant server (self-test: client overhead only)";
    }
    if (json_out != "-") std::cout << retnet::client::ReportTable(*result);
    if (!json_out.empty()) {
      nlohmann::json j = retnet::client::ReportJson(*result);
      j["self_test"] = self_test;
      if (json_out == "-") {
        std::cout << j.dump(2) << "\n";
      } else {
        std::ofstream out(json_out);
        out << j.dump(2) << "\n";
        if (!out) return FailLocal(absl::StrCat(json_out, ": cannot write"));
      }
    }
    if (!csv_out.empty()) {
      std::ofstream out(csv_out);
      out << retnet::client::ReportCsv(*result);
      if (!out) return FailLocal(absl::StrCat(csv_out, ": cannot write"));
    }
    const bool any_ok = std::any_of(result->records.begin(), result->records.end(),
                                    [](const auto& r) { return r.code == absl::StatusCode::kOk; });
    if (!any_ok) {
      std::fprintf(stderr, "retnet-client: bench: no request completed (see errors above)\n");
      return 1;
    }
    return 0;
  }
  return FailUsage("no command (try --help)");
}
