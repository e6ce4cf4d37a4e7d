// retnet-bench-model: prefill and decode speed of the model forms, printed as tables.
//
// For each model (the built-in default checkpoint and a ~125M-parameter random config):
//   prefill  tokens/s for T in {128, 512, 2048}: parallel, chunkwise (C=64), and token-by-token
//            recurrent as the baseline; ratios side by side.
//   decode   one batched recurrent step for B in {1, 8, 64}: ms/step and tokens/s, against the
//            stateless baseline of recomputing a 512-token history in parallel for each token.
//   state    bytes per session (constant in sequence length).
//
// With --json OUT (used by tools/bench_gpu.py): one model (--checkpoint DIR, or --models' first),
// decode step time at each of --batches, chunkwise prefill tokens/s at each of --lengths, and the
// greedy continuation of --prompt-ids, written as one JSON object; --path and --no-graphs pick
// the implementation (ModelOptions::Path, cuda_graphs).
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "model/checkpoint.h"

namespace retnet::model {
namespace {

using Clock = std::chrono::steady_clock;

// Median seconds of `fn` over repetitions (at least `min_reps`, until `budget_s` is spent).
double Time(const std::function<void()>& fn, int min_reps = 3, double budget_s = 2.0) {
  fn();  // warm-up
  std::vector<double> times;
  const auto start = Clock::now();
  while (static_cast<int>(times.size()) < min_reps ||
         std::chrono::duration<double>(Clock::now() - start).count() < budget_s) {
    const auto t0 = Clock::now();
    fn();
    times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    if (times.size() >= 50) break;
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void Sync(const at::Tensor& t) { (void)t.sum().item<double>(); }

ModelConfig Random125M() {
  ModelConfig c;
  c.family = Family::kFla;
  c.layout = "fla (random)";
  c.num_layers = 12;
  c.hidden_size = 768;
  c.num_heads = 6;
  c.key_dim = 768;
  c.value_dim = 1536;
  c.vocab_size = 32000;
  c.ffn = FfnKind::kSwiGlu;
  c.ffn_dim = 1024;
  return c;
}

void Bench(const std::string& name, const RetNet& model, bool quick) {
  c10::InferenceMode guard;
  const ModelConfig& c = model.config();
  const auto dev = at::TensorOptions().device(model.options().device).dtype(at::kLong);
  std::printf("\n## %s — %s, %s on %s\n", name.c_str(), c.Summary().c_str(),
              c10::toString(model.options().dtype), model.options().device.str().c_str());
  std::printf("state per session: %lld bytes (%.2f MiB), independent of sequence length\n",
              static_cast<long long>(model.StateBytesPerSession()),
              model.StateBytesPerSession() / 1048576.0);

  std::printf("\nprefill (B=1)\n");
  std::printf(
      "| T | parallel tok/s | chunkwise C=64 tok/s | recurrent tok/s (baseline) | parallel / "
      "recurrent | chunkwise / recurrent |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|\n");
  std::vector<int64_t> lengths =
      quick ? std::vector<int64_t>{128} : std::vector<int64_t>{128, 512, 2048};
  for (int64_t len : lengths) {
    at::Tensor tokens = at::randint(c.vocab_size, {1, len}, dev);
    const double par = Time([&] { Sync(*model.Parallel(tokens)); });
    const double chunk = Time([&] {
      at::Tensor s = model.NewState(1);
      Sync(*model.Chunkwise(tokens, s, 0, 64, Outputs::kLast));
    });
    // Token-by-token recurrent prefill; for long T, time the first 128 steps and scale.
    const int64_t steps = std::min<int64_t>(len, 128);
    const double rec = Time(
                           [&] {
                             at::Tensor s = model.NewState(1);
                             at::Tensor out;
                             for (int64_t t = 0; t < steps; ++t)
                               out = *model.Step(tokens.select(1, t), at::full({1}, t, dev), s);
                             Sync(out);
                           },
                           1, 1.0) *
                       static_cast<double>(len) / static_cast<double>(steps);
    std::printf("| %lld | %.0f | %.0f | %.0f | %.1fx | %.1fx |\n", static_cast<long long>(len),
                len / par, len / chunk, len / rec, rec / par, rec / chunk);
  }

  const int64_t history = 512;
  at::Tensor hist_tokens = at::randint(c.vocab_size, {1, history}, dev);
  const double recompute = Time([&] { Sync(*model.Parallel(hist_tokens)); });
  std::printf(
      "\ndecode: one batched recurrent step; baseline = recompute a %lld-token history in parallel "
      "per token (%.1f ms, B=1)\n",
      static_cast<long long>(history), recompute * 1e3);
  std::printf("| B | ms / step | tokens/s | tokens/s vs B=1 | speedup vs recompute baseline |\n");
  std::printf("|---:|---:|---:|---:|---:|\n");
  double base_tps = 0;
  for (int64_t batch : {1, 8, 64}) {
    at::Tensor state = at::randn(model.StateShape(batch), dev.dtype(at::kFloat)) * 0.01;
    at::Tensor tokens = at::randint(c.vocab_size, {batch}, dev);
    at::Tensor positions = at::randint(4096, {batch}, dev);
    const double step = Time([&] { Sync(*model.Step(tokens, positions, state)); }, 5);
    const double tps = batch / step;
    if (batch == 1) base_tps = tps;
    std::printf("| %lld | %.2f | %.0f | %.1fx | %.0fx |\n", static_cast<long long>(batch),
                step * 1e3, tps, tps / base_tps, tps * recompute);
  }
}

std::vector<int64_t> ParseList(const std::string& text) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipEmpty())) {
    out.push_back(std::stoll(std::string(part)));
  }
  return out;
}

std::string Num(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.6g", x);
  return buf;
}

struct JsonRun {
  std::vector<int64_t> batches, lengths, prompt;
  int64_t chunk_size = 64, steps = 20, greedy_steps = 32;
};

// Machine-readable measurements for tools/bench_gpu.py.
int RunJson(const RetNet& model, const JsonRun& run, const std::string& path) {
  c10::InferenceMode guard;
  const ModelConfig& c = model.config();
  if (!c.is_language_model()) {
    std::fprintf(stderr, "--json needs a language model\n");
    return 1;
  }
  const auto dev = at::TensorOptions().device(model.options().device).dtype(at::kLong);
  std::string json = "{";
  json += "\"model\": \"" + c.Summary() + "\", ";
  json += "\"device\": \"" + model.options().device.str() + "\", ";
  json += "\"dtype\": \"" + std::string(c10::toString(model.options().dtype)) + "\", ";
  json += "\"fused_step\": " + std::string(model.fused_step() ? "true" : "false") + ", ";
  json += "\"cpu_fast_step\": " + std::string(model.cpu_fast_step() ? "true" : "false") + ", ";
  json += "\"threads\": " + std::to_string(at::get_num_threads()) + ", ";
  json += "\"fast_prefill\": " + std::string(model.fast_prefill() ? "true" : "false") + ", ";
  json += "\"cuda_graphs\": " + std::string(model.cuda_graphs() ? "true" : "false") + ", ";
  json += "\"state_bytes_per_session\": " + std::to_string(model.StateBytesPerSession()) + ", ";
  json += "\"parameters\": " + std::to_string(ParameterCount(c)) + ", ";
  json += "\"decode\": [";
  for (size_t i = 0; i < run.batches.size(); ++i) {
    const int64_t batch = run.batches[i];
    at::Tensor state = at::randn(model.StateShape(batch), dev.dtype(at::kFloat)) * 0.01;
    at::Tensor tokens = at::randint(c.vocab_size, {batch}, dev);
    at::Tensor positions = at::randint(4096, {batch}, dev);
    at::Tensor out;
    for (int w = 0; w < 3; ++w) out = *model.Step(tokens, positions, state);  // graph capture
    Sync(out);
    std::vector<double> reps;
    for (int r = 0; r < 3; ++r) {
      const auto t0 = Clock::now();
      for (int64_t k = 0; k < run.steps; ++k) out = *model.Step(tokens, positions, state);
      Sync(out);
      reps.push_back(std::chrono::duration<double>(Clock::now() - t0).count() /
                     static_cast<double>(run.steps));
    }
    std::string rep_list;
    for (double r : reps) rep_list += (rep_list.empty() ? "" : ", ") + Num(r);
    std::sort(reps.begin(), reps.end());
    const double step = reps[reps.size() / 2];
    json += (i ? ", " : "") + std::string("{\"batch\": ") + std::to_string(batch) +
            ", \"step_s\": " + Num(step) + ", \"rep_step_s\": [" + rep_list + "]" +
            ", \"tokens_per_s\": " + Num(static_cast<double>(batch) / step) + "}";
    std::fprintf(stderr, "decode B=%lld: %.3f ms/step\n", static_cast<long long>(batch),
                 step * 1e3);
  }
  json += "], \"prefill\": [";
  for (size_t i = 0; i < run.lengths.size(); ++i) {
    const int64_t len = run.lengths[i];
    at::Tensor tokens = at::randint(c.vocab_size, {1, len}, dev);
    const double t = Time(
        [&] {
          at::Tensor s = model.NewState(1);
          Sync(*model.Chunkwise(tokens, s, 0, run.chunk_size, Outputs::kLast));
        },
        5, 1.0);
    json += (i ? ", " : "") + std::string("{\"length\": ") + std::to_string(len) +
            ", \"chunk_size\": " + std::to_string(run.chunk_size) + ", \"time_s\": " + Num(t) +
            ", \"tokens_per_s\": " + Num(static_cast<double>(len) / t) + "}";
    std::fprintf(stderr, "prefill T=%lld: %.3f ms\n", static_cast<long long>(len), t * 1e3);
  }
  json += "], \"greedy\": [";
  if (!run.prompt.empty() && run.greedy_steps > 0) {
    at::Tensor s = model.NewState(1);
    const int64_t n = static_cast<int64_t>(run.prompt.size());
    at::Tensor prompt = at::tensor(run.prompt, at::kLong).view({1, n}).to(model.options().device);
    at::Tensor logits =
        model.Chunkwise(prompt, s, 0, run.chunk_size, Outputs::kLast)->view({1, -1});
    for (int64_t k = 0; k < run.greedy_steps; ++k) {
      at::Tensor tok = logits.argmax(-1);  // [1]
      json += (k ? ", " : "") + std::to_string(tok.item<int64_t>());
      logits = *model.Step(tok, at::full({1}, n + k, at::kLong), s);
    }
  }
  json += "]}\n";
  std::ofstream f(path);
  f << json;
  if (!f) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace retnet::model

int main(int argc, char** argv) {
  using namespace retnet::model;
  std::string models = "default,125m", device = "cpu", dtype = "float32";
  std::string checkpoint, json_out, batches = "1,8,64,256", lengths = "512,2048", prompt_ids;
  std::string path = "auto";
  bool quick = false, no_graphs = false;
  JsonRun run;
  CLI::App app{"Benchmarks the RetNet forms (prefill and decode) and prints markdown tables."};
  app.add_option("--models", models, "comma-separated: default, 125m")->capture_default_str();
  app.add_option("--device", device, "cpu | cuda")->capture_default_str();
  app.add_option("--dtype", dtype, "float32 | bfloat16 | float16")->capture_default_str();
  app.add_flag("--quick", quick, "T=128 only (smoke run)");
  app.add_option("--checkpoint", checkpoint, "model directory (instead of --models)");
  app.add_option("--json", json_out, "write machine-readable results for one model here");
  app.add_option("--batches", batches, "--json: decode batch sizes")->capture_default_str();
  app.add_option("--lengths", lengths, "--json: prefill lengths")->capture_default_str();
  app.add_option("--chunk-size", run.chunk_size, "--json: prefill chunk size")
      ->capture_default_str();
  app.add_option("--steps", run.steps, "--json: timed decode steps per repetition")
      ->capture_default_str();
  app.add_option("--prompt-ids", prompt_ids, "--json: comma-separated prompt token ids");
  app.add_option("--greedy-steps", run.greedy_steps, "--json: greedy tokens after the prompt")
      ->capture_default_str();
  app.add_option("--path", path, "auto | reference | fast (ModelOptions::Path)")
      ->capture_default_str();
  app.add_flag("--no-graphs", no_graphs, "fast path without CUDA graphs");
  CLI11_PARSE(app, argc, argv);
  ModelOptions options;
  auto dev = ParseDevice(device);
  auto dt = ParseDtype(dtype);
  if (!dev.ok() || !dt.ok()) {
    std::fprintf(stderr, "%s\n",
                 std::string((!dev.ok() ? dev.status() : dt.status()).message()).c_str());
    return 1;
  }
  options.device = *dev;
  options.dtype = *dt;
  options.cuda_graphs = !no_graphs;
  if (path == "reference") {
    options.path = ModelOptions::Path::kReference;
  } else if (path == "fast") {
    options.path = ModelOptions::Path::kFast;
  } else if (path != "auto") {
    std::fprintf(stderr, "--path: '%s' is not auto, reference or fast\n", path.c_str());
    return 1;
  }
  at::manual_seed(0);
  if (!json_out.empty()) {
    try {
      run.batches = ParseList(batches);
      run.lengths = ParseList(lengths);
      run.prompt = ParseList(prompt_ids);
    } catch (const std::exception&) {
      std::fprintf(stderr, "--batches/--lengths/--prompt-ids: comma-separated integers\n");
      return 1;
    }
    const std::string first = std::string(*absl::StrSplit(models, ',').begin());
    absl::StatusOr<std::unique_ptr<RetNet>> model =
        !checkpoint.empty()  ? LoadModel(checkpoint, options)
        : first == "default" ? LoadModel(DefaultModelDir(), options)
                             : RetNet::CreateRandom(Random125M(), 1, options);
    if (!model.ok()) {
      std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
      return 1;
    }
    return RunJson(**model, run, json_out);
  }
  std::printf("# retnet-bench-model (threads: %d)\n", at::get_num_threads());
  for (const auto& name : absl::StrSplit(models, ',')) {
    absl::StatusOr<std::unique_ptr<RetNet>> model =
        name == "default" ? LoadModel(DefaultModelDir(), options)
                          : RetNet::CreateRandom(Random125M(), 1, options);
    if (name != "default" && name != "125m") {
      std::fprintf(stderr, "unknown model '%s'\n", std::string(name).c_str());
      return 1;
    }
    if (!model.ok()) {
      std::fprintf(stderr, "%s: %s\n", std::string(name).c_str(),
                   std::string(model.status().message()).c_str());
      return 1;
    }
    Bench(std::string(name), **model, quick);
  }
  return 0;
}
