// One pre-norm decoder layer for one token per row, as one operator fxk_cpu::decode_layer: the
// decode step of LLaMA/SmolLM, Mistral and Qwen2 models (fxkernels/generation/step.py) on the CPU,
// for layers whose four projections are weight-only QuantLinears in the limb layout.
//
// Why one operator: a small model's layer is ~9 short calls (4 linears, attention, norms, rotary,
// residuals, the gated activation), each with its own dispatch from the compiled graph and its own
// fork/join, and between them the second thread waits while the first runs the serial glue (on
// SmolLM2-135M at batch 1 it spun ~60 % of the step). Here the layer is one parallel region: the
// cheap row-wide steps (norms, the activation, the limb split of each linear's input) run on every
// thread for one row, or split by rows for several; the threads split each linear's output tiles
// and the attention's (row, kv head) pairs, and meet at a barrier where a result must be whole.
//
// The linears are limb_rows_tiles (bit-identical to dequant_linear on the same rows), the
// attention is attend_group (decode_attention's body); the norms, rotary embedding and SiLU follow Hugging
// Face's fp32 formulas (RMSNorm: x * rsqrt(mean(x^2) + eps) * w; rotate_half; x * sigmoid(x)),
// with a float64 sum of squares, so they agree with the graph's ops to float rounding.
#include <omp.h>
#include <sched.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/kernels_cpu.h"
#include "cpu/vec_math.h"

namespace fxk {
namespace {

struct Linear {
  at::TensorList packed;
  const float* bias;
  int64_t N, K, G, bits;
};

// The sum of squares in float64 over four lanes per register and two registers (a scalar sum is
// one dependent add per value: at batch 8 it took ~3 % of the layer).
FXK_ATT_AVX2 void rms_norm(const float* x, const float* w, int64_t D, float eps, float* out) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t k = 0;
  for (; k + 8 <= D; k += 8) {
    const __m256d a = _mm256_cvtps_pd(_mm_loadu_ps(x + k)), b = _mm256_cvtps_pd(_mm_loadu_ps(x + k + 4));
    s0 = _mm256_fmadd_pd(a, a, s0);
    s1 = _mm256_fmadd_pd(b, b, s1);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(s0, s1));
  double ss = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; k < D; ++k) ss += (double)x[k] * (double)x[k];
  const float r = 1.0f / std::sqrt((float)(ss / (double)D) + eps);
  const __m256 vr = _mm256_set1_ps(r);
  for (k = 0; k + 8 <= D; k += 8)
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_loadu_ps(w + k), _mm256_mul_ps(_mm256_loadu_ps(x + k), vr)));
  for (; k < D; ++k) out[k] = w[k] * (x[k] * r);
}

// Hugging Face's x * cos + rotate_half(x) * sin for one head of D values (cos/sin rows of D).
void rotary(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
    out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
  }
}

// out = silu(g) * u, with silu(g) = g / (1 + exp(-g)) written through exp(-|g|) so nothing overflows.
FXK_ATT_AVX2 void silu_mul_avx2(const float* g, const float* u, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = exp_nonpositive(_mm256_or_ps(x, sign));  // exp(-|x|)
    const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), neg);
    const __m256 s = _mm256_div_ps(num, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) {
    const float e = std::exp(-std::fabs(g[i]));
    out[i] = (g[i] < 0 ? g[i] * e : g[i]) / (1.0f + e) * u[i];
  }
}

// A barrier for the threads of one parallel region that spins on a shared word (with a pause per
// poll, yielding the core after a while in case a thread was descheduled): libgomp's barrier took
// ~1.3 us per crossing between the two vCPUs measured, ~12 % of a layer at batch 8 with 2 digits.
// Only for teams no larger than the CPUs this process may run on: with more threads than CPUs a
// spinning thread holds the CPU its partner needs (30x slower measured), and libgomp's barrier,
// which sleeps, is used instead.
class SpinBarrier {
 public:
  // threads: the team's size (omp_get_num_threads(), the same on every thread)
  void wait(int threads) {
    const int gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int64_t polls = 0; generation_.load(std::memory_order_acquire) == gen; ++polls) {
      if (polls < (1 << 16))
        _mm_pause();
      else
        std::this_thread::yield();
    }
  }

 private:
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
};

int usable_cpus() {
  static const int n = [] {
    cpu_set_t set;
    return sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
  }();
  return n;
}

// This thread's tiles of an N-row output: whole tile pairs (the unit of the INT4 and AMX kernels),
// split evenly.
void my_tiles(int64_t N, int t, int nt, int64_t& t0, int64_t& t1) {
  const int64_t tiles = (N + 7) / 8, pairs = (tiles + 1) / 2;
  t0 = std::min(tiles, 2 * (pairs * t / nt));
  t1 = std::min(tiles, 2 * (pairs * (t + 1) / nt));
}

const float* f32_ptr(const at::Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
              "decode_layer: ", name, " must be a contiguous float32 CPU tensor of ", numel, " values, got ",
              t.scalar_type(), " ", t.sizes());
  return t.data_ptr<float>();
}

Linear linear(const char* name, at::TensorList packed, const c10::optional<at::Tensor>& bias, at::IntArrayRef dims,
              int i) {
  TORCH_CHECK(limb_layout_usable(packed), "decode_layer: ", name,
              " is not a weight-only layer in the limb layout of this CPU's VNNI kernels");
  Linear l{packed, nullptr, dims[4 * i], dims[4 * i + 1], dims[4 * i + 2], dims[4 * i + 3]};
  const int64_t Kp = *packed[4].data_ptr<int64_t>();
  TORCH_CHECK(l.N > 0 && l.K > 0 && l.G > 0 && l.K % l.G == 0 && l.bits >= 2 && l.bits <= 8, "decode_layer: ", name,
              " dims (N, K, G, bits) = (", l.N, ", ", l.K, ", ", l.G, ", ", l.bits, ") are not a layer's");
  TORCH_CHECK(l.bits <= 4 || (Kp % 4 == 0 && (Kp / l.G) % 4 == 0), "decode_layer: ", name,
              " has 8-bit groups that the VNNI kernel cannot split into 4-column steps");
  if (bias.has_value()) l.bias = f32_ptr(*bias, name, l.N);
  return l;
}

}  // namespace

at::Tensor decode_layer(const at::Tensor& h, const at::Tensor& norm1, double eps1, const at::Tensor& norm2, double eps2,
                        at::TensorList qkv, const c10::optional<at::Tensor>& qkv_bias, at::TensorList o_proj,
                        const c10::optional<at::Tensor>& o_bias, at::TensorList gate_up,
                        const c10::optional<at::Tensor>& gate_up_bias, at::TensorList down,
                        const c10::optional<at::Tensor>& down_bias, at::IntArrayRef dims, const at::Tensor& cos,
                        const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& mask,
                        const at::Tensor& slot, int64_t heads, int64_t window, double scaling) {
  TORCH_CHECK(dims.size() == 16, "decode_layer: dims must hold (N, K, G, bits) of the 4 linears, got ", dims.size());
  const Linear lq = linear("qkv", qkv, qkv_bias, dims, 0), lo_ = linear("o_proj", o_proj, o_bias, dims, 1);
  const Linear lg = linear("gate_up", gate_up, gate_up_bias, dims, 2), ld = linear("down", down, down_bias, dims, 3);
  TORCH_CHECK(h.dim() == 3 && h.size(1) == 1, "decode_layer: h must be [B, 1, hidden], got ", h.sizes());
  const int64_t B = h.size(0), D = h.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.sizes() == v_cache.sizes(),
              "decode_layer: k_cache and v_cache must be the same [B, Hkv, L, D] with B = ", B, ", got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t Hkv = k_cache.size(1), L = k_cache.size(2), Dh = k_cache.size(3), H = heads, I = lg.N / 2;
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && Dh % 2 == 0,
              "decode_layer: heads=", H, " over ", Hkv, " kv heads of dimension ", Dh, " is not a GQA layout");
  TORCH_CHECK(lq.K == D && lq.N == (H + 2 * Hkv) * Dh && lo_.K == H * Dh && lo_.N == D && lg.K == D && lg.N % 2 == 0 &&
                  ld.K == I && ld.N == D,
              "decode_layer: the linears' shapes do not chain (hidden ", D, ", heads ", H, "x", Dh, ", kv heads ", Hkv,
              "; dims ", dims, ")");
  const float* ph = f32_ptr(h, "h", B * D);
  const float *pn1 = f32_ptr(norm1, "norm1", D), *pn2 = f32_ptr(norm2, "norm2", D);
  const float *pcos = f32_ptr(cos, "cos", B * Dh), *psin = f32_ptr(sin, "sin", B * Dh);
  float* kc = const_cast<float*>(f32_ptr(k_cache, "k_cache", B * Hkv * L * Dh));
  float* vc = const_cast<float*>(f32_ptr(v_cache, "v_cache", B * Hkv * L * Dh));
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.numel() == B * L,
              "decode_layer: mask must be a contiguous bool [B, 1, 1, L] with B = ", B, ", L = ", L);
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.numel() == 1 && slot.device().is_cpu(),
              "decode_layer: slot must be one int64 on the CPU");
  const int64_t s = slot.item<int64_t>();
  TORCH_CHECK(s >= 0 && s < L, "decode_layer: slot ", s, " outside the cache of ", L, " slots");
  TORCH_CHECK(cpu_features().avx2 && cpu_features().fma, "decode_layer: needs AVX2 and FMA");
  const int64_t lo = window > 0 ? std::max<int64_t>(0, s - window + 1) : 0, n = s - lo + 1;
  const int G = (int)(H / Hkv);
  const int64_t W = std::max(D, std::max(I, H * Dh));  // row width of the linears' inputs
  const bool* pm = mask.data_ptr<bool>();
  const AttentionLoops loops = attention_loops();

  auto out = at::empty_like(h);
  float* po = out.data_ptr<float>();
  // results every thread reads after a barrier (owned by the calling thread, reused across calls)
  static thread_local std::vector<float> s_qkv, s_att, s_o, s_gu, s_d;
  float *qkv_out = scratch(s_qkv, B * lq.N), *att = scratch(s_att, B * H * Dh), *o_out = scratch(s_o, B * D);
  float *gu_out = scratch(s_gu, B * lg.N), *d_out = scratch(s_d, B * D);
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // With several rows the threads split the row-wide work (norms, activation, the linears' input
  // preparation) by rows into shared buffers, at one more barrier per linear; with one row every
  // thread prepares it for itself, which costs less than the barrier.
  const bool split_rows = B > 1 && threads > 1;
  static thread_local LimbRows s_shared[4];
  LimbRows* shared = s_shared;  // the calling thread's (inside the region the name would be each thread's own)
  const Linear* lins[4] = {&lq, &lo_, &lg, &ld};
  if (split_rows)
    for (int i = 0; i < 4; ++i)
      limb_rows_setup(shared[i], B, lins[i]->K, lins[i]->N, lins[i]->G, lins[i]->bits, lins[i]->packed,
                      lins[i]->bias);

  SpinBarrier barrier;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const bool spin = nt <= usable_cpus();
    auto sync = [&]() {
      if (spin) {
        barrier.wait(nt);
      } else {
#pragma omp barrier
      }
    };
    static thread_local LimbRows own;
    static thread_local std::vector<float> s_x, s_h, s_q, s_p;
    float *x = scratch(s_x, B * W), *hr = scratch(s_h, B * D), *qr = scratch(s_q, G * Dh), *p = scratch(s_p, G * n);
    const int64_t r0 = split_rows ? B * t / nt : 0, r1 = split_rows ? B * (t + 1) / nt : B;  // rows prepared here
    // y [B][N] = linear i of x [B][K]: rows [r0, r1) prepared here, this thread's tiles computed here
    auto run_linear = [&](int i, const float* xin, float* y) {
      const Linear& l = *lins[i];
      LimbRows& r = split_rows ? shared[i] : own;
      if (!split_rows) limb_rows_setup(r, B, l.K, l.N, l.G, l.bits, l.packed, l.bias);
      limb_rows_fill(r, xin, r0, r1);
      if (split_rows) sync();
      int64_t t0, t1;
      my_tiles(l.N, t, nt, t0, t1);
      limb_rows_tiles(r, t0, t1, y);
    };

    for (int64_t b = r0; b < r1; ++b) rms_norm(ph + b * D, pn1, D, (float)eps1, x + b * D);
    run_linear(0, x, qkv_out);
    const int64_t task0 = B * Hkv * t / nt, task1 = B * Hkv * (t + 1) / nt;
    sync();
    // rotary, cache write and attention, one (row, kv head) and its query group per task
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t b = task / Hkv, j = task % Hkv;
      const float *qkv_b = qkv_out + b * lq.N, *cb = pcos + b * Dh, *sb = psin + b * Dh;
      float *kh = kc + task * L * Dh, *vh = vc + task * L * Dh;
      rotary(qkv_b + (H + j) * Dh, cb, sb, Dh, kh + s * Dh);
      std::memcpy(vh + s * Dh, qkv_b + (H + Hkv + j) * Dh, Dh * sizeof(float));
      for (int g = 0; g < G; ++g) rotary(qkv_b + (j * G + g) * Dh, cb, sb, Dh, qr + g * Dh);
      // the next task's keys and values stream in while this one computes
      PrefetchStream next;
      if (task + 1 < task1) {
        next.add(kh + (L + lo) * Dh, n * Dh * sizeof(float));
        next.add(vh + (L + lo) * Dh, n * Dh * sizeof(float));
      }
      attend_group(qr, kh, vh, pm + b * L, att + (b * H + j * G) * Dh, p, G, Dh, lo, n, (float)scaling, 0.f, loops,
                   &next);
    }
    sync();
    run_linear(1, att, o_out);
    sync();
    for (int64_t k = r0 * D; k < r1 * D; ++k) hr[k] = ph[k] + o_out[k];
    for (int64_t b = r0; b < r1; ++b) rms_norm(hr + b * D, pn2, D, (float)eps2, x + b * D);
    run_linear(2, x, gu_out);
    sync();
    for (int64_t b = r0; b < r1; ++b) silu_mul_avx2(gu_out + b * lg.N, gu_out + b * lg.N + I, I, x + b * I);
    run_linear(3, x, d_out);
    sync();
    // this thread's rows of the residual sum (all rows' hr are here when every thread has them)
    const int64_t k0 = split_rows ? r0 * D : B * D * t / nt, k1 = split_rows ? r1 * D : B * D * (t + 1) / nt;
    for (int64_t k = k0; k < k1; ++k) po[k] = hr[k] + d_out[k];
  }
  return out;
}

}  // namespace fxk
