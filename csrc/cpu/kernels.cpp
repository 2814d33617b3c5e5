// Torch-facing driver of the CPU kernels: argument checks, one-time repacks, per-call
// activation preparation, thread partitioning, and the portable scalar kernels (the fallback on
// CPUs without AVX2/FMA/F16C, and the path tests force with set_isa("scalar")).
#include "kernels_cpu.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_features.h"
#include "kernels.h"

namespace fxk {

// ---- ISA selection -----------------------------------------------------------------------
// "auto" picks the best the CPU has; "avx512vnni" forces the VNNI kernels without AMX tiles and
// "avx2" the AVX2 kernels without VNNI (tests run every path the machine has and compare them);
// "scalar" the portable loops.
enum Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kVnni = 3, kAmx = 4 };
static std::atomic<int> g_isa{kAuto};

static bool have_avx2() {
  const auto& f = cpu_features();
  return f.avx2 && f.fma && f.f16c;
}

static bool have_vnni() {
  const auto& f = cpu_features();
  return have_avx2() && f.avx512f && f.avx512vl && f.avx512vnni;
}

void set_isa(const std::string& isa) {
  if (isa == "scalar") {
    g_isa = kScalar;
  } else if (isa == "auto") {
    g_isa = kAuto;
  } else if (isa == "avx2") {
    TORCH_CHECK(have_avx2(), "set_isa: isa='avx2' but this CPU lacks AVX2/FMA/F16C");
    g_isa = kAvx2;
  } else if (isa == "avx512amx") {
    TORCH_CHECK(have_vnni() && amx_usable(), "set_isa: isa='avx512amx' but this CPU (or its OS) offers no AMX-INT8 "
                "tiles with AVX512F/VL/VNNI");
    g_isa = kAmx;
  } else if (isa == "avx512vnni") {
    TORCH_CHECK(have_vnni(), "set_isa: isa='avx512vnni' but this CPU lacks AVX512F/VL/VNNI (or AVX2/FMA/F16C)");
    g_isa = kVnni;
  } else {
    TORCH_CHECK(false, "set_isa: isa='", isa, "'; expected 'auto', 'avx512amx', 'avx512vnni', 'avx2' or 'scalar'");
  }
}

static int effective_isa() {
  const int want = g_isa.load(std::memory_order_relaxed);
  if (want == kScalar || !have_avx2()) return kScalar;
  if (want == kAvx2) return kAvx2;
  if (!have_vnni()) return kAvx2;
  if (want == kVnni) return kVnni;
  return amx_usable() ? kAmx : kVnni;
}

std::string active_isa() {
  switch (effective_isa()) {
    case kAmx: return "avx512amx";
    case kVnni: return "avx512vnni";
    case kAvx2: return "avx2";
    default: return "scalar";
  }
}

// Every vector path starts from the AVX2 kernels; VNNI replaces the integer-activation ones, and
// AMX tiles replace VNNI's INT4 loop where enough activation rows share the weights.
static bool use_avx2() { return effective_isa() != kScalar; }
static bool use_vnni() { return effective_isa() >= kVnni; }
static bool use_amx() { return effective_isa() == kAmx; }

// Work per thread chunk: at least ~256K multiply-adds, so that small layers (and M=1 decode of
// a 135M model's 576-wide linears) do not pay a fork/join for microseconds of work.
static int64_t tile_grain(int64_t M, int64_t K) {
  const int64_t per_tile = 8 * K * (M > 0 ? M : 1);
  const int64_t g = (256 * 1024 + per_tile - 1) / per_tile;
  return g < 1 ? 1 : g;
}

static at::Tensor as_f32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t.contiguous() : t.to(at::kFloat).contiguous();
}

static void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": device ", t.device(), "; expected a CPU tensor");
}

// ---- activation quantization -------------------------------------------------------------
static void quant_rows_scalar(const float* x, int64_t K, const float* inv, const int32_t* z, int8_t* xq,
                              int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float fi = inv[r], fz = (float)z[r];
    for (int64_t k = 0; k < K; ++k) {
      float v = std::nearbyint(x[r * K + k] * fi) + fz;
      v = v < -128.f ? -128.f : (v > 127.f ? 127.f : v);
      xq[r * K + k] = (int8_t)(int)v;
    }
  }
}

static void minmax_rows_scalar(const float* x, int64_t K, float* mn, float* mx, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float lo = 0.f, hi = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = x[r * K + k];
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    mn[r] = lo;
    mx[r] = hi;
  }
}

std::vector<at::Tensor> quantize_act(const at::Tensor& x_in, const c10::optional<at::Tensor>& scale,
                                     const c10::optional<at::Tensor>& zero) {
  check_cpu(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "quantize_act: x.shape ", x_in.sizes(), "; expected [M, K]");
  TORCH_CHECK(scale.has_value() == zero.has_value(), "quantize_act: give both scale and zero or neither");
  const at::Tensor x = as_f32(x_in);
  const int64_t M = x.size(0), K = x.size(1);
  auto xq = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor sa, za;
  const bool avx2 = use_avx2();
  const int64_t grain = (64 * 1024 + K) / (K > 0 ? K : 1);
  if (scale.has_value()) {
    TORCH_CHECK(scale->numel() == 1 && zero->numel() == 1, "quantize_act: static scale/zero must have one element");
    const float s = scale->to(at::kFloat).item<float>();
    const int32_t z = zero->to(at::kInt).item<int32_t>();
    sa = at::full({M}, s, x.options());
    za = at::full({M}, z, x.options().dtype(at::kInt));
  } else {
    sa = at::empty({M}, x.options());
    za = at::empty({M}, x.options().dtype(at::kInt));
    std::vector<float> mn(M), mx(M);
    at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
      if (avx2)
        minmax_rows_avx2(x.data_ptr<float>(), K, mn.data(), mx.data(), r0, r1);
      else
        minmax_rows_scalar(x.data_ptr<float>(), K, mn.data(), mx.data(), r0, r1);
    });
    float* ps = sa.data_ptr<float>();
    int32_t* pz = za.data_ptr<int32_t>();
    for (int64_t r = 0; r < M; ++r) {
      // The reference's fp32 rule, operation for operation (every step is one IEEE rounding).
      float s = (mx[r] - mn[r]) / 255.0f;
      if (!(s > 0.f)) s = 1.0f;
      float zf = std::nearbyint(-128.0f - mn[r] / s);
      zf = zf < -128.f ? -128.f : (zf > 127.f ? 127.f : zf);
      ps[r] = s;
      pz[r] = (int32_t)zf;
    }
  }
  std::vector<float> inv(M);
  const float* ps = sa.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) inv[r] = 1.0f / ps[r];
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    if (avx2)
      quant_rows_avx2(x.data_ptr<float>(), K, inv.data(), za.data_ptr<int32_t>(), xq.data_ptr<int8_t>(), r0, r1);
    else
      quant_rows_scalar(x.data_ptr<float>(), K, inv.data(), za.data_ptr<int32_t>(), xq.data_ptr<int8_t>(), r0, r1);
  });
  return {xq, sa, za};
}

// ---- huge pages -----------------------------------------------------------------------------
// A batch-1 linear streams its whole weight once per call; with 4 KiB pages that is a TLB miss
// every 4 KiB (every 64 cache lines), with 2 MiB transparent huge pages one per 2 MiB. Linux's
// usual THP mode is "madvise", so large repacked weights are copied into a 2 MiB-aligned
// anonymous mapping marked MADV_HUGEPAGE before it is first touched (~10 % faster streaming
// measured on Zen 3). Anywhere this is unavailable the tensor is returned as it is.
static constexpr size_t kHugePage = size_t(2) << 20;

static void* map_huge(size_t nbytes, void** base, size_t* len) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  *len = (nbytes + kHugePage - 1) / kHugePage * kHugePage + kHugePage;
  *base = mmap(nullptr, *len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (*base == MAP_FAILED) return nullptr;
  char* p = (char*)(((uintptr_t)*base + kHugePage - 1) & ~(uintptr_t)(kHugePage - 1));
  madvise(p, *len - (size_t)(p - (char*)*base), MADV_HUGEPAGE);  // advisory: failure is harmless
  return p;
#else
  (void)nbytes; (void)base; (void)len;
  return nullptr;
#endif
}

static at::Tensor wrap_mapping(void* p, void* base, size_t len, at::IntArrayRef sizes, const at::TensorOptions& opt) {
#if defined(__linux__)
  return at::from_blob(p, sizes, [base, len](void*) { munmap(base, len); }, opt);
#else
  (void)p; (void)base; (void)len; (void)sizes; (void)opt;
  return at::Tensor();
#endif
}

static at::Tensor in_huge_pages(const at::Tensor& t) {
  const size_t nbytes = t.nbytes();
  if (nbytes < 2 * kHugePage || !t.is_contiguous()) return t;
  void* base = nullptr;
  size_t len = 0;
  void* p = map_huge(nbytes, &base, &len);
  if (!p) return t;
  std::memcpy(p, t.data_ptr(), nbytes);
  return wrap_mapping(p, base, len, t.sizes(), t.options());
}

at::Tensor huge_page_buffer(int64_t nbytes) {
  TORCH_CHECK(nbytes > 0, "huge_page_buffer: nbytes=", nbytes, "; expected a positive size");
  void* base = nullptr;
  size_t len = 0;
  void* p = map_huge((size_t)nbytes, &base, &len);
  if (!p) return at::ones({nbytes}, at::kByte);
  std::memset(p, 1, (size_t)nbytes);  // touch every page now, inside the huge-page region
  return wrap_mapping(p, base, len, {nbytes}, at::TensorOptions().dtype(at::kByte));
}

// ---- repacks -----------------------------------------------------------------------------
// [N, C] -> [NT, C, 8] with rows past N zero: the "rows in lanes" transposition of 8-row tiles.
static at::Tensor rows_in_lanes(const at::Tensor& t, int64_t inner = 1) {
  const int64_t N = t.size(0), NT = (N + 7) / 8;
  at::Tensor p = t;
  if (NT * 8 != N) p = at::constant_pad_nd(t, {0, 0, 0, NT * 8 - N}, 0);
  const int64_t C = p.size(1) / inner;
  return p.reshape({NT, 8, C, inner}).permute({0, 2, 1, 3}).contiguous();
}

static int64_t storage_offset(int64_t bits) { return bits <= 4 ? 0 : 128; }

std::vector<at::Tensor> repack_dequant(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                                       int64_t bits, int64_t K) {
  const int64_t G = scale.size(1), gs = K / G;
  // A code pair would straddle two groups, or K is odd (the last byte holds one code): scalar path.
  if (bits <= 4 && (K % 2 || (G > 1 && gs % 2))) return {};
  auto w = in_huge_pages(rows_in_lanes(qweight.contiguous()));
  auto zc = rows_in_lanes((zero.to(at::kInt) - storage_offset(bits)).contiguous());
  auto sc = rows_in_lanes(scale.to(at::kFloat).contiguous());
  return {w, zc, sc};
}

std::vector<at::Tensor> repack_qact(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                                    const at::Tensor& wsum, int64_t bits, int64_t K) {
  const int64_t G = scale.size(1), gs = K / G;
  const int64_t step = bits <= 4 ? 8 : 2;
  if (G > 1 && gs % step) return {};  // groups not aligned to the kernel step: scalar path
  const int64_t Kp = (K + step - 1) / step * step;
  at::Tensor q = qweight.contiguous();
  const int64_t cols = bits <= 4 ? Kp / 2 : Kp;
  if (q.size(1) != cols) q = at::constant_pad_nd(q, {0, cols - q.size(1)}, 0);
  auto w = in_huge_pages(rows_in_lanes(q, bits <= 4 ? 4 : 2));
  auto zc = rows_in_lanes((zero.to(at::kInt) - storage_offset(bits)).contiguous());
  auto ws = rows_in_lanes(wsum.to(at::kInt).contiguous());
  auto sc = rows_in_lanes(scale.to(at::kFloat).contiguous());
  return {w, zc, ws, sc, at::scalar_tensor(Kp, at::kLong)};
}

// ---- weight-only linear --------------------------------------------------------------------
// One weight row dequantized exactly as the reference does: (q - z) in integers, then * s in fp32.
static void dequant_row(const uint8_t* r, const float* s, const int32_t* z, int64_t K, int64_t G, int64_t bits,
                        float* w) {
  const int64_t gs = K / G;
  for (int64_t g = 0; g < G; ++g) {
    const int32_t zg = z[g];
    const float sg = s[g];
    if (bits <= 4) {
      int64_t k = g * gs;
      if (k % 2 == 0)  // byte-aligned group: both nibbles of each byte at once (vectorizes)
        for (; k + 2 <= (g + 1) * gs; k += 2) {
          const uint8_t b = r[k / 2];
          w[k] = (float)((b & 15) - zg) * sg;
          w[k + 1] = (float)((b >> 4) - zg) * sg;
        }
      for (; k < (g + 1) * gs; ++k) w[k] = (float)(((r[k / 2] >> (4 * (k & 1))) & 15) - zg) * sg;
    } else {
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) w[k] = (float)((int32_t)(int8_t)r[k] + 128 - zg) * sg;
    }
  }
}

static void dq_rows_scalar(const float* x, const uint8_t* qw, const float* s, const int32_t* z, const float* bias,
                           float* y, int64_t M, int64_t N, int64_t K, int64_t G, int64_t bits, int64_t n0, int64_t n1) {
  const int64_t row_bytes = bits <= 4 ? (K + 1) / 2 : K;
  std::vector<float> w(K);
  for (int64_t n = n0; n < n1; ++n) {
    dequant_row(qw + n * row_bytes, s + n * G, z + n * G, K, G, bits, w.data());
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[m * K + k] * w[k];
      y[m * N + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

// Long inputs (prefill): from ~128 rows the weight-only kernels (FMA, or limbs on 256-bit
// registers) are slower than torch's fp32 sgemm on an Intel AVX-512 host (4096x11008, M=512:
// 324 ms vs 172 ms), because each code costs several instructions per activation row while sgemm
// reuses a float weight across rows at full FMA throughput. So blocks of weight rows are
// dequantized exactly into fp32 and multiplied by torch; the dequantization is then a small fixed
// cost per call instead of per row. (Not where limbs_for_long_inputs, below, holds.)
static constexpr int64_t kSgemmMinRows = 128;

static void dequant_sgemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                          const at::Tensor& zero, const float* pb, int64_t bits, int64_t K, at::Tensor& y) {
  const int64_t M = x.size(0), N = qweight.size(0), G = scale.size(1);
  auto s = scale.to(at::kFloat).contiguous();
  auto z = zero.to(at::kInt).contiguous();
  auto q = qweight.contiguous();
  const int64_t row_bytes = q.size(1);
  // blocks of >= 8 MiB and >= 512 weight rows: narrower blocks re-stream x once per block and hand
  // sgemm skinny outputs (11008x4096, M=512: 190-row blocks 315-346 ms, 512-row blocks 264-268 ms)
  const int64_t nb = std::min<int64_t>(N, std::max<int64_t>(512, (int64_t(8) << 20) / (4 * K)));
  auto wbuf = at::empty({nb, K}, x.options());
  const uint8_t* pq = (const uint8_t*)q.data_ptr();
  const float* ps = s.data_ptr<float>();
  const int32_t* pz = z.data_ptr<int32_t>();
  float* pw = wbuf.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t rows = std::min(nb, N - n0);
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        dequant_row(pq + (n0 + r) * row_bytes, ps + (n0 + r) * G, pz + (n0 + r) * G, K, G, bits, pw + r * K);
    });
    y.narrow(1, n0, rows).copy_(at::mm(x, wbuf.narrow(0, 0, rows).t()));
  }
  if (pb) {
    float* py = y.data_ptr<float>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / N), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; ++n) py[m * N + n] += pb[n];
    });
  }
}

static void limb_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const at::Tensor& zero, const std::vector<at::Tensor>& packed, const float* pb, int64_t bits,
                        int64_t K, at::Tensor& y);
static bool vnni_int8(int64_t Kp, int64_t G, int64_t bits);

// The exception: where the limb layout runs on the 512-bit VNNI kernels (no AMX), its int8
// products outrun dequantizing for sgemm at long inputs too (Zen 5, 2 threads, M = 512: 1.2x at
// 576x576 to 2.2x at 11008x4096; torch's sgemm there is MKL's AVX2 path).
static bool limbs_for_long_inputs(const std::vector<at::Tensor>& packed, int64_t M, int64_t bits, int64_t G) {
  if (packed.size() != 6 || !use_vnni() || use_amx()) return false;
  const int64_t Kp = *packed[4].data_ptr<int64_t>();
  return qa_vnni512_rows(M, bits, vnni_int8(Kp, G, bits));
}

at::Tensor dequant_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale,
                          const at::Tensor& zero, const std::vector<at::Tensor>& packed,
                          const c10::optional<at::Tensor>& bias_in, int64_t bits, int64_t K) {
  check_cpu(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "dequant_linear: x.shape ", x_in.sizes(), "; expected [M, ", K, "]");
  const at::Tensor x = as_f32(x_in);
  const int64_t M = x.size(0), N = qweight.size(0), G = scale.size(1);
  at::Tensor bias = bias_in.has_value() ? as_f32(*bias_in) : at::Tensor();
  auto y = at::empty({M, N}, x.options());
  const float* pb = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (use_avx2() && M >= kSgemmMinRows && !limbs_for_long_inputs(packed, M, bits, G)) {
    dequant_sgemm(x, qweight, scale, zero, pb, bits, K, y);
  } else if (use_avx2() && packed.size() == 6) {
    limb_linear(x, qweight, scale, zero, packed, pb, bits, K, y);
  } else if (use_avx2() && !packed.empty()) {
    DqArgs a{(const uint8_t*)packed[0].data_ptr(), packed[1].data_ptr<int32_t>(), packed[2].data_ptr<float>(),
             x.data_ptr<float>(), pb, y.data_ptr<float>(), M, N, K, G, (int)bits};
    const int64_t NT = (N + 7) / 8;
    at::parallel_for(0, NT, tile_grain(M, K), [&](int64_t t0, int64_t t1) { dq_tiles_avx2(a, t0, t1); });
  } else {
    auto s = scale.to(at::kFloat).contiguous();
    auto z = zero.to(at::kInt).contiguous();
    auto q = qweight.contiguous();
    at::parallel_for(0, N, tile_grain(M, K) * 8, [&](int64_t n0, int64_t n1) {
      dq_rows_scalar(x.data_ptr<float>(), (const uint8_t*)q.data_ptr(), s.data_ptr<float>(), z.data_ptr<int32_t>(),
                     pb, y.data_ptr<float>(), M, N, K, G, bits, n0, n1);
    });
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

// ---- integer-activation linear -------------------------------------------------------------
static void qa_rows_scalar(const int8_t* xq, const float* sa, const int32_t* za, const uint8_t* qw, const float* s,
                           const int32_t* z, const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                           int64_t bits, int64_t n0, int64_t n1) {
  const int64_t gs = K / G, off = storage_offset(bits);
  const int64_t row_bytes = bits <= 4 ? (K + 1) / 2 : K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* r = qw + n * row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      float yf = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t zc = z[n * G + g] - off;
        int64_t acc = 0;  // exact: |terms| <= 255 * 255
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
          const int64_t c = bits <= 4 ? ((r[k / 2] >> (4 * (k & 1))) & 15) : (int64_t)(int8_t)r[k];
          acc += ((int64_t)xq[m * K + k] - za[m]) * (c - zc);
        }
        yf += (float)acc * s[n * G + g];
      }
      y[m * N + n] = yf * sa[m] + (bias ? bias[n] : 0.f);
    }
  }
}

// Row stride (elements of `elem` bytes) for the kernels' activation copies: at least Kp, and an
// odd number of 64-byte lines. The micro-kernels read 4-12 rows side by side; at a stride that is
// a multiple of 4 KiB (K = 4096, 8192, ...) all of them map to one L1 set, more rows than its 8
// ways, and the kernel ran at ~60 % of its rate at K = 4032 or 4160 (one core, cache-resident
// W8A8/W4A8, M = 192: 135-197 vs 294-319 GOP/s).
static int64_t act_row_stride(int64_t Kp, int64_t elem) {
  int64_t lines = (Kp * elem + 63) / 64;
  if (lines % 2 == 0) ++lines;
  return lines * 64 / elem;
}

// prep_acts' per-row work on 64-byte vectors (AVX-512BW): the same bytes and sums as its scalar
// loops, which stay for the tails and for CPUs without AVX-512. At batch 8 the scalar byte loops
// were ~4 % of a decode step (32 limb rows per linear).
#define FXK_BW __attribute__((target("avx2,avx512f,avx512bw")))
static bool use_bw() { return use_vnni() && cpu_features().avx512bw; }

// Sum of n int8 values: |sum| <= 128 * 32768 per group (qact_linear checks K / G <= 32768).
FXK_BW static int32_t sum_i8_bw(const int8_t* p, int64_t n) {
  // x ^ 0x80 is x + 128 as an unsigned byte; vpsadbw sums 8 of them per 64-bit lane
  const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
  __m512i acc = zero;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512(p + i), flip), zero));
  if (i < n) {
    const __mmask64 m = ~0ULL >> (64 - (n - i));
    const __m512i v = _mm512_maskz_mov_epi8(m, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, p + i), flip));
    acc = _mm512_add_epi64(acc, _mm512_sad_epu8(v, zero));
  }
  return (int32_t)(_mm512_reduce_add_epi64(acc) - 128 * n);
}

// The INT4 kernels' column order within each 8-byte step ({0, 2, 4, 6, 1, 3, 5, 7}) for the first
// K / 64 * 64 columns; returns how many were written.
FXK_BW static int64_t permute_steps_bw(const int8_t* x, int64_t K, int8_t* o) {
  const __m512i perm = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15));
  int64_t k = 0;
  for (; k + 64 <= K; k += 64)
    _mm512_storeu_si512(o + k, _mm512_shuffle_epi8(_mm512_loadu_si512(x + k), perm));
  return k;
}

// x + 128 as unsigned bytes for the first K / 64 * 64 columns; returns how many were written.
FXK_BW static int64_t unsigned_bw(const int8_t* x, int64_t K, uint8_t* u) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) _mm512_storeu_si512(u + k, _mm512_xor_si512(_mm512_loadu_si512(x + k), flip));
  return k;
}

// Activations in the layout the AVX2 kernel reads (rows `xs` elements apart), plus per-group
// corrections. Every column below Kp is written (the padding past K with a value the zero
// weights there cancel); the row stride's tail past Kp is never read.
// Rows [m0, m1) only (m1 < 0: all M) where the buffers already hold M rows: callers that split
// the rows across threads size them first.
static void prep_acts(const int8_t* xq, const int32_t* za, int64_t M, int64_t K, int64_t Kp, int64_t xs, int64_t G,
                      int64_t Kg, int64_t bits, std::vector<int8_t>& x8, std::vector<int16_t>& x16,
                      std::vector<int32_t>& xc, std::vector<uint8_t>* xu8 = nullptr, int64_t m0 = 0,
                      int64_t m1 = -1) {
  const int64_t gsp = Kp / G;  // padded columns per group (== Kg unless G == 1 and K was padded)
  int32_t* pc = scratch(xc, M * G);
  int8_t* p8 = bits <= 4 ? scratch(x8, M * xs) : nullptr;
  uint8_t* pu = bits > 4 && xu8 ? scratch(*xu8, M * xs) : nullptr;
  int16_t* p16 = bits > 4 && !xu8 ? scratch(x16, M * xs) : nullptr;
  const bool bw = use_bw();
  static const int perm[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  for (int64_t m = m0; m < (m1 < 0 ? M : m1); ++m) {
    const int8_t* xr = xq + m * K;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * gsp, k1 = std::min(k0 + Kg, K);
      int32_t sx = 0;
      if (bw) {
        sx = sum_i8_bw(xr + k0, k1 - k0);
      } else {
        for (int64_t k = k0; k < k1; ++k) sx += xr[k];
      }
      pc[m * G + g] = sx - (int32_t)Kg * za[m];
    }
    if (p8) {
      int8_t* o = p8 + m * xs;
      for (int64_t b = bw ? permute_steps_bw(xr, K, o) : 0; b < Kp; b += 8)
        for (int i = 0; i < 8; ++i) {
          const int64_t k = b + perm[i];
          o[b + i] = k < K ? xr[k] : 0;
        }
    } else if (pu) {  // VNNI's unsigned operand; padded columns meet zero weights, any value works
      uint8_t* u = pu + m * xs;
      for (int64_t k = bw ? unsigned_bw(xr, K, u) : 0; k < K; ++k) u[k] = (uint8_t)(xr[k] + 128);
      for (int64_t k = K; k < Kp; ++k) u[k] = 128;
    } else {
      int16_t* o = p16 + m * xs;
      for (int64_t k = 0; k < K; ++k) o[k] = xr[k];
      for (int64_t k = K; k < Kp; ++k) o[k] = 0;
    }
  }
}

// From this many activation rows the AMX tile kernel beats vpdpbusd (tiles hold 16 rows; fewer
// rows pay a whole tile product for a part of it).
static constexpr int64_t kAmxMinRows = 8;

// The vector integer-activation GEMM on xq [M][K] (AVX2, or VNNI where active): y = [M][N] fp32.
// INT8 weights take the vpdpbusd (and AMX) route when their groups split into K quads.
static bool vnni_int8(int64_t Kp, int64_t G, int64_t bits) {
  return use_vnni() && bits > 4 && Kp % 4 == 0 && (Kp / G) % 4 == 0;
}

// Whether qact_vector runs M rows on AMX tiles.
static bool qa_amx(int64_t M, int64_t N, int64_t Kp, int64_t G, int64_t bits) {
  return use_amx() && (bits <= 4 || vnni_int8(Kp, G, bits)) && M >= kAmxMinRows && (Kp / G) % 64 == 0;
}
// Whether qact_vector's kernel can also sum groups of `limbs` rows in its store (QaArgs::limbs):
// every tile pair on AMX or on the 512-bit VNNI kernels (no odd last tile), whole groups per
// pass or micro-block.
static bool qa_sums_limbs(int64_t M, int64_t N, int64_t Kp, int64_t G, int64_t bits, int limbs) {
  if (limbs <= 1 || ((N + 7) / 8) % 2) return false;
  if (qa_amx(M, N, Kp, G, bits)) return kAmxPassRows % limbs == 0;
  // (the INT4 kernel runs a micro-block as two halves: whole limb groups need limbs | 8)
  return use_vnni() && (kVnni512Rows / 2) % limbs == 0 && qa_vnni512_rows(M, bits, vnni_int8(Kp, G, bits));
}

// y [M / limbs][N]; limbs > 1 only where qa_sums_limbs holds.
static void qact_vector(const int8_t* xq, const float* sa, const int32_t* za, int64_t M, int64_t K, int64_t N,
                        int64_t G, int64_t bits, const std::vector<at::Tensor>& packed, const float* pb, float* y,
                        int limbs = 1) {
  const int64_t Kp = *packed[4].data_ptr<int64_t>();
  static thread_local std::vector<int8_t> x8;
  static thread_local std::vector<int16_t> x16;
  static thread_local std::vector<int32_t> xc;
  static thread_local std::vector<uint8_t> xu8;
  const bool vnni8 = vnni_int8(Kp, G, bits);
  TORCH_CHECK(limbs == 1 || qa_sums_limbs(M, N, Kp, G, bits, limbs),
              "qact_vector: limb sums need the AMX or the 512-bit VNNI route");
  const int64_t xs = act_row_stride(Kp, bits <= 4 || vnni8 ? 1 : 2);
  prep_acts(xq, za, M, K, Kp, xs, G, K / G, bits, x8, x16, xc, vnni8 ? &xu8 : nullptr);
  QaArgs a{(const uint8_t*)packed[0].data_ptr(), packed[1].data_ptr<int32_t>(), packed[2].data_ptr<int32_t>(),
           packed[3].data_ptr<float>(), bits <= 4 ? x8.data() : nullptr, bits <= 4 || vnni8 ? nullptr : x16.data(),
           xc.data(), sa, za, pb, y, M, N, Kp, G, K / G, (int)bits, vnni8 ? xu8.data() : nullptr, xs, limbs};
  const int64_t NT = (N + 7) / 8;
  if (qa_amx(M, N, Kp, G, bits)) {
    // tile pairs in parallel; an odd last tile (N % 16 in 1..8) on the VNNI kernel
    at::parallel_for(0, NT / 2, std::max<int64_t>(1, tile_grain(M, Kp) / 2),
                     [&](int64_t p0, int64_t p1) { qa_pairs_amx(a, 2 * p0, 2 * p1); });
    if (NT % 2) qa_tiles_avx512vnni(a, NT - 1, NT);
  } else if (use_vnni() && (bits <= 4 || vnni8) && limbs > 1) {  // limb sums: whole tile pairs per thread
    at::parallel_for(0, NT / 2, std::max<int64_t>(1, tile_grain(M, Kp) / 2),
                     [&](int64_t p0, int64_t p1) { qa_tiles_avx512vnni(a, 2 * p0, 2 * p1); });
  } else if (use_vnni() && (bits <= 4 || vnni8)) {
    at::parallel_for(0, NT, tile_grain(M, Kp), [&](int64_t t0, int64_t t1) { qa_tiles_avx512vnni(a, t0, t1); });
  } else {
    at::parallel_for(0, NT, tile_grain(M, Kp), [&](int64_t t0, int64_t t1) { qa_tiles_avx2(a, t0, t1); });
  }
}

at::Tensor qact_linear(const at::Tensor& xq_in, const at::Tensor& sa_in, const at::Tensor& za_in,
                       const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& zero,
                       const at::Tensor& wsum, const std::vector<at::Tensor>& packed,
                       const c10::optional<at::Tensor>& bias_in, int64_t bits, at::ScalarType out_dtype) {
  check_cpu(xq_in, "xq");
  const at::Tensor xq = xq_in.contiguous(), sa = as_f32(sa_in), za = za_in.to(at::kInt).contiguous();
  const int64_t M = xq.size(0), K = xq.size(1), N = qweight.size(0), G = scale.size(1);
  TORCH_CHECK(K / G <= 32768, "qact_linear: ", K / G, " columns per group; the int32 accumulator is exact only up to 32768");
  at::Tensor bias = bias_in.has_value() ? as_f32(*bias_in) : at::Tensor();
  const float* pb = bias.defined() ? bias.data_ptr<float>() : nullptr;
  auto y = at::empty({M, N}, sa.options());
  if (use_avx2() && !packed.empty()) {
    qact_vector(xq.data_ptr<int8_t>(), sa.data_ptr<float>(), za.data_ptr<int32_t>(), M, K, N, G, bits, packed, pb,
                y.data_ptr<float>());
  } else {
    auto s = scale.to(at::kFloat).contiguous();
    auto z = zero.to(at::kInt).contiguous();
    auto q = qweight.contiguous();
    at::parallel_for(0, N, tile_grain(M, K) * 8, [&](int64_t n0, int64_t n1) {
      qa_rows_scalar(xq.data_ptr<int8_t>(), sa.data_ptr<float>(), za.data_ptr<int32_t>(), (const uint8_t*)q.data_ptr(),
                     s.data_ptr<float>(), z.data_ptr<int32_t>(), pb, y.data_ptr<float>(), M, N, K, G, bits, n0, n1);
    });
  }
  return out_dtype == at::kFloat ? y : y.to(out_dtype);
}

// ---- weight-only linear on integer units ("limb" layout) -------------------------------------
// limb_linear for M rows at px with a given digit count L (1..4); with `wide`, wide[m] = 1 marks
// the rows whose digits round coarser than bf16 would (limb_split_avx2).
static void limb_linear_digits(const float* px, int64_t M, const at::Tensor& qweight, const at::Tensor& scale,
                               const at::Tensor& zero, const std::vector<at::Tensor>& packed, const float* pb,
                               int64_t bits, int64_t K, int L, float* py, uint8_t* wide) {
  const int64_t N = qweight.size(0), G = scale.size(1);
  const int64_t Kp = *packed[4].data_ptr<int64_t>();
  // Rows go in chunks whose L partial outputs take <= 8 MiB (these buffers persist per thread);
  // for long inputs a chunk is about the row block the kernel streams the weight once for anyway.
  const int64_t mc = std::max<int64_t>(1, std::min<int64_t>(M, (int64_t(8) << 20) / (L * N * 4)));
  static thread_local std::vector<int8_t> digits;
  static thread_local std::vector<float> fac, yl;
  static thread_local std::vector<int32_t> zeros;
  static thread_local std::vector<uint8_t> ok;
  // thread_local buffers are named through plain pointers: inside a parallel_for body the names
  // would refer to each worker thread's own (empty) instances
  if (zeros.size() < size_t(mc * L)) zeros.resize(mc * L, 0);  // never written: stays zero
  int8_t* pd = scratch(digits, mc * L * K);
  float *pf = scratch(fac, mc * L), *pyl = scratch(yl, mc * L * N);
  uint8_t* pok = scratch(ok, M);
  for (int64_t c0 = 0; c0 < M; c0 += mc) {
    const int64_t rows = std::min(mc, M - c0);
    at::parallel_for(0, rows, (64 * 1024 + K) / K, [&](int64_t r0, int64_t r1) {
      limb_split_avx2(px + c0 * K, K, L, pd, pf, pok + c0, r0, r1, wide ? wide + c0 : nullptr);
    });
    if (qa_sums_limbs(rows * L, N, Kp, G, bits, L)) {
      // the kernel sums each row's limbs (and adds the bias) as it stores: no partial outputs
      qact_vector(pd, pf, zeros.data(), rows * L, K, N, G, bits, packed, pb, py + c0 * N, L);
      continue;
    }
    qact_vector(pd, pf, zeros.data(), rows * L, K, N, G, bits, packed, nullptr, pyl);
    at::parallel_for(0, rows, std::max<int64_t>(1, 64 * 1024 / (N * L)), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        float* out = py + (c0 + m) * N;
        const float* part = pyl + m * L * N;
        for (int64_t n = 0; n < N; ++n) out[n] = part[(L - 1) * N + n];  // most significant first
        for (int l = L - 2; l >= 0; --l)
          for (int64_t n = 0; n < N; ++n) out[n] += part[l * N + n];
        if (pb)
          for (int64_t n = 0; n < N; ++n) out[n] += pb[n];
      }
    });
  }
  bool all_ok = true;
  for (int64_t m = 0; m < M; ++m) all_ok = all_ok && pok[m];
  if (all_ok) return;
  // rows with Inf/NaN (or |x| < ~2^-60 throughout) take the scalar fp32 loop, which propagates them
  auto s = scale.to(at::kFloat).contiguous();
  auto z = zero.to(at::kInt).contiguous();
  auto q = qweight.contiguous();
  for (int64_t m = 0; m < M; ++m)
    if (!pok[m])
      dq_rows_scalar(px + m * K, (const uint8_t*)q.data_ptr(), s.data_ptr<float>(), z.data_ptr<int32_t>(), pb,
                     py + m * N, 1, N, K, G, bits, 0, N);
}

// fp32 activations as L int8 digits of a per-row fixed-point value (limb_split_avx2): the weight-only
// product becomes L exact integer products on the qa layout, y = sum_l fac_l * (d_l . (q - z)) * s.
// The only rounding before the fp32 epilogue is x -> integer at ~2^-(8L-2) of the row's largest
// |x|, so with L = 4 the result is closer to the float64 product than an fp32 dot product is, and
// at M = 1 the L vpdpbusd per weight vector cost far less than widening each code to fp32 for an
// FMA (measured: 4096x11008 INT4 0.68 ms vs 1.06 ms; the same ~1.4-1.8x from M = 1 to 512).
// With kAutoLimbs every row runs on 2 digits, and the rows that 2 digits round coarser than bf16
// would run again on 4, gathered, their outputs replacing the first ones: each row's result is
// the one its own digit count gives, whatever rows share the call.
static void limb_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                        const at::Tensor& zero, const std::vector<at::Tensor>& packed, const float* pb, int64_t bits,
                        int64_t K, at::Tensor& y) {
  const int64_t M = x.size(0), N = qweight.size(0);
  const int64_t digits = *packed[5].data_ptr<int64_t>();
  TORCH_CHECK(digits == kAutoLimbs || (digits >= 1 && digits <= 4), "dequant_linear: limb layout with ", digits,
              " limbs; expected 1..4 or ", kAutoLimbs, " (auto)");
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  if (digits != kAutoLimbs) {
    limb_linear_digits(px, M, qweight, scale, zero, packed, pb, bits, K, (int)digits, py, nullptr);
    return;
  }
  static thread_local std::vector<uint8_t> wide_rows;  // a decode step's every call: no allocation
  uint8_t* wide = scratch(wide_rows, M);
  limb_linear_digits(px, M, qweight, scale, zero, packed, pb, bits, K, kAutoLowLimbs, py, wide);
  std::vector<int64_t> rows;
  for (int64_t m = 0; m < M; ++m)
    if (wide[m]) rows.push_back(m);
  if (rows.empty()) return;
  const int64_t W = (int64_t)rows.size();
  std::vector<float> xw(W * K), yw(W * N);
  for (int64_t i = 0; i < W; ++i) std::memcpy(xw.data() + i * K, px + rows[i] * K, K * sizeof(float));
  limb_linear_digits(xw.data(), W, qweight, scale, zero, packed, pb, bits, K, kAutoHighLimbs, yw.data(), nullptr);
  for (int64_t i = 0; i < W; ++i) std::memcpy(py + rows[i] * N, yw.data() + i * N, N * sizeof(float));
}

// ---- rows through the limb layout, inside a caller's parallel region -------------------------
// limb_linear above for one chunk of rows, step for step (the same tile kernels, the limbs summed
// most significant first, then the bias), so the outputs are bit-identical; the rows that
// limb_linear hands to the scalar loop (not finite, or |x| < ~2^-61 throughout) give NaN, resp.
// the bias.
bool limb_layout_usable(at::TensorList packed) {
  if (packed.size() != 6 || !use_vnni()) return false;
  const int64_t L = *packed[5].data_ptr<int64_t>();
  return L == kAutoLimbs || (L >= 1 && L <= 4);
}

static void limb_rows_setup_digits(LimbRows& r, int L, int64_t M, int64_t K, int64_t N, int64_t G, int64_t bits,
                                   at::TensorList packed, const float* bias) {
  const int64_t Kp = *packed[4].data_ptr<int64_t>();
  r.vnni8 = vnni_int8(Kp, G, bits);
  if (r.zeros.size() < size_t(M * L)) r.zeros.resize(M * L, 0);  // never written: stays zero
  const int64_t xs = act_row_stride(Kp, 1);  // bits <= 4 or vnni8: one byte per activation
  scratch(r.digits, M * L * K);
  scratch(r.fac, M * L);
  scratch(r.ok, M);
  scratch(r.finite, M);
  scratch(r.xc, M * L * G);
  if (bits <= 4) scratch(r.x8, M * L * xs);
  if (r.vnni8) scratch(r.xu8, M * L * xs);
  r.L = L;
  r.M = M;
  r.K = K;
  r.N = N;
  r.bias = bias;
  r.sums = qa_sums_limbs(M * L, N, Kp, G, bits, L);
  r.amx = r.sums && qa_amx(M * L, N, Kp, G, bits);
  r.a = QaArgs{(const uint8_t*)packed[0].data_ptr(), packed[1].data_ptr<int32_t>(), packed[2].data_ptr<int32_t>(),
               packed[3].data_ptr<float>(), bits <= 4 ? r.x8.data() : nullptr, nullptr, r.xc.data(), r.fac.data(),
               r.zeros.data(), r.sums ? bias : nullptr, r.sums ? nullptr : scratch(r.part, M * L * N), M * L, N, Kp,
               G, K / G, (int)bits, r.vnni8 ? r.xu8.data() : nullptr, xs, r.sums ? L : 1};
}

void limb_rows_setup(LimbRows& r, int64_t M, int64_t K, int64_t N, int64_t G, int64_t bits, at::TensorList packed,
                     const float* bias) {
  const int64_t digits = *packed[5].data_ptr<int64_t>();
  r.adaptive = digits == kAutoLimbs;
  limb_rows_setup_digits(r, r.adaptive ? kAutoLowLimbs : (int)digits, M, K, N, G, bits, packed, bias);
  if (!r.adaptive) return;
  scratch(r.wide, M);
  if (!r.high) r.high = std::make_unique<LimbRows>();
  limb_rows_setup_digits(*r.high, kAutoHighLimbs, M, K, N, G, bits, packed, bias);
  scratch(r.high->part, M * kAutoHighLimbs * N);  // for runs of rows on a route that does not sum limbs
}

static void limb_rows_fill_digits(LimbRows& r, const float* x, int64_t m0, int64_t m1, uint8_t* wide) {
  const int L = r.L;
  const int64_t K = r.K;
  limb_split_avx2(x, K, L, r.digits.data(), r.fac.data(), r.ok.data(), m0, m1, wide);
  for (int64_t m = m0; m < m1; ++m) {
    bool finite = true;
    if (!r.ok[m])
      for (int64_t k = 0; k < K; ++k) finite = finite && std::isfinite(x[m * K + k]);
    r.finite[m] = finite;
  }
  const QaArgs& a = r.a;
  prep_acts(r.digits.data(), r.zeros.data(), r.M * L, K, a.Kp, a.xs, a.G, a.Kg, a.bits, r.x8, r.x16, r.xc,
            r.vnni8 ? &r.xu8 : nullptr, m0 * L, m1 * L);
}

void limb_rows_fill(LimbRows& r, const float* x, int64_t m0, int64_t m1) {
  limb_rows_fill_digits(r, x, m0, m1, r.adaptive ? r.wide.data() : nullptr);
  if (r.adaptive)
    for (int64_t m = m0; m < m1; ++m)
      if (r.wide[m]) limb_rows_fill_digits(*r.high, x, m, m + 1, nullptr);
}

// y rows [m0, m1) for the output rows of tiles [t0, t1) = [n0, n1), the kernel run on those rows
// only (for whole rows every route gives the same floats per row, whatever rows share a pass).
static void limb_rows_tiles_of(LimbRows& r, int64_t m0, int64_t m1, int64_t t0, int64_t t1, float* y) {
  const int64_t N = r.N, n0 = 8 * t0, n1 = std::min(N, 8 * t1);
  const int L = r.L;
  QaArgs a = r.a;
  bool sums = r.sums, amx = r.amx;
  if (m0 > 0 || m1 < r.M) {  // the kernel's own rows, and the route for that many
    const int64_t k0 = m0 * L;
    a.M = (m1 - m0) * L;
    if (a.x8) a.x8 += k0 * a.xs;
    if (a.xu8) a.xu8 += k0 * a.xs;
    a.xc += k0 * a.G;
    a.sa += k0;
    a.za += k0;
    sums = qa_sums_limbs(a.M, N, a.Kp, a.G, a.bits, L);
    amx = sums && qa_amx(a.M, N, a.Kp, a.G, a.bits);
    a.limbs = sums ? L : 1;
    a.bias = sums ? r.bias : nullptr;
  }
  if (sums) {  // the kernel sums each row's limbs (and adds the bias) as it stores
    a.y = y + m0 * N;
    if (amx)
      qa_pairs_amx(a, t0, t1);
    else
      qa_tiles_avx512vnni(a, t0, t1);
  } else {  // one output per kernel row, summed here
    a.y = r.part.data() + m0 * L * N;
    qa_tiles_avx512vnni(a, t0, t1);
    for (int64_t m = m0; m < m1; ++m) {
      const float* part = r.part.data() + m * L * N;
      float* out = y + m * N;
      for (int64_t n = n0; n < n1; ++n) out[n] = part[(L - 1) * N + n];
      for (int l = L - 2; l >= 0; --l)
        for (int64_t n = n0; n < n1; ++n) out[n] += part[l * N + n];
      if (r.bias)
        for (int64_t n = n0; n < n1; ++n) out[n] += r.bias[n];
    }
  }
}

void limb_rows_tiles(LimbRows& r, int64_t t0, int64_t t1, float* y) {
  const int64_t M = r.M, N = r.N, n0 = 8 * t0, n1 = std::min(N, 8 * t1);
  if (n0 >= n1) return;
  limb_rows_tiles_of(r, 0, M, t0, t1, y);
  if (r.adaptive)  // runs of rows flagged wide, again on the high digit count
    for (int64_t m = 0; m < M;) {
      if (!r.wide[m]) {
        ++m;
        continue;
      }
      int64_t e = m + 1;
      while (e < M && r.wide[e]) ++e;
      limb_rows_tiles_of(*r.high, m, e, t0, t1, y);
      m = e;
    }
  for (int64_t m = 0; m < M; ++m)
    if (!r.ok[m])
      for (int64_t n = n0; n < n1; ++n) y[m * N + n] = r.finite[m] ? (r.bias ? r.bias[n] : 0.f) : NAN;
}

// ---- memory read probe (benchmarks) ------------------------------------------------------------
int64_t read_probe(const at::Tensor& buf) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous(), "read_probe: buf must be a contiguous CPU tensor");
  const uint8_t* p = (const uint8_t*)buf.data_ptr();
  const int64_t n = buf.numel() * buf.element_size();
  const int64_t chunk = 1 << 20;
  std::atomic<uint64_t> acc{0};
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
    const int64_t b = c0 * chunk, e = std::min(n, c1 * chunk);
    uint64_t r = 0;
    if (use_avx2()) {
      r = read_probe_avx2(p + b, e - b);
    } else {
      for (int64_t i = b; i < e; ++i) r ^= p[i];
    }
    acc.fetch_xor(r);
  });
  return (int64_t)acc.load();
}

}  // namespace fxk
