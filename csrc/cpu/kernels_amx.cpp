// INT4 and INT8 weights x int8 activations on AMX tiles (Intel AMX-INT8: Sapphire Rapids and
// later), for the integer-activation GEMM when many activation rows share each weight: batched
// decode, where every fp32 row is LIMBS int8 rows (kernels.cpp limb_linear), and W4A8/W8A8 prefill.
//
// Why: the vpdpbusd kernel (qa4_block2) spends 6 instructions per activation row per 128 weights,
// so at 32 rows (batch 8 x 4 limbs) it is compute-bound, ~4.6x its one-row time. One tdpbsud
// multiplies a 16-row x 64-byte activation tile by a 64 x 16 weight tile (16K products) in ~16
// cycles; the weights then cost only their unpacking, and the loop is bound by memory again.
//
// Layout: a weight tile pair (t, t+1) of the qa layout holds, per 8-column step, 32 bytes per tile
// (8 output rows x 4 bytes, low nibble = even column, high = odd, in the activations' permuted
// order; see kernels.h). An AMX B tile row is one K quad of 16 output rows (4 bytes each), so a
// step's low nibbles of both tiles are one B row and its high nibbles the next: unpacking is two
// masks and a shift per 32 bytes, stored to a 1 KiB buffer per 64 columns. The A tiles are the
// activation rows x8 as they are (64 bytes of a row = 8 steps x [4 low-nibble columns, 4 high]).
// INT8 (unpack_b8) interleaves the layout's column pairs into quads, and the A tiles are the
// unsigned activations xu8.
//
// Results are bit-identical to the vpdpbusd kernel: the int32 tile sums are exact, and the
// epilogue applies the same zero-point correction and fused multiply-adds in the same order.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu_features.h"
#include "kernels.h"
#include "tile_pair512.h"

#define FXK_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))

namespace fxk {

bool amx_usable() {
  static const bool ok = [] {
#if defined(__linux__) && defined(__x86_64__)
    __builtin_cpu_init();
    unsigned eax, ebx, ecx, edx;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;
    if (!tile || !int8 || !__builtin_cpu_supports("avx512bw")) return false;
    // Linux hands out the 8 KiB tile state only on request (once per process, all threads).
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

namespace {

struct alignas(64) TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// A pass is up to 32 activation rows (two row tiles r) x two weight tile pairs p (32 output rows):
// tmm0..tmm3 hold the int32 sums of (r, p) = (0, 0), (0, 1), (1, 0), (1, 1); tmm4 and tmm5 the
// activations of row tiles 0 and 1; tmm6 and tmm7 the weights of pairs 0 and 1. Each activation
// tile feeds two products and each weight tile two, and the four sums are independent, so the
// tile unit is not left waiting on one sum's latency.
constexpr int kPassRows = (int)kAmxPassRows;

FXK_AMX void configure(int64_t rows0, int64_t rows1) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  const int64_t rows[8] = {rows0, rows0, rows1, rows1, rows0, rows1, 16, 16};
  for (int j = 0; j < 8; ++j) {
    c.rows[j] = (uint8_t)rows[j];
    c.colsb[j] = rows[j] ? 64 : 0;
  }
  _tile_loadconfig(&c);
}

// The product instruction by weight width (tile numbers are immediates). INT4: signed activations
// x unsigned codes (tdpbsud); INT8: activations + 128 as unsigned x signed codes (tdpbusd), as on
// the VNNI path.
#define FXK_TDP(C, A, B)         \
  do {                           \
    if (w8)                      \
      _tile_dpbusd(C, A, B);     \
    else                         \
      _tile_dpbsud(C, A, B);     \
  } while (0)

// 64 columns of tiles t and t+1 (8 steps from step s0) as one B tile: 16 K quads x 16 rows x 4 bytes.
// A step's 32 bytes of both tiles sit side by side in one 64-byte register: its low nibbles are
// one B row and its high nibbles the next.
FXK_AMX inline void unpack_b(const uint8_t* w0, const uint8_t* w1, int64_t s0, uint8_t* b) {
  const __m512i m15 = _mm512_set1_epi8(15);
  for (int j = 0; j < 8; ++j) {
    const int64_t s = s0 + j;
    _mm_prefetch((const char*)(w0 + s * 32) + 8192, _MM_HINT_T0);
    _mm_prefetch((const char*)(w1 + s * 32) + 8192, _MM_HINT_T0);
    const __m512i v = load_pair(w0 + s * 32, w1 + s * 32);
    uint8_t* lo = b + (2 * j) * 64;
    _mm512_store_si512((__m512i*)lo, _mm512_and_si512(v, m15));
    _mm512_store_si512((__m512i*)(lo + 64), _mm512_and_si512(_mm512_srli_epi16(v, 4), m15));
  }
}

// INT8: 64 columns of tiles t and t+1 as one B tile. A tile stores each column pair (k, k+1) of
// its 8 rows as one 16-byte block; two adjacent blocks (a K quad) are interleaved by 16-bit words
// into the quad's 32 bytes, row by row.
FXK_AMX inline void unpack_b8(const uint8_t* w0, const uint8_t* w1, int64_t q0, uint8_t* b) {
  // both tiles' 32 bytes in one register, each half interleaved on its own
  const __m512i interleave = _mm512_set_epi16(31, 23, 30, 22, 29, 21, 28, 20, 27, 19, 26, 18, 25, 17, 24, 16,
                                              15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
  for (int j = 0; j < 16; ++j) {
    const int64_t q = q0 + j;
    _mm_prefetch((const char*)(w0 + q * 32) + 8192, _MM_HINT_T0);
    _mm_prefetch((const char*)(w1 + q * 32) + 8192, _MM_HINT_T0);
    const __m512i v = load_pair(w0 + q * 32, w1 + q * 32);
    _mm512_store_si512((__m512i*)(b + j * 64), _mm512_permutexvar_epi16(interleave, v));
  }
}

}  // namespace

FXK_AMX void qa_pairs_amx(const QaArgs& a, int64_t t0, int64_t t1) {
  const int64_t Kp = a.Kp, G = a.G, per_group = Kp / G / 64, chunks = Kp / 64;
  const bool w8 = a.bits > 4;
  // bytes of one tile (8 output rows) per 64 columns: 4-bit codes 256, 8-bit codes 512
  const int64_t tile_bytes = (Kp / 64) * (w8 ? 512 : 256);
  const uint8_t* xbase = w8 ? a.xu8 : (const uint8_t*)a.x8;
  // Unpacked weights go through a ring of four 1 KiB tiles per pair, written two chunks ahead of
  // their tile load: a tile load does not take data from pending stores, and one issued right
  // after the stores that fill its buffer waits for them to reach L1 (a third of the time, measured).
  constexpr int kAhead = 2;
  alignas(64) uint8_t ring[2][4][16 * 64];
  alignas(64) int32_t acc[16 * 16];
  alignas(64) float yf[2][kPassRows * 16];
  const auto unpack = [&](int64_t t, int64_t chunk, uint8_t* b) {
    const uint8_t* w0 = a.w + t * tile_bytes;
    if (w8)
      unpack_b8(w0, w0 + tile_bytes, chunk * 16, b);
    else
      unpack_b(w0, w0 + tile_bytes, chunk * 8, b);
  };
  for (int64_t m0 = 0; m0 < a.M; m0 += kPassRows) {
    const int64_t rows = a.M - m0 < kPassRows ? a.M - m0 : kPassRows;
    const int64_t rows0 = rows < 16 ? rows : 16, rows1 = rows - rows0;
    configure(rows0, rows1);
    const uint8_t* x0 = xbase + m0 * a.xs;
    const uint8_t* x1 = x0 + 16 * a.xs;
    for (int64_t t = t0; t + 2 <= t1; t += 4) {
      const bool two = t + 4 <= t1;  // a second pair in this thread's range
      for (int64_t c = 0; c < kAhead && c < chunks; ++c) {
        unpack(t, c, ring[0][c & 3]);
        if (two) unpack(t + 2, c, ring[1][c & 3]);
      }
      std::memset(yf, 0, sizeof yf);
      for (int64_t g = 0; g < G; ++g) {
        _tile_zero(0);
        _tile_zero(1);
        if (rows1) {
          _tile_zero(2);
          _tile_zero(3);
        }
        for (int64_t k = g * per_group; k < (g + 1) * per_group; ++k) {
          if (k + kAhead < chunks) {
            unpack(t, k + kAhead, ring[0][(k + kAhead) & 3]);
            if (two) unpack(t + 2, k + kAhead, ring[1][(k + kAhead) & 3]);
          }
          _tile_loadd(6, ring[0][k & 3], 64);
          if (two) _tile_loadd(7, ring[1][k & 3], 64);
          _tile_loadd(4, x0 + k * 64, a.xs);
          FXK_TDP(0, 4, 6);
          if (two) FXK_TDP(1, 4, 7);
          if (rows1) {
            _tile_loadd(5, x1 + k * 64, a.xs);
            FXK_TDP(2, 5, 6);
            if (two) FXK_TDP(3, 5, 7);
          }
        }
        _tile_stored(0, acc, 64);
        pair_epilogue(a, t, g, m0, rows0, acc, yf[0]);
        if (rows1) {
          _tile_stored(2, acc, 64);
          pair_epilogue(a, t, g, m0 + 16, rows1, acc, yf[0] + 16 * 16);
        }
        if (two) {
          _tile_stored(1, acc, 64);
          pair_epilogue(a, t + 2, g, m0, rows0, acc, yf[1]);
          if (rows1) {
            _tile_stored(3, acc, 64);
            pair_epilogue(a, t + 2, g, m0 + 16, rows1, acc, yf[1] + 16 * 16);
          }
        }
      }
      pair_store(a, t, m0, rows, yf[0]);
      if (two) pair_store(a, t + 2, m0, rows, yf[1]);
    }
  }
  _tile_release();
}
#undef FXK_TDP

}  // namespace fxk
