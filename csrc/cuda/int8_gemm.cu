// INT8 x INT8 -> INT32 tensor-core GEMM (mma.sync.m16n8k32.s8, sm_80 and later) with a fused
// dequantization epilogue. See fxk_gemm.h for the tile configurations and the index helpers
// shared with the host-side checks.
//
// Data flow per CTA: global --cp.async (16 B, L1 bypass)--> swizzled smem ring of STAGES
// K-slices --ldmatrix.x4--> registers --mma.sync--> int32 accumulators --epilogue--> C.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fxk_gemm.h"

namespace fxk {
namespace {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async.cg copies 16 bytes global->shared without staging through registers and without
// allocating in L1 (every byte is consumed once per CTA from smem). src-size 0 zero-fills the
// destination: rows past M/N and the K tail read as zeros, so the mma loop needs no bounds checks.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// One ldmatrix.x4 moves four 8x16-byte sub-tiles into the exact register fragment layout of
// mma.m16n8k32 (see ldsm_a_coord / ldsm_b_coord): one shared-memory instruction per 512 bytes
// instead of sixteen 4-byte loads per lane.
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int OUT>
struct OutT;
template <> struct OutT<kOutI32> { using T = int32_t; };
template <> struct OutT<kOutF32> { using T = float; };
template <> struct OutT<kOutF16> { using T = __half; };
template <> struct OutT<kOutBF16> { using T = __nv_bfloat16; };

// Stores two horizontally adjacent outputs; one 4/8-byte store when both exist and are aligned.
template <int OUT>
__device__ __forceinline__ void store_pair(void* base, size_t idx, bool pair, bool second, float v0, float v1,
                                           int32_t i0, int32_t i1) {
  if constexpr (OUT == kOutI32) {
    int32_t* p = static_cast<int32_t*>(base) + idx;
    if (pair) { *reinterpret_cast<int2*>(p) = make_int2(i0, i1); }
    else { p[0] = i0; if (second) p[1] = i1; }
  } else if constexpr (OUT == kOutF32) {
    float* p = static_cast<float*>(base) + idx;
    if (pair) { *reinterpret_cast<float2*>(p) = make_float2(v0, v1); }
    else { p[0] = v0; if (second) p[1] = v1; }
  } else if constexpr (OUT == kOutF16) {
    __half* p = static_cast<__half*>(base) + idx;
    if (pair) { *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1); }
    else { p[0] = __float2half_rn(v0); if (second) p[1] = __float2half_rn(v1); }
  } else {
    __nv_bfloat16* p = static_cast<__nv_bfloat16*>(base) + idx;
    if (pair) { *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1); }
    else { p[0] = __float2bfloat16_rn(v0); if (second) p[1] = __float2bfloat16_rn(v1); }
  }
}

template <class Cfg, int OUT, bool XSUM>
__global__ void __launch_bounds__(Cfg::THREADS, Cfg::MIN_BLOCKS) int8_gemm_kernel(const GemmArgs p) {
  extern __shared__ __align__(128) uint8_t smem[];
  // Activation row sums for the zero-point correction, exchanged between the warps of a row.
  __shared__ int32_t s_xsum[XSUM ? Cfg::BM : 1];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int grid_m = (p.m + Cfg::BM - 1) / Cfg::BM, grid_n = (p.n + Cfg::BN - 1) / Cfg::BN;
  const TileCoord tc = tile_coords(blockIdx.x, grid_m, grid_n, Cfg::GROUP_M);
  const int m0 = tc.tm * Cfg::BM, n0 = tc.tn * Cfg::BN;
  const int K = p.k;
  const int ktiles = (K + Cfg::BK - 1) / Cfg::BK;
  const uint32_t sbase = smem_addr(smem);
  const int8_t* __restrict__ A = p.a;
  const int8_t* __restrict__ B = p.b;

  auto load_stage = [&](int stage, int kt) {
    const uint32_t sa = sbase + stage * Cfg::STAGE_BYTES;
    const uint32_t sb = sa + Cfg::A_STAGE_BYTES;
    const int k0 = kt * Cfg::BK;
#pragma unroll
    for (int it = 0; it < (Cfg::A_CHUNKS + Cfg::THREADS - 1) / Cfg::THREADS; ++it) {
      const int i = it * Cfg::THREADS + tid;
      if (Cfg::A_CHUNKS % Cfg::THREADS == 0 || i < Cfg::A_CHUNKS) {
        int row, ch;
        copy_chunk_coord<Cfg::CPR>(i, row, ch);
        const int gm = m0 + row, gk = k0 + ch * 16;
        const bool ok = gm < p.m && gk < K;
        cp_async_16(sa + swizzled_offset<Cfg::CPR>(row, ch), ok ? A + (size_t)gm * K + gk : A, ok);
      }
    }
#pragma unroll
    for (int it = 0; it < (Cfg::B_CHUNKS + Cfg::THREADS - 1) / Cfg::THREADS; ++it) {
      const int i = it * Cfg::THREADS + tid;
      if (Cfg::B_CHUNKS % Cfg::THREADS == 0 || i < Cfg::B_CHUNKS) {
        int row, ch;
        copy_chunk_coord<Cfg::CPR>(i, row, ch);
        const int gn = n0 + row, gk = k0 + ch * 16;
        const bool ok = gn < p.n && gk < K;
        cp_async_16(sb + swizzled_offset<Cfg::CPR>(row, ch), ok ? B + (size_t)gn * K + gk : B, ok);
      }
    }
  };

  int32_t acc[Cfg::MT][Cfg::NT][4];
#pragma unroll
  for (int i = 0; i < Cfg::MT; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
  int32_t rs[XSUM ? Cfg::MT : 1][4];
#pragma unroll
  for (int i = 0; i < (XSUM ? Cfg::MT : 1); ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) rs[i][e] = 0;

  // Prologue: put STAGES-1 slices in flight before the first mma so global latency is hidden
  // behind the math of the slices already resident.
#pragma unroll
  for (int s = 0; s < Cfg::STAGES - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();  // commit even when empty: keeps the group count = slices issued
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    // Slice kt has landed once at most STAGES-2 newer groups are pending; the barrier makes it
    // visible to every warp and guarantees all warps are done with slice kt-1, whose buffer the
    // prefetch below overwrites.
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();
    const int pf = kt + Cfg::STAGES - 1;
    if (pf < ktiles) load_stage(pf % Cfg::STAGES, pf);
    cp_async_commit();

    const uint32_t sa = sbase + (kt % Cfg::STAGES) * Cfg::STAGE_BYTES;
    const uint32_t sb = sa + Cfg::A_STAGE_BYTES;
#pragma unroll
    for (int ks = 0; ks < Cfg::KSTEPS; ++ks) {
      uint32_t af[Cfg::MT][4];
      uint32_t bf[Cfg::NT][2];
#pragma unroll
      for (int i = 0; i < Cfg::MT; ++i) {
        int row, ch;
        ldsm_a_coord(lane, wm * Cfg::WM + i * 16, ks, row, ch);
        ldsm_x4(sa + swizzled_offset<Cfg::CPR>(row, ch), af[i]);
      }
#pragma unroll
      for (int j = 0; j < Cfg::NT; j += 2) {
        int row, ch;
        ldsm_b_coord(lane, wn * Cfg::WN + j * 8, ks, row, ch);
        uint32_t r[4];
        ldsm_x4(sb + swizzled_offset<Cfg::CPR>(row, ch), r);
        bf[j][0] = r[0];
        bf[j][1] = r[1];
        bf[j + 1][0] = r[2];
        bf[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < Cfg::MT; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::NT; ++j) mma_s8(acc[i][j], af[i], bf[j][0], bf[j][1]);
      if constexpr (XSUM) {
        // Row sums of A on the tensor cores: an mma against an all-ones B fragment gives
        // sum_k A[m, k] in every column, from fragments already in registers. Each m16 tile is
        // summed by one warp of the CTA row (i % WARPS_N == wn) to spread the extra mma.
#pragma unroll
        for (int i = 0; i < Cfg::MT; ++i)
          if (i % Cfg::WARPS_N == wn) mma_s8(rs[i], af[i], 0x01010101u, 0x01010101u);
      }
    }
  }
  cp_async_wait<0>();

  int lane_row, lane_col;  // this lane's accumulator elements 0/1 inside each m16n8 tile
  acc_coord(lane, 0, lane_row, lane_col);
  if constexpr (XSUM) {
#pragma unroll
    for (int i = 0; i < Cfg::MT; ++i) {
      // Every column of the ones-product holds the row sum; lanes owning column 0 publish it.
      if (i % Cfg::WARPS_N == wn && lane_col == 0) {
        const int r = wm * Cfg::WM + i * 16 + lane_row;
        s_xsum[r] = rs[i][0];
        s_xsum[r + 8] = rs[i][2];
      }
    }
    __syncthreads();
  }

  const bool n_even = (p.n & 1) == 0;
#pragma unroll
  for (int j = 0; j < Cfg::NT; ++j) {
    const int c = n0 + wn * Cfg::WN + j * 8 + lane_col;
    if (c >= p.n) continue;
    const bool second = c + 1 < p.n;
    const bool pair = second && n_even;
    // Per-column epilogue operands for the two columns this lane owns in this n8 tile.
    float sw[2] = {0.f, 0.f}, bias[2] = {0.f, 0.f};
    int32_t zs[2] = {0, 0}, ws[2] = {0, 0};
    if constexpr (OUT != kOutI32) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int cc = (e == 0 || second) ? c + e : c;
        sw[e] = p.w_scale[(size_t)cc * p.w_scale_stride];
        if (p.w_zero) zs[e] = p.w_zero[(size_t)cc * p.w_zero_stride] - p.zero_offset;
        if (p.wsum) ws[e] = p.wsum[(size_t)cc * p.wsum_stride];
        if (p.bias) bias[e] = p.bias[cc];
      }
    }
#pragma unroll
    for (int i = 0; i < Cfg::MT; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rl = wm * Cfg::WM + i * 16 + lane_row + h * 8;  // row inside the CTA tile (acc e = 2h)
        const int r = m0 + rl;
        if (r >= p.m) continue;
        const int32_t a0 = acc[i][j][2 * h], a1 = acc[i][j][2 * h + 1];
        float v0 = 0.f, v1 = 0.f;
        if constexpr (OUT != kOutI32) {
          const float sa = p.x_scale[(size_t)r * p.x_scale_stride];
          const int32_t za = p.x_zero ? p.x_zero[(size_t)r * p.x_zero_stride] : 0;
          int32_t xs = 0;
          if constexpr (XSUM) xs = s_xsum[rl];
          v0 = epilogue_value(corrected_acc(a0, za, xs, zs[0], ws[0], K), sa, sw[0], bias[0]);
          v1 = epilogue_value(corrected_acc(a1, za, xs, zs[1], ws[1], K), sa, sw[1], bias[1]);
        }
        store_pair<OUT>(p.c, (size_t)r * p.n + c, pair, second, v0, v1, a0, a1);
      }
    }
  }
}

template <class Cfg, int OUT, bool XSUM>
int launch_cfg(const GemmArgs& p, cudaStream_t stream) {
  auto kernel = int8_gemm_kernel<Cfg, OUT, XSUM>;
  if (Cfg::SMEM_BYTES > 48 * 1024) {
    // Above 48 KiB dynamic shared memory is opt-in per kernel (the ring depth needs it).
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM_BYTES);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  const long long tiles = (long long)((p.m + Cfg::BM - 1) / Cfg::BM) * ((p.n + Cfg::BN - 1) / Cfg::BN);
  if (tiles == 0) return 0;
  if (tiles > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  kernel<<<static_cast<unsigned>(tiles), Cfg::THREADS, Cfg::SMEM_BYTES, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <class Cfg>
int launch_out(const GemmArgs& p, int out_kind, bool xsum, cudaStream_t s) {
  switch (out_kind) {
    case kOutI32: return launch_cfg<Cfg, kOutI32, false>(p, s);
    case kOutF32: return xsum ? launch_cfg<Cfg, kOutF32, true>(p, s) : launch_cfg<Cfg, kOutF32, false>(p, s);
    case kOutF16: return xsum ? launch_cfg<Cfg, kOutF16, true>(p, s) : launch_cfg<Cfg, kOutF16, false>(p, s);
    case kOutBF16: return xsum ? launch_cfg<Cfg, kOutBF16, true>(p, s) : launch_cfg<Cfg, kOutBF16, false>(p, s);
    default: return -1;
  }
}

}  // namespace

const char* config_name(int config) {
  switch (config) {
    case 0: return "s16x32";
    case 1: return "m64x64";
    case 2: return "l128x128";
    case 3: return "l128x256";
    default: return "?";
  }
}

int pick_config(int m, int n, int num_sms) {
  if (m <= 16) return 0;  // one m16 row of mma tiles: weight streaming bound
  auto tiles = [&](int bm, int bn) { return (long long)((m + bm - 1) / bm) * ((n + bn - 1) / bn); };
  if (num_sms <= 0) num_sms = 108;
  // Largest tile that still gives every SM work (wave quantization matters less once there are
  // several waves); the big tiles halve smem traffic per mma.
  if (tiles(128, 256) >= 2LL * num_sms) return 3;
  if (tiles(128, 128) >= 2LL * num_sms) return 2;
  return 1;
}

int launch_int8_gemm(const GemmArgs& args, int config, int out_kind, bool need_xsum, int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool xsum = need_xsum && args.w_zero != nullptr && out_kind != kOutI32;
  switch (config) {
    case 0: return launch_out<Cfg0>(args, out_kind, xsum, s);
    case 1: return launch_out<Cfg1>(args, out_kind, xsum, s);
    case 2: return launch_out<Cfg2>(args, out_kind, xsum, s);
    case 3: return launch_out<Cfg3>(args, out_kind, xsum, s);
    default: return -1;
  }
}

}  // namespace fxk
