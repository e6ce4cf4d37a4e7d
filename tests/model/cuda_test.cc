// The fast path (ModelOptions::Path::kFast) against the reference path.
//
// On every machine: the batched chunkwise prefill (a composition of library calls, also used on
// CUDA) gives the reference chunk loop's outputs and state. With a CUDA device and a build that
// has the kernels (RetNet::CudaKernelsCompiled(), a CUDA LibTorch): the fused decode step, the
// CUDA-graph replay and the fast prefill on the GPU against the reference ops on the GPU, on pool
// views at mixed positions; skipped otherwise.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "model/retnet.h"
#include "tests/model/test_util.h"

namespace retnet::model {
namespace {

using testing::RandomInput;
using testing::RelErr;
using testing::SmallConfig;
using testing::Variant;
using testing::VariantName;

std::unique_ptr<RetNet> Make(const ModelConfig& c, at::Device device, at::ScalarType dtype,
                             ModelOptions::Path path, bool graphs = false) {
  ModelOptions o;
  o.device = device;
  o.dtype = dtype;
  o.path = path;
  o.cuda_graphs = graphs;
  auto m = RetNet::CreateRandom(c, 7, o);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

const Variant kVariants[] = {Variant::kFla, Variant::kTorchscale, Variant::kTorchscaleV1,
                             Variant::kSeed};

TEST(FastPath, PathResolution) {
  const ModelConfig c = SmallConfig(Variant::kFla);
  auto ref = Make(c, at::kCPU, at::kFloat, ModelOptions::Path::kReference);
  ASSERT_NE(ref, nullptr);
  EXPECT_FALSE(ref->fused_step());
  EXPECT_FALSE(ref->fast_prefill());
  EXPECT_FALSE(ref->cpu_fast_step());
  EXPECT_FALSE(ref->cuda_graphs());
  auto fast = Make(c, at::kCPU, at::kFloat, ModelOptions::Path::kAuto);
  ASSERT_NE(fast, nullptr);
  EXPECT_FALSE(fast->fused_step());  // no CUDA kernels on the CPU: the CPU step and prefill
  EXPECT_TRUE(fast->fast_prefill());
  EXPECT_TRUE(fast->cpu_fast_step());
}

// Batched chunkwise == the reference chunk loop, from a non-zero state at a non-zero position,
// for chunk sizes that leave a partial chunk and that need several super-blocks (C = 1).
TEST(FastPath, BatchedChunkwiseMatchesReferenceOnCpu) {
  for (Variant v : kVariants) {
    const ModelConfig c = SmallConfig(v);
    auto ref = Make(c, at::kCPU, at::kFloat, ModelOptions::Path::kReference);
    auto fast = Make(c, at::kCPU, at::kFloat, ModelOptions::Path::kFast);
    ASSERT_NE(ref, nullptr);
    ASSERT_NE(fast, nullptr);
    const at::Tensor input = RandomInput(c, 2, 150, 11);
    at::manual_seed(3);
    const at::Tensor init = at::randn(ref->StateShape(2)) * 0.1;
    for (int64_t chunk : {1, 7, 64, 150}) {
      at::Tensor s_ref = init.clone(), s_fast = init.clone();
      auto out_ref = ref->Chunkwise(input, s_ref, 100, chunk);
      auto out_fast = fast->Chunkwise(input, s_fast, 100, chunk);
      ASSERT_TRUE(out_ref.ok()) << out_ref.status();
      ASSERT_TRUE(out_fast.ok()) << out_fast.status();
      EXPECT_LT(RelErr(*out_fast, *out_ref), 1e-5) << VariantName(v) << " C=" << chunk;
      EXPECT_LT(RelErr(s_fast, s_ref), 1e-5) << VariantName(v) << " C=" << chunk;
    }
  }
}

bool HaveCudaPath() { return at::hasCUDA() && RetNet::CudaKernelsCompiled(); }

// Pool [L, 6, H, d_k, d_v], the step runs on slots [1, 5): rows 0 and 5 must stay untouched.
struct Pool {
  at::Tensor pool;
  at::Tensor View() const { return pool.narrow(1, 1, 4); }
};

TEST(CudaFastPath, FusedStepMatchesReference) {
  if (!HaveCudaPath()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const at::Device dev(at::kCUDA);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (Variant v : kVariants) {
      const ModelConfig c = SmallConfig(v);
      auto ref = Make(c, dev, dtype, ModelOptions::Path::kReference);
      auto fused = Make(c, dev, dtype, ModelOptions::Path::kFast);
      ASSERT_NE(ref, nullptr);
      ASSERT_NE(fused, nullptr);
      ASSERT_TRUE(fused->fused_step());
      at::manual_seed(5);
      at::Tensor pool =
          at::randn({c.num_layers, 6, c.num_heads, c.head_k_dim(), c.head_v_dim()}).to(dev) * 0.1;
      Pool p_ref{pool.clone()}, p_fused{pool.clone()};
      at::Tensor pos = at::tensor(std::vector<int64_t>{0, 17, 1000, 4095}, at::kLong);
      const double tol = dtype == at::kFloat ? 2e-5 : 5e-2;
      for (int step = 0; step < 3; ++step) {
        at::Tensor in = RandomInput(c, 4, 1, 20 + step).select(1, 0).to(dev);
        auto a = ref->Step(in, pos + step, p_ref.View());
        auto b = fused->Step(in, pos + step, p_fused.View());
        ASSERT_TRUE(a.ok()) << a.status();
        ASSERT_TRUE(b.ok()) << b.status();
        const std::string what = VariantName(v) + " " + c10::toString(dtype);
        EXPECT_LT(RelErr(b->cpu(), a->cpu()), tol) << what << " step " << step;
        EXPECT_LT(RelErr(p_fused.pool.cpu(), p_ref.pool.cpu()), dtype == at::kFloat ? 2e-5 : 2e-2)
            << what << " state after step " << step;
      }
      EXPECT_TRUE(at::equal(p_fused.pool.select(1, 0), pool.select(1, 0)));
      EXPECT_TRUE(at::equal(p_fused.pool.select(1, 5), pool.select(1, 5)));
    }
  }
}

// Graph replay (buckets 4 and 1, batch 3 padded to 4) == the eager fused step; padding rows
// never touch the pool.
TEST(CudaFastPath, CudaGraphStepMatchesEager) {
  if (!HaveCudaPath()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const at::Device dev(at::kCUDA);
  const ModelConfig c = SmallConfig(Variant::kFla);
  auto eager = Make(c, dev, at::kFloat, ModelOptions::Path::kFast, /*graphs=*/false);
  auto graph = Make(c, dev, at::kFloat, ModelOptions::Path::kFast, /*graphs=*/true);
  ASSERT_NE(eager, nullptr);
  ASSERT_NE(graph, nullptr);
  ASSERT_TRUE(graph->cuda_graphs());
  at::manual_seed(9);
  at::Tensor pool =
      at::randn({c.num_layers, 6, c.num_heads, c.head_k_dim(), c.head_v_dim()}).to(dev) * 0.1;
  at::Tensor p_eager = pool.clone(), p_graph = pool.clone();
  for (int64_t batch : {3, 4, 1, 3}) {
    for (int step = 0; step < 2; ++step) {
      at::Tensor in = at::randint(c.vocab_size, {batch}, at::kLong).to(dev);
      at::Tensor pos = at::randint(3000, {batch}, at::kLong);
      auto a = eager->Step(in, pos, p_eager.narrow(1, 1, batch));
      auto b = graph->Step(in, pos, p_graph.narrow(1, 1, batch));
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      ASSERT_EQ(b->sizes(), a->sizes());
      EXPECT_LT(RelErr(b->cpu(), a->cpu()), 1e-5) << "B=" << batch;
      EXPECT_LT(RelErr(p_graph.cpu(), p_eager.cpu()), 1e-5) << "B=" << batch;
    }
  }
  EXPECT_TRUE(at::equal(p_graph.select(1, 0), pool.select(1, 0)));
  EXPECT_TRUE(at::equal(p_graph.select(1, 5), pool.select(1, 5)));
}

// The fast prefill on the GPU hands the reference's state to decoding, and decoding from it with
// the fused step continues like the reference.
TEST(CudaFastPath, FastPrefillStateMatchesReference) {
  if (!HaveCudaPath()) GTEST_SKIP() << "no CUDA device or no CUDA kernels in this build";
  const at::Device dev(at::kCUDA);
  for (Variant v : kVariants) {
    const ModelConfig c = SmallConfig(v);
    auto ref = Make(c, dev, at::kFloat, ModelOptions::Path::kReference);
    auto fast = Make(c, dev, at::kFloat, ModelOptions::Path::kFast, /*graphs=*/true);
    ASSERT_NE(ref, nullptr);
    ASSERT_NE(fast, nullptr);
    const at::Tensor input = RandomInput(c, 2, 300, 13).to(dev);
    for (int64_t chunk : {64, 300}) {
      at::Tensor s_ref = ref->NewState(2), s_fast = fast->NewState(2);
      auto a = ref->Chunkwise(input, s_ref, 0, chunk, Outputs::kLast);
      auto b = fast->Chunkwise(input, s_fast, 0, chunk, Outputs::kLast);
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      EXPECT_LT(RelErr(b->cpu(), a->cpu()), 1e-5) << VariantName(v) << " C=" << chunk;
      EXPECT_LT(RelErr(s_fast.cpu(), s_ref.cpu()), 1e-5) << VariantName(v) << " C=" << chunk;
      at::Tensor next = RandomInput(c, 2, 1, 14).select(1, 0).to(dev);
      at::Tensor pos = at::full({2}, 300, at::kLong);
      auto sa = ref->Step(next, pos, s_ref);
      auto sb = fast->Step(next, pos, s_fast);
      ASSERT_TRUE(sa.ok()) << sa.status();
      ASSERT_TRUE(sb.ok()) << sb.status();
      EXPECT_LT(RelErr(sb->cpu(), sa->cpu()), 2e-5) << VariantName(v);
    }
  }
}

}  // namespace
}  // namespace retnet::model
