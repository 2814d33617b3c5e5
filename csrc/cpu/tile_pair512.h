// A tile pair (tiles t and t + 1 of the qa layout, 16 output rows) in one 512-bit register: the
// loads, the epilogue and the output store shared by the kernels that hold whole pairs that way,
// the AMX tile kernel (kernels_amx.cpp) and the 512-bit VNNI kernels (kernels_avx2.cpp). Per lane
// they do what the 256-bit qa_epilogue / qa_store do per tile, so every route gives the same floats.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

// always inlined: in the 512-bit VNNI kernels the row count is then a constant and the loops unroll
#define FXK_PAIR512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl"), always_inline))

namespace fxk {
namespace {

// 32 bytes at p0 (tile t) and 32 at p1 (tile t + 1) as one register, t in the low half.
FXK_PAIR512 inline __m512i load_pair(const void* p0, const void* p1) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)p0)),
                            _mm256_loadu_si256((const __m256i*)p1), 1);
}

// yf[m][0..15] += scale * (sum - zero corrections) for rows [m0, m0 + rows) of group g, from the
// int32 sums acc[m][0..15] (64-byte aligned rows; output rows of tiles t and t + 1 side by side).
// On the INT8 path the activations carry +128 (vpdpbusd's unsigned operand), removed here.
FXK_PAIR512 inline void pair_epilogue(const QaArgs& a, int64_t t, int64_t g, int64_t m0, int64_t rows,
                                      const int32_t* acc, float* yf) {
  const int64_t at0 = (t * a.G + g) * 8, at1 = ((t + 1) * a.G + g) * 8;
  const __m512i zc = load_pair(a.zc + at0, a.zc + at1), ws = load_pair(a.ws + at0, a.ws + at1);
  const __m512 sc = _mm512_castsi512_ps(load_pair(a.sc + at0, a.sc + at1));
  const __m512i plus128 = a.bits > 4 ? _mm512_slli_epi32(ws, 7) : _mm512_setzero_si512();
  for (int64_t m = 0; m < rows; ++m) {
    const int32_t za = a.za[m0 + m];  // 0 on every limb row: its product is skipped, the sum is the same
    __m512i corr = _mm512_mullo_epi32(zc, _mm512_set1_epi32(a.xc[(m0 + m) * a.G + g]));
    if (za) corr = _mm512_add_epi32(corr, _mm512_mullo_epi32(_mm512_set1_epi32(za), ws));
    const __m512i ex = _mm512_sub_epi32(_mm512_sub_epi32(_mm512_load_si512((const __m512i*)(acc + m * 16)), plus128),
                                        corr);
    float* f = yf + m * 16;
    _mm512_store_ps(f, _mm512_fmadd_ps(_mm512_cvtepi32_ps(ex), sc, _mm512_load_ps(f)));
  }
}

// y = yf * sa + bias for rows [m0, m0 + rows), output rows of tiles t and t + 1 (tile t + 1 may end
// past N: those lanes are not stored). With a.limbs = L > 1 each group of L rows is one fp32 row's
// limbs, least significant first: its output is their scaled sums added most significant first,
// then the bias, as limb_linear adds the rows' separate outputs (the same floats to the bit).
FXK_PAIR512 inline void pair_store(const QaArgs& a, int64_t t, int64_t m0, int64_t rows, const float* yf) {
  const int64_t n0 = t * 8;
  const __mmask16 valid = a.N - n0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (a.N - n0)) - 1);
  const __m512 b = a.bias ? _mm512_maskz_loadu_ps(valid, a.bias + n0) : _mm512_setzero_ps();
  const int L = a.limbs;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t m = 0; m < rows; m += L) {
    __m512 v;
    if (L == 1) {
      v = _mm512_fmadd_ps(_mm512_load_ps(yf + m * 16), _mm512_set1_ps(a.sa[m0 + m]), b);
    } else {
      v = _mm512_fmadd_ps(_mm512_load_ps(yf + (m + L - 1) * 16), _mm512_set1_ps(a.sa[m0 + m + L - 1]), zero);
      for (int l = L - 2; l >= 0; --l)
        v = _mm512_add_ps(v, _mm512_fmadd_ps(_mm512_load_ps(yf + (m + l) * 16), _mm512_set1_ps(a.sa[m0 + m + l]), zero));
      if (a.bias) v = _mm512_add_ps(v, b);
    }
    _mm512_mask_storeu_ps(a.y + ((m0 + m) / L) * a.N + n0, valid, v);
  }
}

}  // namespace
}  // namespace fxk
