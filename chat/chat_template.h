// File: chat/chat_template.h
//
// ChatTemplate: a checkpoint's chat template (the Jinja `chat_template` of its
// tokenizer_config.json, or a chat_template.jinja file) rendered over a conversation, as
// transformers' apply_chat_template does: the template sees `messages`, `add_generation_prompt`,
// `bos_token` and `eos_token` (from tokenizer_config.json when present) and any extra variables
// (`tools`, `documents`, `date_string`, ...).
//
// Default() is the template for checkpoints without one (ChatML):
//
//   <|im_start|>{role}\n{content}<|im_end|>\n     for every message, then, with
//   <|im_start|>assistant\n                       when add_generation_prompt is true.
//
// A template's `raise_exception(msg)` (e.g. "Conversation roles must alternate") fails Render()
// with InvalidArgumentError(msg), which IsRaisedException() recognises; report it to the client.
//
// Ownership and threading: a ChatTemplate is an immutable value (copies share the parsed
// template); Render() is const and safe to call from any number of threads at once.
#ifndef RETNET_CHAT_CHAT_TEMPLATE_H_
#define RETNET_CHAT_CHAT_TEMPLATE_H_

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "chat/jinja.h"
#include "nlohmann/json.hpp"

namespace retnet::chat {

// The text of a special token in tokenizer_config.json: `key` given as a string, or as an
// AddedToken object {"content": "...", ...}. nullopt when absent or null.
absl::StatusOr<std::optional<std::string>> SpecialTokenFromConfig(
    const nlohmann::ordered_json& tokenizer_config, std::string_view key);

class ChatTemplate {
 public:
  // From a parsed tokenizer_config.json (or chat_template.json): `chat_template` is a string, or
  // a list of {"name", "template"} objects of which "default" is used. NotFoundError when there
  // is none. bos_token and eos_token are read from the same object.
  static absl::StatusOr<ChatTemplate> FromTokenizerConfig(
      const nlohmann::ordered_json& tokenizer_config, const Limits& limits = Limits());
  static absl::StatusOr<ChatTemplate> FromTokenizerConfig(const nlohmann::json& tokenizer_config,
                                                          const Limits& limits = Limits());
  // A file: *.json is read as FromTokenizerConfig, anything else (chat_template.jinja) is the
  // template text itself. At most 4 MiB.
  static absl::StatusOr<ChatTemplate> FromFile(const std::string& path,
                                               const Limits& limits = Limits());
  // Template text, with optional special tokens.
  static absl::StatusOr<ChatTemplate> FromSource(std::string_view source,
                                                 std::optional<std::string> bos_token = {},
                                                 std::optional<std::string> eos_token = {},
                                                 const Limits& limits = Limits());
  // The ChatML default described above.
  static ChatTemplate Default();
  static constexpr std::string_view kDefaultSource =
      "{% for message in messages %}"
      "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
      "{% endfor %}"
      "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

  // Renders `messages` (a JSON list of {"role", "content", ...}). `extra` (an object or null)
  // adds variables and may override bos_token / eos_token; `messages` and
  // `add_generation_prompt` are always the arguments.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& messages,
                                     bool add_generation_prompt,
                                     const nlohmann::ordered_json& extra = nullptr) const;
  absl::StatusOr<std::string> Render(const nlohmann::json& messages, bool add_generation_prompt,
                                     const nlohmann::json& extra = nullptr) const;

  const std::string& source() const { return source_; }
  const std::optional<std::string>& bos_token() const { return bos_token_; }
  const std::optional<std::string>& eos_token() const { return eos_token_; }

 private:
  ChatTemplate(Template tmpl, std::string source, std::optional<std::string> bos,
               std::optional<std::string> eos)
      : template_(std::move(tmpl)),
        source_(std::move(source)),
        bos_token_(std::move(bos)),
        eos_token_(std::move(eos)) {}

  Template template_;
  std::string source_;
  std::optional<std::string> bos_token_;
  std::optional<std::string> eos_token_;
};

}  // namespace retnet::chat

#endif  // RETNET_CHAT_CHAT_TEMPLATE_H_
