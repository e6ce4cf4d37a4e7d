// File: model/checkpoint.h
//
// Loading RetNet checkpoints from a directory: config.json plus model.safetensors, or HF-style
// shards listed in model.safetensors.index.json. Files are memory-mapped by the project's own
// safetensors reader (safetensors.h). The family is detected from config.json and the tensor
// names (shared/reference/retnet-spec.md §6):
//
//   fla/HF      model_type "retnet" (fla-hub/retnet-*): model.layers.N.attn.*, legacy fused
//               mlp.gate_proj [2I, D] split into its gate and up halves.
//   torchscale  "family": "torchscale" + RetNetConfig field names; keys with or without the
//               "decoder." prefix, current (RMSNorm/GLU) and July-2023 (LayerNorm, biases, subln
//               FFN) layouts; syncdoth's "model."-prefixed variant with lm_head.
//   seed        "family": "seed" + myscience/retnet-pytorch constructor arguments; a backbone.
//
// Every problem is an error that names the file and the tensor: NotFound for missing files,
// InvalidArgument for malformed data (missing/unexpected tensor, wrong shape or dtype, bad
// header), Unimplemented for unsupported variants (MoE, multiway, GQA, short conv, hybrid
// attention, feature maps, post-norm/DeepNorm).
//
// Threading: free functions without shared state; safe to call concurrently.
#ifndef RETNET_MODEL_CHECKPOINT_H_
#define RETNET_MODEL_CHECKPOINT_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/retnet.h"

namespace retnet::model {

struct Checkpoint {
  std::string dir;
  ModelConfig config;
  ModelWeights weights;  // CPU tensors aliasing the mapped files, original dtypes
};

// Reads and validates the checkpoint in `dir` without moving weights anywhere.
absl::StatusOr<Checkpoint> ReadCheckpoint(const std::string& dir);

// ReadCheckpoint + RetNet::Create.
absl::StatusOr<std::unique_ptr<RetNet>> LoadModel(const std::string& dir,
                                                  const ModelOptions& options);

// The built-in default model's directory: $RETNET_DEFAULT_MODEL if set, else the source tree's
// model/default (compiled in), else <prefix>/share/retnet-serve/default-model.
std::string DefaultModelDir();

}  // namespace retnet::model

#endif  // RETNET_MODEL_CHECKPOINT_H_
