// Host-side (CPU) evaluation of the CUDA kernels' index arithmetic and epilogue math; see
// host_check.cpp. Exposed by csrc/bindings_cuda.cpp for the tests.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace fxk {
namespace host {

// Replays the GEMM kernel of tile configuration `config` on CPU: returns (C int32 [M, N],
// row sums of A int32 [M] as the kernel's all-ones mma computes them).
std::vector<at::Tensor> simulate_gemm(const at::Tensor& a, const at::Tensor& b, int64_t config);
// (corrected integer accumulator int32 [M, N], fp32 output before the final dtype cast).
std::vector<at::Tensor> epilogue(const at::Tensor& acc, const at::Tensor& xsum, const at::Tensor& x_scale,
                                 const at::Tensor& x_zero, const at::Tensor& w_scale, const at::Tensor& w_zero,
                                 int64_t zero_offset, const at::Tensor& wsum, const c10::optional<at::Tensor>& bias,
                                 int64_t k);
// (xq int8 [M, K], scale fp32 [M], zero int32 [M]) from fp32 x with the kernel's rounding code.
std::vector<at::Tensor> quantize_act(const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                                     const c10::optional<at::Tensor>& zero);
// [grid_m * grid_n, 2] (tile_m, tile_n) visited by each linear block id.
at::Tensor tile_order(int64_t grid_m, int64_t grid_n, int64_t group_m);
// [BM, BN, BK, WARPS_M, WARPS_N, STAGES, SMEM_BYTES] of a configuration.
std::vector<int64_t> config_shape(int64_t config);

}  // namespace host
}  // namespace fxk
