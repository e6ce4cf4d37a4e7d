// retnet-bench-model: prefill and decode speed of the model forms, printed as tables.
//
// For each model (the built-in default checkpoint and a ~125M-parameter random config):
//   prefill  tokens/s for T in {128, 512, 2048}: parallel, chunkwise (C=64), and token-by-token
//            recurrent as the baseline; ratios side by side.
//   decode   one batched recurrent step for B in {1, 8, 64}: ms/step and tokens/s, against the
//            stateless baseline of recomputing a 512-token history in parallel for each token.
//   state    bytes per session (constant in sequence length).
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
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

}  // namespace
}  // namespace retnet::model

int main(int argc, char** argv) {
  using namespace retnet::model;
  std::string models = "default,125m", device = "cpu", dtype = "float32";
  bool quick = false;
  CLI::App app{"Benchmarks the RetNet forms (prefill and decode) and prints markdown tables."};
  app.add_option("--models", models, "comma-separated: default, 125m")->capture_default_str();
  app.add_option("--device", device, "cpu | cuda")->capture_default_str();
  app.add_option("--dtype", dtype, "float32 | bfloat16 | float16")->capture_default_str();
  app.add_flag("--quick", quick, "T=128 only (smoke run)");
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
  at::manual_seed(0);
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
