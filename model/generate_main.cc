// retnet-generate: generates text from a prompt with a RetNet checkpoint (the built-in default
// model when --checkpoint is not given): chunkwise prefill of the prompt into a recurrent
// state, then one recurrent step per new token, streamed to stdout as it is produced.
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <iostream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/checkpoint.h"
#include "model/tokenizer.h"

namespace retnet::model {
namespace {

struct Args {
  std::string checkpoint;
  std::string prompt = "The ";
  int64_t max_new_tokens = 200;
  double temperature = 0.0;
  int64_t top_k = 0;
  uint64_t seed = 0;
  int64_t chunk_size = 64;
  std::string device = "cpu";
  std::string dtype = "float32";
};

absl::Status Run(const Args& args) {
  using Clock = std::chrono::steady_clock;
  if (args.max_new_tokens < 0)
    return absl::InvalidArgumentError("--max-new-tokens: must not be negative");
  if (args.temperature < 0)
    return absl::InvalidArgumentError("--temperature: must not be negative");
  if (args.top_k < 0) return absl::InvalidArgumentError("--top-k: must not be negative");
  if (args.chunk_size <= 0) return absl::InvalidArgumentError("--chunk-size: must be positive");
  ModelOptions options;
  ASSIGN_OR_RETURN(options.device, ParseDevice(args.device));
  ASSIGN_OR_RETURN(options.dtype, ParseDtype(args.dtype));
  const std::string dir = args.checkpoint.empty() ? DefaultModelDir() : args.checkpoint;
  const auto t_load = Clock::now();
  ASSIGN_OR_RETURN(auto model, LoadModel(dir, options));
  ASSIGN_OR_RETURN(auto tokenizer, LoadTokenizer(dir, model->config()));
  spdlog::info("loaded {} in {:.0f} ms: {}", dir,
               std::chrono::duration<double, std::milli>(Clock::now() - t_load).count(),
               model->config().Summary());

  ASSIGN_OR_RETURN(std::vector<int64_t> ids, tokenizer->Encode(args.prompt));
  if (tokenizer->bos_id() >= 0) ids.insert(ids.begin(), tokenizer->bos_id());
  if (ids.empty()) return absl::InvalidArgumentError("--prompt: empty after tokenization");

  c10::InferenceMode guard;
  const auto dev = at::TensorOptions().device(options.device);
  at::Tensor state = model->NewState(1);
  const auto t0 = Clock::now();
  at::Tensor prompt = at::tensor(ids, at::kLong).view({1, -1}).to(options.device);
  ASSIGN_OR_RETURN(at::Tensor logits,
                   model->Chunkwise(prompt, state, 0, args.chunk_size, Outputs::kLast));
  logits = logits.view({1, -1});
  const auto t1 = Clock::now();

  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(args.seed);
  std::cout << args.prompt << std::flush;
  std::string pending;
  int64_t position = static_cast<int64_t>(ids.size());
  int64_t produced = 0;
  for (; produced < args.max_new_tokens; ++produced) {
    at::Tensor row = logits.to(at::kCPU).view({-1});
    int64_t next;
    if (args.temperature == 0.0) {
      next = row.argmax().item<int64_t>();
    } else {
      at::Tensor scaled = row / args.temperature;
      if (args.top_k > 0 && args.top_k < scaled.size(0)) {
        at::Tensor kth = std::get<0>(scaled.topk(args.top_k)).select(0, args.top_k - 1);
        scaled = scaled.masked_fill(scaled < kth, -std::numeric_limits<float>::infinity());
      }
      next = at::multinomial(at::softmax(scaled, 0), 1, false, gen).item<int64_t>();
    }
    if (next == tokenizer->eos_id()) break;
    pending += tokenizer->TokenBytes(next);
    const size_t ready = CompleteUtf8Prefix(pending);
    std::cout << pending.substr(0, ready) << std::flush;
    pending.erase(0, ready);
    at::Tensor token = at::full({1}, next, dev.dtype(at::kLong));
    at::Tensor pos = at::full({1}, position++, dev.dtype(at::kLong));
    ASSIGN_OR_RETURN(logits, model->Step(token, pos, state));
  }
  std::cout << pending << std::endl;
  const auto t2 = Clock::now();
  const double prefill_s = std::chrono::duration<double>(t1 - t0).count();
  const double decode_s = std::chrono::duration<double>(t2 - t1).count();
  spdlog::info(
      "prefill {} tokens in {:.1f} ms ({:.0f} tok/s); decoded {} tokens in {:.1f} ms ({:.0f} "
      "tok/s)",
      ids.size(), prefill_s * 1e3, ids.size() / prefill_s, produced, decode_s * 1e3,
      produced / std::max(decode_s, 1e-9));
  return absl::OkStatus();
}

}  // namespace
}  // namespace retnet::model

int main(int argc, char** argv) {
  retnet::model::Args args;
  CLI::App app{"Generates text with a RetNet checkpoint (default: the built-in model)."};
  app.add_option("--checkpoint", args.checkpoint, "checkpoint directory (default: built-in model)");
  app.add_option("--prompt", args.prompt, "prompt text")->capture_default_str();
  app.add_option("--max-new-tokens", args.max_new_tokens, "tokens to generate")
      ->capture_default_str();
  app.add_option("--temperature", args.temperature, "0 = greedy")->capture_default_str();
  app.add_option("--top-k", args.top_k, "0 = off")->capture_default_str();
  app.add_option("--seed", args.seed, "sampling seed")->capture_default_str();
  app.add_option("--chunk-size", args.chunk_size, "prefill chunk size")->capture_default_str();
  app.add_option("--device", args.device, "cpu | cuda[:N]")->capture_default_str();
  app.add_option("--dtype", args.dtype, "float32 | bfloat16 | float16")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  spdlog::set_default_logger(spdlog::stderr_color_mt("retnet-generate"));
  try {
    absl::Status status = retnet::model::Run(args);
    if (!status.ok()) {
      spdlog::error("{}", std::string(status.message()));
      return 1;
    }
  } catch (const std::exception& e) {
    std::string what = e.what();
    spdlog::error("{}", what.substr(0, what.find('\n')));
    return 1;
  }
  return 0;
}
