// AVX2/FMA kernels. Every function carries the target attribute (the module is compiled for
// baseline x86-64) and only the entry points declared in kernels.h have external linkage; the
// driver calls them after cpu_features() said AVX2+FMA+F16C are present.
//
// Layout choice (see kernels.h): output rows live in the 8 SIMD lanes. A GEMV then needs no
// horizontal sums, one vector of per-group scale / zero serves 8 rows, and the activation is a
// broadcast shared by all 8 rows, so the weight stream is read exactly once with unit stride.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "tile_pair512.h"

// kernels_avx512vnni.cpp includes this file with FXK_VNNI defined: the same kernels compiled
// with AVX-512 VNNI enabled, whose INT4 x int8 and (given a.xu8) INT8 x INT8 loops use vpdpbusd
// (four u8 x s8 products summed into int32 in one instruction) instead of vpmaddubsw/vpmaddwd.
// Only the integer-activation entry point is built there; the results are bit-identical (exact
// int32 sums).
#ifdef FXK_VNNI
#define FXK_AVX2 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
#else
#define FXK_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace fxk {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Software prefetch distance (bytes) along a weight stream. A batch-1 linear reads each weight
// once, in short streams (a 576x1536 INT4 layer is ~220 KB per thread), and the hardware
// prefetchers restart at every 4 KiB page, so without this each page begins with full DRAM latency:
// a decode step's linears measured ~2x slower run in sequence than re-run hot in L2.
#ifndef FXK_PREFETCH
#define FXK_PREFETCH 8192
#endif
FXK_AVX2 inline void prefetch_ahead(const void* p) {
  if (FXK_PREFETCH > 0) _mm_prefetch((const char*)p + FXK_PREFETCH, _MM_HINT_T0);
}

FXK_AVX2 inline void store_rows(float* yrow, int64_t n0, int64_t N, __m256 v) {
  if (n0 + 8 <= N) {
    _mm256_storeu_ps(yrow + n0, v);
  } else {  // last, partial tile: rows past N are padding
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    for (int64_t i = 0; n0 + i < N; ++i) yrow[n0 + i] = tmp[i];
  }
}

FXK_AVX2 inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ------------------------------------------------------------------------------------------
// Weight-only: y[m, n] = sum_g s[n, g] * sum_{k in g} x[m, k] * (q[n, k] - z[n, g])
// (q - z) is formed in integers and converted exactly, then FMA'd against a broadcast activation. Several accumulators per
// activation row hide the 4-cycle FMA latency when MR is small.
// ------------------------------------------------------------------------------------------
template <int MR>
struct DqAcc {
  static constexpr int NA = MR <= 2 ? 4 : (MR <= 4 ? 2 : 1);
};

template <int MR, bool NIB>
FXK_AVX2 void dq_block(const DqArgs& a, int64_t t, int64_t m0) {
  constexpr int NA = DqAcc<MR>::NA;
  const int64_t K = a.K, G = a.G, gs = K / G;
  const float* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = a.x + (m0 + m) * K;
  __m256 acc[MR][NA], tot[MR];
  for (int m = 0; m < MR; ++m) {
    tot[m] = _mm256_setzero_ps();
    for (int j = 0; j < NA; ++j) acc[m][j] = _mm256_setzero_ps();
  }
  const __m256i m15 = _mm256_set1_epi32(15);

  for (int64_t g = 0; g < G; ++g) {
    const __m256i zc = _mm256_loadu_si256((const __m256i*)(a.zc + (t * G + g) * 8));
    const __m256 sc = _mm256_loadu_ps(a.sc + (t * G + g) * 8);
    const int64_t k0 = g * gs, k1 = k0 + gs;
    int64_t k = k0;
    if (NIB) {
      // One byte per row holds k (low nibble) and k+1 (high nibble): a single 8-byte load
      // zero-extended to 32-bit lanes yields both codes for 8 rows with one AND and one shift.
      const uint8_t* wp = a.w + t * (K / 2) * 8;
      for (; k + 4 <= k1; k += 4) {
        __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wp + (k / 2) * 8)));
        __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wp + (k / 2 + 1) * 8)));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v0, m15), zc));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v0, 4), zc));
        __m256 w2 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v1, m15), zc));
        __m256 w3 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v1, 4), zc));
        for (int m = 0; m < MR; ++m) {
          acc[m][0 % NA] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(xr[m] + k), acc[m][0 % NA]);
          acc[m][1 % NA] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(xr[m] + k + 1), acc[m][1 % NA]);
          acc[m][2 % NA] = _mm256_fmadd_ps(w2, _mm256_broadcast_ss(xr[m] + k + 2), acc[m][2 % NA]);
          acc[m][3 % NA] = _mm256_fmadd_ps(w3, _mm256_broadcast_ss(xr[m] + k + 3), acc[m][3 % NA]);
        }
      }
      for (; k + 2 <= k1; k += 2) {
        __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wp + (k / 2) * 8)));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v0, m15), zc));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v0, 4), zc));
        for (int m = 0; m < MR; ++m) {
          acc[m][0] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(xr[m] + k), acc[m][0]);
          acc[m][1 % NA] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(xr[m] + k + 1), acc[m][1 % NA]);
        }
      }
    } else {
      const int8_t* wp = (const int8_t*)a.w + t * K * 8;
      for (; k + 4 <= k1; k += 4) {
        __m256 w[4];
        for (int j = 0; j < 4; ++j) {
          __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wp + (k + j) * 8)));
          w[j] = _mm256_cvtepi32_ps(_mm256_sub_epi32(v, zc));
        }
        for (int m = 0; m < MR; ++m)
          for (int j = 0; j < 4; ++j)
            acc[m][j % NA] = _mm256_fmadd_ps(w[j], _mm256_broadcast_ss(xr[m] + k + j), acc[m][j % NA]);
      }
      for (; k < k1; ++k) {
        __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wp + k * 8)));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(v, zc));
        for (int m = 0; m < MR; ++m)
          acc[m][0] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(xr[m] + k), acc[m][0]);
      }
    }
    // (q - z) is an exact small integer in fp32, so the group's scale is applied once to the
    // group's partial sum instead of once per weight (one multiply per 8 rows x group).
    for (int m = 0; m < MR; ++m) {
      __m256 sg = acc[m][0];
      for (int j = 1; j < NA; ++j) sg = _mm256_add_ps(sg, acc[m][j]);
      tot[m] = _mm256_fmadd_ps(sg, sc, tot[m]);
      for (int j = 0; j < NA; ++j) acc[m][j] = _mm256_setzero_ps();
    }
  }
  const int64_t n0 = t * 8;
  __m256 b = _mm256_setzero_ps();
  if (a.bias) {
    if (n0 + 8 <= a.N) {
      b = _mm256_loadu_ps(a.bias + n0);
    } else {
      alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; n0 + i < a.N; ++i) tmp[i] = a.bias[n0 + i];
      b = _mm256_load_ps(tmp);
    }
  }
  for (int m = 0; m < MR; ++m) store_rows(a.y + (m0 + m) * a.N, n0, a.N, _mm256_add_ps(tot[m], b));
}

// Weight-only GEMV (M = 1), two tiles (16 rows) at a time. At M = 1 nothing amortises the
// per-weight work of dq_block (widen, mask, subtract zero, convert, broadcast, FMA: ~5.5
// instructions per 8 weights, which left the kernel compute-bound at ~25% of the DRAM rate), so
// here: (1) the zero point leaves the inner loop, sum_k x (q - z) = sum_k x q - z * sum_k x,
// with sum_k x per group computed once per call (`xs`); the codes are small non-negative
// integers, so the folded form has partial sums of the same size as before and no cancellation
// beyond the final group term; (2) each activation broadcast serves both tiles. What is left per
// 8 weights is ~1/2 widening load, ~1/2 mask or shift, one exact int->float conversion, one FMA
// and ~1/2 broadcast.
template <bool NIB>
FXK_AVX2 void dq_gemv2(const DqArgs& a, int64_t t, const float* xs) {
  const int64_t K = a.K, G = a.G, gs = K / G;
  const float* x = a.x;
  const __m256i m15 = _mm256_set1_epi32(15);
  __m256 tot[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  const uint8_t* wq[2];
  const int8_t* wb[2];
  for (int j = 0; j < 2; ++j) {
    wq[j] = a.w + (t + j) * (K / 2) * 8;
    wb[j] = (const int8_t*)a.w + (t + j) * K * 8;
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * gs, k1 = k0 + gs;
    __m256 acc[2][2] = {{_mm256_setzero_ps(), _mm256_setzero_ps()}, {_mm256_setzero_ps(), _mm256_setzero_ps()}};
    int64_t k = k0;
    if (NIB) {
      for (; k + 4 <= k1; k += 4) {
        const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
        const __m256 x2 = _mm256_broadcast_ss(x + k + 2), x3 = _mm256_broadcast_ss(x + k + 3);
        for (int j = 0; j < 2; ++j) {
          const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wq[j] + (k / 2) * 8)));
          const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wq[j] + (k / 2 + 1) * 8)));
          acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, m15)), x0, acc[j][0]);
          acc[j][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), x1, acc[j][1]);
          acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, m15)), x2, acc[j][0]);
          acc[j][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), x3, acc[j][1]);
        }
      }
      for (; k + 2 <= k1; k += 2) {
        const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
        for (int j = 0; j < 2; ++j) {
          const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(wq[j] + (k / 2) * 8)));
          acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, m15)), x0, acc[j][0]);
          acc[j][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), x1, acc[j][1]);
        }
      }
    } else {
      // Stored codes are q - 128, far from 0 for 5..7-bit grids: folding the zero there would
      // subtract two large sums. (c - zc) stays in the loop (one vpsubd, no mask needed here).
      __m256i zc[2];
      for (int j = 0; j < 2; ++j) zc[j] = _mm256_loadu_si256((const __m256i*)(a.zc + ((t + j) * G + g) * 8));
      for (; k + 2 <= k1; k += 2) {
        const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
        for (int j = 0; j < 2; ++j) {
          const __m256i v0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wb[j] + k * 8)));
          const __m256i v1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wb[j] + k * 8 + 8)));
          acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v0, zc[j])), x0, acc[j][0]);
          acc[j][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v1, zc[j])), x1, acc[j][1]);
        }
      }
      for (; k < k1; ++k) {
        const __m256 x0 = _mm256_broadcast_ss(x + k);
        for (int j = 0; j < 2; ++j) {
          const __m256i v0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(wb[j] + k * 8)));
          acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(v0, zc[j])), x0, acc[j][0]);
        }
      }
    }
    const __m256 sx = _mm256_set1_ps(xs[g]);
    for (int j = 0; j < 2; ++j) {
      const __m256 zf = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)(a.zc + ((t + j) * G + g) * 8)));
      const __m256 sc = _mm256_loadu_ps(a.sc + ((t + j) * G + g) * 8);
      // sum x (q - z) = sum x q - z * sum x: one rounding for the correction, then the scale
      const __m256 sum = _mm256_add_ps(acc[j][0], acc[j][1]);
      const __m256 dot = NIB ? _mm256_fnmadd_ps(zf, sx, sum) : sum;
      tot[j] = _mm256_fmadd_ps(dot, sc, tot[j]);
    }
  }
  for (int j = 0; j < 2; ++j) {
    const int64_t n0 = (t + j) * 8;
    __m256 b = _mm256_setzero_ps();
    if (a.bias) {
      alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t i = 0; i < 8 && n0 + i < a.N; ++i) tmp[i] = a.bias[n0 + i];
      b = _mm256_load_ps(tmp);
    }
    store_rows(a.y, n0, a.N, _mm256_add_ps(tot[j], b));
  }
}

template <bool NIB>
FXK_AVX2 void dq_rows(const DqArgs& a, int64_t t, int64_t m0, int64_t mr) {
  switch (mr) {
    case 1: dq_block<1, NIB>(a, t, m0); break;
    case 2: dq_block<2, NIB>(a, t, m0); break;
    case 3: dq_block<3, NIB>(a, t, m0); break;
    case 4: dq_block<4, NIB>(a, t, m0); break;
    case 5: dq_block<5, NIB>(a, t, m0); break;
    default: dq_block<6, NIB>(a, t, m0); break;
  }
}

// ------------------------------------------------------------------------------------------
// Integer activations. INT4: vpmaddubsw(unsigned nibble codes, signed int8 activations): each
// int16 lane is c0*x0 + c1*x1 with |.| <= 2*15*128 = 3840, so eight of them (32 k) sum in int16
// without saturation before one vpmaddwd widens to int32. INT8: codes are full-range signed,
// where vpmaddubsw could saturate, so both operands are widened to int16 and vpmaddwd (exact)
// does the pairs. Zero points are folded afterwards in exact int32 arithmetic:
//   sum (xq - za)(c - zc) = acc - zc * (sum xq - Kg za) - za * sum c.
// ------------------------------------------------------------------------------------------
template <int MR>
FXK_AVX2 inline void qa_epilogue(const QaArgs& a, int64_t t, int64_t g, int64_t m0, const __m256i* acc32,
                                 __m256* yf) {
  const __m256i zc = _mm256_loadu_si256((const __m256i*)(a.zc + (t * a.G + g) * 8));
  const __m256i ws = _mm256_loadu_si256((const __m256i*)(a.ws + (t * a.G + g) * 8));
  const __m256 sc = _mm256_loadu_ps(a.sc + (t * a.G + g) * 8);
  for (int m = 0; m < MR; ++m) {
    const __m256i xc = _mm256_set1_epi32(a.xc[(m0 + m) * a.G + g]);
    const __m256i za = _mm256_set1_epi32(a.za[m0 + m]);
    __m256i ex = _mm256_sub_epi32(acc32[m], _mm256_add_epi32(_mm256_mullo_epi32(zc, xc), _mm256_mullo_epi32(za, ws)));
    yf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ex), sc, yf[m]);
  }
}

template <int MR>
FXK_AVX2 inline void qa_store(const QaArgs& a, int64_t t, int64_t m0, const __m256* yf) {
  const int64_t n0 = t * 8;
  __m256 b = _mm256_setzero_ps();
  if (a.bias) {
    alignas(32) float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < 8 && n0 + i < a.N; ++i) tmp[i] = a.bias[n0 + i];
    b = _mm256_load_ps(tmp);
  }
  for (int m = 0; m < MR; ++m)
    store_rows(a.y + (m0 + m) * a.N, n0, a.N, _mm256_fmadd_ps(yf[m], _mm256_set1_ps(a.sa[m0 + m]), b));
}

template <int MR>
FXK_AVX2 void qa4_block(const QaArgs& a, int64_t t, int64_t m0) {
  const int64_t Kp = a.Kp, G = a.G, steps = Kp / G / 8;  // 8-column steps per group
  const uint8_t* wt = a.w + t * (Kp / 8) * 32;
  const int8_t* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = a.x8 + (m0 + m) * a.xs;
  const __m256i m15 = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 yf[MR];
  for (int m = 0; m < MR; ++m) yf[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc32[MR];
    for (int m = 0; m < MR; ++m) acc32[m] = _mm256_setzero_si256();
    const int64_t s0 = g * steps, s1 = s0 + steps;
    for (int64_t sb = s0; sb < s1; sb += 4) {
      const int64_t se = imin(sb + 4, s1);
      __m256i acc16[MR];
      for (int m = 0; m < MR; ++m) acc16[m] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int64_t s = sb; s < se; ++s) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(wt + s * 32));
        const __m256i lo = _mm256_and_si256(w, m15);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m15);
        for (int m = 0; m < MR; ++m) {
          const __m256i xl = _mm256_set1_epi32(load_i32(xr[m] + s * 8));
          const __m256i xh = _mm256_set1_epi32(load_i32(xr[m] + s * 8 + 4));
#ifdef FXK_VNNI
          acc32[m] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc32[m], lo, xl), hi, xh);
#else
          acc16[m] = _mm256_add_epi16(acc16[m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                                                                 _mm256_maddubs_epi16(hi, xh)));
#endif
        }
      }
#ifndef FXK_VNNI
      for (int m = 0; m < MR; ++m) acc32[m] = _mm256_add_epi32(acc32[m], _mm256_madd_epi16(acc16[m], ones));
#endif
    }
    qa_epilogue<MR>(a, t, g, m0, acc32, yf);
  }
  qa_store<MR>(a, t, m0, yf);
}

// INT8 x INT8 micro-kernel: NTL tiles (8 output rows each) x MR activation rows. vpmaddwd has
// no accumulating form without VNNI (absent on Zen 3), so each 16 MACs cost a vpmaddwd plus a
// vpaddd; what register blocking can remove is everything else around them. With NTL = 2 every
// activation broadcast feeds two tiles and every widened weight vector feeds MR rows, so a k-pair
// costs 2 widening loads + MR broadcasts for 2*MR vpmaddwd (12 accumulators at MR = 6, which
// with 2 weight vectors, one broadcast and one product fills the 16 ymm registers exactly).
template <int MR, int NTL>
FXK_AVX2 void qa8_block(const QaArgs& a, int64_t t, int64_t m0) {
  const int64_t Kp = a.Kp, G = a.G, steps = Kp / G / 2;  // 2-column steps per group
  const int8_t* wt[NTL];
  for (int j = 0; j < NTL; ++j) wt[j] = (const int8_t*)a.w + (t + j) * (Kp / 2) * 16;
  const int16_t* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = a.x16 + (m0 + m) * a.xs;
  __m256 yf[NTL][MR];
  for (int j = 0; j < NTL; ++j)
    for (int m = 0; m < MR; ++m) yf[j][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc32[NTL][MR];
    for (int j = 0; j < NTL; ++j)
      for (int m = 0; m < MR; ++m) acc32[j][m] = _mm256_setzero_si256();
    const int64_t s0 = g * steps, s1 = s0 + steps;
    for (int64_t s = s0; s < s1; ++s) {
      __m256i w[NTL];
      for (int j = 0; j < NTL; ++j) w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(wt[j] + s * 16)));
      for (int m = 0; m < MR; ++m) {
        if (NTL == 2) {
          // One asm block per activation row: GCC 12 otherwise hoists all MR broadcasts and
          // vpmaddwd ahead of the adds and, at 12 live accumulators, spills half of them to the
          // stack on every k step. The block is the same broadcast / 2x(vpmaddwd, vpaddd) the
          // intrinsics would give, in this order, with the accumulators tied to their registers.
          __m256i xb, p;
          asm("vpbroadcastd %[x], %[xb]\n\t"
              "vpmaddwd %[xb], %[w0], %[p]\n\t"
              "vpaddd %[p], %[a0], %[a0]\n\t"
              "vpmaddwd %[xb], %[w1], %[xb]\n\t"
              "vpaddd %[xb], %[a1], %[a1]"
              : [a0] "+x"(acc32[0][m]), [a1] "+x"(acc32[NTL - 1][m]), [xb] "=&x"(xb), [p] "=&x"(p)
              : [w0] "x"(w[0]), [w1] "x"(w[NTL - 1]), [x] "m"(*(const int32_t*)(xr[m] + 2 * s)));
        } else {
          const __m256i xb = _mm256_set1_epi32(load_i32(xr[m] + 2 * s));
          for (int j = 0; j < NTL; ++j) acc32[j][m] = _mm256_add_epi32(acc32[j][m], _mm256_madd_epi16(w[j], xb));
        }
      }
    }
    for (int j = 0; j < NTL; ++j) qa_epilogue<MR>(a, t + j, g, m0, acc32[j], yf[j]);
  }
  for (int j = 0; j < NTL; ++j) qa_store<MR>(a, t + j, m0, yf[j]);
}

// GEMV (M = 1) with INT4 codes: two tiles (16 rows) share every activation broadcast and each
// 32-column block is fully unrolled, which brings the loop to ~9 instructions per 64 MACs so the
// kernel stays memory-bound on two cores. Requires 32-aligned groups (or G == 1 and Kp % 32 == 0).
FXK_AVX2 void qa4_gemv2(const QaArgs& a, int64_t t) {
  const int64_t Kp = a.Kp, G = a.G, steps = Kp / G / 8;
  const uint8_t* w0 = a.w + t * (Kp / 8) * 32;
  const uint8_t* w1 = w0 + (Kp / 8) * 32;
  const int8_t* xr = a.x8;
  const __m256i m15 = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 yf[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
#ifdef FXK_VNNI
    __m256i c0a = acc0, c0b = acc0, c1a = acc0, c1b = acc0, h0a = acc0, h0b = acc0, h1a = acc0, h1b = acc0;
#endif
    for (int64_t sb = g * steps; sb < (g + 1) * steps; sb += 4) {
      __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int64_t s = sb + j;
        if (!(j & 1)) {
          prefetch_ahead(w0 + s * 32);
          prefetch_ahead(w1 + s * 32);
        }
        const __m256i xl = _mm256_set1_epi32(load_i32(xr + s * 8));
        const __m256i xh = _mm256_set1_epi32(load_i32(xr + s * 8 + 4));
        const __m256i v0 = _mm256_loadu_si256((const __m256i*)(w0 + s * 32));
        const __m256i v1 = _mm256_loadu_si256((const __m256i*)(w1 + s * 32));
#ifdef FXK_VNNI
        // four independent chains per tile (low/high nibbles x step parity): one chain would
        // serialize every vpdpbusd on its ~4-5 cycle latency
        __m256i* c0 = (j & 1) ? &c0b : &c0a;
        __m256i* c1 = (j & 1) ? &c1b : &c1a;
        __m256i* h0 = (j & 1) ? &h0b : &h0a;
        __m256i* h1 = (j & 1) ? &h1b : &h1a;
        *c0 = _mm256_dpbusd_epi32(*c0, _mm256_and_si256(v0, m15), xl);
        *h0 = _mm256_dpbusd_epi32(*h0, _mm256_and_si256(_mm256_srli_epi16(v0, 4), m15), xh);
        *c1 = _mm256_dpbusd_epi32(*c1, _mm256_and_si256(v1, m15), xl);
        *h1 = _mm256_dpbusd_epi32(*h1, _mm256_and_si256(_mm256_srli_epi16(v1, 4), m15), xh);
#else
        s0 = _mm256_add_epi16(s0, _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v0, m15), xl),
                                                   _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), m15), xh)));
        s1 = _mm256_add_epi16(s1, _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v1, m15), xl),
                                                   _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), m15), xh)));
#endif
      }
#ifndef FXK_VNNI
      acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(s0, ones));
      acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(s1, ones));
#endif
    }
#ifdef FXK_VNNI
    acc0 = _mm256_add_epi32(_mm256_add_epi32(c0a, c0b), _mm256_add_epi32(h0a, h0b));
    acc1 = _mm256_add_epi32(_mm256_add_epi32(c1a, c1b), _mm256_add_epi32(h1a, h1b));
#endif
    qa_epilogue<1>(a, t, g, 0, &acc0, &yf[0]);
    qa_epilogue<1>(a, t + 1, g, 0, &acc1, &yf[1]);
  }
  qa_store<1>(a, t, 0, &yf[0]);
  qa_store<1>(a, t + 1, 0, &yf[1]);
}

#ifdef FXK_VNNI
// INT4 x int8 with VNNI, two tiles (16 output rows) x MR activation rows (up to 12): with no int16 partial
// sums to widen, a step of 8 columns is 2 weight loads, 4 nibble vectors, 2 broadcasts per
// activation row shared by both tiles, and 4 vpdpbusd per row; 2*MR int32 accumulators live in
// the 32 EVEX ymm registers that AVX-512VL provides.
template <int MR>
FXK_AVX2 void qa4_block2(const QaArgs& a, int64_t t, int64_t m0) {
  const int64_t Kp = a.Kp, G = a.G, steps = Kp / G / 8;
  const uint8_t* w0 = a.w + t * (Kp / 8) * 32;
  const uint8_t* w1 = w0 + (Kp / 8) * 32;
  const int8_t* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = a.x8 + (m0 + m) * a.xs;
  const __m256i m15 = _mm256_set1_epi8(15);
  __m256 yf[2][MR];
  for (int j = 0; j < 2; ++j)
    for (int m = 0; m < MR; ++m) yf[j][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[2][MR];
    for (int j = 0; j < 2; ++j)
      for (int m = 0; m < MR; ++m) acc[j][m] = _mm256_setzero_si256();
    for (int64_t s = g * steps; s < (g + 1) * steps; ++s) {
      if (!(s & 1)) {
        prefetch_ahead(w0 + s * 32);
        prefetch_ahead(w1 + s * 32);
      }
      const __m256i v0 = _mm256_loadu_si256((const __m256i*)(w0 + s * 32));
      const __m256i v1 = _mm256_loadu_si256((const __m256i*)(w1 + s * 32));
      const __m256i l0 = _mm256_and_si256(v0, m15), h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m15);
      const __m256i l1 = _mm256_and_si256(v1, m15), h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m15);
      for (int m = 0; m < MR; ++m) {
        const __m256i xl = _mm256_set1_epi32(load_i32(xr[m] + s * 8));
        const __m256i xh = _mm256_set1_epi32(load_i32(xr[m] + s * 8 + 4));
        acc[0][m] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc[0][m], l0, xl), h0, xh);
        acc[1][m] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc[1][m], l1, xl), h1, xh);
      }
    }
    qa_epilogue<MR>(a, t, g, m0, acc[0], yf[0]);
    qa_epilogue<MR>(a, t + 1, g, m0, acc[1], yf[1]);
  }
  qa_store<MR>(a, t, m0, yf[0]);
  qa_store<MR>(a, t + 1, m0, yf[1]);
}

// INT8 x INT8 with VNNI, NTL tiles (1 or 2) x MR rows. The qa layout pairs columns (k, k+1) per
// row; vpdpbusd wants four, so two pair-steps are interleaved per 16-bit element (unpacklo/hi)
// into one vector holding k..k+3 of 8 rows. The activation is the unsigned operand: codes + 128
// (a.xu8), and sum (x + 128) c - 128 sum c = sum x c restores the AVX2 path's exact accumulator.
// The single-tile form serves a chunk's odd last tile, so this path never needs int16 activations.
template <int MR, int NTL>
FXK_AVX2 void qa8_block2(const QaArgs& a, int64_t t, int64_t m0) {
  const int64_t Kp = a.Kp, G = a.G, quads = Kp / G / 4;
  const int8_t* wt[NTL];
  for (int j = 0; j < NTL; ++j) wt[j] = (const int8_t*)a.w + (t + j) * (Kp / 2) * 16;
  const uint8_t* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = a.xu8 + (m0 + m) * a.xs;
  __m256 yf[NTL][MR];
  for (int j = 0; j < NTL; ++j)
    for (int m = 0; m < MR; ++m) yf[j][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[NTL][MR];
    for (int j = 0; j < NTL; ++j)
      for (int m = 0; m < MR; ++m) acc[j][m] = _mm256_setzero_si256();
    for (int64_t q = g * quads; q < (g + 1) * quads; ++q) {
      __m256i w[NTL];
      for (int j = 0; j < NTL; ++j) {
        if (!(q & 1)) prefetch_ahead(wt[j] + (2 * q) * 16);
        const __m128i p0 = _mm_loadu_si128((const __m128i*)(wt[j] + (2 * q) * 16));
        const __m128i p1 = _mm_loadu_si128((const __m128i*)(wt[j] + (2 * q + 1) * 16));
        w[j] = _mm256_set_m128i(_mm_unpackhi_epi16(p0, p1), _mm_unpacklo_epi16(p0, p1));
      }
      for (int m = 0; m < MR; ++m) {
        const __m256i xb = _mm256_set1_epi32(load_i32(xr[m] + 4 * q));
        for (int j = 0; j < NTL; ++j) acc[j][m] = _mm256_dpbusd_epi32(acc[j][m], xb, w[j]);
      }
    }
    for (int j = 0; j < NTL; ++j) {
      const __m256i ws128 = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(a.ws + ((t + j) * G + g) * 8)), 7);
      for (int m = 0; m < MR; ++m) acc[j][m] = _mm256_sub_epi32(acc[j][m], ws128);
      qa_epilogue<MR>(a, t + j, g, m0, acc[j], yf[j]);
    }
  }
  for (int j = 0; j < NTL; ++j) qa_store<MR>(a, t + j, m0, yf[j]);
}

// Up to 12 activation rows: 24 accumulators plus the weight vectors (INT4: 4 nibble vectors, W8:
// 2 interleaved ones) and the broadcasts fit the 32 EVEX registers, and each weight vector built
// feeds twice as many dot products as at 6 rows. NTL = 2: tile pairs (INT4 or W8); NTL = 1: W8's
// odd last tile.
constexpr int kRows2 = 12;
template <int MR, int NTL>
FXK_AVX2 void qa_block_vnni(const QaArgs& a, int64_t t, int64_t m0) {
  if (NTL == 2 && a.bits <= 4)
    qa4_block2<MR>(a, t, m0);
  else
    qa8_block2<MR, NTL>(a, t, m0);
}

template <int NTL>
FXK_AVX2 void qa_rows_vnni(const QaArgs& a, int64_t t, int64_t m0, int64_t mr) {
  switch (mr) {
    case 1: qa_block_vnni<1, NTL>(a, t, m0); break;
    case 2: qa_block_vnni<2, NTL>(a, t, m0); break;
    case 3: qa_block_vnni<3, NTL>(a, t, m0); break;
    case 4: qa_block_vnni<4, NTL>(a, t, m0); break;
    case 5: qa_block_vnni<5, NTL>(a, t, m0); break;
    case 6: qa_block_vnni<6, NTL>(a, t, m0); break;
    case 7: qa_block_vnni<7, NTL>(a, t, m0); break;
    case 8: qa_block_vnni<8, NTL>(a, t, m0); break;
    case 9: qa_block_vnni<9, NTL>(a, t, m0); break;
    case 10: qa_block_vnni<10, NTL>(a, t, m0); break;
    case 11: qa_block_vnni<11, NTL>(a, t, m0); break;
    default: qa_block_vnni<12, NTL>(a, t, m0); break;
  }
}

// ---- 512-bit forms of the tile-pair kernels, for several activation rows ---------------------
// On a core with full-width 512-bit units (Zen 5, Intel server cores) a vpdpbusd on 512-bit
// registers does twice the products of the 256-bit one in the same issue slot, and with many
// rows the kernels above are bound by exactly those dot products (32 int8 rows per linear at
// batch 8: each fp32 row is four limb rows). Here one register holds a whole tile pair: tile t in
// the low 256 bits, t + 1 in the high (16 output rows), so a row's step of 8 INT4 columns is 2
// vpdpbusd instead of 4, and an INT8 quad 1 instead of 2. The integer sums are the same exact
// int32 values and the epilogue does the same operations per lane, so the outputs are
// bit-identical to the 256-bit kernels'.
//
// The activations of a 16-row micro-block are first copied into a panel, step by step: a step's
// bytes of all 16 rows are adjacent (INT4: 8 bytes per row and 8-column step, INT8: 4 per row and
// quad), so the loop reads every row at a fixed offset from one pointer instead of keeping 16 row
// pointers that do not fit the registers. The epilogue and store are tile_pair512.h's, shared with
// the AMX kernel; their running outputs live in memory, where they leave the registers to the
// accumulators.
#define FXK_VNNI512 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))

constexpr int kRowsZ = (int)kVnni512Rows;  // activation rows per micro-block: 16 accumulators

// Bytes of one row per panel step: an INT4 8-column step, or an INT8 quad (unsigned codes).
inline int64_t panel_unit(const QaArgs& a) { return a.bits <= 4 ? 8 : 4; }

// Rows [m0, m0 + mr) of the activations (x8, or xu8 for INT8) as a panel of Kp / unit steps of
// kRowsZ * unit bytes (rows past mr are left as they are: no product reads them).
FXK_VNNI512 void fill_panel(const QaArgs& a, int64_t m0, int64_t mr, uint8_t* panel) {
  const int64_t unit = panel_unit(a), steps = a.Kp / unit;
  const uint8_t* x = a.bits <= 4 ? (const uint8_t*)a.x8 : a.xu8;
  for (int64_t m = 0; m < mr; ++m) {
    const uint8_t* xr = x + (m0 + m) * a.xs;
    uint8_t* p = panel + m * unit;
    if (unit == 8)
      for (int64_t s = 0; s < steps; ++s) std::memcpy(p + s * kRowsZ * 8, xr + s * 8, 8);
    else
      for (int64_t s = 0; s < steps; ++s) std::memcpy(p + s * kRowsZ * 4, xr + s * 4, 4);
  }
}

// acc + u8 . s8 (vpdpbusd) written as one instruction on acc's own register: otherwise GCC 12
// copies every accumulator to another register and back on each iteration wherever a loop
// updates an accumulator only once (the INT8 loop; the INT4 loop below 8 rows).
FXK_VNNI512 inline __m512i dpbusd_in_place(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// The 16 accumulators of a micro-block are named variables a0..a15 (rows past MR are compiled
// out): kept in an array, GCC 12 at -O3 copies most of them to other registers on every step.
#define FXK_ROWS16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

// qa4_block2 on 512-bit registers over a panel. Below 8 rows the low- and high-nibble products go
// to separate accumulators (b0..b7), so the two vpdpbusd of a step do not wait on each other.
template <int MR>
FXK_VNNI512 void qa4_pair_z(const QaArgs& a, int64_t t, int64_t m0, const uint8_t* panel, float* yf) {
  constexpr bool split = MR < 8;
  const int64_t Kp = a.Kp, G = a.G, steps = Kp / G / 8;
  const uint8_t* w0 = a.w + t * (Kp / 8) * 32;
  const uint8_t* w1 = w0 + (Kp / 8) * 32;
  const __m512i m15 = _mm512_set1_epi8(15);
  for (int m = 0; m < MR; ++m) _mm512_store_ps(yf + m * 16, _mm512_setzero_ps());
  for (int64_t g = 0; g < G; ++g) {
#define FXK_ZERO(i) __m512i a##i = _mm512_setzero_si512(), b##i = _mm512_setzero_si512();
    FXK_ROWS16(FXK_ZERO)
#undef FXK_ZERO
    for (int64_t s = g * steps; s < (g + 1) * steps; ++s) {
      // every step, although a 64-byte line holds two (a repeated prefetch of a line is cheap)
      prefetch_ahead(w0 + s * 32);
      prefetch_ahead(w1 + s * 32);
      const __m512i v = load_pair(w0 + s * 32, w1 + s * 32);
      // a 32-bit shift moves the next byte's low nibble into each byte's top: the mask drops it
      const __m512i lo = _mm512_and_si512(v, m15), hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), m15);
      const uint8_t* xp = panel + s * (kRowsZ * 8);
#define FXK_STEP(i)                                                                                    \
  if constexpr (i < MR) {                                                                              \
    const __m512i xl = _mm512_set1_epi32(load_i32(xp + i * 8)), xh = _mm512_set1_epi32(load_i32(xp + i * 8 + 4)); \
    if constexpr (split) {                                                                             \
      a##i = dpbusd_in_place(a##i, lo, xl);                                                            \
      b##i = dpbusd_in_place(b##i, hi, xh);                                                            \
    } else {                                                                                           \
      a##i = dpbusd_in_place(dpbusd_in_place(a##i, lo, xl), hi, xh);                                  \
    }                                                                                                  \
  }
      FXK_ROWS16(FXK_STEP)
#undef FXK_STEP
    }
    __m512i acc[MR];
#define FXK_GATHER(i) \
  if constexpr (i < MR) acc[i] = split ? _mm512_add_epi32(a##i, b##i) : a##i;
    FXK_ROWS16(FXK_GATHER)
#undef FXK_GATHER
    pair_epilogue(a, t, g, m0, MR, (const int32_t*)acc, yf);
  }
  pair_store(a, t, m0, MR, yf);
}

#define FXK_ROWS8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

// qa4_pair_z over two tile pairs at once (tiles t .. t + 3) for up to 8 rows of a panel (xp: the
// panel at the block's first row; its steps stay kRowsZ rows long): each activation broadcast
// feeds one vpdpbusd of each pair, so a step loads 16 broadcasts for 32 products instead of 32.
// The 16-row loop is bound by those loads (one Zen 5 core, in L1: 7.7 G vpdpbusd/s against 8.6
// here). Accumulators a0..a7 hold pair (t, t + 1), b0..b7 pair (t + 2, t + 3); the sums, and so
// the outputs, are the same as two qa4_pair_z calls'.
template <int MR>
FXK_VNNI512 void qa4_two_pairs_z(const QaArgs& a, int64_t t, int64_t m0, const uint8_t* xp0, float* yf0, float* yf1) {
  const int64_t Kp = a.Kp, G = a.G, steps = Kp / G / 8;
  const uint8_t* w0 = a.w + t * (Kp / 8) * 32;
  const uint8_t *w1 = w0 + (Kp / 8) * 32, *w2 = w1 + (Kp / 8) * 32, *w3 = w2 + (Kp / 8) * 32;
  const int64_t ahead = std::max<int64_t>(4 * (Kp / 8) * 32, FXK_PREFETCH);  // see the step loop
  const __m512i m15 = _mm512_set1_epi8(15);
  for (int m = 0; m < MR; ++m) {
    _mm512_store_ps(yf0 + m * 16, _mm512_setzero_ps());
    _mm512_store_ps(yf1 + m * 16, _mm512_setzero_ps());
  }
  for (int64_t g = 0; g < G; ++g) {
#define FXK_ZERO(i) __m512i a##i = _mm512_setzero_si512(), b##i = _mm512_setzero_si512();
    FXK_ROWS8(FXK_ZERO)
#undef FXK_ZERO
    for (int64_t s = g * steps; s < (g + 1) * steps; ++s) {
      // Each tile's stream requests the same step of the tile 4 ahead (the next call's), into L2:
      // the fixed 8 KB distance of prefetch_ahead falls inside this call's own 4 tiles once a
      // row is longer than ~512 values (K = 1536: 24 KB), where it requested nothing new. One
      // thread, 8 rows x 2 digits, weights out of cache: 576x1536 55-60 -> 46-47 us, 3072x576
      // 89-91 -> 82-87 us.
      _mm_prefetch((const char*)(w0 + ahead + s * 32), _MM_HINT_T1);
      _mm_prefetch((const char*)(w1 + ahead + s * 32), _MM_HINT_T1);
      _mm_prefetch((const char*)(w2 + ahead + s * 32), _MM_HINT_T1);
      _mm_prefetch((const char*)(w3 + ahead + s * 32), _MM_HINT_T1);
      const __m512i v = load_pair(w0 + s * 32, w1 + s * 32), u = load_pair(w2 + s * 32, w3 + s * 32);
      const __m512i lo = _mm512_and_si512(v, m15), hi = _mm512_and_si512(_mm512_srli_epi32(v, 4), m15);
      const __m512i lo2 = _mm512_and_si512(u, m15), hi2 = _mm512_and_si512(_mm512_srli_epi32(u, 4), m15);
      const uint8_t* xp = xp0 + s * (kRowsZ * 8);
#define FXK_STEP(i)                                                                                    \
  if constexpr (i < MR) {                                                                              \
    const __m512i xl = _mm512_set1_epi32(load_i32(xp + i * 8)), xh = _mm512_set1_epi32(load_i32(xp + i * 8 + 4)); \
    a##i = dpbusd_in_place(a##i, lo, xl);                                                              \
    b##i = dpbusd_in_place(b##i, lo2, xl);                                                             \
    a##i = dpbusd_in_place(a##i, hi, xh);                                                              \
    b##i = dpbusd_in_place(b##i, hi2, xh);                                                             \
  }
      FXK_ROWS8(FXK_STEP)
#undef FXK_STEP
    }
    __m512i acc0[MR], acc1[MR];
#define FXK_GATHER(i)   \
  if constexpr (i < MR) { \
    acc0[i] = a##i;      \
    acc1[i] = b##i;      \
  }
    FXK_ROWS8(FXK_GATHER)
#undef FXK_GATHER
    pair_epilogue(a, t, g, m0, MR, (const int32_t*)acc0, yf0);
    pair_epilogue(a, t + 2, g, m0, MR, (const int32_t*)acc1, yf1);
  }
  pair_store(a, t, m0, MR, yf0);
  pair_store(a, t + 2, m0, MR, yf1);
}

FXK_VNNI512 void qa4_two_pairs_rows_z(const QaArgs& a, int64_t t, int64_t m0, int64_t mr, const uint8_t* xp,
                                      float* yf0, float* yf1) {
  switch (mr) {
    case 1: qa4_two_pairs_z<1>(a, t, m0, xp, yf0, yf1); break;
    case 2: qa4_two_pairs_z<2>(a, t, m0, xp, yf0, yf1); break;
    case 3: qa4_two_pairs_z<3>(a, t, m0, xp, yf0, yf1); break;
    case 4: qa4_two_pairs_z<4>(a, t, m0, xp, yf0, yf1); break;
    case 5: qa4_two_pairs_z<5>(a, t, m0, xp, yf0, yf1); break;
    case 6: qa4_two_pairs_z<6>(a, t, m0, xp, yf0, yf1); break;
    case 7: qa4_two_pairs_z<7>(a, t, m0, xp, yf0, yf1); break;
    default: qa4_two_pairs_z<8>(a, t, m0, xp, yf0, yf1); break;
  }
}

// qa8_block2 (NTL = 2) on 512-bit registers over a panel of the unsigned activations: a quad's
// two 16-byte column-pair blocks of both tiles, interleaved by 16-bit words within each tile's
// half (k..k+3 of each output row).
template <int MR>
FXK_VNNI512 void qa8_pair_z(const QaArgs& a, int64_t t, int64_t m0, const uint8_t* panel, float* yf) {
  const int64_t Kp = a.Kp, G = a.G, quads = Kp / G / 4;
  const int8_t* w0 = (const int8_t*)a.w + t * (Kp / 2) * 16;
  const int8_t* w1 = w0 + (Kp / 2) * 16;
  const __m512i interleave = _mm512_set_epi16(31, 23, 30, 22, 29, 21, 28, 20, 27, 19, 26, 18, 25, 17, 24, 16,
                                              15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
  for (int m = 0; m < MR; ++m) _mm512_store_ps(yf + m * 16, _mm512_setzero_ps());
  for (int64_t g = 0; g < G; ++g) {
#define FXK_ZERO(i) __m512i a##i = _mm512_setzero_si512();
    FXK_ROWS16(FXK_ZERO)
#undef FXK_ZERO
    for (int64_t q = g * quads; q < (g + 1) * quads; ++q) {
      prefetch_ahead(w0 + (2 * q) * 16);  // every quad: see qa4_pair_z
      prefetch_ahead(w1 + (2 * q) * 16);
      const __m512i w = _mm512_permutexvar_epi16(interleave, load_pair(w0 + (2 * q) * 16, w1 + (2 * q) * 16));
      const uint8_t* xp = panel + q * (kRowsZ * 4);
#define FXK_STEP(i) \
  if constexpr (i < MR) a##i = dpbusd_in_place(a##i, _mm512_set1_epi32(load_i32(xp + i * 4)), w);
      FXK_ROWS16(FXK_STEP)
#undef FXK_STEP
    }
    __m512i acc[MR];  // pair_epilogue removes the activations' +128
#define FXK_GATHER(i) \
  if constexpr (i < MR) acc[i] = a##i;
    FXK_ROWS16(FXK_GATHER)
#undef FXK_GATHER
    pair_epilogue(a, t, g, m0, MR, (const int32_t*)acc, yf);
  }
  pair_store(a, t, m0, MR, yf);
}

template <int MR>
FXK_VNNI512 void qa_pair_z(const QaArgs& a, int64_t t, int64_t m0, const uint8_t* panel, float* yf) {
  if (a.bits <= 4)
    qa4_pair_z<MR>(a, t, m0, panel, yf);
  else
    qa8_pair_z<MR>(a, t, m0, panel, yf);
}

FXK_VNNI512 void qa_rows_z(const QaArgs& a, int64_t t, int64_t m0, int64_t mr, const uint8_t* panel, float* yf) {
  switch (mr) {
    case 1: qa_pair_z<1>(a, t, m0, panel, yf); break;
    case 2: qa_pair_z<2>(a, t, m0, panel, yf); break;
    case 3: qa_pair_z<3>(a, t, m0, panel, yf); break;
    case 4: qa_pair_z<4>(a, t, m0, panel, yf); break;
    case 5: qa_pair_z<5>(a, t, m0, panel, yf); break;
    case 6: qa_pair_z<6>(a, t, m0, panel, yf); break;
    case 7: qa_pair_z<7>(a, t, m0, panel, yf); break;
    case 8: qa_pair_z<8>(a, t, m0, panel, yf); break;
    case 9: qa_pair_z<9>(a, t, m0, panel, yf); break;
    case 10: qa_pair_z<10>(a, t, m0, panel, yf); break;
    case 11: qa_pair_z<11>(a, t, m0, panel, yf); break;
    case 12: qa_pair_z<12>(a, t, m0, panel, yf); break;
    case 13: qa_pair_z<13>(a, t, m0, panel, yf); break;
    case 14: qa_pair_z<14>(a, t, m0, panel, yf); break;
    case 15: qa_pair_z<15>(a, t, m0, panel, yf); break;
    default: qa_pair_z<16>(a, t, m0, panel, yf); break;
  }
}

// Rows [b0, b1) over tile pairs from t while t + 2 <= t1, on the 512-bit kernels; returns the
// first tile left.
FXK_VNNI512 int64_t qa_pairs_z(const QaArgs& a, int64_t t, int64_t t1, int64_t b0, int64_t b1) {
  static thread_local std::vector<uint8_t> panels;
  alignas(64) float yf[kRowsZ * 16], yf1[8 * 16];
  const int64_t bytes = a.Kp * kRowsZ, blocks = (b1 - b0 + kRowsZ - 1) / kRowsZ;
  if (panels.size() < size_t(blocks * bytes)) panels.resize(blocks * bytes);
  for (int64_t i = 0; i < blocks; ++i)
    fill_panel(a, b0 + i * kRowsZ, imin(kRowsZ, b1 - b0 - i * kRowsZ), panels.data() + i * bytes);
  // INT4 with 8 rows or more: two pairs at a time, each 16-row block as two halves of <= 8 rows
  // (whole limb groups, as the limb counts divide 8)
  if (a.bits <= 4 && b1 - b0 >= 8)
    for (; t + 4 <= t1; t += 4)
      for (int64_t i = 0; i < blocks; ++i) {
        const int64_t rows = imin(kRowsZ, b1 - b0 - i * kRowsZ);
        for (int64_t h = 0; h < rows; h += 8)
          qa4_two_pairs_rows_z(a, t, b0 + i * kRowsZ + h, imin(8, rows - h), panels.data() + i * bytes + h * 8, yf,
                               yf1);
      }
  for (; t + 2 <= t1; t += 2)
    for (int64_t i = 0; i < blocks; ++i)
      qa_rows_z(a, t, b0 + i * kRowsZ, imin(kRowsZ, b1 - b0 - i * kRowsZ), panels.data() + i * bytes, yf);
  return t;
}

#endif

template <int NTL>
FXK_AVX2 void qa8_rows(const QaArgs& a, int64_t t, int64_t m0, int64_t mr) {
  switch (mr) {
    case 1: qa8_block<1, NTL>(a, t, m0); break;
    case 2: qa8_block<2, NTL>(a, t, m0); break;
    case 3: qa8_block<3, NTL>(a, t, m0); break;
    case 4: qa8_block<4, NTL>(a, t, m0); break;
    case 5: qa8_block<5, NTL>(a, t, m0); break;
    default: qa8_block<6, NTL>(a, t, m0); break;
  }
}

FXK_AVX2 void qa_rows(const QaArgs& a, int64_t t, int64_t m0, int64_t mr) {
  if (a.bits <= 4) {
    switch (mr) {
      case 1: qa4_block<1>(a, t, m0); break;
      case 2: qa4_block<2>(a, t, m0); break;
      case 3: qa4_block<3>(a, t, m0); break;
      default: qa4_block<4>(a, t, m0); break;
    }
  } else {
    qa8_rows<1>(a, t, m0, mr);
  }
}

}  // namespace

// Cache blocking: a block of activation rows (sized to stay in the 512 KiB L2 next to one
// weight tile) is swept over this thread's tiles; each 8-row weight tile is then reused from
// L1/L2 by every MR-row micro-block of that activation block.
static int64_t rows_per_block(int64_t row_bytes, int64_t mr) {
  int64_t mb = (192 * 1024) / (row_bytes > 0 ? row_bytes : 1);
  mb = mb / mr * mr;
  return mb < mr ? mr : mb;
}

#ifndef FXK_VNNI
FXK_AVX2 void dq_tiles_avx2(const DqArgs& a, int64_t t0, int64_t t1) {
  if (a.M == 1) {
    // per-group activation sums for the folded zero point (K adds, shared by all tiles)
    std::vector<float> xs(a.G);
    const int64_t gs = a.K / a.G;
    for (int64_t g = 0; g < a.G; ++g) {
      int64_t k = g * gs;
      __m256 v = _mm256_setzero_ps();
      for (; k + 8 <= (g + 1) * gs; k += 8) v = _mm256_add_ps(v, _mm256_loadu_ps(a.x + k));
      alignas(32) float l[8];
      _mm256_store_ps(l, v);
      float sum = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
      for (; k < (g + 1) * gs; ++k) sum += a.x[k];
      xs[g] = sum;
    }
    int64_t t = t0;
    for (; t + 2 <= t1; t += 2) {
      if (a.bits <= 4)
        dq_gemv2<true>(a, t, xs.data());
      else
        dq_gemv2<false>(a, t, xs.data());
    }
    for (; t < t1; ++t) {
      if (a.bits <= 4)
        dq_rows<true>(a, t, 0, 1);
      else
        dq_rows<false>(a, t, 0, 1);
    }
    return;
  }
  const int64_t mb = rows_per_block(a.K * 4, 6);
  for (int64_t b0 = 0; b0 < a.M; b0 += mb) {
    const int64_t b1 = imin(a.M, b0 + mb);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t m0 = b0; m0 < b1; m0 += 6) {
        if (a.bits <= 4)
          dq_rows<true>(a, t, m0, imin(6, b1 - m0));
        else
          dq_rows<false>(a, t, m0, imin(6, b1 - m0));
      }
  }
}

#endif  // !FXK_VNNI

#ifdef FXK_VNNI
bool qa_vnni512_rows(int64_t M, int64_t bits, bool xu8) {
  static const bool wide = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  return wide && M > 1 && (bits <= 4 || xu8);
}

FXK_AVX2 void qa_tiles_avx512vnni(const QaArgs& a, int64_t t0, int64_t t1) {
#else
FXK_AVX2 void qa_tiles_avx2(const QaArgs& a, int64_t t0, int64_t t1) {
#endif
  const int64_t mr = a.bits <= 4 ? 4 : 6;
  if (a.M == 1 && a.bits <= 4 && (a.Kp / a.G) % 32 == 0) {
    int64_t t = t0;
    for (; t + 2 <= t1; t += 2) qa4_gemv2(a, t);
    for (; t < t1; ++t) qa_rows(a, t, 0, 1);
    return;
  }
  // rows per M block: their activations (1 byte per column as int8/uint8, 2 as int16) stay in L2
  // while each weight tile (pair) sweeps over them
  const bool bytes1 = a.bits <= 4 || a.xu8;
#ifdef FXK_VNNI
  // a multiple of both micro-block heights, and of the limb counts whose sums the 512-bit store fuses
  const int64_t mb = rows_per_block(a.Kp * (bytes1 ? 1 : 2), 48);
#else
  const int64_t mb = rows_per_block(a.Kp * (bytes1 ? 1 : 2), 12);
#endif
  for (int64_t b0 = 0; b0 < a.M; b0 += mb) {
    const int64_t b1 = imin(a.M, b0 + mb);
    int64_t t = t0;
#ifdef FXK_VNNI
    if (qa_vnni512_rows(a.M, a.bits, a.xu8 != nullptr))  // 512-bit tile pairs (see qa4_pair_z / qa8_pair_z)
      t = qa_pairs_z(a, t, t1, b0, b1);
    if (a.bits <= 4 || a.xu8)  // vpdpbusd tile pairs (see qa4_block2 / qa8_block2)
      for (; t + 2 <= t1; t += 2)
        for (int64_t m0 = b0; m0 < b1; m0 += kRows2) qa_rows_vnni<2>(a, t, m0, imin(kRows2, b1 - m0));
    if (a.xu8)  // W8's odd last tile stays on vpdpbusd (no int16 activations on this path)
      for (; t < t1; ++t)
        for (int64_t m0 = b0; m0 < b1; m0 += kRows2) qa_rows_vnni<1>(a, t, m0, imin(kRows2, b1 - m0));
#endif
    if (a.bits > 4)  // W8A8: tile pairs share each activation broadcast (see qa8_block)
      for (; t + 2 <= t1; t += 2)
        for (int64_t m0 = b0; m0 < b1; m0 += mr) qa8_rows<2>(a, t, m0, imin(mr, b1 - m0));
    for (; t < t1; ++t)
      for (int64_t m0 = b0; m0 < b1; m0 += mr) qa_rows(a, t, m0, imin(mr, b1 - m0));
  }
}

// ------------------------------------------------------------------------------------------
// Activation quantization, bit-exact with the reference: fp32 multiply by the fp32 reciprocal,
// round half to even (vroundps with the default MXCSR mode, same as rint), add the zero, clamp.
// ------------------------------------------------------------------------------------------
#ifndef FXK_VNNI
FXK_AVX2 void quant_rows_avx2(const float* x, int64_t K, const float* inv, const int32_t* z, int8_t* xq,
                              int64_t r0, int64_t r1) {
  const __m256 lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * K;
    int8_t* qr = xq + r * K;
    const float fi = inv[r];
    const float fz = (float)z[r];
    const __m256 vi = _mm256_set1_ps(fi), vz = _mm256_set1_ps(fz);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m256i q[4];
      for (int j = 0; j < 4; ++j) {
        __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8 * j), vi),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vz), lo), hi);
        q[j] = _mm256_cvtps_epi32(v);
      }
      // packs work per 128-bit lane; the final dword permutation restores k order.
      __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
      _mm256_storeu_si256((__m256i*)(qr + k), _mm256_permutevar8x32_epi32(p, perm));
    }
    for (; k < K; ++k) {
      float v = __builtin_nearbyintf(xr[k] * fi) + fz;
      v = v < -128.f ? -128.f : (v > 127.f ? 127.f : v);
      qr[k] = (int8_t)(int)v;
    }
  }
}

// Fixed-point split of fp32 rows for the weight-only path on integer units (see limb_linear in
// kernels.cpp): x[r, k] * 2^e = sum_l d[r*L + l][k] * 256^l exactly up to one rounding to an integer,
// with balanced int8 digits d in [-128, 127]. e puts the row's largest |x| in [2^(8L-3), 2^(8L-2)),
// so the top digit stays within +-65 and every value keeps ~(8L-2) significant bits relative to
// the row's maximum. The scaling is done as two power-of-two multiplies (each exact) so that
// neither factor overflows float. Writes fac[r*L + l] = 2^(8l - e); ok[r] = 0 marks rows that are
// not finite or too small for fac to stay a normal float (the caller computes those another way).
// With `wide`, wide[r] = 1 marks the rows whose rounding bound, half a step per value, exceeds in
// L2 norm the one bf16 storage of the row has (2^-8 |x| per value): sqrt(K) / 2 > 2^-8 ||x 2^e||,
// i.e. the scaled row's sum of squares is below K * 2^14 (with 2 digits: the largest |x| is more
// than ~64-128x the row's RMS). Those rows need more digits (kAutoLimbs).
FXK_AVX2 void limb_split_avx2(const float* x, int64_t K, int L, int8_t* d, float* fac, uint8_t* ok,
                              int64_t r0, int64_t r1, uint8_t* wide) {
  const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * K;
    __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 a = _mm256_and_ps(_mm256_loadu_ps(xr + k), absm);
      vmax = _mm256_max_ps(vmax, a);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));  // NaN
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, vmax);
    float amax = 0.f;
    for (int j = 0; j < 8; ++j) amax = t[j] > amax ? t[j] : amax;
    bool finite = _mm256_movemask_ps(bad) == 0;
    for (; k < K; ++k) {
      const float a = xr[k] < 0 ? -xr[k] : xr[k];
      finite = finite && a == a;
      amax = a > amax ? a : amax;
    }
    finite = finite && amax <= 3.4028235e38f;
    int e = 0;
    if (amax > 0.f) e = (8 * L - 3) - __builtin_ilogbf(amax);
    ok[r] = finite && e <= 90;
    int8_t* dr = d + r * L * K;
    if (wide) wide[r] = 0;
    if (!ok[r]) {
      std::memset(dr, 0, (size_t)(L * K));
      for (int l = 0; l < L; ++l) fac[r * L + l] = 1.f;
      continue;
    }
    const int e1 = e / 2, e2 = e - e1;
    const float f1 = __builtin_ldexpf(1.f, e1), f2 = __builtin_ldexpf(1.f, e2);
    const __m256 v1 = _mm256_set1_ps(f1), v2 = _mm256_set1_ps(f2);
    for (int l = 0; l < L; ++l) fac[r * L + l] = __builtin_ldexpf(1.f, 8 * l - e);
    __m256 vss = _mm256_setzero_ps();  // with `wide`: the scaled row's sum of squares (|x 2^e| < 2^(8L-2))
    for (k = 0; k + 8 <= K; k += 8) {
      const __m256 xs = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), v1), v2);
      if (wide) vss = _mm256_fmadd_ps(xs, xs, vss);
      // cvtps rounds half to even (default MXCSR), like nearbyint in the tail below
      __m256i xi = _mm256_cvtps_epi32(xs);
      for (int l = 0; l < L; ++l) {
        const __m256i dl = _mm256_srai_epi32(_mm256_slli_epi32(xi, 24), 24);  // low byte, signed
        xi = _mm256_srai_epi32(_mm256_sub_epi32(xi, dl), 8);                  // exact: divisible by 256
        const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(dl), _mm256_extracti128_si256(dl, 1));
        _mm_storel_epi64((__m128i*)(dr + l * K + k), _mm_packs_epi16(p16, p16));
      }
    }
    alignas(32) float sq[8];
    _mm256_store_ps(sq, vss);
    double ss = 0;
    for (int j = 0; j < 8; ++j) ss += sq[j];
    for (; k < K; ++k) {
      const float xs = (xr[k] * f1) * f2;
      if (wide) ss += (double)xs * xs;
      int32_t xi = (int32_t)__builtin_nearbyintf(xs);
      for (int l = 0; l < L; ++l) {
        const int8_t dl = (int8_t)(uint8_t)(xi & 0xff);
        dr[l * K + k] = dl;
        xi = (xi - dl) >> 8;
      }
    }
    if (wide) wide[r] = ss < (double)K * 16384.0;
  }
}

FXK_AVX2 void minmax_rows_avx2(const float* x, int64_t K, float* mn, float* mx, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * K;
    int64_t k = 0;
    float lo = 0.f, hi = 0.f;  // the grid always contains 0, so starting from 0 is exact
    if (K >= 8) {
      __m256 vl = _mm256_loadu_ps(xr), vh = vl;
      for (k = 8; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(xr + k);
        vl = _mm256_min_ps(vl, v);
        vh = _mm256_max_ps(vh, v);
      }
      alignas(32) float tl[8], th[8];
      _mm256_store_ps(tl, vl);
      _mm256_store_ps(th, vh);
      for (int j = 0; j < 8; ++j) {
        lo = tl[j] < lo ? tl[j] : lo;
        hi = th[j] > hi ? th[j] : hi;
      }
    }
    for (; k < K; ++k) {
      lo = xr[k] < lo ? xr[k] : lo;
      hi = xr[k] > hi ? xr[k] : hi;
    }
    mn[r] = lo;
    mx[r] = hi;
  }
}

#endif  // !FXK_VNNI
}  // namespace fxk

#ifndef FXK_VNNI
namespace fxk {
// Memory read-bandwidth probe: XOR-reduce every 32-byte line of [p, p + n). Eight independent
// loads per iteration and no arithmetic dependency on the data keep the core out of the way,
// so the time is set by DRAM, unlike torch.sum whose fp32 reduction is compute-limited here.
FXK_AVX2 uint64_t read_probe_avx2(const uint8_t* p, int64_t n) {
  __m256i a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 256 <= n; i += 256)
    for (int j = 0; j < 8; ++j) a[j] = _mm256_xor_si256(a[j], _mm256_loadu_si256((const __m256i*)(p + i + 32 * j)));
  for (int j = 1; j < 8; ++j) a[0] = _mm256_xor_si256(a[0], a[j]);
  alignas(32) uint64_t t[4];
  _mm256_store_si256((__m256i*)t, a[0]);
  uint64_t r = t[0] ^ t[1] ^ t[2] ^ t[3];
  for (; i < n; ++i) r ^= p[i];
  return r;
}
}  // namespace fxk
#endif  // !FXK_VNNI
