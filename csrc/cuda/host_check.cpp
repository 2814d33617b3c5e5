// Host-side evaluation of the CUDA kernels' index arithmetic and epilogue math, so a GPU-less
// machine can test them against fxkernels.reference.
//
// * host_epilogue: corrected_acc / epilogue_value (fxk_gemm.h) on CPU tensors.
// * host_quantize_act: act_qparams / act_inv_scale / act_quantize on CPU tensors.
// * host_simulate_gemm: replays the GEMM kernel's data movement for one tile configuration:
//   the cp.async chunk -> swizzled smem mapping, the ldmatrix.x4 lane addresses, the register
//   fragments mma.m16n8k32 consumes, the all-ones row-sum mma and the accumulator -> output
//   coordinates. ldmatrix and mma are modelled from the PTX ISA fragment tables (written out
//   independently below), so a wrong index helper shows up as a wrong product.
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "fxk_gemm.h"
#include "host_check.h"

namespace fxk {
namespace host {

namespace {

void check_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, ": tensor on ", t.device(), "; expected a CPU tensor (host-side check)");
  TORCH_CHECK(t.scalar_type() == dtype, name, ": dtype ", t.scalar_type(), "; expected ", dtype);
  TORCH_CHECK(t.dim() == dim, name, ": shape ", t.sizes(), "; expected ", dim, " dimensions");
}

// ---- PTX ISA models -------------------------------------------------------------------------
// ldmatrix.m8n8.x4.b16: lane l supplies the address of row (l % 8) of matrix (l / 8); each
// matrix row is 16 bytes. Destination register j of lane l receives bytes 4*(l%4)..+3 of row
// l/4 of matrix j.
void model_ldmatrix_x4(const uint8_t* smem, const int (&addr)[32], uint32_t (&regs)[32][4]) {
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) {
      const int row_addr = addr[j * 8 + (l >> 2)];
      uint32_t v;
      std::memcpy(&v, smem + row_addr + 4 * (l & 3), 4);
      regs[l][j] = v;
    }
}

// mma.m16n8k32.row.col.s32.s8.s8.s32 fragment tables (groupID g = lane/4, t = lane%4):
//   A element i (0..15, 4 per register): row g + 8 for i in [4,8) or [12,16), else g;
//                                        col 4t + (i%4) + 16 * (i >= 8)
//   B element i (0..7): k = 4t + (i%4) + 16 * (i >= 4), n = g
//   C element i (0..3): row g + 8 * (i >= 2), col 2t + (i%2)
void model_mma(const uint32_t (&a)[32][4], const uint32_t (&b)[32][2], int32_t (&c)[32][4]) {
  int32_t A[16][32], B[32][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 16; ++i) {
      const int8_t v = static_cast<int8_t>((a[l][i / 4] >> (8 * (i % 4))) & 0xff);
      const int row = g + (((i >= 4 && i < 8) || i >= 12) ? 8 : 0);
      const int col = 4 * t + (i % 4) + (i >= 8 ? 16 : 0);
      A[row][col] = v;
    }
    for (int i = 0; i < 8; ++i) {
      const int8_t v = static_cast<int8_t>((b[l][i / 4] >> (8 * (i % 4))) & 0xff);
      B[4 * t + (i % 4) + (i >= 4 ? 16 : 0)][g] = v;
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
      int32_t s = 0;
      for (int k = 0; k < 32; ++k) s += A[row][k] * B[k][col];
      c[l][i] += s;
    }
  }
}

// ---- the kernel's data movement, replayed ----------------------------------------------------
template <class Cfg>
void simulate(const int8_t* a, const int8_t* b, int m, int n, int k, int32_t* c, int32_t* xsum_out) {
  const int grid_m = (m + Cfg::BM - 1) / Cfg::BM, grid_n = (n + Cfg::BN - 1) / Cfg::BN;
  const int ktiles = (k + Cfg::BK - 1) / Cfg::BK;
  std::vector<uint8_t> smem(Cfg::SMEM_BYTES);
  std::vector<int> covered(static_cast<size_t>(grid_m) * grid_n, 0);
  constexpr int NW = Cfg::WARPS_M * Cfg::WARPS_N;
  for (int bid = 0; bid < grid_m * grid_n; ++bid) {
    const TileCoord tc = tile_coords(bid, grid_m, grid_n, Cfg::GROUP_M);
    TORCH_CHECK(tc.tm >= 0 && tc.tm < grid_m && tc.tn >= 0 && tc.tn < grid_n, "tile_coords out of range");
    covered[static_cast<size_t>(tc.tm) * grid_n + tc.tn] += 1;
    const int m0 = tc.tm * Cfg::BM, n0 = tc.tn * Cfg::BN;
    std::vector<int32_t> acc(static_cast<size_t>(NW) * Cfg::MT * Cfg::NT * 32 * 4, 0);
    std::vector<int32_t> rs(static_cast<size_t>(NW) * Cfg::MT * 32 * 4, 0);
    auto ACC = [&](int w, int i, int j) { return &acc[((static_cast<size_t>(w) * Cfg::MT + i) * Cfg::NT + j) * 128]; };
    auto RS = [&](int w, int i) { return &rs[(static_cast<size_t>(w) * Cfg::MT + i) * 128]; };
    std::fill(smem.begin(), smem.end(), 0xA5);  // poison: unwritten bytes must never be read
    for (int kt = 0; kt < ktiles; ++kt) {
      const int stage = kt % Cfg::STAGES;
      uint8_t* sa = smem.data() + stage * Cfg::STAGE_BYTES;
      uint8_t* sb = sa + Cfg::A_STAGE_BYTES;
      const int k0 = kt * Cfg::BK;
      std::vector<int> written(Cfg::STAGE_BYTES / 16, 0);
      for (int tid = 0; tid < Cfg::THREADS; ++tid) {
        for (int it = 0; it < (Cfg::A_CHUNKS + Cfg::THREADS - 1) / Cfg::THREADS; ++it) {
          const int i = it * Cfg::THREADS + tid;
          if (i >= Cfg::A_CHUNKS) continue;
          int row, ch;
          copy_chunk_coord<Cfg::CPR>(i, row, ch);
          const int gm = m0 + row, gk = k0 + ch * 16;
          const int off = swizzled_offset<Cfg::CPR>(row, ch);
          TORCH_CHECK(off >= 0 && off + 16 <= Cfg::A_STAGE_BYTES && off % 16 == 0, "A smem offset out of range");
          written[off / 16] += 1;
          if (gm < m && gk < k) std::memcpy(sa + off, a + static_cast<size_t>(gm) * k + gk, 16);
          else std::memset(sa + off, 0, 16);
        }
        for (int it = 0; it < (Cfg::B_CHUNKS + Cfg::THREADS - 1) / Cfg::THREADS; ++it) {
          const int i = it * Cfg::THREADS + tid;
          if (i >= Cfg::B_CHUNKS) continue;
          int row, ch;
          copy_chunk_coord<Cfg::CPR>(i, row, ch);
          const int gn = n0 + row, gk = k0 + ch * 16;
          const int off = swizzled_offset<Cfg::CPR>(row, ch);
          TORCH_CHECK(off >= 0 && off + 16 <= Cfg::B_STAGE_BYTES && off % 16 == 0, "B smem offset out of range");
          written[(Cfg::A_STAGE_BYTES + off) / 16] += 1;
          if (gn < n && gk < k) std::memcpy(sb + off, b + static_cast<size_t>(gn) * k + gk, 16);
          else std::memset(sb + off, 0, 16);
        }
      }
      for (int x : written) TORCH_CHECK(x == 1, "a 16-byte smem chunk was written ", x, " times in one stage");
      for (int w = 0; w < NW; ++w) {
        const int wm = w / Cfg::WARPS_N, wn = w % Cfg::WARPS_N;
        for (int ks = 0; ks < Cfg::KSTEPS; ++ks) {
          uint32_t afr[Cfg::MT][32][4];
          uint32_t bfr[Cfg::NT][32][2];
          for (int i = 0; i < Cfg::MT; ++i) {
            int addr[32];
            for (int l = 0; l < 32; ++l) {
              int row, ch;
              ldsm_a_coord(l, wm * Cfg::WM + i * 16, ks, row, ch);
              TORCH_CHECK(row < Cfg::BM && ch < Cfg::CPR, "ldmatrix A address outside the tile");
              addr[l] = swizzled_offset<Cfg::CPR>(row, ch);
            }
            model_ldmatrix_x4(sa, addr, afr[i]);
          }
          for (int j = 0; j < Cfg::NT; j += 2) {
            int addr[32];
            for (int l = 0; l < 32; ++l) {
              int row, ch;
              ldsm_b_coord(l, wn * Cfg::WN + j * 8, ks, row, ch);
              TORCH_CHECK(row < Cfg::BN && ch < Cfg::CPR, "ldmatrix B address outside the tile");
              addr[l] = swizzled_offset<Cfg::CPR>(row, ch);
            }
            uint32_t r[32][4];
            model_ldmatrix_x4(sb, addr, r);
            for (int l = 0; l < 32; ++l) {
              bfr[j][l][0] = r[l][0];
              bfr[j][l][1] = r[l][1];
              bfr[j + 1][l][0] = r[l][2];
              bfr[j + 1][l][1] = r[l][3];
            }
          }
          for (int i = 0; i < Cfg::MT; ++i) {
            for (int j = 0; j < Cfg::NT; ++j)
              model_mma(afr[i], bfr[j], *reinterpret_cast<int32_t(*)[32][4]>(ACC(w, i, j)));
            if (i % Cfg::WARPS_N == wn) {
              uint32_t ones[32][2];
              for (int l = 0; l < 32; ++l) ones[l][0] = ones[l][1] = 0x01010101u;
              model_mma(afr[i], ones, *reinterpret_cast<int32_t(*)[32][4]>(RS(w, i)));
            }
          }
        }
      }
    }
    // Epilogue addressing exactly as the kernel does it.
    std::vector<int32_t> s_xsum(Cfg::BM, 0);
    for (int w = 0; w < NW; ++w) {
      const int wm = w / Cfg::WARPS_N, wn = w % Cfg::WARPS_N;
      for (int l = 0; l < 32; ++l) {
        int lane_row, lane_col;
        acc_coord(l, 0, lane_row, lane_col);
        for (int i = 0; i < Cfg::MT; ++i)
          if (i % Cfg::WARPS_N == wn && lane_col == 0) {
            const int r = wm * Cfg::WM + i * 16 + lane_row;
            s_xsum[r] = RS(w, i)[l * 4 + 0];
            s_xsum[r + 8] = RS(w, i)[l * 4 + 2];
          }
      }
    }
    for (int w = 0; w < NW; ++w) {
      const int wm = w / Cfg::WARPS_N, wn = w % Cfg::WARPS_N;
      for (int l = 0; l < 32; ++l) {
        int lane_row, lane_col;
        acc_coord(l, 0, lane_row, lane_col);
        for (int e = 0; e < 4; ++e) {  // the kernel's assumption about elements 1..3
          int r2, c2;
          acc_coord(l, e, r2, c2);
          TORCH_CHECK(r2 == lane_row + 8 * (e >> 1) && c2 == lane_col + (e & 1), "acc_coord layout assumption broken");
        }
        for (int j = 0; j < Cfg::NT; ++j) {
          const int col = n0 + wn * Cfg::WN + j * 8 + lane_col;
          for (int i = 0; i < Cfg::MT; ++i)
            for (int h = 0; h < 2; ++h) {
              const int rl = wm * Cfg::WM + i * 16 + lane_row + h * 8;
              const int r = m0 + rl;
              if (r >= m) continue;
              if (xsum_out && tc.tn == 0 && wn == 0 && j == 0 && (l & 3) == 0) xsum_out[r] = s_xsum[rl];
              for (int e = 0; e < 2; ++e)
                if (col + e < n) c[static_cast<size_t>(r) * n + col + e] = ACC(w, i, j)[l * 4 + 2 * h + e];
            }
        }
      }
    }
  }
  for (int x : covered) TORCH_CHECK(x == 1, "tile_coords visited a tile ", x, " times");
}

}  // namespace

std::vector<at::Tensor> simulate_gemm(const at::Tensor& a, const at::Tensor& b, int64_t config) {
  check_cpu(a, "a", at::kChar, 2);
  check_cpu(b, "b", at::kChar, 2);
  TORCH_CHECK(a.size(1) == b.size(1), "b: shape ", b.sizes(), "; expected [N, K=", a.size(1), "]");
  TORCH_CHECK(a.size(1) % 16 == 0, "a: K=", a.size(1), "; expected a multiple of 16");
  auto ac = a.contiguous(), bc = b.contiguous();
  const int m = a.size(0), n = b.size(0), k = a.size(1);
  auto c = at::full({m, n}, -7, a.options().dtype(at::kInt));  // sentinel: every entry must be written
  auto xs = at::full({m}, -7, a.options().dtype(at::kInt));
  const int8_t* pa = ac.data_ptr<int8_t>();
  const int8_t* pb = bc.data_ptr<int8_t>();
  int32_t* pc = c.data_ptr<int32_t>();
  switch (config) {
    case 0: simulate<Cfg0>(pa, pb, m, n, k, pc, xs.data_ptr<int32_t>()); break;
    case 1: simulate<Cfg1>(pa, pb, m, n, k, pc, xs.data_ptr<int32_t>()); break;
    case 2: simulate<Cfg2>(pa, pb, m, n, k, pc, xs.data_ptr<int32_t>()); break;
    case 3: simulate<Cfg3>(pa, pb, m, n, k, pc, xs.data_ptr<int32_t>()); break;
    default: TORCH_CHECK(false, "config: got ", config, "; expected 0..", kNumConfigs - 1);
  }
  return {c, xs};
}

std::vector<at::Tensor> epilogue(const at::Tensor& acc, const at::Tensor& xsum, const at::Tensor& x_scale,
                                 const at::Tensor& x_zero, const at::Tensor& w_scale, const at::Tensor& w_zero,
                                 int64_t zero_offset, const at::Tensor& wsum, const c10::optional<at::Tensor>& bias,
                                 int64_t k) {
  check_cpu(acc, "acc", at::kInt, 2);
  const int64_t m = acc.size(0), n = acc.size(1);
  check_cpu(xsum, "xsum", at::kInt, 1);
  check_cpu(x_scale, "x_scale", at::kFloat, 1);
  check_cpu(x_zero, "x_zero", at::kInt, 1);
  check_cpu(w_scale, "w_scale", at::kFloat, 1);
  check_cpu(w_zero, "w_zero", at::kInt, 1);
  check_cpu(wsum, "wsum", at::kInt, 1);
  TORCH_CHECK(xsum.size(0) == m && x_scale.size(0) == m && x_zero.size(0) == m, "xsum/x_scale/x_zero: expected [M=", m, "]");
  TORCH_CHECK(w_scale.size(0) == n && w_zero.size(0) == n && wsum.size(0) == n, "w_scale/w_zero/wsum: expected [N=", n, "]");
  at::Tensor bc;
  if (bias) {
    check_cpu(*bias, "bias", at::kFloat, 1);
    TORCH_CHECK(bias->size(0) == n, "bias: shape ", bias->sizes(), "; expected [", n, "]");
    bc = bias->contiguous();
  }
  auto a = acc.contiguous();
  auto corr = at::empty_like(a);
  auto y = at::empty({m, n}, a.options().dtype(at::kFloat));
  auto pa = a.accessor<int32_t, 2>();
  auto pc = corr.accessor<int32_t, 2>();
  auto py = y.accessor<float, 2>();
  auto xs = xsum.accessor<int32_t, 1>();
  auto sa = x_scale.accessor<float, 1>();
  auto za = x_zero.accessor<int32_t, 1>();
  auto sw = w_scale.accessor<float, 1>();
  auto wz = w_zero.accessor<int32_t, 1>();
  auto ws = wsum.accessor<int32_t, 1>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) {
      const int32_t v = corrected_acc(pa[r][c], za[r], xs[r], wz[c] - static_cast<int32_t>(zero_offset), ws[c],
                                      static_cast<int32_t>(k));
      pc[r][c] = v;
      py[r][c] = epilogue_value(v, sa[r], sw[c], bias ? bc.data_ptr<float>()[c] : 0.f);
    }
  return {corr, y};
}

std::vector<at::Tensor> quantize_act(const at::Tensor& x, const c10::optional<at::Tensor>& scale,
                                     const c10::optional<at::Tensor>& zero) {
  check_cpu(x, "x", at::kFloat, 2);
  auto xc = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  auto q = at::empty({m, k}, x.options().dtype(at::kChar));
  auto so = at::empty({m}, x.options());
  auto zo = at::empty({m}, x.options().dtype(at::kInt));
  const float* px = xc.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r) {
    float s;
    int32_t z;
    if (scale) {
      s = scale->item<float>();
      z = zero->item<int32_t>();
    } else {
      float lo = 0.f, hi = 0.f;
      for (int64_t i = 0; i < k; ++i) {
        lo = std::min(lo, px[r * k + i]);
        hi = std::max(hi, px[r * k + i]);
      }
      act_qparams(lo, hi, s, z);
    }
    const float inv = act_inv_scale(s);
    for (int64_t i = 0; i < k; ++i) q.data_ptr<int8_t>()[r * k + i] = act_quantize(px[r * k + i], inv, z);
    so.data_ptr<float>()[r] = s;
    zo.data_ptr<int32_t>()[r] = z;
  }
  return {q, so, zo};
}

at::Tensor tile_order(int64_t grid_m, int64_t grid_n, int64_t group_m) {
  TORCH_CHECK(grid_m > 0 && grid_n > 0 && group_m > 0, "tile_order: grid_m, grid_n, group_m must be positive");
  auto out = at::empty({grid_m * grid_n, 2}, at::TensorOptions().dtype(at::kInt));
  auto p = out.accessor<int32_t, 2>();
  for (int64_t b = 0; b < grid_m * grid_n; ++b) {
    const TileCoord t = tile_coords(static_cast<int>(b), grid_m, grid_n, group_m);
    p[b][0] = t.tm;
    p[b][1] = t.tn;
  }
  return out;
}

std::vector<int64_t> config_shape(int64_t config) {
  auto f = [](auto c) {
    using C = decltype(c);
    return std::vector<int64_t>{C::BM, C::BN, C::BK, C::WARPS_M, C::WARPS_N, C::STAGES, C::SMEM_BYTES};
  };
  switch (config) {
    case 0: return f(Cfg0{});
    case 1: return f(Cfg1{});
    case 2: return f(Cfg2{});
    case 3: return f(Cfg3{});
    default: TORCH_CHECK(false, "config: got ", config, "; expected 0..", kNumConfigs - 1);
  }
}

}  // namespace host
}  // namespace fxk
