// Shared helpers for the model tests: small configs of every variant, error metrics.
#ifndef RETNET_TESTS_MODEL_TEST_UTIL_H_
#define RETNET_TESTS_MODEL_TEST_UTIL_H_

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "model/config.h"

namespace retnet::model::testing {

// Max absolute difference relative to the largest reference magnitude.
inline double RelErr(const at::Tensor& got, const at::Tensor& want) {
  const double scale = want.abs().max().item<double>();
  return (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>() /
         std::max(scale, 1e-30);
}

enum class Variant { kFla, kTorchscale, kTorchscaleV1, kSeed };

inline std::string VariantName(Variant v) {
  switch (v) {
    case Variant::kFla:
      return "fla";
    case Variant::kTorchscale:
      return "torchscale";
    case Variant::kTorchscaleV1:
      return "torchscale_v1";
    case Variant::kSeed:
      return "seed";
  }
  return "?";
}

// Small configs that together exercise every option: rotary conventions, scale placement,
// both retention normalisations, LayerNorm/RMSNorm with and without affine, all FFN kinds.
inline ModelConfig SmallConfig(Variant v) {
  ModelConfig c;
  c.num_layers = 2;
  c.hidden_size = 32;
  c.num_heads = 2;
  c.key_dim = 32;
  c.value_dim = 64;
  c.vocab_size = 61;
  switch (v) {
    case Variant::kFla:
      c.family = Family::kFla;
      c.layout = "fla";
      c.ffn = FfnKind::kSwiGlu;
      c.ffn_dim = 64;
      break;
    case Variant::kTorchscale:
      c.family = Family::kTorchscale;
      c.layout = "torchscale";
      c.rotary = Rotary::kInterleaved;
      c.scale_on = ScaleOn::kKey;
      c.retention_norm = RetentionNorm::kInvSqrtCn;
      c.group_norm_weight = false;
      c.value_dim = 54;  // d_v = 27: not a power of two
      c.ffn = FfnKind::kGlu;
      c.ffn_act = Activation::kGelu;
      c.ffn_dim = 48;
      c.embed_scale = std::sqrt(32.0);
      c.embed_norm = true;
      c.tied_head = true;
      break;
    case Variant::kTorchscaleV1:
      c.family = Family::kTorchscale;
      c.layout = "torchscale-v1";
      c.rotary = Rotary::kInterleaved;
      c.scale_on = ScaleOn::kKey;
      c.retention_norm = RetentionNorm::kInvSqrtCn;
      c.block_norm = NormKind::kLayerNorm;
      c.block_norm_bias = true;
      c.block_norm_eps = 1e-5;
      c.group_norm = NormKind::kLayerNorm;
      c.group_norm_weight = false;
      c.group_norm_eps = 1e-5;
      c.proj_bias = true;
      c.ffn = FfnKind::kFfnV1;
      c.ffn_act = Activation::kGelu;
      c.ffn_dim = 64;
      c.ffn_bias = true;
      c.ffn_inner_norm = true;
      break;
    case Variant::kSeed:
      c.family = Family::kSeed;
      c.layout = "seed";
      c.vocab_size = 0;
      c.rotary = Rotary::kInterleaved;
      c.scale_on = ScaleOn::kKey;
      c.block_norm = NormKind::kLayerNorm;
      c.block_norm_bias = true;
      c.block_norm_eps = 1e-5;
      c.group_norm = NormKind::kLayerNorm;
      c.group_norm_bias = true;
      c.group_norm_eps = 1e-5;
      c.gate_act = Activation::kGelu;
      c.proj_bias = true;
      c.ffn = FfnKind::kSeedMlp;
      c.ffn_act = Activation::kGelu;
      c.ffn_dims = {4, 32};
      c.ffn_bias = true;
      c.final_norm = false;
      break;
  }
  return c;
}

// Inputs for a model: tokens [B, T] or features [B, T, D], deterministic.
inline at::Tensor RandomInput(const ModelConfig& c, int64_t batch, int64_t len, uint64_t seed) {
  at::manual_seed(seed);
  if (c.is_language_model()) return at::randint(c.vocab_size, {batch, len}, at::kLong);
  return at::randn({batch, len, c.hidden_size});
}

inline std::string SourceDir() {
  const char* dir = std::getenv("RETNET_SOURCE_DIR");
  return dir != nullptr ? dir : ".";
}

}  // namespace retnet::model::testing

#endif  // RETNET_TESTS_MODEL_TEST_UTIL_H_
