// Unit tests of ChatTemplate (chat/chat_template.h): tokenizer_config.json forms, special tokens,
// the default template, files, extra variables and raise_exception.
#include "chat/chat_template.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

namespace retnet::chat {
namespace {

using Json = nlohmann::ordered_json;

Json Conversation() {
  return Json::parse(R"([{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "Bye"}])");
}

std::string SourceDir() {
  const char* dir = std::getenv("RETNET_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

std::string TempPath(const std::string& name) {
  const char* tmp = std::getenv("TMPDIR");
  return std::string(tmp != nullptr ? tmp : "/tmp") + "/chat_template_test_" +
         std::to_string(getpid()) + "_" + name;
}

TEST(ChatTemplate, DefaultIsChatMl) {
  const ChatTemplate t = ChatTemplate::Default();
  EXPECT_EQ(*t.Render(Conversation(), true),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(*t.Render(Json::parse(R"([{"role": "user", "content": "x"}])"), false),
            "<|im_start|>user\nx<|im_end|>\n");
}

TEST(ChatTemplate, FromTokenizerConfigString) {
  const Json config = Json::parse(R"({
    "bos_token": "<s>",
    "eos_token": {"content": "</s>", "lstrip": false, "normalized": false},
    "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
  })");
  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromTokenizerConfig(config);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->bos_token(), "<s>");
  EXPECT_EQ(t->eos_token(), "</s>");
  EXPECT_EQ(*t->Render(Json::parse(R"([{"role": "user", "content": "Hi"}])"), true),
            "<s>[user]Hi</s>[assistant]");
  // `extra` adds variables and overrides the special tokens; messages stay the argument.
  const Json extra = {{"bos_token", "<B>"}, {"messages", Json::array()}};
  EXPECT_EQ(*t->Render(Json::parse(R"([{"role": "user", "content": "Hi"}])"), false, extra),
            "<B>[user]Hi</s>");
  // A plain nlohmann::json works too.
  absl::StatusOr<ChatTemplate> t2 = ChatTemplate::FromTokenizerConfig(nlohmann::json(config));
  ASSERT_TRUE(t2.ok());
  EXPECT_EQ(*t2->Render(nlohmann::json::parse(R"([{"role": "user", "content": "Hi"}])"), false),
            "<s>[user]Hi</s>");
}

TEST(ChatTemplate, FromTokenizerConfigList) {
  const Json config = Json::parse(R"({"chat_template": [
      {"name": "tool_use", "template": "tools"},
      {"name": "default", "template": "default {{ messages | length }}"}]})");
  absl::StatusOr<ChatTemplate> t = ChatTemplate::FromTokenizerConfig(config);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(*t->Render(Conversation(), false), "default 4");
  EXPECT_EQ(ChatTemplate::FromTokenizerConfig(
                Json::parse(R"({"chat_template": [{"name": "rag", "template": "x"}]})"))
                .status()
                .code(),
            absl::StatusCode::kNotFound);
}

TEST(ChatTemplate, ConfigErrors) {
  EXPECT_EQ(
      ChatTemplate::FromTokenizerConfig(Json::parse(R"({"bos_token": "<s>"})")).status().code(),
      absl::StatusCode::kNotFound);
  EXPECT_EQ(
      ChatTemplate::FromTokenizerConfig(Json::parse(R"({"chat_template": 3})")).status().code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChatTemplate::FromTokenizerConfig(Json::parse(R"({"chat_template": "{% if %}"})"))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(
      ChatTemplate::FromTokenizerConfig(Json::parse(R"({"chat_template": "x", "eos_token": 5})"))
          .ok());
  EXPECT_FALSE(ChatTemplate::Default().Render(Json::object(), true).ok());
}

TEST(ChatTemplate, SpecialTokenForms) {
  const Json config = Json::parse(
      R"({"bos_token": "<|begin|>", "eos_token": {"content": "<|end|>"}, "unk_token": null})");
  EXPECT_EQ(*SpecialTokenFromConfig(config, "bos_token"), "<|begin|>");
  EXPECT_EQ(*SpecialTokenFromConfig(config, "eos_token"), "<|end|>");
  EXPECT_EQ(*SpecialTokenFromConfig(config, "unk_token"), std::nullopt);
  EXPECT_EQ(*SpecialTokenFromConfig(config, "pad_token"), std::nullopt);
  EXPECT_FALSE(
      SpecialTokenFromConfig(Json::parse(R"({"bos_token": {"id": 1}})"), "bos_token").ok());
}

TEST(ChatTemplate, RaiseExceptionReachesTheCaller) {
  absl::StatusOr<ChatTemplate> t =
      ChatTemplate::FromFile(SourceDir() + "/tests/chat/templates/llama2.jinja");
  ASSERT_TRUE(t.ok()) << t.status();
  const Json bad =
      Json::parse(R"([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])");
  absl::StatusOr<std::string> out =
      t->Render(bad, false, {{"bos_token", "<s>"}, {"eos_token", "</s>"}});
  ASSERT_FALSE(out.ok());
  EXPECT_TRUE(IsRaisedException(out.status()));
  EXPECT_EQ(out.status().message(),
            "Conversation roles must alternate user/assistant/user/assistant/...");
  EXPECT_EQ(
      *t->Render(Conversation(), false, {{"bos_token", "<s>"}, {"eos_token", "</s>"}}),
      "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]");
}

TEST(ChatTemplate, FromFile) {
  const std::string jinja = TempPath("chat_template.jinja");
  const std::string json = TempPath("tokenizer_config.json");
  {
    std::ofstream(jinja) << "{% for m in messages %}{{ m.content }}{% endfor %}\n";
    std::ofstream(json)
        << R"({"chat_template": "{{ bos_token }}|{{ messages[0].content }}", "bos_token": "B"})";
  }
  absl::StatusOr<ChatTemplate> a = ChatTemplate::FromFile(jinja);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(*a->Render(Conversation(), false), "Be brief.HiHello.Bye");
  absl::StatusOr<ChatTemplate> b = ChatTemplate::FromFile(json);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*b->Render(Conversation(), false), "B|Be brief.");
  EXPECT_EQ(ChatTemplate::FromFile(TempPath("missing.jinja")).status().code(),
            absl::StatusCode::kNotFound);
  { std::ofstream(json) << "{not json"; }
  EXPECT_EQ(ChatTemplate::FromFile(json).status().code(), absl::StatusCode::kInvalidArgument);
  std::remove(jinja.c_str());
  std::remove(json.c_str());
}

TEST(ChatTemplate, ToolsReachTheTemplate) {
  absl::StatusOr<ChatTemplate> t =
      ChatTemplate::FromFile(SourceDir() + "/tests/chat/templates/qwen2_tools.jinja");
  ASSERT_TRUE(t.ok()) << t.status();
  const Json tools = Json::parse(R"([{"type": "function", "function": {"name": "f",
      "parameters": {"type": "object", "properties": {"z": {"type": "string"}, "a": {}}}}}])");
  absl::StatusOr<std::string> out =
      t->Render(Json::parse(R"([{"role": "user", "content": "go"}])"), true, {{"tools", tools}});
  ASSERT_TRUE(out.ok()) << out.status();
  // Key order is the input's, as transformers' tojson keeps it.
  EXPECT_NE(
      out->find(
          R"({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"z": {"type": "string"}, "a": {}}}}})"),
      std::string::npos)
      << *out;
  EXPECT_NE(out->find("<|im_start|>user\ngo<|im_end|>\n<|im_start|>assistant\n"),
            std::string::npos);
}

}  // namespace
}  // namespace retnet::chat
