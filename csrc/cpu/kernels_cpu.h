// Torch-facing CPU kernel entry points (defined in kernels.cpp, bound in bindings_cpu.cpp).
// Argument conventions are those of fxkernels/reference.py; fxkernels/ops.py has validated the
// arguments before these run, the checks here only guard against direct misuse.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

namespace fxk {

// "auto" (AVX2 when the CPU has AVX2+FMA+F16C) or "scalar" (portable loops, for tests).
void set_isa(const std::string& isa);
std::string active_isa();

// x fp32/fp16/bf16 [M, K] -> (xq int8 [M, K], scale fp32 [M], zero int32 [M]).
std::vector<at::Tensor> quantize_act(const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                                     const c10::optional<at::Tensor>& zero);

// One-time repacks into the AVX2 layouts of kernels.h; an empty list means "layout not
// supported for this group size" and the scalar kernel runs instead.
std::vector<at::Tensor> repack_dequant(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                                       int64_t bits, int64_t K);
std::vector<at::Tensor> repack_qact(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                                    const at::Tensor& wsum, int64_t bits, int64_t K);

at::Tensor dequant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                          const at::Tensor& zero, const std::vector<at::Tensor>& packed,
                          const c10::optional<at::Tensor>& bias, int64_t bits, int64_t K);

at::Tensor qact_linear(const at::Tensor& xq, const at::Tensor& sa, const at::Tensor& za, const at::Tensor& qweight,
                       const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& wsum,
                       const std::vector<at::Tensor>& packed, const c10::optional<at::Tensor>& bias, int64_t bits,
                       at::ScalarType out_dtype);

// One query token's attention over a static cache, reading slots up to `slot` only (attention.cpp):
// q fp32 [B, H, 1, D], k/v cache [B, Hkv, L, D], mask bool [B, 1, 1, L], slot int64 [1];
// window > 0 limits the read to the last `window` slots; softcap: Gemma 2's logit soft-capping.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& mask, const at::Tensor& slot, int64_t window, double scaling,
                            c10::optional<double> softcap);

// XOR fold (64-bit words) of a contiguous CPU tensor, read in parallel: a read-bandwidth probe.
int64_t read_probe(const at::Tensor& buf);

// A uint8 tensor of nbytes (filled with 1) in 2 MiB transparent huge pages where the OS allows it,
// like the repacked weights: the read probe's buffer, so both stream under the same paging.
at::Tensor huge_page_buffer(int64_t nbytes);

}  // namespace fxk
