// Activation quantization to int8: dynamic asymmetric per-token or static per-tensor, bit-exact
// with fxkernels.reference.quantize_act (the rounding rule lives in fxk_gemm.h, shared with the
// host-side check).
//
// One CTA per token row. Rows of LLM activations are 1-16 KiB, so the second pass re-reads the
// row from L1/L2, not DRAM; the kernel is bandwidth bound and a few % of the GEMM it feeds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fxk_gemm.h"

namespace fxk {
namespace {

constexpr int kThreads = 256;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Four consecutive elements with one 8- or 16-byte load (caller guarantees alignment).
template <typename T>
__device__ __forceinline__ void load4(const T* p, float (&v)[4]) {
  if constexpr (sizeof(T) == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
  } else {
    const uint2 t = *reinterpret_cast<const uint2*>(p);
    const T* e = reinterpret_cast<const T*>(&t);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = to_float<T>(e[i]);
  }
}

template <typename T, bool VEC4>
__global__ void __launch_bounds__(kThreads) quantize_act_kernel(const T* __restrict__ x, int k,
                                                                int8_t* __restrict__ xq, float* __restrict__ scale_out,
                                                                int32_t* __restrict__ zero_out,
                                                                const float* __restrict__ static_scale,
                                                                const int32_t* __restrict__ static_zero) {
  __shared__ float red_lo[kThreads / 32], red_hi[kThreads / 32];
  __shared__ float s_scale;
  __shared__ int32_t s_zero;
  const int tid = threadIdx.x;
  const size_t row = blockIdx.x;
  const T* xr = x + row * k;
  int8_t* qr = xq + row * k;

  float scale;
  int32_t zero;
  if (static_scale == nullptr) {
    // Starting at 0 folds the reference's clamp(min, max=0) / clamp(max, min=0) into the scan.
    float lo = 0.f, hi = 0.f;
    if constexpr (VEC4) {
      for (int i = tid * 4; i < k; i += kThreads * 4) {
        float v[4];
        load4<T>(xr + i, v);
#pragma unroll
        for (int e = 0; e < 4; ++e) { lo = fminf(lo, v[e]); hi = fmaxf(hi, v[e]); }
      }
    } else {
      for (int i = tid; i < k; i += kThreads) {
        const float v = to_float<T>(xr[i]);
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    if ((tid & 31) == 0) { red_lo[tid >> 5] = lo; red_hi[tid >> 5] = hi; }
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < kThreads / 32; ++w) { lo = fminf(lo, red_lo[w]); hi = fmaxf(hi, red_hi[w]); }
      float s;
      int32_t z;
      act_qparams(lo, hi, s, z);
      s_scale = s;
      s_zero = z;
    }
    __syncthreads();
    scale = s_scale;
    zero = s_zero;
  } else {
    scale = static_scale[0];
    zero = static_zero[0];
  }
  const float inv = act_inv_scale(scale);

  if constexpr (VEC4) {
    for (int i = tid * 4; i < k; i += kThreads * 4) {
      float v[4];
      load4<T>(xr + i, v);
      char4 q;
      q.x = act_quantize(v[0], inv, zero);
      q.y = act_quantize(v[1], inv, zero);
      q.z = act_quantize(v[2], inv, zero);
      q.w = act_quantize(v[3], inv, zero);
      *reinterpret_cast<char4*>(qr + i) = q;
    }
  } else {
    for (int i = tid; i < k; i += kThreads) qr[i] = act_quantize(to_float<T>(xr[i]), inv, zero);
  }
  if (tid == 0) {
    scale_out[row] = scale;
    zero_out[row] = zero;
  }
}

template <typename T>
int launch_typed(const void* x, int m, int k, int8_t* xq, float* so, int32_t* zo, const float* ss,
                 const int32_t* sz, cudaStream_t s) {
  const T* xt = static_cast<const T*>(x);
  // Vector path when every row starts 16-byte aligned for fp32 / 8-byte for 16-bit types and
  // the int8 row start is 4-byte aligned.
  const bool vec = (k % 4 == 0) && (reinterpret_cast<uintptr_t>(x) % (4 * sizeof(T)) == 0) &&
                   (reinterpret_cast<uintptr_t>(xq) % 4 == 0);
  if (vec)
    quantize_act_kernel<T, true><<<m, kThreads, 0, s>>>(xt, k, xq, so, zo, ss, sz);
  else
    quantize_act_kernel<T, false><<<m, kThreads, 0, s>>>(xt, k, xq, so, zo, ss, sz);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_quantize_act(const void* x, int dtype, int m, int k, int8_t* xq, float* scale_out, int32_t* zero_out,
                        const float* static_scale, const int32_t* static_zero, int64_t stream) {
  if (m == 0) return 0;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_typed<float>(x, m, k, xq, scale_out, zero_out, static_scale, static_zero, s);
    case 1: return launch_typed<__half>(x, m, k, xq, scale_out, zero_out, static_scale, static_zero, s);
    case 2: return launch_typed<__nv_bfloat16>(x, m, k, xq, scale_out, zero_out, static_scale, static_zero, s);
    default: return -1;
  }
}

}  // namespace fxk
