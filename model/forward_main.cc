// retnet-forward: runs one RetNet form over a batch and writes every position's outputs.
//
//   retnet-forward --checkpoint DIR --input IN.safetensors --output OUT.safetensors
//                  [--mode parallel|chunkwise|recurrent] [--chunk-size N]
//                  [--device cpu|cuda] [--dtype float32|bfloat16|float16]
//
// IN holds `tokens` (int64 [B, T]) for language models or `features` (float [B, T, D]) for
// backbones; OUT receives `logits` (float32 [B, T, V]) or `hidden` (float32 [B, T, D]).
// recurrent = token by token through the state. Errors: one line on stderr, exit code 1.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <iostream>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "model/checkpoint.h"
#include "model/safetensors.h"

namespace retnet::model {
namespace {

struct Args {
  std::string checkpoint, input, output;
  std::string mode = "parallel";
  int64_t chunk_size = 64;
  std::string device = "cpu";
  std::string dtype = "float32";
};

absl::Status Run(const Args& args) {
  if (args.mode != "parallel" && args.mode != "chunkwise" && args.mode != "recurrent") {
    return absl::InvalidArgumentError(
        absl::StrCat("--mode: '", args.mode, "' is not parallel, chunkwise or recurrent"));
  }
  if (args.chunk_size <= 0) return absl::InvalidArgumentError("--chunk-size: must be positive");
  ModelOptions options;
  ASSIGN_OR_RETURN(options.device, ParseDevice(args.device));
  ASSIGN_OR_RETURN(options.dtype, ParseDtype(args.dtype));
  ASSIGN_OR_RETURN(auto model, LoadModel(args.checkpoint, options));
  const bool lm = model->config().is_language_model();
  const std::string in_name = lm ? "tokens" : "features";

  ASSIGN_OR_RETURN(auto in_file, SafetensorsFile::Open(args.input));
  if (in_file->Find(in_name) == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(args.input, ": no tensor '", in_name,
                                                   "' (this checkpoint is a ",
                                                   lm ? "language model" : "backbone", ")"));
  }
  ASSIGN_OR_RETURN(at::Tensor input, in_file->Get(in_name));
  if (input.dim() < 2 || input.size(0) == 0 || input.size(1) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(args.input, ": tensor '", in_name,
                                                   "' must be non-empty [B, T", lm ? "]" : ", D]"));
  }
  if (!lm) input = input.to(at::kFloat);
  input = input.to(options.device);

  at::Tensor output;
  if (args.mode == "parallel") {
    ASSIGN_OR_RETURN(output, model->Parallel(input));
  } else if (args.mode == "chunkwise") {
    at::Tensor state = model->NewState(input.size(0));
    ASSIGN_OR_RETURN(output, model->Chunkwise(input, state, 0, args.chunk_size));
  } else {
    const int64_t batch = input.size(0), len = input.size(1);
    if (lm) {
      // Check the ids once up front: the recurrent step does not (it is the hot path).
      const int64_t lo = input.min().item<int64_t>(), hi = input.max().item<int64_t>();
      if (lo < 0 || hi >= model->config().vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat(args.input, ": tokens must be in [0, ", model->config().vocab_size, ")"));
      }
    }
    at::Tensor state = model->NewState(batch);
    std::vector<at::Tensor> steps;
    for (int64_t t = 0; t < len; ++t) {
      at::Tensor positions =
          at::full({batch}, t, at::TensorOptions().dtype(at::kLong).device(options.device));
      ASSIGN_OR_RETURN(at::Tensor out, model->Step(input.select(1, t), positions, state));
      steps.push_back(out);
    }
    output = at::stack(steps, 1);
  }
  return WriteSafetensors(args.output, {{lm ? "logits" : "hidden", output.to(at::kFloat)}},
                          {{"mode", args.mode}, {"checkpoint", args.checkpoint}});
}

}  // namespace
}  // namespace retnet::model

int main(int argc, char** argv) {
  retnet::model::Args args;
  CLI::App app{"Runs a RetNet checkpoint over a batch in one of its three forms."};
  app.add_option("--checkpoint", args.checkpoint,
                 "checkpoint directory (config.json + model.safetensors)")
      ->required();
  app.add_option("--input", args.input, "input .safetensors with `tokens` or `features`")
      ->required();
  app.add_option("--output", args.output, "output .safetensors (receives `logits` or `hidden`)")
      ->required();
  app.add_option("--mode", args.mode, "parallel | chunkwise | recurrent")->capture_default_str();
  app.add_option("--chunk-size", args.chunk_size, "chunk size for --mode chunkwise")
      ->capture_default_str();
  app.add_option("--device", args.device, "cpu | cuda[:N]")->capture_default_str();
  app.add_option("--dtype", args.dtype, "float32 | bfloat16 | float16")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "retnet-forward: " << e.what() << "\n";
    return 1;
  }
  try {
    absl::Status status = retnet::model::Run(args);
    if (!status.ok()) {
      std::string what(status.message());
      std::cerr << "retnet-forward: " << what.substr(0, what.find('\n')) << "\n";
      return 1;
    }
  } catch (const std::exception& e) {
    std::string what = e.what();
    std::cerr << "retnet-forward: " << what.substr(0, what.find('\n')) << "\n";
    return 1;
  }
  return 0;
}
