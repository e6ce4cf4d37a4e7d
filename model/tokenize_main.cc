// retnet-tokenize: the tokenizer of a checkpoint directory (or of a bare tokenizer directory),
// for checks against other implementations.
//
//   retnet-tokenize --dir DIR [--vocab-size N] [--json]
//
// Reads one text per stdin line. Plain mode prints the ids separated by spaces. --json: each
// line is a JSON string (or {"text": ...}); each output line is a JSON object
// {"ids": [...], "decode": "...", "bytes_hex": "..."} where bytes_hex is the hex of the
// concatenated TokenBytes of the ids (what a streaming server emits). A line {"ids": [...]}
// decodes those ids instead: {"decode": "...", "bytes_hex": "..."}. The first output line in
// --json mode describes the tokenizer: {"kind", "vocab_size", "bos_id", "eos_id"}.
// Without --vocab-size the directory's own tokenizer files are loaded (tokenizer.json, else
// vocab.json + merges.txt); with it, LoadTokenizer's full selection runs against that vocab size.
// Errors: one line on stderr, exit code 1.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "model/config.h"
#include "model/hf_tokenizer.h"
#include "model/tokenizer.h"

namespace {

std::string Hex(const std::string& bytes) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

int Run(const std::string& dir, int64_t vocab_size, bool json) {
  absl::StatusOr<std::unique_ptr<retnet::model::Tokenizer>> tok;
  if (vocab_size > 0) {
    retnet::model::ModelConfig config;
    config.vocab_size = vocab_size;
    tok = retnet::model::LoadTokenizer(dir, config);
  } else {
    tok = retnet::model::LoadHfTokenizerDir(dir);
  }
  if (!tok.ok()) {
    std::cerr << "retnet-tokenize: " << tok.status().message() << "\n";
    return 1;
  }
  const auto& t = **tok;
  if (json) {
    nlohmann::json info = {{"kind", t.kind()},
                           {"vocab_size", t.vocab_size()},
                           {"bos_id", t.bos_id()},
                           {"eos_id", t.eos_id()}};
    std::cout << info.dump() << "\n";
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    std::string text = line;
    if (json) {
      nlohmann::json in = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (in.is_object() && in.contains("ids") && in["ids"].is_array()) {
        // Decode only: {"ids": [...]} -> {"decode", "bytes_hex"}.
        std::vector<int64_t> ids;
        for (const auto& v : in["ids"]) {
          if (!v.is_number_integer()) {
            std::cerr << "retnet-tokenize: ids must be integers\n";
            return 1;
          }
          ids.push_back(v.get<int64_t>());
        }
        std::string bytes;
        for (int64_t id : ids) bytes += t.TokenBytes(id);
        std::cout << nlohmann::json({{"decode", t.Decode(ids)}, {"bytes_hex", Hex(bytes)}}).dump()
                  << "\n";
        continue;
      }
      if (in.is_object() && in.contains("text")) in = in["text"];
      if (!in.is_string()) {
        std::cerr << "retnet-tokenize: input line is not a JSON string or {\"text\": ...}\n";
        return 1;
      }
      text = in.get<std::string>();
    }
    auto ids = t.Encode(text);
    if (!ids.ok()) {
      if (!json) {
        std::cerr << "retnet-tokenize: " << ids.status().message() << "\n";
        return 1;
      }
      std::cout << nlohmann::json({{"error", std::string(ids.status().message())}}).dump() << "\n";
      continue;
    }
    if (!json) {
      std::string out;
      for (size_t i = 0; i < ids->size(); ++i) absl::StrAppend(&out, i ? " " : "", (*ids)[i]);
      std::cout << out << "\n";
      continue;
    }
    std::string bytes;
    for (int64_t id : *ids) bytes += t.TokenBytes(id);
    nlohmann::json out = {{"ids", *ids}, {"decode", t.Decode(*ids)}, {"bytes_hex", Hex(bytes)}};
    std::cout << out.dump() << "\n";
  }
  std::cout.flush();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"retnet-tokenize: encode stdin lines with a checkpoint's tokenizer"};
  std::string dir;
  int64_t vocab_size = 0;
  bool json = false;
  app.add_option("--dir", dir, "checkpoint or tokenizer directory")->required();
  app.add_option("--vocab-size", vocab_size, "run LoadTokenizer for a model of this vocab size");
  app.add_flag("--json", json, "JSON lines in and out");
  CLI11_PARSE(app, argc, argv);
  try {
    return Run(dir, vocab_size, json);
  } catch (const std::exception& e) {
    std::cerr << "retnet-tokenize: " << e.what() << "\n";
    return 1;
  }
}
