// Raw-pointer kernel interfaces shared by the torch-facing driver (kernels.cpp) and the
// per-ISA implementations (kernels_avx2.cpp, kernels_avx512vnni.cpp; the portable scalar loops are
// in kernels.cpp).
//
// The AVX2 translation unit includes no torch header: every function in it carries
// __attribute__((target("avx2,fma,f16c"))) and has internal linkage except the entry points
// below, so no inline function of a shared header can be emitted with AVX2 code and picked by
// the linker for a caller on an older CPU. The driver only calls the *_avx2 entry points after
// checking cpu_features().
#pragma once
#include <cstdint>

namespace fxk {

// ---- repacked layouts (built once per weight at load, see kernels.cpp) --------------------
// NT = ceil(N / 8) tiles of 8 output rows; rows past N are zero-padded.
//
// Weight-only ("dq") layouts, rows in SIMD lanes so one widening load gives one k for 8 rows:
//   bits <= 4: uint8 [NT][K/2][8]   byte = code(k=2p) | code(k=2p+1) << 4   (requires G == 1 or
//              an even group size)
//   bits  > 4: int8  [NT][K][8]     stored code (q - 128)
// Integer-activation ("qa") layouts, built for vpmaddubsw / vpmaddwd pairing along k:
//   bits <= 4: uint8 [NT][Kp/8][8][4]  the row's original 4 bytes (8 nibbles) of that k-block;
//              Kp = K rounded up to 8 (zero codes), requires G == 1 or group size % 8 == 0
//   bits  > 4: int8  [NT][Kp/2][8][2]  stored codes of k, k+1; Kp = K rounded up to 2
// Per-group metadata, rows in lanes: zc int32 [NT][G][8] (zero in the stored-code domain),
// sc float [NT][G][8] (scale), ws int32 [NT][G][8] (sum of stored codes, qa only).

struct DqArgs {
  const uint8_t* w;      // dq layout
  const int32_t* zc;     // [NT][G][8]
  const float* sc;       // [NT][G][8]
  const float* x;        // [M][K] fp32, row stride K
  const float* bias;     // [N] or nullptr
  float* y;              // [M][N] fp32
  int64_t M, N, K, G;
  int bits;
};

struct QaArgs {
  const uint8_t* w;      // qa layout
  const int32_t* zc;     // [NT][G][8]
  const int32_t* ws;     // [NT][G][8]
  const float* sc;       // [NT][G][8]
  const int8_t* x8;      // bits <= 4: [M][Kp] codes, each 8-block permuted to k order 0,2,4,6,1,3,5,7
  const int16_t* x16;    // bits  > 4: [M][Kp] codes widened to int16
  const int32_t* xc;     // [M][G]  sum_{k in g} xq - Kg * za
  const float* sa;       // [M]
  const int32_t* za;     // [M]
  const float* bias;     // [N] or nullptr
  float* y;              // [M][N] fp32
  int64_t M, N, Kp, G, Kg;  // Kg: real columns per group (Kp/G unless K was padded, G == 1)
  int bits;
  // bits > 4 on the VNNI path only (else nullptr, and then x16 is used): [M][Kp] activation codes
  // + 128 as uint8, vpdpbusd's unsigned operand (the kernel subtracts 128 * ws afterwards); needs
  // Kp/G % 4 == 0. When set, x16 is not filled.
  const uint8_t* xu8 = nullptr;
  // Row stride of x8 / x16 / xu8 in elements (>= Kp): an odd number of 64-byte lines, so the rows
  // a micro-kernel reads together fall in different L1 sets (see act_row_stride in kernels.cpp).
  int64_t xs = 0;
  // > 1 (AMX and 512-bit VNNI tile-pair kernels only): the M rows are groups of `limbs` int8 digit rows of one fp32 row, least
  // significant first (limb_linear in kernels.cpp); y is then [M / limbs][N], each output the sum of
  // its group's scaled products, most significant first, plus the bias: limb_linear's own order,
  // so the result is bit-identical to summing the rows' outputs afterwards.
  int limbs = 1;
};

// Rows per pass of the AMX kernel (two 16-row tiles); a multiple of the limb counts it fuses.
constexpr int64_t kAmxPassRows = 32;
// Rows per micro-block of the 512-bit VNNI kernels; a multiple of the limb counts they fuse.
constexpr int64_t kVnni512Rows = 16;

// Tiles [t0, t1) of 8 output rows, all M rows of the input.
void dq_tiles_avx2(const DqArgs& a, int64_t t0, int64_t t1);
void qa_tiles_avx2(const QaArgs& a, int64_t t0, int64_t t1);
// The same with vpdpbusd for bits <= 4, and for bits > 4 when xu8 is given (needs
// AVX512F+VL+VNNI; kernels_avx512vnni.cpp).
void qa_tiles_avx512vnni(const QaArgs& a, int64_t t0, int64_t t1);
// Whether qa_tiles_avx512vnni runs M rows of tile pairs on 512-bit registers (several rows, INT4
// or INT8 with unsigned activations xu8, a CPU with AVX-512 BW): then a.limbs > 1 is allowed, with
// tile ranges of whole pairs.
bool qa_vnni512_rows(int64_t M, int64_t bits, bool xu8);

// Row-wise int8 activation quantization of rows [r0, r1): xq = clamp(rint(x * inv) + z).
void quant_rows_avx2(const float* x, int64_t K, const float* inv, const int32_t* z, int8_t* xq,
                     int64_t r0, int64_t r1);
// Per-row min and max (for the dynamic grid) of rows [r0, r1).
void minmax_rows_avx2(const float* x, int64_t K, float* mn, float* mx, int64_t r0, int64_t r1);

// Rows [r0, r1) of fp32 x [M][K] as L balanced int8 digits of a per-row fixed-point value:
// d [M*L][K] and fac [M*L] with x[r, k] ~= sum_l d[r*L + l][k] * fac[r*L + l]; ok[r] = 0 for rows
// that are not finite or too small; with `wide`, wide[r] = 1 for the rows whose L digits round
// coarser than bf16 would (see kernels_avx2.cpp).
void limb_split_avx2(const float* x, int64_t K, int L, int8_t* d, float* fac, uint8_t* ok, int64_t r0, int64_t r1,
                     uint8_t* wide = nullptr);

// Tile pairs (t, t + 1), (t + 2, t + 3), ... in [t0, t1) on AMX tiles, all M rows; needs
// Kp / G % 64 == 0 (whole 64-column tiles per group), and for bits > 4 the unsigned activations
// xu8. Bit-identical to qa_tiles_avx512vnni.
void qa_pairs_amx(const QaArgs& a, int64_t t0, int64_t t1);

// XOR fold of the bytes as 64-bit words (a DRAM read-bandwidth probe for the benchmarks).
uint64_t read_probe_avx2(const uint8_t* p, int64_t n);

}  // namespace fxk
