// File: model/config.h
//
// ModelConfig: every architectural choice the RetNet families make, as explicit fields. One
// configurable model covers fla/HF, torchscale (current and July-2023 layouts), syncdoth and the
// seed (myscience/retnet-pytorch). See shared/reference/retnet-spec.md §7 for where they differ.
//
// The checkpoint loader fills a ModelConfig from config.json plus the tensor names it finds;
// ExpectedTensors() then states exactly which internal tensors (and shapes) that config needs.
// Plain value type; no threading concerns.
#ifndef RETNET_MODEL_CONFIG_H_
#define RETNET_MODEL_CONFIG_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace retnet::model {

enum class Family { kFla, kTorchscale, kSeed };
// Interleaved: pairs (2i, 2i+1), theta_i = 10000^(-i/(d_k/2-1)) (torchscale, seed, syncdoth).
// RotateHalf: pairs (i, i+d_k/2), theta_i = 10000^(-2i/d_k) (fla).
enum class Rotary { kInterleaved, kRotateHalf };
// Which projection carries the 1/sqrt(d_k) factor (changes the state's contents, not outputs).
enum class ScaleOn { kQuery, kKey };
// Per-row factor on the retention output before the group norm, identical in all three forms:
// raw (alpha = 1, fla and seed) or 1/sqrt(c_n) with c_n = sum_{j<=n} gamma^j (torchscale).
enum class RetentionNorm { kRaw, kInvSqrtCn };
enum class NormKind { kLayerNorm, kRmsNorm };
enum class Activation { kSwish, kGelu };
// kSeedMlp: LN, then [Linear, act] per entry of ffn_dims (act after the last Linear too).
// kFfnV1: fc1 -> act -> (LayerNorm over F if ffn_inner_norm) -> fc2 (torchscale July 2023).
// kGlu: fc2(act(fc1 x) * gate x) (torchscale HEAD / syncdoth). kSwiGlu: down(silu(gate x) * up x).
enum class FfnKind { kSeedMlp, kFfnV1, kGlu, kSwiGlu };

const char* FamilyName(Family f);
const char* ActivationName(Activation a);
const char* FfnKindName(FfnKind k);

// Limits ModelConfig::Validate() enforces.
inline constexpr int64_t kMaxLayers = 1024;
inline constexpr int64_t kMaxWidth = 1 << 16;
inline constexpr int64_t kMaxHeads = 1024;
inline constexpr int64_t kMaxFfnWidth = 1 << 20;
inline constexpr int64_t kMaxVocab = 1 << 24;

struct ModelConfig {
  Family family = Family::kFla;
  std::string layout;  // human-readable variant, e.g. "fla", "torchscale-v1", "syncdoth"

  int64_t num_layers = 0;
  int64_t hidden_size = 0;  // D
  int64_t num_heads = 0;    // H
  int64_t key_dim = 0;      // H * d_k
  int64_t value_dim = 0;    // H * d_v
  int64_t vocab_size = 0;   // 0 for a backbone (features in, hidden out)

  Rotary rotary = Rotary::kRotateHalf;
  double rope_base = 10000.0;
  ScaleOn scale_on = ScaleOn::kQuery;
  RetentionNorm retention_norm = RetentionNorm::kRaw;

  NormKind block_norm = NormKind::kRmsNorm;  // attn/ffn pre-norms, final and embedding norms
  bool block_norm_bias = false;
  double block_norm_eps = 1e-6;

  NormKind group_norm = NormKind::kRmsNorm;  // per head, over d_v
  bool group_norm_weight = true;             // one [d_v] affine weight shared by all heads
  bool group_norm_bias = false;
  double group_norm_eps = 1e-6;

  Activation gate_act = Activation::kSwish;
  bool proj_bias = false;  // q/k/v/g/o projections

  FfnKind ffn = FfnKind::kSwiGlu;
  Activation ffn_act = Activation::kSwish;
  int64_t ffn_dim = 0;            // F / I for kFfnV1, kGlu, kSwiGlu
  std::vector<int64_t> ffn_dims;  // kSeedMlp: hidden widths, then D (one per Linear)
  bool ffn_bias = false;
  bool ffn_inner_norm = false;  // kFfnV1 subln LayerNorm over F

  double embed_scale = 1.0;
  bool embed_norm = false;
  bool final_norm = true;
  bool tied_head = false;
  // Decay table: log(1 - 2^(-5-h)) unless the checkpoint stores its own buffer.
  bool per_layer_buffers = false;  // seed stores decay/angle per layer

  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;  // the first of eos_token_ids, -1 when none
  // Every id that ends a generation: config.json's eos_token_id (an id or a list), replaced by
  // generation_config.json's when that file has one.
  std::vector<int64_t> eos_token_ids;
  // tokenizer_config.json's add_bos_token: 1 yes, 0 no, -1 not said (the server then adds the
  // tokenizer's BOS to a new session's first turn).
  int add_bos_token = -1;

  int64_t head_k_dim() const { return num_heads > 0 ? key_dim / num_heads : 0; }
  int64_t head_v_dim() const { return num_heads > 0 ? value_dim / num_heads : 0; }
  bool is_language_model() const { return vocab_size > 0; }

  // Checks dimensions and combinations; InvalidArgument naming the field otherwise.
  // Also bounds every size: kMaxLayers, kMaxWidth (hidden, key; value 4x), kMaxHeads,
  // kMaxFfnWidth, kMaxVocab.
  absl::Status Validate() const;
  // One line for logs: family, layout, dims, parameter count.
  std::string Summary() const;
};

// Internal tensor names and shapes a config needs ("embed.w", "layers.3.q.w", ...). Buffers
// (decay, theta) are not included: they are read or computed separately.
std::map<std::string, std::vector<int64_t>> ExpectedTensors(const ModelConfig& config);

// Parameter count implied by ExpectedTensors().
int64_t ParameterCount(const ModelConfig& config);

}  // namespace retnet::model

#endif  // RETNET_MODEL_CONFIG_H_
