// File: model/cuda/retention_cuda.cc — see retention_cuda.h. Built only with a CUDA LibTorch.
#include "model/cuda/retention_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <utility>

#include "model/cuda/retention_kernels.h"

namespace retnet::model::cuda {
namespace {

namespace k = ::retnet::cuda;

k::DType ToDType(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return k::DType::kFloat32;
    case at::kBFloat16:
      return k::DType::kBFloat16;
    case at::kHalf:
      return k::DType::kFloat16;
    default:
      TORCH_CHECK(false, "fused retention: unsupported dtype ", t);
  }
  return k::DType::kFloat32;
}

void CheckRows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.is_cuda() && t.dim() == 2 && t.stride(1) == 1,
              "fused retention: ", name, " must be a 2-D CUDA tensor with unit column stride");
}

const float* Fp32Ptr(const at::Tensor& t, const char* name) {
  if (!t.defined()) return nullptr;
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "fused retention: ", name, " must be a contiguous fp32 CUDA tensor");
  return t.data_ptr<float>();
}

}  // namespace

at::Tensor RetentionStep(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& positions, const at::Tensor& log_decay,
                         const at::Tensor& theta, const StepParams& p, void* state,
                         at::ScalarType state_dtype, int64_t slot_stride, const at::Tensor& slots) {
  CheckRows(q, "q");
  CheckRows(k, "k");
  CheckRows(v, "v");
  const int64_t batch = q.size(0);
  TORCH_CHECK(k.size(0) == batch && v.size(0) == batch && q.size(1) == p.heads * p.dk &&
                  k.size(1) == p.heads * p.dk && v.size(1) == p.heads * p.dv,
              "fused retention: q/k/v shapes do not match heads, d_k, d_v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "fused retention: q, k, v must share a dtype");
  TORCH_CHECK(positions.is_cuda() && positions.scalar_type() == at::kLong &&
                  positions.is_contiguous() && positions.numel() == batch,
              "fused retention: positions must be a contiguous int64 CUDA tensor [B]");
  TORCH_CHECK(log_decay.numel() == p.heads, "fused retention: log_decay must have H entries");
  if (slots.defined()) {
    TORCH_CHECK(slots.is_cuda() && slots.scalar_type() == at::kInt && slots.is_contiguous() &&
                    slots.numel() == batch,
                "fused retention: slots must be a contiguous int32 CUDA tensor [B]");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({batch, p.heads, p.dv}, q.options().dtype(at::kFloat));
  k::RetentionStepArgs a;
  a.batch = static_cast<int>(batch);
  a.heads = static_cast<int>(p.heads);
  a.dk = static_cast<int>(p.dk);
  a.dv = static_cast<int>(p.dv);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.q_row_stride = q.stride(0);
  a.k_row_stride = k.stride(0);
  a.v_row_stride = v.stride(0);
  a.in_dtype = ToDType(q.scalar_type());
  a.positions = positions.data_ptr<int64_t>();
  a.log_decay = Fp32Ptr(log_decay, "log_decay");
  a.theta = p.rotary == Rotary::kNone ? nullptr : Fp32Ptr(theta, "theta");
  a.rotary = p.rotary == Rotary::kNone         ? k::RotaryKind::kNone
             : p.rotary == Rotary::kRotateHalf ? k::RotaryKind::kRotateHalf
                                               : k::RotaryKind::kInterleaved;
  a.q_scale = p.q_scale;
  a.k_scale = p.k_scale;
  a.inv_sqrt_cn = p.inv_sqrt_cn;
  a.state = state;
  TORCH_CHECK(state_dtype == at::kFloat || state_dtype == at::kBFloat16,
              "fused retention: the state must be float32 or bfloat16");
  a.state_dtype = ToDType(state_dtype);
  a.slot_stride = slot_stride;
  a.slots = slots.defined() ? slots.data_ptr<int32_t>() : nullptr;
  a.out = out.data_ptr<float>();
  C10_CUDA_CHECK(k::RecurrentRetentionStep(a, at::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor NormGate(const at::Tensor& x, int64_t inner_rows, const at::Tensor& weight,
                    const at::Tensor& bias, Norm kind, double eps, const at::Tensor& gate, Act act,
                    at::ScalarType out_dtype) {
  CheckRows(x, "norm input");
  TORCH_CHECK(inner_rows > 0 && x.size(1) % inner_rows == 0, "fused norm: bad row split");
  const int64_t cols = x.size(1) / inner_rows;
  if (gate.defined()) {
    CheckRows(gate, "gate");
    TORCH_CHECK(gate.size(0) == x.size(0) && gate.size(1) == x.size(1),
                "fused norm: gate shape must match the input");
    out_dtype = gate.scalar_type();
  }
  TORCH_CHECK(!weight.defined() || weight.numel() == cols, "fused norm: weight must have ", cols,
              " entries");
  TORCH_CHECK(!bias.defined() || bias.numel() == cols, "fused norm: bias must have ", cols,
              " entries");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options().dtype(out_dtype));
  k::NormGateArgs a;
  a.outer_rows = static_cast<int>(x.size(0));
  a.inner_rows = static_cast<int>(inner_rows);
  a.cols = static_cast<int>(cols);
  a.x = x.data_ptr();
  a.x_dtype = ToDType(x.scalar_type());
  a.x_outer_stride = x.stride(0);
  a.weight = Fp32Ptr(weight, "norm weight");
  a.bias = Fp32Ptr(bias, "norm bias");
  a.kind = kind == Norm::kRms ? k::NormKind::kRms : k::NormKind::kLayer;
  a.eps = static_cast<float>(eps);
  if (gate.defined()) {
    a.gate = gate.data_ptr();
    a.gate_dtype = ToDType(gate.scalar_type());
    a.gate_outer_stride = gate.stride(0);
  }
  a.act = act == Act::kSwish ? k::ActKind::kSwish : k::ActKind::kGelu;
  a.out = out.data_ptr();
  a.out_dtype = ToDType(out_dtype);
  a.out_outer_stride = out.stride(0);
  C10_CUDA_CHECK(k::NormGate(a, at::cuda::getCurrentCUDAStream().stream()));
  return out;
}

at::Tensor GatedActivation(const at::Tensor& x, int64_t f, Act act) {
  CheckRows(x, "gated activation input");
  TORCH_CHECK(x.size(1) >= 2 * f, "gated activation: input narrower than 2F");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), f}, x.options());
  k::GatedActivationArgs a;
  a.rows = static_cast<int>(x.size(0));
  a.cols = static_cast<int>(f);
  a.x = x.data_ptr();
  a.x_row_stride = x.stride(0);
  a.dtype = ToDType(x.scalar_type());
  a.act = act == Act::kSwish ? k::ActKind::kSwish : k::ActKind::kGelu;
  a.out = out.data_ptr();
  C10_CUDA_CHECK(k::GatedActivation(a, at::cuda::getCurrentCUDAStream().stream()));
  return out;
}

// ---------------------------------------------------------------------------------------------

struct StepGraphCache::Entry {
  at::cuda::CUDAGraph graph;
  at::Tensor tokens, positions, slots, iota, out;
  int64_t batch = -1;  // the batch the slot buffer currently describes
};

bool KernelsRunnable(const at::Device& device) {
  if (!device.is_cuda()) return false;
  return KernelsRunnableOn(device.has_index() ? device.index() : c10::cuda::current_device());
}

struct StepGraphCache::State {
  using Key = std::tuple<int64_t, uintptr_t, int64_t, int64_t>;
  std::map<Key, std::unique_ptr<Entry>> graphs;
  decltype(at::cuda::graph_pool_handle()) pool = at::cuda::graph_pool_handle();
  std::optional<at::cuda::CUDAEvent> last;  // recorded after the latest replay
};

StepGraphCache::StepGraphCache() : state_(std::make_unique<State>()) {}
StepGraphCache::~StepGraphCache() = default;

int64_t StepGraphCache::Bucket(int64_t batch) {
  if (batch <= 0 || batch > kMaxBucket) return 0;
  int64_t b = 1;
  while (b < batch) b *= 2;
  return b;
}

size_t StepGraphCache::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return state_->graphs.size();
}

at::Tensor StepGraphCache::Run(const at::Tensor& tokens, const at::Tensor& positions,
                               std::tuple<uintptr_t, int64_t, int64_t> key, const Body& body,
                               const at::Tensor& slots) {
  const int64_t batch = tokens.size(0), bucket = Bucket(batch);
  TORCH_CHECK(bucket > 0, "step graph: batch ", batch, " beyond the largest bucket");
  std::lock_guard<std::mutex> lock(mu_);
  State& st = *state_;
  at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  if (st.last.has_value()) st.last->block(stream);  // replays never overlap across streams
  const State::Key full_key{bucket, std::get<0>(key), std::get<1>(key), std::get<2>(key)};
  auto it = st.graphs.find(full_key);
  if (it == st.graphs.end()) {
    if (st.graphs.size() >= 64) {  // a caller cycling through state tensors
      st.graphs.clear();
      st.pool = at::cuda::graph_pool_handle();  // the old pool is released with its graphs
    }
    auto e = std::make_unique<Entry>();
    const auto dev = at::TensorOptions().device(stream.device());
    e->tokens = at::zeros({bucket}, dev.dtype(at::kLong));
    e->positions = at::zeros({bucket}, dev.dtype(at::kLong));
    e->slots = at::full({bucket}, -1, dev.dtype(at::kInt));  // warm-up and capture write no state
    e->iota = at::arange(bucket, dev.dtype(at::kInt));
    // Capture on a side stream (graphs cannot be captured on the legacy default stream), after
    // one eager warm-up there (lazy cuBLAS/allocator initialisation must not be captured).
    at::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
    at::cuda::CUDAEvent ready;
    ready.record(stream);
    ready.block(side);
    {
      const c10::cuda::CUDAStreamGuard guard(side);
      (void)body(e->tokens, e->positions, e->slots);
      // Thread-local capture: other threads (snapshots, restores) keep using CUDA meanwhile.
      e->graph.capture_begin(st.pool, cudaStreamCaptureModeThreadLocal);
      try {
        e->out = body(e->tokens, e->positions, e->slots);
      } catch (...) {
        // End the capture so the side stream and the pool are usable again; drop the graph.
        try {
          e->graph.capture_end();
        } catch (...) {
        }
        throw;
      }
      e->graph.capture_end();
    }
    at::cuda::CUDAEvent captured;
    captured.record(side);
    captured.block(stream);
    it = st.graphs.emplace(full_key, std::move(e)).first;
  }
  Entry& e = *it->second;
  e.tokens.narrow(0, 0, batch).copy_(tokens, /*non_blocking=*/true);
  e.positions.narrow(0, 0, batch).copy_(positions, /*non_blocking=*/true);
  if (slots.defined()) {
    e.slots.narrow(0, 0, batch).copy_(slots, /*non_blocking=*/true);
    if (batch < bucket) e.slots.narrow(0, batch, bucket - batch).fill_(-1);
    e.batch = -1;  // the identity rows are no longer in place
  } else if (e.batch != batch) {
    e.slots.narrow(0, 0, batch).copy_(e.iota.narrow(0, 0, batch));
    if (batch < bucket) e.slots.narrow(0, batch, bucket - batch).fill_(-1);
    e.batch = batch;
  }
  e.graph.replay();
  at::Tensor out = e.out.narrow(0, 0, batch).clone();
  if (!st.last.has_value()) st.last.emplace();
  st.last->record(stream);
  return out;
}

}  // namespace retnet::model::cuda
