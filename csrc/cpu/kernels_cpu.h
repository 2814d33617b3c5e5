// Torch-facing CPU kernel entry points (defined in kernels.cpp, bound in bindings_cpu.cpp).
// Argument conventions are those of fxkernels/reference.py; fxkernels/ops.py has validated the
// arguments before these run, the checks here only guard against direct misuse.
#pragma once
#include <torch/extension.h>

#include <memory>
#include <string>
#include <vector>

#include "kernels.h"

namespace fxk {

// Per-thread scratch that only grows (the kernels' activation copies, the decode operators'
// buffers): resize only when too small, since assign/resize-to-fit would zero-fill whatever a
// larger layer needs after a smaller one, and a decode step alternates layer widths ~200 times
// (that filling was ~5 % of a batch-8 step). Callers write every element they read.
template <class T>
inline T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

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

// Memory a caller will read next, pulled towards L2 in even portions while other work runs
// (decode_layer: the next attention task's keys and values while the current task computes,
// where they would otherwise stream from DRAM with the core idle). Spans past kMaxSpans are
// dropped: prefetching is a hint.
struct PrefetchStream {
  static constexpr int kMaxSpans = 64;
  const char* begin[kMaxSpans];
  int64_t lines[kMaxSpans];
  int spans = 0, cur = 0;
  int64_t issued = 0, per_step = 0, total = 0;  // issued: lines of span cur already requested

  void add(const void* p, int64_t bytes) {
    if (spans == kMaxSpans || bytes <= 0) return;
    begin[spans] = (const char*)p;
    lines[spans] = (bytes + 63) / 64;
    total += lines[spans++];
  }
  // Spread the lines over `steps` calls of step().
  void pace(int64_t steps) { per_step = steps > 0 ? (total + steps - 1) / steps : total; }
  void step() {
    for (int64_t left = per_step; left > 0 && cur < spans;) {
      const int64_t n = lines[cur] - issued < left ? lines[cur] - issued : left;
      for (int64_t i = issued; i < issued + n; ++i) __builtin_prefetch(begin[cur] + 64 * i, 0, 2);
      left -= n;
      issued += n;
      if (issued == lines[cur]) {
        ++cur;
        issued = 0;
      }
    }
  }
};

// The loops attend_group may use, by the CPU and the instruction set the kernels are pinned to
// (set_isa): AVX-512 ones run for D = 64, 128 and 256 without soft-capping, AVX2 ones for
// D % 8 == 0, the portable ones otherwise.
enum class AttentionLoops { kScalar, kAvx2, kAvx512 };
AttentionLoops attention_loops();

// One query group of one kv head for one token (the body of decode_attention, also run per thread
// by decode_layer): q [G, D], k/v [L, D] of that head, mask [L], out [G, D], scratch >= G * n
// floats; slots [lo, lo + n) are read. With `next`, its lines are requested in even portions
// over the task's score passes and weighted sum (paced here).
void attend_group(const float* q, const float* k, const float* v, const bool* mask, float* out, float* scratch, int G,
                  int64_t D, int64_t lo, int64_t n, float scaling, float softcap, AttentionLoops loops,
                  PrefetchStream* next = nullptr);

// The digit count of a limb layout (its sixth tensor) that means "auto": each row on
// kAutoLowLimbs digits, or on kAutoHighLimbs where the low count would round it coarser than bf16
// storage of the row would (limb_split_avx2's `wide`).
constexpr int64_t kAutoLimbs = 0;
constexpr int kAutoLowLimbs = 2, kAutoHighLimbs = 4;

// M fp32 rows through a weight-only layer's limb layout (see limb_linear in kernels.cpp), in steps
// that a caller's own parallel region can run: limb_rows_setup (sizes the buffers, binds the
// weight), limb_rows_fill (the activations of rows [m0, m1); threads may fill disjoint rows of one
// LimbRows), then limb_rows_tiles on each thread's share of the output tiles, once every row is
// filled. The result is bit-identical to dequant_linear on those rows.
struct LimbRows {
  QaArgs a{};
  int L = 0;
  int64_t M = 0, K = 0, N = 0;
  const float* bias = nullptr;
  bool vnni8 = false;
  bool sums = false;  // the kernel sums the limbs as it stores (then tile ranges must be whole pairs)
  bool amx = false;   // that kernel is the AMX one
  std::vector<int8_t> digits, x8;
  std::vector<int16_t> x16;
  std::vector<int32_t> xc, zeros;
  std::vector<uint8_t> xu8, ok, finite;
  std::vector<float> fac, part;
  // kAutoLimbs: these rows run on kAutoLowLimbs digits, the rows flagged in `wide` also on
  // kAutoHighLimbs in `high`, whose outputs replace theirs
  bool adaptive = false;
  std::vector<uint8_t> wide;
  std::unique_ptr<LimbRows> high;
};
// Whether `packed` (from the weight-only repack) is the limb layout this CPU's kernels run.
bool limb_layout_usable(at::TensorList packed);
void limb_rows_setup(LimbRows& r, int64_t M, int64_t K, int64_t N, int64_t G, int64_t bits, at::TensorList packed,
                     const float* bias);
void limb_rows_fill(LimbRows& r, const float* x, int64_t m0, int64_t m1);
// y [M][N] for the output rows of tiles [t0, t1) (8 rows per tile; rows past N are not written).
void limb_rows_tiles(LimbRows& r, int64_t t0, int64_t t1, float* y);

// One pre-norm decoder layer (LLaMA/SmolLM, Mistral, Qwen2: RMSNorm, rotary, grouped-query attention
// over a static cache, SiLU-gated MLP) for one token of each of B rows, in one parallel region
// (decode_layer.cpp).
at::Tensor decode_layer(const at::Tensor& h, const at::Tensor& norm1, double eps1, const at::Tensor& norm2, double eps2,
                        at::TensorList qkv, const c10::optional<at::Tensor>& qkv_bias, at::TensorList o_proj,
                        const c10::optional<at::Tensor>& o_bias, at::TensorList gate_up,
                        const c10::optional<at::Tensor>& gate_up_bias, at::TensorList down,
                        const c10::optional<at::Tensor>& down_bias, at::IntArrayRef dims, const at::Tensor& cos,
                        const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& mask,
                        const at::Tensor& slot, int64_t heads, int64_t window, double scaling);

// XOR fold (64-bit words) of a contiguous CPU tensor, read in parallel: a read-bandwidth probe.
int64_t read_probe(const at::Tensor& buf);

// A uint8 tensor of nbytes (filled with 1) in 2 MiB transparent huge pages where the OS allows it,
// like the repacked weights: the read probe's buffer, so both stream under the same paging.
at::Tensor huge_page_buffer(int64_t nbytes);

}  // namespace fxk
