// fxkernels CUDA INT8 GEMM: tile configurations, index arithmetic and epilogue math.
//
// Everything here is plain C++ usable from host code (the host-side checks in host_check.cpp
// evaluate the same functions the kernels run, on CPU data) and from device code. No CUDA or
// torch headers: the .cu files compile stand-alone with `nvcc -cubin`.
//
// Problem: C[M, N] = epilogue( A[M, K] . B[N, K]^T ), A and B int8, both K-contiguous ("TN"),
// which is exactly the operand order mma.sync.m16n8k32.row.col wants: A row-major and B
// "column-major" (k fastest within each output column n), so no transposes anywhere.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FXK_HD __host__ __device__ __forceinline__
#else
#define FXK_HD inline
#endif

namespace fxk {

// ---------------------------------------------------------------------------------------------
// Output kinds of the GEMM (the epilogue is skipped for kOutI32: raw int32 accumulators).
enum OutKind : int { kOutI32 = 0, kOutF32 = 1, kOutF16 = 2, kOutBF16 = 3 };

// ---------------------------------------------------------------------------------------------
// Tile configurations. A CTA computes a BM x BN tile of C; its warps form a WARPS_M x WARPS_N
// grid, each warp a WM x WN sub-tile made of (WM/16) x (WN/8) mma.m16n8k32 tiles. K advances in
// BK-byte slices staged through shared memory by a STAGES-deep cp.async ring.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct TileConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MT = WM / 16;      // mma tiles along M per warp
  static constexpr int NT = WN / 8;       // mma tiles along N per warp
  static constexpr int CPR = BK / 16;     // 16-byte chunks per smem row (one cp.async each)
  static constexpr int KSTEPS = BK / 32;  // mma k-steps per stage
  static constexpr int A_STAGE_BYTES = BM * BK;
  static constexpr int B_STAGE_BYTES = BN * BK;
  static constexpr int STAGE_BYTES = A_STAGE_BYTES + B_STAGE_BYTES;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES;
  static constexpr int A_CHUNKS = BM * CPR, B_CHUNKS = BN * CPR;
  static constexpr int GROUP_M = 8;       // CTA rasterization: 8 M-tiles share each B panel in L2

  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must hold whole m16 tiles and pairs of n8 tiles");
  static_assert(BK % 32 == 0, "BK must be a multiple of the mma k (32 int8)");
  static_assert(CPR == 2 || CPR == 4 || CPR == 8, "swizzle defined for 32/64/128-byte rows");
  static_assert(STAGES >= 2, "need at least double buffering");
};

// The configurations compiled into the extension; the index is the `config` argument of the
// launcher (and of the host simulator). Keep in sync with kConfigNames.
//   0 "s16x32":  decode / tiny M (M <= 16). Two warps per CTA so a 4096-wide N gives 128 CTAs
//                (enough to keep all SMs streaming the weight, which is what bounds M = 1).
//   1 "m64x64":  M up to a few hundred: 64x64 tiles keep the SMs busy when M*N is small.
//   2 "l128x128": large M, 4 warps with 64x64 warp tiles (2 CTAs/SM).
//   3 "l128x256": large M, 8 warps with 64x64 warp tiles; better B reuse, 1 CTA/SM.
using Cfg0 = TileConfig<16, 32, 128, 1, 2, 6, 4>;
using Cfg1 = TileConfig<64, 64, 64, 2, 2, 4, 3>;
using Cfg2 = TileConfig<128, 128, 64, 2, 2, 4, 2>;
using Cfg3 = TileConfig<128, 256, 64, 2, 4, 3, 1>;
constexpr int kNumConfigs = 4;

// ---------------------------------------------------------------------------------------------
// CTA rasterization: linear block id -> (tile_m, tile_n). Consecutive CTAs walk down a column
// of up to GROUP_M M-tiles before moving to the next N-tile, so the B (weight) panel of a
// column and the A panels of the group stay resident in L2 while they are reused.
struct TileCoord {
  int tm, tn;
};

FXK_HD TileCoord tile_coords(int bid, int grid_m, int grid_n, int group_m) {
  const int width = group_m * grid_n;  // CTAs per group of GROUP_M tile rows
  const int group = bid / width;
  const int first_m = group * group_m;
  const int rows = (grid_m - first_m) < group_m ? (grid_m - first_m) : group_m;
  const int in_group = bid - group * width;
  TileCoord t;
  t.tm = first_m + in_group % rows;
  t.tn = in_group / rows;
  return t;
}

// ---------------------------------------------------------------------------------------------
// Shared-memory layout of one operand stage: `rows` rows of BK bytes, stored as CPR 16-byte
// chunks. ldmatrix makes 8 lanes read the same logical chunk of 8 consecutive rows at once; with
// a plain layout those 8 addresses are a multiple of 64 or 128 bytes apart and hit the same
// banks (8-way conflict). XOR-ing the chunk index with the row's position inside its 128-byte
// group of rows spreads the 8 reads over all 32 banks; the same permutation on the cp.async
// store side keeps the writes conflict-free too.
template <int CPR>
FXK_HD int swizzled_offset(int row, int chunk) {
  // rows per 128-byte line: 8 / CPR (1 for 128-byte rows). The line index (mod CPR) is the mask.
  constexpr int rows_per_line = (8 / CPR) > 0 ? (8 / CPR) : 1;
  const int mask = (row / rows_per_line) % CPR;
  return row * (CPR * 16) + ((chunk ^ mask) * 16);
}

// Which (row, chunk) of an operand tile the i-th 16-byte copy of a stage fills.
template <int CPR>
FXK_HD void copy_chunk_coord(int i, int& row, int& chunk) {
  row = i / CPR;
  chunk = i % CPR;
}

// ldmatrix.x4 address of `lane` for the A fragment of one m16 x k32 mma tile (rows r0..r0+15,
// k-step ks). Matrices 0..3 of the x4 load are (rows 0-7, k 0-15), (rows 8-15, k 0-15),
// (rows 0-7, k 16-31), (rows 8-15, k 16-31), which puts them in registers a0..a3 in exactly the
// order mma.m16n8k32 expects (a0/a2: row g, a1/a3: row g+8; a2/a3 the upper 16 k).
FXK_HD void ldsm_a_coord(int lane, int r0, int ks, int& row, int& chunk) {
  row = r0 + (lane & 15);
  chunk = ks * 2 + (lane >> 4);
}

// ldmatrix.x4 address of `lane` for the B fragments of two neighbouring n8 tiles (columns
// n0..n0+15). Matrices: (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31):
// registers r0,r1 are b0,b1 of the first n8 tile and r2,r3 of the second.
FXK_HD void ldsm_b_coord(int lane, int n0, int ks, int& row, int& chunk) {
  row = n0 + (lane & 7) + ((lane >> 4) << 3);
  chunk = ks * 2 + ((lane >> 3) & 1);
}

// Accumulator element e (0..3) of `lane` in an m16n8 tile: (row, col) inside the tile.
FXK_HD void acc_coord(int lane, int e, int& row, int& col) {
  row = (lane >> 2) + ((e >> 1) << 3);
  col = ((lane & 3) << 1) + (e & 1);
}

// ---------------------------------------------------------------------------------------------
// Epilogue math. With activation codes xq (zero za) and stored weight codes c (zero zs, the
// unsigned zero minus the storage offset 128):
//   sum_k (xq - za)(c - zs) = acc - za * wsum - zs * xsum + K * za * zs,
// acc = sum_k xq*c from the tensor cores, wsum = sum_k c (precomputed at load), xsum = sum_k xq.
// Every term is computed modulo 2^32 (unsigned arithmetic: no UB on intermediate overflow); the
// result is exact whenever the true value fits int32, i.e. |K| * 255 * 255 < 2^31 (K <= 32768).
FXK_HD int32_t corrected_acc(int32_t acc, int32_t za, int32_t xsum, int32_t zs, int32_t wsum, int32_t k) {
  uint32_t v = (uint32_t)acc;
  v -= (uint32_t)za * (uint32_t)wsum;
  v -= (uint32_t)zs * (uint32_t)xsum;
  v += (uint32_t)k * (uint32_t)za * (uint32_t)zs;
  return (int32_t)v;
}

// y = (float(v) * sw) * sa + bias, each step rounded to nearest fp32 (no FMA contraction), the
// same order as fxkernels.reference.qact_linear (acc * s[n], then * sa[m], then + bias).
FXK_HD float epilogue_value(int32_t v, float sa, float sw, float bias) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(__fmul_rn(__int2float_rn(v), sw), sa), bias);
#else
  volatile float t = (float)v * sw;  // volatile: keep the host compiler from fusing or reordering
  volatile float u = t * sa;
  return u + bias;
#endif
}

// ---------------------------------------------------------------------------------------------
// Activation quantization, the reference rule bit for bit:
//   dynamic: lo = min(min x, 0), hi = max(max x, 0), s = (hi - lo) / 255 (1 if s is not > 0),
//            z = clamp(rint(-128 - lo / s), -128, 127)
//   both:    q = clamp(rint(x * fp32(1 / s)) + z, -128, 127)
// every operation an IEEE fp32 op rounded to nearest even (explicit _rn intrinsics on device).
FXK_HD void act_qparams(float lo, float hi, float& scale, int32_t& zero) {
  lo = lo < 0.f ? lo : 0.f;
  hi = hi > 0.f ? hi : 0.f;
#if defined(__CUDA_ARCH__)
  float s = __fdiv_rn(__fsub_rn(hi, lo), 255.f);
  if (!(s > 0.f)) s = 1.f;
  float z = rintf(__fsub_rn(-128.f, __fdiv_rn(lo, s)));
#else
  volatile float d = hi - lo;
  float s = d / 255.f;
  if (!(s > 0.f)) s = 1.f;
  volatile float q = lo / s;
  volatile float w = -128.f - q;
  float z = __builtin_rintf(w);
#endif
  z = z < -128.f ? -128.f : (z > 127.f ? 127.f : z);
  scale = s;
  zero = (int32_t)z;
}

FXK_HD float act_inv_scale(float scale) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(scale);
#else
  volatile float one = 1.f;
  return one / scale;
#endif
}

FXK_HD int8_t act_quantize(float x, float inv, int32_t zero) {
#if defined(__CUDA_ARCH__)
  float r = __fadd_rn(rintf(__fmul_rn(x, inv)), (float)zero);
#else
  volatile float p = x * inv;
  volatile float r0 = __builtin_rintf(p);
  volatile float r = r0 + (float)zero;
#endif
  float c = r < -128.f ? -128.f : (r > 127.f ? 127.f : r);
  return (int8_t)(int)c;
}

}  // namespace fxk

// ---------------------------------------------------------------------------------------------
// Launcher interface (implemented in int8_gemm.cu / quantize_act.cu, called by
// csrc/bindings_cuda.cpp). Plain pointers and ints only, so the host C++ side never needs CUDA
// headers and the stream travels as an integer handle.
namespace fxk {

struct GemmArgs {
  const int8_t* a;       // [M, K] int8 activation codes, row-major, 16-byte aligned
  const int8_t* b;       // [N, K] int8 weight codes (q - 128), row-major, 16-byte aligned
  void* c;               // [M, N] row-major output of kind OutKind
  int m, n, k;
  // Epilogue operands (ignored for kOutI32). Per-row / per-column vectors; a stride of 0
  // broadcasts element 0 (per-tensor). Null za / w_zero / wsum / bias mean zero.
  const float* x_scale; int x_scale_stride;    // sa [M]
  const int32_t* x_zero; int x_zero_stride;    // za [M] (signed domain)
  const float* w_scale; int w_scale_stride;    // sw [N]
  const int32_t* w_zero; int w_zero_stride;    // unsigned-domain zero [N]; zs = w_zero - zero_offset
  int zero_offset;                             // 128 for int8 storage
  const int32_t* wsum; int wsum_stride;        // sum_k c [N]
  const float* bias;                           // [N] fp32 or null
};

// Returns 0 (cudaSuccess) or a cudaError_t value; -1 for an unknown config/out kind.
int launch_int8_gemm(const GemmArgs& args, int config, int out_kind, bool need_xsum, int64_t stream);
// Heuristic tile choice for an M x N problem on a GPU with `num_sms` SMs.
int pick_config(int m, int n, int num_sms);
// dtype: 0 fp32, 1 fp16, 2 bf16. static_scale/static_zero null -> dynamic per-token.
int launch_quantize_act(const void* x, int dtype, int m, int k, int8_t* xq, float* scale_out,
                        int32_t* zero_out, const float* static_scale, const int32_t* static_zero,
                        int64_t stream);
const char* config_name(int config);

}  // namespace fxk
