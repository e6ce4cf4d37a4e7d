#include "server/openai_api.h"

#include <grpcpp/client_context.h>
#include <grpcpp/create_channel.h>
#include <httplib.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "common/strings.h"
#include "common/transcript.h"
#include "common/utf8.h"

namespace retnet::server {
namespace v1 = retnet::v1;
using json = nlohmann::ordered_json;

namespace {

constexpr int kMaxJsonDepth = 64;

// An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
struct ApiError {
  int http = 400;
  std::string message;
  std::string param;  // empty = null
  std::string code;   // empty = null
};

const char* ErrorType(int http) {
  switch (http) {
    case 400:
    case 413:
      return "invalid_request_error";
    case 401:
      return "authentication_error";
    case 403:
      return "permission_error";
    case 404:
      return "not_found_error";
    case 409:
      return "conflict_error";
    case 429:
      return "rate_limit_error";
    case 503:
      return "service_unavailable";
    default:
      return "server_error";
  }
}

std::string Dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// One server-sent event.
std::string Sse(const json& j) { return absl::StrCat("data: ", Dump(j), "\n\n"); }

json ErrorJson(const ApiError& e) {
  // Bounded like a gRPC status message: an error never grows with the input that caused it.
  constexpr size_t kMaxMessageBytes = 1024;
  std::string message = common::SanitizeUtf8(
      std::string_view(e.message).substr(0, std::min(e.message.size(), kMaxMessageBytes)));
  if (e.message.size() > kMaxMessageBytes) message += "...";
  json err = {{"message", message},
              {"type", ErrorType(e.http)},
              {"param", e.param.empty() ? json(nullptr) : json(e.param)},
              {"code", e.code.empty() ? json(nullptr) : json(e.code)}};
  return json{{"error", err}};
}

// The field a server message names ("top_p: must be ...") in OpenAI's terms, and the message
// with the gRPC field paths renamed.
ApiError FromGrpc(const grpc::Status& s) {
  ApiError e;
  switch (s.error_code()) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::ALREADY_EXISTS:
      e.http = 400;
      break;
    case grpc::StatusCode::UNAUTHENTICATED:
      e.http = 401;
      break;
    case grpc::StatusCode::PERMISSION_DENIED:
      e.http = 403;
      break;
    case grpc::StatusCode::NOT_FOUND:
      e.http = 404;
      break;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      e.http = 429;
      break;
    case grpc::StatusCode::UNAVAILABLE:
      e.http = 503;
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      e.http = 504;
      break;
    case grpc::StatusCode::ABORTED:  // expect_transcript: another request changed the session
      e.http = 409;
      break;
    default:
      e.http = 500;
  }
  std::string m = s.error_message();
  static const std::pair<const char*, const char*> kRenames[] = {
      {"stopping.max_new_tokens", "max_tokens"},
      {"stopping.stop_token_ids", "stop_token_ids"},
      {"stopping.stop", "stop"},
      {"stopping.", ""},
      {"sampling.", ""},
      {"tokens.ids", "prompt"},
  };
  for (const auto& [from, to] : kRenames) {
    if (absl::StartsWith(m, from)) {
      m = absl::StrCat(to, m.substr(strlen(from)));
      break;
    }
  }
  e.message = m;
  const size_t colon = m.find(':');
  if (e.http == 400 && colon != std::string::npos && colon < 40 &&
      m.find(' ') > colon) {  // "name: ..." names the parameter
    e.param = m.substr(0, colon);
  }
  if (e.http == 429) e.code = "capacity_exceeded";
  if (s.error_code() == grpc::StatusCode::ABORTED) {
    e.message =
        "the session changed while this request was being prepared (another request "
        "continued it): send the conversation again";
  }
  if (e.http == 409 || (s.error_code() == grpc::StatusCode::FAILED_PRECONDITION &&
                        absl::StrContains(m, "is already generating"))) {
    e.http = 409;
    e.param = "x-session-id";
    e.code = "session_busy";
  }
  return e;
}

ApiError Bad(const std::string& param, const std::string& message) {
  return ApiError{400, absl::StrCat(param, ": ", message), param, ""};
}

// Rejects bodies nested deeper than kMaxJsonDepth before the (recursive) parser sees them.
bool TooDeep(const std::string& body) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

std::string RandomHex(int bytes) {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  std::string out;
  static const char* kHex = "0123456789abcdef";
  for (int i = 0; i < bytes; ++i) {
    const uint64_t v = rng();
    out.push_back(kHex[v & 15]);
    out.push_back(kHex[(v >> 4) & 15]);
  }
  return out;
}

// gRPC metadata values (the Authorization header travels as one) are printable ASCII.
bool PrintableAscii(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c >= 0x20 && c < 0x7F; });
}
ApiError BadAuthorization() {
  return ApiError{401, "Authorization: must be 'Bearer <key>' in printable ASCII", "", ""};
}

bool IsInteger(const json& v) {
  if (v.is_number_integer()) return true;
  if (!v.is_number_float()) return false;
  const double d = v.get<double>();
  return std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15;
}

// The parameters of one /v1/completions or /v1/chat/completions request.
struct Params {
  bool chat = false;
  std::vector<v1::GenerateRequest> prompts;  // completions: one per prompt (text or tokens set)
  json messages;                             // chat
  int64_t n = 1;
  bool stream = false;
  bool include_usage = false;
  int32_t logprobs = -1;  // -1 none, else the number of alternatives (0 = chosen token only)
  std::optional<uint64_t> seed;
  v1::GenerateRequest base;  // sampling, stopping and logprobs for every choice
};

std::optional<ApiError> NumberIn(const json& body, const char* name, double lo, double hi,
                                 std::optional<double>* out) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) return Bad(name, "must be a number");
  const double v = it->get<double>();
  if (!(v >= lo && v <= hi)) {
    return Bad(name, absl::StrCat("must be in [", lo, ", ", hi, "], got ", Dump(*it)));
  }
  *out = v;
  return std::nullopt;
}

std::optional<ApiError> IntegerIn(const json& body, const char* name, int64_t lo, int64_t hi,
                                  std::optional<int64_t>* out) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!IsInteger(*it)) return Bad(name, "must be an integer");
  const double v = it->get<double>();
  if (v < static_cast<double>(lo) || v > static_cast<double>(hi)) {
    return Bad(name, absl::StrCat("must be in [", lo, ", ", hi, "], got ", Dump(*it)));
  }
  *out = static_cast<int64_t>(v);
  return std::nullopt;
}

std::optional<ApiError> BoolParam(const json& body, const char* name, bool* out) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) return Bad(name, "must be true or false");
  *out = it->get<bool>();
  return std::nullopt;
}

#define RETURN_IF_API_ERROR(expr)     \
  do {                                \
    if (auto _e = (expr)) return *_e; \
  } while (0)

std::optional<ApiError> ParseParams(const json& body, bool chat, int64_t max_n, Params* p) {
  p->chat = chat;
  static const std::set<std::string> kCommon = {"model",
                                                "max_tokens",
                                                "temperature",
                                                "top_p",
                                                "stop",
                                                "seed",
                                                "presence_penalty",
                                                "frequency_penalty",
                                                "logit_bias",
                                                "logprobs",
                                                "user",
                                                "n",
                                                "stream",
                                                "stream_options",
                                                "top_k",
                                                "min_p",
                                                "repetition_penalty",
                                                "ignore_eos",
                                                "min_tokens",
                                                "stop_token_ids"};
  static const std::set<std::string> kCompletions = {"prompt"};
  static const std::set<std::string> kChat = {"messages", "max_completion_tokens", "top_logprobs"};
  std::vector<std::string> unsupported;
  for (const auto& [key, value] : body.items()) {
    if (value.is_null()) continue;
    if (kCommon.count(key) || (chat ? kChat : kCompletions).count(key)) continue;
    unsupported.push_back(key);
  }
  if (!unsupported.empty()) {
    ApiError e = Bad(unsupported[0],
                     absl::StrCat("unsupported parameter", unsupported.size() > 1 ? "s " : " ",
                                  absl::StrJoin(unsupported, ", ")));
    e.message = absl::StrCat("unsupported parameter", unsupported.size() > 1 ? "s: " : ": ",
                             absl::StrJoin(unsupported, ", "));
    return e;
  }
  v1::GenerateRequest& b = p->base;
  v1::SamplingParams& s = *b.mutable_sampling();
  v1::StoppingCriteria& stop = *b.mutable_stopping();
  std::optional<double> d;
  std::optional<int64_t> i;
  RETURN_IF_API_ERROR(NumberIn(body, "temperature", 0, 2, &d));
  if (d) s.set_temperature(*d);
  d.reset();
  RETURN_IF_API_ERROR(NumberIn(body, "top_p", 0, 1, &d));
  if (d) s.set_top_p(*d);
  d.reset();
  RETURN_IF_API_ERROR(NumberIn(body, "min_p", 0, 1, &d));
  if (d) s.set_min_p(*d);
  d.reset();
  RETURN_IF_API_ERROR(NumberIn(body, "repetition_penalty", 0, 1e9, &d));
  if (d) s.set_repetition_penalty(*d);
  d.reset();
  RETURN_IF_API_ERROR(NumberIn(body, "presence_penalty", -2, 2, &d));
  if (d) s.set_presence_penalty(*d);
  d.reset();
  RETURN_IF_API_ERROR(NumberIn(body, "frequency_penalty", -2, 2, &d));
  if (d) s.set_frequency_penalty(*d);
  RETURN_IF_API_ERROR(IntegerIn(body, "top_k", -1, int64_t{1} << 31, &i));
  if (i) s.set_top_k(*i < 0 ? 0 : *i);  // vLLM: -1 = off
  i.reset();
  RETURN_IF_API_ERROR(IntegerIn(body, "seed", std::numeric_limits<int64_t>::min() / 2,
                                std::numeric_limits<int64_t>::max() / 2, &i));
  if (i) p->seed = static_cast<uint64_t>(*i);
  i.reset();
  RETURN_IF_API_ERROR(IntegerIn(body, "n", 1, max_n, &i));
  if (i) p->n = *i;
  i.reset();
  const char* max_name = "max_tokens";
  if (chat && body.contains("max_completion_tokens") && !body["max_completion_tokens"].is_null()) {
    max_name = "max_completion_tokens";
  }
  RETURN_IF_API_ERROR(IntegerIn(body, max_name, 1, int64_t{1} << 31, &i));
  if (i) stop.set_max_new_tokens(*i);
  i.reset();
  RETURN_IF_API_ERROR(IntegerIn(body, "min_tokens", 0, int64_t{1} << 31, &i));
  if (i) stop.set_min_tokens(*i);
  i.reset();
  bool flag = false;
  RETURN_IF_API_ERROR(BoolParam(body, "ignore_eos", &flag));
  stop.set_ignore_eos(flag);
  RETURN_IF_API_ERROR(BoolParam(body, "stream", &p->stream));
  if (auto it = body.find("stream_options"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) return Bad("stream_options", "must be an object");
    if (!p->stream) return Bad("stream_options", "only allowed with stream: true");
    for (const auto& [key, value] : it->items()) {
      if (key != "include_usage" && key != "continuous_usage_stats") {
        return Bad("stream_options." + key, "unsupported");
      }
    }
    RETURN_IF_API_ERROR(BoolParam(*it, "include_usage", &p->include_usage));
  }
  if (auto it = body.find("stop"); it != body.end() && !it->is_null()) {
    std::vector<std::string> stops;
    if (it->is_string()) {
      stops.push_back(it->get<std::string>());
    } else if (it->is_array()) {
      for (const auto& v : *it) {
        if (!v.is_string()) return Bad("stop", "must be a string or a list of strings");
        stops.push_back(v.get<std::string>());
      }
    } else {
      return Bad("stop", "must be a string or a list of strings");
    }
    for (auto& st : stops) {
      if (st.empty()) return Bad("stop", "stop strings must not be empty");
      stop.add_stop(st);
    }
  }
  if (auto it = body.find("stop_token_ids"); it != body.end() && !it->is_null()) {
    if (!it->is_array()) return Bad("stop_token_ids", "must be a list of token ids");
    for (const auto& v : *it) {
      if (!IsInteger(v)) return Bad("stop_token_ids", "must be a list of token ids");
      stop.add_stop_token_ids(v.get<int64_t>());
    }
  }
  if (auto it = body.find("logit_bias"); it != body.end() && !it->is_null()) {
    if (!it->is_object()) return Bad("logit_bias", "must be an object of token id -> bias");
    for (const auto& [key, value] : it->items()) {
      int64_t id = 0;
      if (!absl::SimpleAtoi(key, &id)) {
        return Bad("logit_bias", absl::StrCat("'", key, "' is not a token id"));
      }
      if (!value.is_number()) return Bad("logit_bias", "biases must be numbers");
      (*s.mutable_logit_bias())[id] = value.get<double>();
    }
  }
  // Log probabilities: completions take logprobs = N (0..20); chat takes logprobs: true and
  // top_logprobs = N.
  if (chat) {
    bool want = false;
    RETURN_IF_API_ERROR(BoolParam(body, "logprobs", &want));
    RETURN_IF_API_ERROR(IntegerIn(body, "top_logprobs", 0, 20, &i));
    if (i && !want) return Bad("top_logprobs", "needs logprobs: true");
    if (want) p->logprobs = i ? static_cast<int32_t>(*i) : 0;
    i.reset();
  } else {
    RETURN_IF_API_ERROR(IntegerIn(body, "logprobs", 0, 20, &i));
    if (i) p->logprobs = static_cast<int32_t>(*i);
    i.reset();
  }
  if (p->logprobs >= 0) b.set_logprobs(p->logprobs);
  if (auto it = body.find("user"); it != body.end() && !it->is_null() && !it->is_string()) {
    return Bad("user", "must be a string");
  }

  if (chat) {
    auto it = body.find("messages");
    if (it == body.end() || !it->is_array() || it->empty()) {
      return Bad("messages", "a non-empty list of messages is required");
    }
    json messages = json::array();
    for (size_t m = 0; m < it->size(); ++m) {
      const json& msg = (*it)[m];
      const std::string where = absl::StrCat("messages[", m, "]");
      if (!msg.is_object()) return Bad(where, "must be an object");
      auto role = msg.find("role");
      if (role == msg.end() || !role->is_string()) return Bad(where + ".role", "required string");
      json copy = msg;
      auto content = msg.find("content");
      if (content != msg.end() && content->is_array()) {  // content parts: text only
        std::string text;
        for (size_t k = 0; k < content->size(); ++k) {
          const json& part = (*content)[k];
          const std::string pw = absl::StrCat(where, ".content[", k, "]");
          if (!part.is_object() || !part.contains("type") || !part["type"].is_string() ||
              part["type"].get<std::string>() != "text" || !part.contains("text") ||
              !part["text"].is_string()) {
            return Bad(pw, "only {\"type\": \"text\", \"text\": ...} parts are supported");
          }
          text += part["text"].get<std::string>();
        }
        copy["content"] = text;
      } else if (content != msg.end() && !content->is_string() && !content->is_null()) {
        return Bad(where + ".content", "must be a string, null or a list of text parts");
      }
      messages.push_back(std::move(copy));
    }
    p->messages = std::move(messages);
    return std::nullopt;
  }
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) return Bad("prompt", "required");
  auto add_text = [&](const std::string& text) {
    v1::GenerateRequest r;
    r.set_text(text);
    p->prompts.push_back(std::move(r));
  };
  auto add_ids = [&](const json& ids) -> std::optional<ApiError> {
    v1::GenerateRequest r;
    for (const auto& v : ids) {
      if (!IsInteger(v)) return Bad("prompt", "token ids must be integers");
      r.mutable_tokens()->add_ids(v.get<int64_t>());
    }
    p->prompts.push_back(std::move(r));
    return std::nullopt;
  };
  if (it->is_string()) {
    add_text(it->get<std::string>());
  } else if (it->is_array() && !it->empty()) {
    if ((*it)[0].is_number()) {
      RETURN_IF_API_ERROR(add_ids(*it));
    } else {
      for (const auto& v : *it) {
        if (v.is_string()) {
          add_text(v.get<std::string>());
        } else if (v.is_array() && !v.empty()) {
          RETURN_IF_API_ERROR(add_ids(v));
        } else {
          return Bad("prompt",
                     "must be a string, a list of strings, a list of token ids or a list of such "
                     "lists");
        }
      }
    }
  } else {
    return Bad("prompt",
               "must be a string, a list of strings, a list of token ids or a list of such lists");
  }
  if (static_cast<int64_t>(p->prompts.size()) * p->n > max_n) {
    return Bad("prompt", absl::StrCat("at most ", max_n, " choices (prompts x n) per request"));
  }
  return std::nullopt;
}

const char* FinishName(v1::FinishReason r) {
  switch (r) {
    case v1::FINISH_REASON_EOS_TOKEN:
    case v1::FINISH_REASON_STOP_SEQUENCE:
      return "stop";
    case v1::FINISH_REASON_CANCELLED:
      return "abort";
    default:
      return "length";
  }
}

// One event of a choice's stream.
struct Event {
  int choice = 0;
  enum Kind { kChunk, kFinal, kError } kind = kChunk;
  v1::TokenChunk chunk;
  v1::Final final;
  grpc::Status status;
};

}  // namespace

// A request in flight: one Generate stream per choice, each read on its own thread into one
// queue. Destroying it cancels what still runs and joins the readers.
struct OpenAiApi::Call {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Event> events;
  int open = 0;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::thread> readers;
  // n > 1: the temporary copies. Each is deleted by the engine when its turn ends; one whose turn
  // never reached the engine (cancelled while queued, refused while draining or at admission)
  // is deleted here once every stream has ended (NOT_FOUND when the engine did it).
  v1::RetNet::Stub* cleanup_stub = nullptr;
  std::string cleanup_auth;
  std::vector<std::string> cleanup;

  void Start(v1::RetNet::Stub* stub, int choice, v1::GenerateRequest request,
             const std::string& auth) {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (!auth.empty()) ctx->AddMetadata("authorization", auth);
    grpc::ClientContext* raw = ctx.get();
    contexts.push_back(std::move(ctx));
    {
      std::lock_guard<std::mutex> lock(mu);
      ++open;
    }
    readers.emplace_back([this, stub, choice, raw, request = std::move(request)] {
      auto reader = stub->Generate(raw, request);
      v1::GenerateResponse response;
      bool final_seen = false;
      while (reader->Read(&response)) {
        Event e;
        e.choice = choice;
        if (response.has_final()) {
          e.kind = Event::kFinal;
          e.final = std::move(*response.mutable_final());
          final_seen = true;
        } else {
          e.chunk = std::move(*response.mutable_chunk());
        }
        Push(std::move(e));
      }
      grpc::Status status = reader->Finish();
      std::lock_guard<std::mutex> lock(mu);
      if (!status.ok() || !final_seen) {
        Event e;
        e.choice = choice;
        e.kind = Event::kError;
        e.status =
            status.ok() ? grpc::Status(grpc::StatusCode::INTERNAL, "stream ended early") : status;
        events.push_back(std::move(e));
      }
      --open;
      cv.notify_all();
    });
  }
  void Push(Event e) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back(std::move(e));
    cv.notify_all();
  }
  // The next event; false once every stream has ended and everything was taken.
  bool Next(Event* out) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return !events.empty() || open == 0; });
    if (events.empty()) return false;
    *out = std::move(events.front());
    events.pop_front();
    return true;
  }
  void Cancel() {
    for (auto& c : contexts) c->TryCancel();
  }
  ~Call() {
    Cancel();
    for (auto& t : readers) t.join();
    for (const std::string& id : cleanup) {
      grpc::ClientContext ctx;
      if (!cleanup_auth.empty()) ctx.AddMetadata("authorization", cleanup_auth);
      v1::DeleteSessionRequest d;
      d.set_session_id(id);
      v1::DeleteSessionResponse out;
      (void)cleanup_stub->DeleteSession(&ctx, d, &out);
    }
  }
};

namespace {

// One choice's result so far.
struct Choice {
  std::string text;
  std::string finish;  // empty until its Final
  int64_t prompt_tokens = 0, completion_tokens = 0;
  json logprobs;  // chat: {"content": [...]}; completions: the four parallel lists
  int64_t text_offset = 0;
  bool role_sent = false;
};

json EmptyLogprobs(bool chat) {
  if (chat) return json{{"content", json::array()}};
  return json{{"tokens", json::array()},
              {"token_logprobs", json::array()},
              {"top_logprobs", json::array()},
              {"text_offset", json::array()}};
}

// A request's answer, built from its choices' events: shared by the handler and, when streamed,
// httplib's content provider (which runs after the handler returned).
struct Output {
  std::unique_ptr<OpenAiApi::Call> call;
  bool chat = false, stream = false, include_usage = false;
  int32_t logprobs = -1;
  std::string id, object, model;
  int64_t created = 0;
  const model::Tokenizer* tokenizer = nullptr;
  std::vector<Choice> choices;
  int64_t shared_prompt_tokens = 0;
  Event first;                      // streaming: the event that decided the HTTP status
  std::shared_ptr<void> in_flight;  // OpenAiApi::BeginRequest(): released with the answer

  std::string TokenText(int64_t token) const {
    return common::SanitizeUtf8(tokenizer != nullptr ? tokenizer->TokenBytes(token) : "");
  }
  json TokenBytes(int64_t token) const {
    json out = json::array();
    if (tokenizer == nullptr) return out;
    for (unsigned char c : tokenizer->TokenBytes(token)) out.push_back(static_cast<int>(c));
    return out;
  }

  // Appends a chunk's log probabilities to its choice; returns this chunk's part of them.
  json AddLogprobs(Choice& c, const v1::TokenChunk& chunk) const {
    if (c.logprobs.is_null()) c.logprobs = EmptyLogprobs(chat);
    json part = EmptyLogprobs(chat);
    for (const v1::Token& t : chunk.tokens()) {
      if (!t.has_logprob()) continue;
      const std::string text = TokenText(t.id());
      if (chat) {
        json top = json::array();
        for (const auto& alt : t.top_logprobs()) {
          top.push_back({{"token", TokenText(alt.id())},
                         {"logprob", alt.logprob()},
                         {"bytes", TokenBytes(alt.id())}});
        }
        json entry = {{"token", text},
                      {"logprob", t.logprob()},
                      {"bytes", TokenBytes(t.id())},
                      {"top_logprobs", top}};
        part["content"].push_back(entry);
        c.logprobs["content"].push_back(entry);
        continue;
      }
      json top = json::object();
      for (const auto& alt : t.top_logprobs()) top[TokenText(alt.id())] = alt.logprob();
      const json values[] = {json(text), json(t.logprob()), logprobs > 0 ? top : json(nullptr),
                             json(c.text_offset)};
      const char* keys[] = {"tokens", "token_logprobs", "top_logprobs", "text_offset"};
      for (int k = 0; k < 4; ++k) {
        part[keys[k]].push_back(values[k]);
        c.logprobs[keys[k]].push_back(values[k]);
      }
      c.text_offset += static_cast<int64_t>(t.text().size());  // offsets into the returned text
    }
    return part;
  }

  // Folds an event (chunk or final) into its choice; returns the text it adds.
  std::string Absorb(const Event& e, json* logprob_part = nullptr) {
    Choice& c = choices[e.choice];
    if (e.kind == Event::kChunk) {
      std::string text;
      for (const v1::Token& t : e.chunk.tokens()) text += t.text();
      c.text += text;
      if (logprobs >= 0) {
        json part = AddLogprobs(c, e.chunk);
        if (logprob_part != nullptr) *logprob_part = std::move(part);
      }
      return text;
    }
    if (e.kind != Event::kFinal) return "";
    c.text += e.final.text();
    c.finish = FinishName(e.final.finish_reason());
    c.prompt_tokens = e.final.usage().prompt_tokens();
    c.completion_tokens = e.final.usage().completion_tokens();
    return e.final.text();
  }

  json Usage() const {
    int64_t prompt = shared_prompt_tokens, completion = 0;
    for (const auto& c : choices) {
      prompt += c.prompt_tokens;
      completion += c.completion_tokens;
    }
    return json{{"prompt_tokens", prompt},
                {"completion_tokens", completion},
                {"total_tokens", prompt + completion}};
  }

  // The non-streamed answer.
  json Whole() const {
    json list = json::array();
    for (size_t i = 0; i < choices.size(); ++i) {
      const Choice& c = choices[i];
      json item = {{"index", i}, {"finish_reason", c.finish}};
      if (chat) {
        item["message"] = {{"role", "assistant"}, {"content", c.text}};
      } else {
        item["text"] = c.text;
      }
      item["logprobs"] =
          logprobs >= 0 ? (c.logprobs.is_null() ? EmptyLogprobs(chat) : c.logprobs) : json(nullptr);
      list.push_back(item);
    }
    return json{{"id", id},       {"object", object}, {"created", created},
                {"model", model}, {"choices", list},  {"usage", Usage()}};
  }

  std::string Chunk(size_t index, json delta_or_text, json lp, json finish) const {
    json item = {{"index", index}, {"logprobs", std::move(lp)}, {"finish_reason", finish}};
    item[chat ? "delta" : "text"] = std::move(delta_or_text);
    json j = {{"id", id},
              {"object", object},
              {"created", created},
              {"model", model},
              {"choices", json::array({item})}};
    if (include_usage) j["usage"] = nullptr;
    return Sse(j);
  }

  // The whole event stream, written from httplib's provider; false when the client went away
  // (every choice is then cancelled).
  bool Stream(httplib::DataSink& sink) {
    if (call == nullptr) return false;
    bool ok = true;
    auto send = [&](const std::string& s) {
      if (ok && !sink.write(s.data(), s.size())) ok = false;
    };
    Event e = std::move(first);
    bool more = true;
    while (more && ok) {
      Choice& c = choices[e.choice];
      if (chat && !c.role_sent && e.kind != Event::kError) {
        c.role_sent = true;
        send(Chunk(e.choice, json{{"role", "assistant"}, {"content", ""}}, nullptr, nullptr));
      }
      if (e.kind == Event::kError) {
        send(Sse(ErrorJson(FromGrpc(e.status))));
      } else if (e.kind == Event::kChunk) {
        json lp = nullptr;
        const std::string text = Absorb(e, &lp);
        if (!text.empty() || !lp.is_null()) {
          send(
              Chunk(e.choice, chat ? json{{"content", text}} : json(text), std::move(lp), nullptr));
        }
      } else {
        const std::string tail = Absorb(e);
        json delta = chat ? (tail.empty() ? json::object() : json{{"content", tail}}) : json(tail);
        send(Chunk(e.choice, std::move(delta), nullptr, c.finish));
      }
      more = call->Next(&e);
    }
    if (ok) {
      if (include_usage) {
        send(Sse(json{{"id", id},
                      {"object", object},
                      {"created", created},
                      {"model", model},
                      {"choices", json::array()},
                      {"usage", Usage()}}));
      }
      send("data: [DONE]\n\n");
    }
    call.reset();  // cancels what still runs (the client went away) and joins the readers
    if (ok) sink.done();
    return ok;
  }
};

}  // namespace

OpenAiApi::OpenAiApi(std::shared_ptr<grpc::Channel> channel, OpenAiOptions options,
                     Metrics* metrics)
    : stub_(v1::RetNet::NewStub(std::move(channel))),
      options_(std::move(options)),
      metrics_(metrics),
      created_unix_s_(absl::ToUnixSeconds(absl::Now())) {}

OpenAiApi::~OpenAiApi() = default;

std::shared_ptr<void> OpenAiApi::BeginRequest() {
  {
    absl::MutexLock lock(&idle_mu_);
    ++in_flight_;
  }
  return std::shared_ptr<void>(this, [](OpenAiApi* api) {
    absl::MutexLock lock(&api->idle_mu_);
    --api->in_flight_;
  });
}

bool OpenAiApi::WaitIdle(absl::Duration timeout) {
  absl::MutexLock lock(&idle_mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(idle_mu_) { return in_flight_ == 0; };
  return idle_mu_.AwaitWithTimeout(absl::Condition(&idle), timeout);
}

void OpenAiApi::SetModel(const model::Tokenizer* tokenizer, chat::ChatTemplate chat_template,
                         std::string bos_token, std::string eos_token, std::vector<int64_t> eos_ids,
                         std::function<std::string()> metrics_text) {
  tokenizer_ = tokenizer;
  eos_ids_ = std::move(eos_ids);
  template_ = std::make_unique<chat::ChatTemplate>(std::move(chat_template));
  bos_token_ = std::move(bos_token);
  eos_token_ = std::move(eos_token);
  metrics_text_ = std::move(metrics_text);
  ready_.store(true);
}

namespace {

void Reply(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(Dump(body), "application/json");
}

void ReplyError(httplib::Response& res, const ApiError& e) { Reply(res, e.http, ErrorJson(e)); }

}  // namespace

void OpenAiApi::Register(httplib::Server& server) {
  server.set_payload_max_length(static_cast<size_t>(options_.max_body_bytes));
  // httplib's own answers (unknown route, body too large) and escaped exceptions in OpenAI's
  // error shape; an exception's text is logged, not sent.
  server.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return;
    const int status = res.status;
    ReplyError(res, ApiError{status,
                             status == 404   ? "no such endpoint"
                             : status == 413 ? "the request body is too large"
                                             : absl::StrCat("HTTP ", status),
                             "", ""});
  });
  server.set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
        try {
          if (ep) std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          spdlog::error("http: {} {}: {}", req.method, req.path, e.what());
        } catch (...) {
          spdlog::error("http: {} {}: unknown exception", req.method, req.path);
        }
        ReplyError(res, ApiError{500, "internal error", "", ""});
      });
  auto count = [this](const char* endpoint, int status) {
    if (metrics_ != nullptr) metrics_->CountHttpRequest(endpoint, status);
  };
  server.Get("/health", [this, count](const httplib::Request&, httplib::Response& res) {
    const bool ok = ready_.load() && !draining_.load();
    res.status = ok ? 200 : 503;
    res.set_content(ok ? "ok\n" : (draining_.load() ? "draining\n" : "loading\n"), "text/plain");
    count("/health", res.status);
  });
  server.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    if (!ready_.load()) {
      res.status = 503;
      res.set_content("loading\n", "text/plain");
      return;
    }
    res.set_content(metrics_text_(), "text/plain; version=0.0.4");
  });
  auto models = [this, count](const httplib::Request& req, httplib::Response& res) {
    const std::string endpoint = req.matches.size() > 1 ? "/v1/models/{id}" : "/v1/models";
    if (!ready_.load()) {
      ReplyError(res, ApiError{503, "the model is loading", "", ""});
      count(endpoint.c_str(), res.status);
      return;
    }
    // Authorised like every call: through the gRPC service.
    grpc::ClientContext ctx;
    const std::string auth = req.get_header_value("Authorization");
    if (!PrintableAscii(auth)) {
      ReplyError(res, BadAuthorization());
      count(endpoint.c_str(), res.status);
      return;
    }
    if (!auth.empty()) ctx.AddMetadata("authorization", auth);
    v1::ModelInfo info;
    grpc::Status s = stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    if (!s.ok()) {
      ReplyError(res, FromGrpc(s));
      count(endpoint.c_str(), res.status);
      return;
    }
    json model = {{"id", options_.served_model_name},
                  {"object", "model"},
                  {"created", created_unix_s_},
                  {"owned_by", "retnet-serve"},
                  {"root", options_.served_model_name}};
    if (req.matches.size() > 1) {
      if (req.matches[1].str() != options_.served_model_name) {
        ReplyError(
            res,
            ApiError{404, absl::StrCat("The model '", req.matches[1].str(), "' does not exist"),
                     "model", "model_not_found"});
      } else {
        Reply(res, 200, model);
      }
    } else {
      Reply(res, 200, json{{"object", "list"}, {"data", json::array({model})}});
    }
    count(endpoint.c_str(), res.status);
  };
  server.Get("/v1/models", models);
  server.Get(R"(/v1/models/(.+))", models);
  auto completions = [this, count](bool chat) {
    return [this, count, chat](const httplib::Request& req, httplib::Response& res) {
      Completions(req.body, req.get_header_value("Authorization"),
                  req.get_header_value("x-session-id"), chat, &res);
      count(chat ? "/v1/chat/completions" : "/v1/completions", res.status);
    };
  };
  server.Post("/v1/completions", completions(false));
  server.Post("/v1/chat/completions", completions(true));
}

void OpenAiApi::Completions(const std::string& body_text, const std::string& auth,
                            const std::string& session, bool chat, void* http_response) {
  httplib::Response& res = *static_cast<httplib::Response*>(http_response);
  std::shared_ptr<void> in_flight = BeginRequest();
  if (!ready_.load()) return ReplyError(res, ApiError{503, "the model is loading", "", ""});
  // Headers become proto strings and gRPC metadata: UTF-8 and printable ASCII only.
  if (!common::IsValidUtf8(session)) {
    return ReplyError(res, Bad("x-session-id", "not valid UTF-8"));
  }
  if (!PrintableAscii(auth)) return ReplyError(res, BadAuthorization());
  if (TooDeep(body_text)) {
    return ReplyError(res, ApiError{400, "the request body is nested too deeply", "", ""});
  }
  json body = json::parse(body_text, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded() || !body.is_object()) {
    return ReplyError(res, ApiError{400, "the request body must be a JSON object", "", ""});
  }
  Params p;
  if (auto e = ParseParams(body, chat, options_.max_n, &p)) return ReplyError(res, *e);
  if (auto it = body.find("model"); it != body.end() && !it->is_null()) {
    if (!it->is_string()) return ReplyError(res, Bad("model", "must be a string"));
    if (it->get<std::string>() != options_.served_model_name) {
      return ReplyError(res, ApiError{404,
                                      absl::StrCat("The model '", it->get<std::string>(),
                                                   "' does not exist (this server serves '",
                                                   options_.served_model_name, "')"),
                                      "model", "model_not_found"});
    }
  }
  if (!session.empty()) {
    if (p.n != 1) return ReplyError(res, Bad("n", "must be 1 with an x-session-id header"));
    if (!chat && p.prompts.size() != 1) {
      return ReplyError(res, Bad("prompt", "one prompt with an x-session-id header"));
    }
  }

  // Chat: render the conversation; with a session, send only what extends the text the session
  // holds (its transcript, kept by the session itself, so any replica can check it).
  if (chat) {
    json extra = {{"bos_token", bos_token_}, {"eos_token", eos_token_}};
    absl::StatusOr<std::string> text = template_->Render(p.messages, true, extra);
    if (!text.ok()) {
      return ReplyError(res, Bad("messages", absl::StrCat("the chat template failed: ",
                                                          text.status().message())));
    }
    v1::GenerateRequest r;
    r.set_add_bos(false);  // the template writes the BOS it wants
    std::string delta = *std::move(text);
    if (!session.empty()) {
      // The session's transcript (this also authenticates the caller). The turn runs only if the
      // session still holds it when the engine takes it (expect_transcript): a request that
      // changed it in between makes this one a 409, never a continuation of the wrong text.
      grpc::ClientContext ctx;
      if (!auth.empty()) ctx.AddMetadata("authorization", auth);
      v1::GetSessionRequest get;
      get.set_session_id(session);
      v1::Session info;
      grpc::Status s = stub_->GetSession(&ctx, get, &info);
      v1::Transcript& held = *r.mutable_expect_transcript();
      held.set_digest(common::Transcript{}.digest);  // a new session's: empty
      if (s.ok()) {
        if (info.generating()) {
          return ReplyError(
              res, ApiError{409, absl::StrCat("session '", session, "' is already generating"),
                            "x-session-id", "session_busy"});
        }
        const bool fresh = info.position() == 0 && !info.has_pending_token();
        if (!fresh && !info.has_transcript()) {
          return ReplyError(
              res, Bad("x-session-id",
                       absl::StrCat("session '", session,
                                    "' holds a conversation that is not text (a prompt of "
                                    "token ids, or a turn that was cancelled or failed); use a "
                                    "new session")));
        }
        if (info.has_transcript()) held = info.transcript();
        const common::Transcript t{held.length(), held.digest()};
        if (!t.IsPrefixOf(delta)) {
          return ReplyError(
              res,
              Bad("messages", absl::StrCat("the messages do not extend the conversation "
                                           "session '",
                                           session,
                                           "' holds (earlier messages must be repeated "
                                           "unchanged, the assistant's replies as returned)")));
        }
        delta.erase(0, static_cast<size_t>(t.length));
        if (delta.empty()) {
          return ReplyError(res, Bad("messages", "no new message after the conversation so far"));
        }
        r.set_transcript_text(delta);
        // The EOS that ended the last reply is in the session (its pending token): the
        // template's copy of it is not prefilled again (the transcript still counts it).
        const bool ended_with_eos =
            info.has_pending_token() &&
            std::find(eos_ids_.begin(), eos_ids_.end(), info.pending_token()) != eos_ids_.end();
        if (ended_with_eos && !eos_token_.empty() && absl::StartsWith(delta, eos_token_)) {
          delta.erase(0, eos_token_.size());
        }
      } else if (s.error_code() != grpc::StatusCode::NOT_FOUND) {
        return ReplyError(res, FromGrpc(s));
      }
    }
    r.set_text(std::move(delta));
    p.prompts.push_back(std::move(r));
  }

  // Every choice as a Generate call. n > 1: prefill once into a temporary session, fork it.
  auto call = std::make_unique<Call>();
  std::vector<std::string> temporary;  // sessions to delete if a choice never started on them
  int64_t shared_prompt_tokens = 0;    // prompt tokens of the n > 1 prefills
  auto unary_ctx = [&auth] {
    auto ctx = std::make_unique<grpc::ClientContext>();
    if (!auth.empty()) ctx->AddMetadata("authorization", auth);
    return ctx;
  };
  auto delete_temporary = [&] {
    for (const std::string& id : temporary) {
      auto ctx = unary_ctx();
      v1::DeleteSessionRequest d;
      d.set_session_id(id);
      v1::DeleteSessionResponse out;
      (void)stub_->DeleteSession(ctx.get(), d, &out);
    }
    temporary.clear();
  };
  const uint64_t base_seed = p.seed.value_or(std::random_device{}() * 0x9E3779B97F4A7C15ull);
  int choice = 0;
  for (size_t pi = 0; pi < p.prompts.size(); ++pi) {
    v1::GenerateRequest prompt = p.prompts[pi];
    auto merged = [&](v1::GenerateRequest r) {
      v1::GenerateRequest out = p.base;
      out.MergeFrom(r);
      return out;
    };
    if (!session.empty()) {
      v1::GenerateRequest r = merged(prompt);
      r.set_session_id(session);
      r.set_create_session(true);
      if (p.seed) r.mutable_sampling()->set_seed(*p.seed);
      call->Start(stub_.get(), choice++, std::move(r), auth);
      continue;
    }
    if (p.n == 1) {
      v1::GenerateRequest r = merged(prompt);
      if (p.seed) r.mutable_sampling()->set_seed(*p.seed + pi);
      call->Start(stub_.get(), choice++, std::move(r), auth);
      continue;
    }
    const std::string root = absl::StrCat("oai-", RandomHex(8));
    {
      auto ctx = unary_ctx();
      v1::CreateSessionRequest c;
      c.set_session_id(root);
      v1::Session out;
      grpc::Status s = stub_->CreateSession(ctx.get(), c, &out);
      if (!s.ok()) {
        call.reset();
        delete_temporary();
        return ReplyError(res, FromGrpc(s));
      }
      temporary.push_back(root);
    }
    {  // the prompt once; its last token stays pending for every copy
      v1::GenerateRequest r = merged(prompt);
      r.set_session_id(root);
      r.set_prefill_only(true);
      auto ctx = unary_ctx();
      auto reader = stub_->Generate(ctx.get(), r);
      v1::GenerateResponse out;
      while (reader->Read(&out)) {
        if (out.has_final()) shared_prompt_tokens += out.final().usage().prompt_tokens();
      }
      grpc::Status s = reader->Finish();
      if (!s.ok()) {
        call.reset();
        delete_temporary();
        return ReplyError(res, FromGrpc(s));
      }
    }
    std::vector<std::string> copies = {root};
    for (int64_t k = 1; k < p.n; ++k) {
      auto ctx = unary_ctx();
      v1::ForkSessionRequest f;
      f.set_session_id(root);
      f.set_new_session_id(absl::StrCat(root, "-", k));
      v1::Session out;
      grpc::Status s = stub_->ForkSession(ctx.get(), f, &out);
      if (!s.ok()) {
        call.reset();
        delete_temporary();
        return ReplyError(res, FromGrpc(s));
      }
      temporary.push_back(f.new_session_id());
      copies.push_back(f.new_session_id());
    }
    call->cleanup_stub = stub_.get();
    call->cleanup_auth = auth;
    call->cleanup.insert(call->cleanup.end(), copies.begin(), copies.end());
    for (int64_t k = 0; k < p.n; ++k) {
      v1::GenerateRequest r = p.base;
      r.set_session_id(copies[k]);
      r.set_delete_session_at_end(true);
      r.mutable_sampling()->set_seed(base_seed + pi * p.n + k);
      call->Start(stub_.get(), choice++, std::move(r), auth);
    }
    temporary.clear();  // now the call's: see Call::cleanup
  }
  const int choices = choice;

  // Wait for the first event: an error before any token is the request's HTTP status.
  Event first;
  const bool any = call->Next(&first);
  if (!any || first.kind == Event::kError) {
    const grpc::Status s =
        any ? first.status : grpc::Status(grpc::StatusCode::INTERNAL, "no response");
    call.reset();
    return ReplyError(res, FromGrpc(s));
  }

  auto o = std::make_shared<Output>();
  o->call = std::move(call);
  o->chat = chat;
  o->stream = p.stream;
  o->include_usage = p.include_usage;
  o->logprobs = p.logprobs;
  o->id = absl::StrCat(chat ? "chatcmpl-" : "cmpl-", RandomHex(12));
  o->created = absl::ToUnixSeconds(absl::Now());
  o->object = chat ? (p.stream ? "chat.completion.chunk" : "chat.completion") : "text_completion";
  o->model = options_.served_model_name;
  o->tokenizer = tokenizer_;
  o->choices.resize(choices);
  o->shared_prompt_tokens = shared_prompt_tokens;
  o->in_flight = std::move(in_flight);

  if (!p.stream) {
    std::optional<grpc::Status> failed;
    Event e = std::move(first);
    do {
      if (e.kind == Event::kError) {
        if (!failed) failed = e.status;
        continue;
      }
      o->Absorb(e);
    } while (o->call->Next(&e));
    o->call.reset();
    if (failed) return ReplyError(res, FromGrpc(*failed));
    if (!session.empty()) res.set_header("x-session-id", session);
    return Reply(res, 200, o->Whole());
  }

  // Streaming: server-sent events, one per chunk of a choice, then the usage, then [DONE].
  res.status = 200;
  res.set_header("Cache-Control", "no-cache");
  res.set_header("X-Accel-Buffering", "no");
  if (!session.empty()) res.set_header("x-session-id", session);
  o->first = std::move(first);
  res.set_chunked_content_provider(
      "text/event-stream", [o](size_t, httplib::DataSink& sink) { return o->Stream(sink); },
      [o](bool) {
        // Ends (or never started: the client left first): whatever still runs is cancelled.
        o->call.reset();
      });
}

}  // namespace retnet::server
