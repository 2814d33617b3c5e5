// Single-query attention over a static KV cache: the attention of one decode step
// (fxkernels/generation/step.py), as one operator fxk_cpu::decode_attention.
//
// Why an operator: the step's cache is allocated for the whole generation (prompt plus every new
// token, rounded up), so a graph of fixed shapes reads all L slots of every row at every step,
// although only the slots up to the current one can be attended to. Here the loop stops at the
// step's slot (and starts at the sliding window's first slot), so a step reads the keys and values
// written so far and no more. Each key and value row is read once for all the query heads that
// share it (grouped-query attention), the softmax is exact (max-subtracted, fp32), and masked
// slots (left padding) are skipped.
//
// Layout: q [B, H, 1, D], k/v cache [B, Hkv, L, D], mask bool [B, 1, 1, L] (may this step's query
// read slot j), slot int64 [1] (the cache slot of this step's token); query head h reads kv head
// h / (H / Hkv), as in Hugging Face's repeat_kv. fp32 throughout.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/kernels_cpu.h"
#include "cpu/vec_math.h"


namespace fxk {
namespace {

struct Rows {
  const float* q;     // [G, D] the query heads of one kv head
  const float* k;     // [L, D]
  const float* v;     // [L, D]
  const bool* mask;   // [L]
  float* out;         // [G, D]
  float* p;           // [G, n] scratch: scores, then probabilities
  PrefetchStream* next = nullptr;  // stepped per 16 slots of each score pass and of the weighted sum (512-bit loops)
};

// Scores -> probabilities in place for one head's n slots (masked slots hold -inf and get 0).
FXK_ATT_AVX2 void softmax_avx2(float* p, int64_t n) {
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float m = lanes[0];
  for (int l = 1; l < 8; ++l) m = std::max(m, lanes[l]);
  for (; i < n; ++i) m = std::max(m, p[i]);
  const __m256 vm = _mm256_set1_ps(m);
  __m256 vs = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), vm));
    _mm256_storeu_ps(p + j, e);
    vs = _mm256_add_ps(vs, e);
  }
  float s = hsum(vs);
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - m);
    s += p[j];
  }
  const __m256 inv = _mm256_set1_ps(1.0f / s);
  for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), inv));
  for (; j < n; ++j) p[j] *= 1.0f / s;
}

// Pull the next rows' key and value lines towards L1 while this row's scores are computed, so
// the weighted sum below reads values that are already near (it walks each row in 64-byte
// column strips, a pattern the hardware prefetchers do not follow well).
constexpr int64_t kPrefetchRows = 8;
FXK_ATT_AVX2 inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) _mm_prefetch((const char*)(row + d), _MM_HINT_T0);
}

// Scores of GB query heads (g0 ..) over slots [lo, lo + n); masked slots get -inf.
template <int GB>
FXK_ATT_AVX2 void scores_avx2(const Rows& r, int g0, int64_t D, int64_t lo, int64_t n, int64_t hi_row,
                              float scaling, float softcap) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (lo + j + kPrefetchRows <= hi_row) {
      prefetch_row(r.k + (lo + j + kPrefetchRows) * D, D);
      prefetch_row(r.v + (lo + j + kPrefetchRows) * D, D);
    }
    if (!r.mask[lo + j]) {
      for (int g = 0; g < GB; ++g) r.p[(g0 + g) * n + j] = ninf;
      continue;
    }
    const float* kr = r.k + (lo + j) * D;
    __m256 acc[GB];
    for (int g = 0; g < GB; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kv = _mm256_loadu_ps(kr + d);
      for (int g = 0; g < GB; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(r.q + (g0 + g) * D + d), kv, acc[g]);
    }
    for (int g = 0; g < GB; ++g) {
      float w = hsum(acc[g]) * scaling;
      if (softcap > 0) w = std::tanh(w / softcap) * softcap;
      r.p[(g0 + g) * n + j] = w;
    }
  }
}

// out[g] = sum_j p[g, j] v[j] for GB heads: 16 output columns of each head stay in registers
// while the rows stream.
template <int GB>
FXK_ATT_AVX2 void weighted_sum_avx2(const Rows& r, int g0, int64_t D, int64_t lo, int64_t n) {
  for (int64_t d = 0; d < D; d += 16) {
    const bool two = d + 16 <= D;
    __m256 a0[GB], a1[GB];
    for (int g = 0; g < GB; ++g) a0[g] = a1[g] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const float* vr = r.v + (lo + j) * D + d;
      const __m256 v0 = _mm256_loadu_ps(vr);
      const __m256 v1 = two ? _mm256_loadu_ps(vr + 8) : _mm256_setzero_ps();
      for (int g = 0; g < GB; ++g) {
        const __m256 pj = _mm256_broadcast_ss(r.p + (g0 + g) * n + j);
        a0[g] = _mm256_fmadd_ps(pj, v0, a0[g]);
        a1[g] = _mm256_fmadd_ps(pj, v1, a1[g]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      _mm256_storeu_ps(r.out + (g0 + g) * D + d, a0[g]);
      if (two) _mm256_storeu_ps(r.out + (g0 + g) * D + d + 8, a1[g]);
    }
  }
}

template <int GB>
FXK_ATT_AVX2 void head_block_avx2(const Rows& r, int g0, int64_t D, int64_t lo, int64_t n, float scaling,
                                  float softcap) {
  scores_avx2<GB>(r, g0, D, lo, n, lo + n - 1, scaling, softcap);
  for (int g = 0; g < GB; ++g) softmax_avx2(r.p + (g0 + g) * n, n);
  weighted_sum_avx2<GB>(r, g0, D, lo, n);
}

// One kv head: G query heads over slots [lo, lo + n), in blocks of up to kHeadBlock heads whose
// accumulators fit the 16 vector registers. D is a multiple of 8.
FXK_ATT_AVX2 void attend_avx2(const Rows& r, int G, int64_t D, int64_t lo, int64_t n, float scaling,
                              float softcap) {
  int g0 = 0;
  for (; g0 + 4 <= G; g0 += 4) head_block_avx2<4>(r, g0, D, lo, n, scaling, softcap);
  switch (G - g0) {
    case 3: head_block_avx2<3>(r, g0, D, lo, n, scaling, softcap); break;
    case 2: head_block_avx2<2>(r, g0, D, lo, n, scaling, softcap); break;
    case 1: head_block_avx2<1>(r, g0, D, lo, n, scaling, softcap); break;
    default: break;
  }
}

// ---- AVX-512 forms (D a multiple of 16, no soft-capping) --------------------------------------
// The AVX2 loops above spend most of a slot on horizontal sums (one per head per slot) and on
// broadcasting each probability for every 8 values of a row. Here a block of 16 slots keeps one
// 16-wide partial dot product per slot, and a transposing reduction turns the 16 into one vector
// of 16 scores (~3 instructions per slot instead of ~8); the weighted sum keeps a head's whole
// output row (D / 16 registers) while the value rows stream, each probability an embedded
// broadcast operand of its multiply-adds.
#define FXK_ATT_512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))

// out[i] = sum of the 16 lanes of v[i], i = 0..15.
FXK_ATT_512 inline __m512 reduce16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  // 256-bit halves: lanes 0-7 of a[i] belong to v[2i], lanes 8-15 to v[2i+1]
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  // 128-bit quarters: quarter q of b[i] belongs to v[4i + q]
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  // within each quarter q: lanes (0, 2) hold two halves of v[q] (from b[2i]) resp. v[4 + q] (b[2i+1])
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  // quarter q, lane l: v[q + 4 l] -> reorder so lane j holds v[j]
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, d);
}

// Scores of head g (of r) over slots [lo, lo + n), 16 at a time, D = 16 * DC; masked slots get
// -inf. A last, partial block re-reads its last slot in the lanes past n (never stored), so the
// 16 partial sums stay in registers without a branch per slot.
template <int DC>
FXK_ATT_512 void scores_512(const Rows& r, int g, int64_t lo, int64_t n, float scaling) {
  constexpr int64_t D = 16 * DC;
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), sc = _mm512_set1_ps(scaling);
  const float* q = r.q + g * D;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int nb = (int)std::min<int64_t>(16, n - j0);
    if (r.next) r.next->step();
    __m512 part[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      const float* kr = r.k + (lo + j0 + std::min(i, nb - 1)) * D;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(kr));
#pragma GCC unroll 16
      for (int c = 1; c < DC; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), _mm512_loadu_ps(kr + 16 * c), acc);
      part[i] = acc;
    }
    const __mmask16 in_range = (__mmask16)((1u << nb) - 1);
    const __m128i m8 = _mm_maskz_loadu_epi8(in_range, r.mask + lo + j0);
    const __mmask16 keep = _mm_test_epi8_mask(m8, m8) & in_range;
    _mm512_mask_storeu_ps(r.p + g * n + j0, in_range, _mm512_mask_mul_ps(ninf, keep, reduce16(part), sc));
  }
}

// out[g] = sum_j p[g, j] v[j] for GB heads from g0, D = 16 * DC.
template <int GB, int DC>
FXK_ATT_512 void weighted_sum_512(const Rows& r, int g0, int64_t lo, int64_t n) {
  constexpr int64_t D = 16 * DC;
  __m512 acc[GB][DC];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < DC; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (r.next && (j & 15) == 0) r.next->step();
    const float* vr = r.v + (lo + j) * D;
#pragma GCC unroll 16
    for (int c = 0; c < DC; ++c) {
      const __m512 vv = _mm512_loadu_ps(vr + 16 * c);
      for (int g = 0; g < GB; ++g) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(r.p[(g0 + g) * n + j]), vv, acc[g][c]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < DC; ++c) _mm512_storeu_ps(r.out + (g0 + g) * D + 16 * c, acc[g][c]);
}

// All G heads, in as few passes over the values as the registers allow: blocks of up to kBlock
// heads (GB * DC accumulators, at most 16), the last block taking whatever heads remain.
template <int DC>
FXK_ATT_512 void weighted_sums_512(const Rows& r, int G, int64_t lo, int64_t n) {
  constexpr int kBlock = DC <= 4 ? 4 : (DC <= 8 ? 2 : 1);
  for (int g0 = 0; g0 < G; g0 += kBlock) {
    switch (std::min(kBlock, G - g0)) {
      case 4: weighted_sum_512<4 <= kBlock ? 4 : 1, DC>(r, g0, lo, n); break;
      case 3: weighted_sum_512<3 <= kBlock ? 3 : 1, DC>(r, g0, lo, n); break;
      case 2: weighted_sum_512<2 <= kBlock ? 2 : 1, DC>(r, g0, lo, n); break;
      default: weighted_sum_512<1, DC>(r, g0, lo, n); break;
    }
  }
}

template <int DC>
FXK_ATT_512 void attend_512(const Rows& r, int G, int64_t lo, int64_t n, float scaling) {
  for (int g = 0; g < G; ++g) {
    scores_512<DC>(r, g, lo, n, scaling);
    softmax_avx2(r.p + g * n, n);
  }
  weighted_sums_512<DC>(r, G, lo, n);
}

// Portable loops with the same arithmetic order per head (dot, softmax, weighted sum).
void attend_scalar(const Rows& r, int G, int64_t D, int64_t lo, int64_t n, float scaling, float softcap) {
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int g = 0; g < G; ++g) {
    float* p = r.p + g * n;
    const float* q = r.q + g * D;
    float m = ninf;
    for (int64_t j = 0; j < n; ++j) {
      if (!r.mask[lo + j]) {
        p[j] = ninf;
        continue;
      }
      const float* kr = r.k + (lo + j) * D;
      float w = 0.f;
      for (int64_t d = 0; d < D; ++d) w += q[d] * kr[d];
      w *= scaling;
      if (softcap > 0) w = std::tanh(w / softcap) * softcap;
      p[j] = w;
      m = std::max(m, w);
    }
    float s = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      p[j] = std::exp(p[j] - m);
      s += p[j];
    }
    float* o = r.out + g * D;
    std::fill(o, o + D, 0.f);
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[j] / s;
      const float* vr = r.v + (lo + j) * D;
      for (int64_t d = 0; d < D; ++d) o[d] += pj * vr[d];
    }
  }
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& mask, const at::Tensor& slot, int64_t window, double scaling,
                            c10::optional<double> softcap) {
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "decode_attention: CPU tensors expected");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "decode_attention: q, k_cache and v_cache must be float32");
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1, "decode_attention: q must be [B, H, 1, D], got ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: k_cache and v_cache must be the same [B, Hkv, L, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "decode_attention: caches must be contiguous");
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3);
  const int64_t Hkv = k_cache.size(1), L = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "decode_attention: q ", q_in.sizes(), " does not match the cache ", k_cache.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.numel() == B * L,
              "decode_attention: mask must be bool [B, 1, 1, L]");
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.numel() == 1 && slot.device().is_cpu(),
              "decode_attention: slot must be one int64 on the CPU");
  const int64_t s = slot.item<int64_t>();
  TORCH_CHECK(s >= 0 && s < L, "decode_attention: slot ", s, " outside the cache of ", L, " slots");
  const int64_t lo = window > 0 ? std::max<int64_t>(0, s - window + 1) : 0, n = s - lo + 1;
  const int G = (int)(H / Hkv);
  const float cap = softcap.has_value() ? (float)*softcap : 0.f;

  auto q = q_in.contiguous();
  auto m = mask.contiguous();
  auto out = at::empty({B, H, 1, D}, q.options());
  const float *pq = q.data_ptr<float>(), *pk = k_cache.data_ptr<float>(), *pv = v_cache.data_ptr<float>();
  const bool* pm = m.data_ptr<bool>();
  float* po = out.data_ptr<float>();
  const AttentionLoops loops = attention_loops();
  // one task per (row, kv head); split across threads only when a task reads enough to pay for it
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, n * D));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> scratch((size_t)(G * n));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv;
      attend_group(pq + t * G * D, pk + t * L * D, pv + t * L * D, pm + b * L, po + t * G * D, scratch.data(), G, D,
                   lo, n, (float)scaling, cap, loops);
    }
  });
  return out;
}

AttentionLoops attention_loops() {
  const std::string isa = active_isa();
  if (isa == "scalar" || !cpu_features().avx2 || !cpu_features().fma) return AttentionLoops::kScalar;
  const CpuFeatures& f = cpu_features();
  return isa != "avx2" && f.avx512f && f.avx512bw && f.avx512vl ? AttentionLoops::kAvx512 : AttentionLoops::kAvx2;
}

void attend_group(const float* q, const float* k, const float* v, const bool* mask, float* out, float* scratch, int G,
                  int64_t D, int64_t lo, int64_t n, float scaling, float softcap, AttentionLoops loops,
                  PrefetchStream* next) {
  Rows r{q, k, v, mask, out, scratch, next};
  if (next) next->pace((G + 1) * ((n + 15) / 16));
  if (loops == AttentionLoops::kAvx512 && softcap == 0.f) {
    switch (D) {
      case 64: return attend_512<4>(r, G, lo, n, scaling);
      case 128: return attend_512<8>(r, G, lo, n, scaling);
      case 256: return attend_512<16>(r, G, lo, n, scaling);
      default: break;
    }
  }
  if (loops != AttentionLoops::kScalar && D % 8 == 0)
    attend_avx2(r, G, D, lo, n, scaling, softcap);
  else
    attend_scalar(r, G, D, lo, n, scaling, softcap);
}

}  // namespace fxk
