// File: chat/chat_template.cc
#include "chat/chat_template.h"

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace retnet::chat {
namespace {

constexpr size_t kMaxFileBytes = size_t{4} << 20;

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string data;
  char buf[65536];
  while (in.read(buf, sizeof(buf)) || in.gcount() > 0) {
    data.append(buf, static_cast<size_t>(in.gcount()));
    if (data.size() > kMaxFileBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": larger than ", kMaxFileBytes, " bytes"));
    }
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path));
  return data;
}

}  // namespace

absl::StatusOr<std::optional<std::string>> SpecialTokenFromConfig(
    const nlohmann::ordered_json& tokenizer_config, std::string_view key) {
  if (!tokenizer_config.is_object()) return std::optional<std::string>();
  auto it = tokenizer_config.find(std::string(key));
  if (it == tokenizer_config.end() || it->is_null()) return std::optional<std::string>();
  if (it->is_string()) return std::optional<std::string>(it->get<std::string>());
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) {
      return std::optional<std::string>(content->get<std::string>());
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "tokenizer_config: ", std::string(key), " must be a string or an object with \"content\""));
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromTokenizerConfig(const nlohmann::ordered_json& config,
                                                               const Limits& limits) {
  if (!config.is_object()) {
    return absl::InvalidArgumentError("tokenizer_config must be a JSON object");
  }
  auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) {
    return absl::NotFoundError("tokenizer_config has no chat_template");
  }
  std::string source;
  if (it->is_string()) {
    source = it->get<std::string>();
  } else if (it->is_array()) {
    bool found = false;
    for (const auto& entry : *it) {
      if (!entry.is_object() || !entry.contains("name") || !entry.contains("template") ||
          !entry["name"].is_string() || !entry["template"].is_string()) {
        return absl::InvalidArgumentError(
            "tokenizer_config: chat_template list entries must be {\"name\", \"template\"}");
      }
      if (entry["name"].get<std::string>() == "default") {
        source = entry["template"].get<std::string>();
        found = true;
      }
    }
    if (!found) return absl::NotFoundError("tokenizer_config: no chat_template named \"default\"");
  } else {
    return absl::InvalidArgumentError("tokenizer_config: chat_template must be a string or a list");
  }
  ASSIGN_OR_RETURN(std::optional<std::string> bos, SpecialTokenFromConfig(config, "bos_token"));
  ASSIGN_OR_RETURN(std::optional<std::string> eos, SpecialTokenFromConfig(config, "eos_token"));
  return FromSource(source, std::move(bos), std::move(eos), limits);
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromTokenizerConfig(const nlohmann::json& config,
                                                               const Limits& limits) {
  return FromTokenizerConfig(nlohmann::ordered_json::parse(config.dump()), limits);
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromFile(const std::string& path, const Limits& limits) {
  ASSIGN_OR_RETURN(std::string data, ReadSmallFile(path));
  if (absl::EndsWith(path, ".json")) {
    nlohmann::ordered_json config =
        nlohmann::ordered_json::parse(data, nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
    }
    absl::StatusOr<ChatTemplate> t = FromTokenizerConfig(config, limits);
    if (!t.ok()) {
      return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
    }
    return t;
  }
  absl::StatusOr<ChatTemplate> t = FromSource(data, std::nullopt, std::nullopt, limits);
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  }
  return t;
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromSource(std::string_view source,
                                                      std::optional<std::string> bos_token,
                                                      std::optional<std::string> eos_token,
                                                      const Limits& limits) {
  ASSIGN_OR_RETURN(Template tmpl, Template::Parse(source, limits));
  return ChatTemplate(std::move(tmpl), std::string(source), std::move(bos_token),
                      std::move(eos_token));
}

ChatTemplate ChatTemplate::Default() {
  return *FromSource(kDefaultSource);  // the constant parses; jinja_test checks it
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& messages,
                                                 bool add_generation_prompt,
                                                 const nlohmann::ordered_json& extra) const {
  if (!messages.is_array()) return absl::InvalidArgumentError("messages must be a JSON list");
  if (!extra.is_object() && !extra.is_null()) {
    return absl::InvalidArgumentError("the extra template variables must be a JSON object");
  }
  nlohmann::ordered_json context = nlohmann::ordered_json::object();
  context["messages"] = messages;
  context["add_generation_prompt"] = add_generation_prompt;
  if (bos_token_) context["bos_token"] = *bos_token_;
  if (eos_token_) context["eos_token"] = *eos_token_;
  if (extra.is_object()) {
    for (auto it = extra.begin(); it != extra.end(); ++it) {
      if (it.key() == "messages" || it.key() == "add_generation_prompt") continue;
      context[it.key()] = it.value();
    }
  }
  return template_.Render(context);
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::json& messages,
                                                 bool add_generation_prompt,
                                                 const nlohmann::json& extra) const {
  return Render(nlohmann::ordered_json::parse(messages.dump()), add_generation_prompt,
                nlohmann::ordered_json::parse(extra.dump()));
}

}  // namespace retnet::chat
