// kiln's native CPU kernels (AVX-512), built by native.py: a direct fp32 NHWC convolution, max pooling and a
// per-channel affine map with a clamp (an inference BatchNormalization + ReLU), the last two in fp32 or bf16.
//
// The convolution:
// Weights are packed as [oc/16][kh][kw][ic][16]. A task computes one output row segment for up to four blocks of
// 16 output channels; the input channels run in blocks whose weights stay in L1 across the segment, the partial
// sums kept in the output. Bias starts the sum; the residual add and a clamp (ReLU, Clip) finish it.
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <vector>

// Before a loop over a tile's accumulator array: the compiler keeps the array in registers only where such loops are
// unrolled into constant indices (without, it kept them in memory between the bias, the sums and the stores, and a
// 16-channel 1x1 spent 43% of its time outside its multiply-adds; with, 0.23 -> 0.17 ms at batch 8)
#define UNROLLED _Pragma("GCC unroll 16")

static inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
}

// v clamped to [lo, hi], a NaN kept: AVX-512's max and min return their second operand where either is NaN, so v
// goes second (max(v, lo) made a NaN sum lo: ReLU(NaN) 0, where torch's and onnxruntime's give NaN)
static inline __m512 clamped(__m512 v, __m512 lo, __m512 hi) { return _mm512_min_ps(hi, _mm512_max_ps(lo, v)); }

struct ConvArgs {
  const float* x; const float* w; const float* bias; const float* residual; float* y;
  int64_t n, h, w_, c;          // input, NHWC
  int64_t oh, ow, oc;           // output, NHWC
  int64_t ldy;                  // floats from one output pixel to the next: oc, or more in a slice of a wider buffer
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  float lo, hi;                 // clamp after the residual: ReLU is [0, inf)
};

struct Span { int64_t n, oy, ob0, ic0, ic1; bool first, last; };

// The multiply-adds of one tap (ky, kx) over input channels [ic0, ic1): per channel NB weight vectors, NW broadcast
// input pixels (only [j0, j1) where EDGE), NB x NW accumulators.
template <int NB, int NW, bool EDGE>
__attribute__((always_inline)) static inline void accumulate(__m512 (&acc)[NB][NW], const float* xp, const float* wp,
                                                            int64_t wblock, int64_t xs, int64_t ic0, int64_t ic1,
                                                            int64_t j0, int64_t j1) {
  for (int64_t ic = ic0; ic < ic1; ++ic) {
    __m512 wv[NB];
    UNROLLED for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_ps(wp + b * wblock + ic * 16);
    UNROLLED for (int j = 0; j < NW; ++j) {
      if (EDGE && (j < j0 || j >= j1)) continue;
      const __m512 xv = _mm512_set1_ps(xp[j * xs + ic]);
      UNROLLED for (int b = 0; b < NB; ++b) acc[b][j] = _mm512_fmadd_ps(wv[b], xv, acc[b][j]);
    }
  }
}

// Each branch of the tile (first pass or not, one tap or several, last pass with or without a residual) is taken once
// per tile, outside the loops over its accumulators. What the stores address is read into locals first: a vector store
// may alias anything, and the compiler read the arguments again from memory for each of the 24 stores.
template <int NB, int NW, bool EDGE>
static inline void tile(const ConvArgs& a, const Span& s, int64_t ox0) {
  __m512 acc[NB][NW];
  const int64_t pixel0 = (s.n * a.oh + s.oy) * a.ow + ox0, ldy = a.ldy, oc = a.oc;
  float* const y = a.y + pixel0 * ldy + s.ob0 * 16;  // the tile's first pixel, its first output channel
  const float* const residual = a.residual ? a.residual + pixel0 * oc + s.ob0 * 16 : nullptr;
  const bool last = s.last;
  __mmask16 mask[NB];
  UNROLLED for (int b = 0; b < NB; ++b) mask[b] = first_lanes(oc - (s.ob0 + b) * 16);
  if (s.first) {
    UNROLLED for (int b = 0; b < NB; ++b) {
      const __m512 bias = _mm512_loadu_ps(a.bias + (s.ob0 + b) * 16);
      UNROLLED for (int j = 0; j < NW; ++j) acc[b][j] = bias;
    }
  } else {
    UNROLLED for (int b = 0; b < NB; ++b)
      UNROLLED for (int j = 0; j < NW; ++j) acc[b][j] = _mm512_maskz_loadu_ps(mask[b], y + j * ldy + b * 16);
  }
  if (!EDGE && last) {
    // the output lines (and the residual's) two tiles on, asked for ahead: a layer whose output does not fit
    // in cache otherwise waits on a write-allocate miss per store (ResNet-50 b8's 64->256 1x1: 3.3 -> 2.0 ms)
    UNROLLED for (int j = 2 * NW; j < 3 * NW; ++j)
      UNROLLED for (int b = 0; b < NB; ++b) {
        _mm_prefetch(reinterpret_cast<const char*>(y + j * ldy + b * 16), _MM_HINT_ET0);
        if (residual) _mm_prefetch(reinterpret_cast<const char*>(residual + j * oc + b * 16), _MM_HINT_T0);
      }
  }
  const int64_t wblock = a.kh * a.kw * a.c * 16;
  const int64_t xs = a.sw * a.c;
  const float* w = a.w + s.ob0 * wblock;
  if (!EDGE && a.kh == 1 && a.kw == 1 && a.ph == 0) {  // one tap, inside the input: a 1x1 layer's row of pixels
    const float* xp = a.x + (((s.n * a.h + s.oy * a.sh) * a.w_) + ox0 * a.sw) * a.c;
    accumulate<NB, NW, false>(acc, xp, w, wblock, xs, s.ic0, s.ic1, 0, NW);
  } else {
    for (int64_t ky = 0; ky < a.kh; ++ky) {
      const int64_t iy = s.oy * a.sh + ky * a.dh - a.ph;
      if (iy < 0 || iy >= a.h) continue;
      const float* xrow = a.x + ((s.n * a.h + iy) * a.w_) * a.c;
      for (int64_t kx = 0; kx < a.kw; ++kx) {
        const int64_t ix0 = ox0 * a.sw + kx * a.dw - a.pw;  // column of pixel j: ix0 + j * sw
        int64_t j0 = 0, j1 = NW;
        if (EDGE) {
          while (j0 < NW && ix0 + j0 * a.sw < 0) ++j0;
          while (j1 > j0 && ix0 + (j1 - 1) * a.sw >= a.w_) --j1;
          if (j0 >= j1) continue;
        }
        const float* taps = w + (ky * a.kw + kx) * a.c * 16;
        accumulate<NB, NW, EDGE>(acc, xrow + ix0 * a.c, taps, wblock, xs, s.ic0, s.ic1, j0, j1);
      }
    }
  }
  if (last) {
    if (residual)
      UNROLLED for (int j = 0; j < NW; ++j)
        UNROLLED for (int b = 0; b < NB; ++b)
          acc[b][j] = _mm512_add_ps(acc[b][j], _mm512_maskz_loadu_ps(mask[b], residual + j * oc + b * 16));
    const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi);
    UNROLLED for (int j = 0; j < NW; ++j)
      UNROLLED for (int b = 0; b < NB; ++b) acc[b][j] = clamped(acc[b][j], lo, hi);
  }
  UNROLLED for (int j = 0; j < NW; ++j)
    UNROLLED for (int b = 0; b < NB; ++b) _mm512_mask_storeu_ps(y + j * ldy + b * 16, mask[b], acc[b][j]);
}

template <int NB, int NW, bool EDGE>
static inline void tile_upto(const ConvArgs& a, const Span& s, int64_t ox0, int64_t count) {
  if constexpr (NW > 1) {
    if (count < NW) return tile_upto<NB, NW - 1, EDGE>(a, s, ox0, count);
  }
  tile<NB, NW, EDGE>(a, s, ox0);
}

template <int NB>
static void segment(const ConvArgs& a, const Span& s, int64_t cx0, int64_t cx1) {
  constexpr int W = NB >= 4 ? 6 : (NB == 3 ? 8 : (NB == 2 ? 12 : 14));
  // columns whose every tap lies inside the input, [lo_x, hi_x), run in full tiles without bounds checks; the
  // padded columns either side (one for a padded 3x3) run one by one with them
  int64_t lo_x = 0, hi_x = a.ow;
  while (lo_x < a.ow && lo_x * a.sw - a.pw < 0) ++lo_x;
  while (hi_x > lo_x && (hi_x - 1) * a.sw + (a.kw - 1) * a.dw - a.pw >= a.w_) --hi_x;
  lo_x = lo_x < cx0 ? cx0 : (lo_x > cx1 ? cx1 : lo_x);
  hi_x = hi_x > cx1 ? cx1 : (hi_x < lo_x ? lo_x : hi_x);
  for (int64_t ox = cx0; ox < lo_x; ++ox) tile<NB, 1, true>(a, s, ox);
  for (int64_t ox = lo_x; ox < hi_x; ox += W) tile_upto<NB, W, false>(a, s, ox, hi_x - ox < W ? hi_x - ox : W);
  for (int64_t ox = hi_x; ox < cx1; ++ox) tile<NB, 1, true>(a, s, ox);
}

extern "C" void kiln_conv_nhwc(const ConvArgs* args, int64_t blocks_per_task, int64_t rows_per_task,
                               int64_t cols_per_task, int64_t channels_per_pass, int64_t threads) {
  const ConvArgs& a = *args;
  const int64_t ocb = (a.oc + 15) / 16;
  const int64_t groups = (ocb + blocks_per_task - 1) / blocks_per_task;
  const int64_t chunks = (a.ow + cols_per_task - 1) / cols_per_task;
  const int64_t bands = (a.oh + rows_per_task - 1) / rows_per_task;
  const int64_t per_group = a.n * bands * chunks;
  // the output-channel group varies slowest, so that the tasks a thread takes in turn share their weights; taken
  // one at a time, so that uneven tasks (a last, shorter band) do not leave a thread idle
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < groups * per_group; ++t) {
    const int64_t g = t / per_group, chunk = t % chunks, band = (t / chunks) % bands;
    Span s;
    s.n = t % per_group / chunks / bands; s.ob0 = g * blocks_per_task;
    const int64_t nb = ocb - s.ob0 < blocks_per_task ? ocb - s.ob0 : blocks_per_task;
    const int64_t cx0 = chunk * cols_per_task;
    const int64_t cx1 = cx0 + cols_per_task < a.ow ? cx0 + cols_per_task : a.ow;
    const int64_t oy0 = band * rows_per_task;
    const int64_t oy1 = oy0 + rows_per_task < a.oh ? oy0 + rows_per_task : a.oh;
    for (s.ic0 = 0; s.ic0 < a.c; s.ic0 += channels_per_pass) {
      s.ic1 = s.ic0 + channels_per_pass < a.c ? s.ic0 + channels_per_pass : a.c;
      s.first = s.ic0 == 0; s.last = s.ic1 == a.c;
      for (s.oy = oy0; s.oy < oy1; ++s.oy) {
        switch (nb) {
          case 4: segment<4>(a, s, cx0, cx1); break;
          case 3: segment<3>(a, s, cx0, cx1); break;
          case 2: segment<2>(a, s, cx0, cx1); break;
          default: segment<1>(a, s, cx0, cx1); break;
        }
      }
    }
  }
}

// Loads and stores of 16 lanes in the kernels' element types; bf16 converts to and from fp32 (round to nearest
// even, as torch rounds), and exists only where the compiler targets AVX512-BF16 (kiln_native_bf16 says so).
#ifdef __AVX512BF16__
typedef uint16_t bf16_t;
static inline __m512 load16(const bf16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline void store16(bf16_t* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
extern "C" int kiln_native_bf16() { return 1; }
#else
extern "C" int kiln_native_bf16() { return 0; }
#endif
static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline void store16(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }

// A typed kernel's C entry points: `name` for fp32, and `name`_bf16 where the library has bf16
#ifdef __AVX512BF16__
#define KILN_TYPED(name, kernel, Args)                                                                   \
  extern "C" void name(const Args* args, int64_t threads) { kernel<float>(*args, threads); }            \
  extern "C" void name##_bf16(const Args* args, int64_t threads) { kernel<bf16_t>(*args, threads); }
#else
#define KILN_TYPED(name, kernel, Args) \
  extern "C" void name(const Args* args, int64_t threads) { kernel<float>(*args, threads); }
#endif

// Winograd F(2x2, 3x3): a stride-1, undilated 3x3 convolution as 16 matrix products on transformed 4x4 input patches
// (one per 2x2 output tile) and transformed weights, 2.25x fewer multiply-adds than the direct kernel. A task takes
// a block of tiles and a range of output-channel blocks: it transforms the block's input patches into a per-thread
// buffer (V[xi][tile][c], xi the 16 patch positions), multiplies each V[xi] by the weights U[xi] (transformed once by
// winograd.py) into M[xi][tile][64 channels], and transforms M back into the 2x2 outputs with bias, residual and
// clamp. In fp32, V and U are fp32 (U as [oc/16][c][16]) and the products are the direct kernel's accumulate(); in
// bf16, V is rounded to bf16 and U is bf16 in channel pairs ([oc/16][c/2][16][2]) for AVX512-BF16's dot products,
// accumulated in fp32.
struct WinogradArgs {
  const void* x; const void* u; const float* bias; const void* residual; void* y;  // x, residual, y: fp32 or bf16
  int64_t n, h, w_, c;          // input, NHWC; c a multiple of 16
  int64_t oh, ow, oc;           // output, NHWC; oc a multiple of 16
  int64_t ldy;                  // elements from one output pixel to the next
  int64_t pt, pl;               // padding above and left of the input
  float lo, hi;                 // clamp after the residual
};

// B^T d B over a 4x4 patch of 16-channel vectors (rows r, columns q): d[r][q] -> v[r][q]
static inline void winograd_input(const __m512 (&d)[4][4], __m512 (&v)[4][4]) {
  __m512 t[4][4];  // B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3)
  UNROLLED for (int q = 0; q < 4; ++q) {
    t[0][q] = _mm512_sub_ps(d[0][q], d[2][q]);
    t[1][q] = _mm512_add_ps(d[1][q], d[2][q]);
    t[2][q] = _mm512_sub_ps(d[2][q], d[1][q]);
    t[3][q] = _mm512_sub_ps(d[1][q], d[3][q]);
  }
  UNROLLED for (int r = 0; r < 4; ++r) {  // (B^T d) B: the same on columns
    v[r][0] = _mm512_sub_ps(t[r][0], t[r][2]);
    v[r][1] = _mm512_add_ps(t[r][1], t[r][2]);
    v[r][2] = _mm512_sub_ps(t[r][2], t[r][1]);
    v[r][3] = _mm512_sub_ps(t[r][1], t[r][3]);
  }
}

// The sums of one register tile of a matrix product: NW rows of v (`row` elements apart, c long) times NB weight
// blocks of u, into acc. fp32: the direct kernel's accumulate(); bf16: AVX512-BF16 dot products over pairs along c,
// whose weights u holds as [c/2][16][2] a block. Winograd's patch products, and the bf16 attention's two products.
template <int NB, int NW>
static inline void patch_sums(__m512 (&acc)[NB][NW], const float* v, int64_t row, const float* u, int64_t c) {
  accumulate<NB, NW, false>(acc, v, u, c * 16, row, 0, c, 0, NW);
}

static inline void store_patch(float* p, __m512 v) { _mm512_store_ps(p, v); }

#ifdef __AVX512BF16__
template <int NB, int NW>
static inline void patch_sums(__m512 (&acc)[NB][NW], const bf16_t* v, int64_t row, const bf16_t* u, int64_t c) {
  for (int64_t pair = 0; pair < c / 2; ++pair) {  // elements 2 * pair and 2 * pair + 1 along c
    __m512bh wv[NB];
    UNROLLED for (int b = 0; b < NB; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(u + b * c * 16 + pair * 32);
    UNROLLED for (int j = 0; j < NW; ++j) {
      int32_t both;
      memcpy(&both, v + j * row + 2 * pair, sizeof both);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(both);
      UNROLLED for (int b = 0; b < NB; ++b) acc[b][j] = _mm512_dpbf16_ps(acc[b][j], wv[b], xv);
    }
  }
}

static inline void store_patch(bf16_t* p, __m512 v) {
  _mm256_store_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
#endif

// The product of one patch position: rows [0, count) of v (tiles) times NB weight blocks into m (64 floats a tile),
// NW tiles at a time
template <int NB, int NW, typename T>
static inline void winograd_rows(const T* v, const T* u, float* m, int64_t c, int64_t count) {
  if constexpr (NW > 1) {
    if (count < NW) return winograd_rows<NB, NW - 1>(v, u, m, c, count);
  }
  __m512 acc[NB][NW];
  UNROLLED for (int b = 0; b < NB; ++b)
    UNROLLED for (int j = 0; j < NW; ++j) acc[b][j] = _mm512_setzero_ps();
  patch_sums<NB, NW>(acc, v, c, u, c);
  UNROLLED for (int j = 0; j < NW; ++j)
    UNROLLED for (int b = 0; b < NB; ++b) _mm512_storeu_ps(m + j * 64 + b * 16, acc[b][j]);
}

template <int NB, typename T>
static void winograd_product(const T* v, const T* u, float* m, int64_t c, int64_t tiles) {
  constexpr int W = NB >= 4 ? 6 : (NB == 3 ? 8 : (NB == 2 ? 12 : 14));
  for (int64_t t = 0; t < tiles; t += W)
    winograd_rows<NB, W>(v + t * c, u, m + t * 64, c, tiles - t < W ? tiles - t : W);
}

template <typename T>
static void winograd_f2x3(const WinogradArgs& a, int64_t tiles_per_task, int64_t blocks_per_task, int64_t threads) {
  const T* const x = static_cast<const T*>(a.x);
  const T* const u = static_cast<const T*>(a.u);
  const T* const residual = static_cast<const T*>(a.residual);
  T* const y = static_cast<T*>(a.y);
  const int64_t th = (a.oh + 1) / 2, tw = (a.ow + 1) / 2, tiles = a.n * th * tw;
  const int64_t ocb = a.oc / 16, cb = a.c / 16;
  const int64_t tile_blocks = (tiles + tiles_per_task - 1) / tiles_per_task;
  const int64_t channel_groups = (ocb + blocks_per_task - 1) / blocks_per_task;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < tile_blocks * channel_groups; ++task) {
    const int64_t t0 = task / channel_groups * tiles_per_task;
    const int64_t count = tiles - t0 < tiles_per_task ? tiles - t0 : tiles_per_task;
    const int64_t ob0 = task % channel_groups * blocks_per_task;
    const int64_t ob1 = ob0 + blocks_per_task < ocb ? ob0 + blocks_per_task : ocb;
    thread_local std::vector<char> scratch;
    const size_t v_bytes = 16 * tiles_per_task * a.c * sizeof(T), m_bytes = 16 * tiles_per_task * 64 * sizeof(float);
    if (scratch.size() < v_bytes + m_bytes + 64) scratch.resize(v_bytes + m_bytes + 64);
    T* const v = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    float* const m = reinterpret_cast<float*>(reinterpret_cast<char*>(v) + v_bytes);
    // the block's patches, transformed: V[xi][tile][c]
    for (int64_t i = 0; i < count; ++i) {
      const int64_t t = t0 + i, img = t / (th * tw), ty = t / tw % th, tx = t % tw;
      const int64_t y0 = ty * 2 - a.pt, x0 = tx * 2 - a.pl;
      const T* base = x + img * a.h * a.w_ * a.c;
      for (int64_t k = 0; k < cb; ++k) {
        __m512 d[4][4], tv[4][4];
        UNROLLED for (int r = 0; r < 4; ++r)
          UNROLLED for (int q = 0; q < 4; ++q) {
            const int64_t iy = y0 + r, ix = x0 + q;
            const bool inside = iy >= 0 && iy < a.h && ix >= 0 && ix < a.w_;
            d[r][q] = inside ? load16(base + (iy * a.w_ + ix) * a.c + k * 16, 0xFFFF) : _mm512_setzero_ps();
          }
        winograd_input(d, tv);
        UNROLLED for (int r = 0; r < 4; ++r)
          UNROLLED for (int q = 0; q < 4; ++q)
            store_patch(v + ((r * 4 + q) * tiles_per_task + i) * a.c + k * 16, tv[r][q]);
      }
    }
    for (int64_t g = ob0; g < ob1; g += 4) {  // 64 output channels at a time
      const int64_t nb = ob1 - g < 4 ? ob1 - g : 4;
      for (int xi = 0; xi < 16; ++xi) {
        const T* vx = v + xi * tiles_per_task * a.c;
        const T* ux = u + (xi * ocb + g) * a.c * 16;
        float* mx = m + xi * tiles_per_task * 64;
        switch (nb) {
          case 4: winograd_product<4>(vx, ux, mx, a.c, count); break;
          case 3: winograd_product<3>(vx, ux, mx, a.c, count); break;
          case 2: winograd_product<2>(vx, ux, mx, a.c, count); break;
          default: winograd_product<1>(vx, ux, mx, a.c, count); break;
        }
      }
      // A^T M A, 2x2 outputs a tile: A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]
      const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t t = t0 + i, img = t / (th * tw), ty = t / tw % th, tx = t % tw;
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t channel = (g + b) * 16;
          __m512 mm[4][4], s[2][4];
          UNROLLED for (int r = 0; r < 4; ++r)
            UNROLLED for (int q = 0; q < 4; ++q)
              mm[r][q] = _mm512_load_ps(m + ((r * 4 + q) * tiles_per_task + i) * 64 + b * 16);
          UNROLLED for (int q = 0; q < 4; ++q) {
            s[0][q] = _mm512_add_ps(_mm512_add_ps(mm[0][q], mm[1][q]), mm[2][q]);
            s[1][q] = _mm512_sub_ps(_mm512_sub_ps(mm[1][q], mm[2][q]), mm[3][q]);
          }
          const __m512 bias = _mm512_loadu_ps(a.bias + channel);
          UNROLLED for (int r = 0; r < 2; ++r) {
            const int64_t oy = ty * 2 + r;
            if (oy >= a.oh) continue;
            __m512 out[2];
            out[0] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[r][0], s[r][1]), s[r][2]), bias);
            out[1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[r][1], s[r][2]), s[r][3]), bias);
            UNROLLED for (int q = 0; q < 2; ++q) {
              const int64_t ox = tx * 2 + q;
              if (ox >= a.ow) continue;
              const int64_t pixel = (img * a.oh + oy) * a.ow + ox;
              __m512 value = out[q];
              if (residual) value = _mm512_add_ps(value, load16(residual + pixel * a.oc + channel, 0xFFFF));
              store16(y + pixel * a.ldy + channel, 0xFFFF, clamped(value, lo, hi));
            }
          }
        }
      }
    }
  }
}

extern "C" void kiln_winograd_f2x3(const WinogradArgs* args, int64_t tiles_per_task, int64_t blocks_per_task,
                                   int64_t threads) {
  winograd_f2x3<float>(*args, tiles_per_task, blocks_per_task, threads);
}
#ifdef __AVX512BF16__
extern "C" void kiln_winograd_f2x3_bf16(const WinogradArgs* args, int64_t tiles_per_task, int64_t blocks_per_task,
                                        int64_t threads) {
  winograd_f2x3<bf16_t>(*args, tiles_per_task, blocks_per_task, threads);
}
#endif

// A convolution of few input channels (the 3-channel stems) from an NCHW fp32 input, NHWC fp32 or bf16 out. The
// direct kernel's loop over input channels is 3 long here, so this one treats every (channel, ky, kx) as one tap of
// a flat reduction: weights packed as [oc/16][tap][16], the input zero-padded beforehand (native.py) so that tap t of
// output pixel (oy, ox) reads  x[offsets[t] + oy * sh * wp + ox * sw]  with no bounds to check. A task is one output
// row for up to four blocks of 16 output channels, in tiles of 6 pixels: per tap 4 weight loads and 6 broadcasts feed
// 24 multiply-adds.
struct StemArgs {
  const float* x; const float* w; const float* bias; void* y;
  const int64_t* offsets;
  int64_t n, image, wp;        // images, floats per padded image, padded row width
  int64_t taps, oh, ow, oc, sh, sw;
  float lo, hi;
};

template <int NB, int NW, typename T>
static inline void stem_tile(const StemArgs& a, const float* x, T* y, int64_t ob0) {
  __m512 acc[NB][NW];
  UNROLLED for (int b = 0; b < NB; ++b) {
    const __m512 bias = _mm512_loadu_ps(a.bias + (ob0 + b) * 16);
    UNROLLED for (int j = 0; j < NW; ++j) acc[b][j] = bias;
  }
  // the output two tiles on, asked for ahead (as the direct kernel's tile)
  UNROLLED for (int j = 2 * NW; j < 3 * NW; ++j)
    UNROLLED for (int b = 0; b < NB; ++b)
      _mm_prefetch(reinterpret_cast<const char*>(y + j * a.oc + (ob0 + b) * 16), _MM_HINT_ET0);
  const float* w = a.w + ob0 * a.taps * 16;
  for (int64_t t = 0; t < a.taps; ++t) {
    const float* xp = x + a.offsets[t];
    __m512 wv[NB];
    UNROLLED for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_ps(w + (b * a.taps + t) * 16);
    UNROLLED for (int j = 0; j < NW; ++j) {
      const __m512 xv = _mm512_set1_ps(xp[j * a.sw]);
      UNROLLED for (int b = 0; b < NB; ++b) acc[b][j] = _mm512_fmadd_ps(wv[b], xv, acc[b][j]);
    }
  }
  const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi);
  UNROLLED for (int j = 0; j < NW; ++j)
    UNROLLED for (int b = 0; b < NB; ++b) {
      const int64_t oc0 = (ob0 + b) * 16;
      store16(y + j * a.oc + oc0, first_lanes(a.oc - oc0), clamped(acc[b][j], lo, hi));
    }
}

template <int NB, int NW, typename T>
static inline void stem_tile_upto(const StemArgs& a, const float* x, T* y, int64_t ob0, int64_t count) {
  if constexpr (NW > 1) {
    if (count < NW) return stem_tile_upto<NB, NW - 1, T>(a, x, y, ob0, count);
  }
  stem_tile<NB, NW, T>(a, x, y, ob0);
}

template <int NB, typename T>
static void stem_row(const StemArgs& a, const float* x, T* y, int64_t ob0) {
  for (int64_t ox = 0; ox < a.ow; ox += 6)
    stem_tile_upto<NB, 6, T>(a, x + ox * a.sw, y + ox * a.oc, ob0, a.ow - ox < 6 ? a.ow - ox : 6);
}

template <typename T>
static void stem_conv(const StemArgs& a, int64_t threads) {
  T* out = static_cast<T*>(a.y);
  const int64_t ocb = (a.oc + 15) / 16, groups = (ocb + 3) / 4;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < a.n * a.oh * groups; ++task) {
    const int64_t g = task % groups, row = task / groups, n = row / a.oh, oy = row % a.oh;
    const float* x = a.x + n * a.image + oy * a.sh * a.wp;
    T* y = out + row * a.ow * a.oc;
    const int64_t ob0 = g * 4, nb = ocb - ob0 < 4 ? ocb - ob0 : 4;
    switch (nb) {
      case 4: stem_row<4, T>(a, x, y, ob0); break;
      case 3: stem_row<3, T>(a, x, y, ob0); break;
      case 2: stem_row<2, T>(a, x, y, ob0); break;
      default: stem_row<1, T>(a, x, y, ob0); break;
    }
  }
}

KILN_TYPED(kiln_stem_conv, stem_conv, StemArgs)

#ifdef __AVX512BF16__
// The bf16 stem: the same layer in AVX512-BF16 dot products, which take two taps a lane. A first pass rounds the NCHW
// fp32 image into a zero-padded NHWC bf16 copy (the calling thread's scratch), where one kernel row of a window, kw
// pixels of c channels, is c * kw consecutive elements: a dot product takes two of them at once, from one 32-bit
// broadcast. Where c * kw is odd (3 * 7, 3 * 3), the row's last element is paired with a zero in place of the
// element after it, which belongs to another window and may be infinite (0 * inf would be NaN). Weights packed as
// [oc/16][kh][pairs][16][2]. A task is one output row for up to four blocks of 16 output channels, in tiles of 6
// pixels, as in the fp32 kernel: per pair 4 weight loads and 6 broadcasts feed 24 dot products.
struct StemPairArgs {
  const float* x; const bf16_t* w; const float* bias; bf16_t* y;
  int64_t n, c, h, w_;          // input, NCHW fp32
  int64_t pt, pl, hp, wp;       // padding above and left; the padded image's height and width
  int64_t kh, kw, oh, ow, oc, sh, sw;
  float lo, hi;
};

// Row py of image `image` of the padded NHWC copy: zeros outside the input, the input's pixels rounded to bf16
static void stem_pack_row(const StemPairArgs& a, bf16_t* out, int64_t image, int64_t py) {
  const int64_t c = a.c, iy = py - a.pt;
  if (iy < 0 || iy >= a.h) {
    memset(out, 0, a.wp * c * sizeof(bf16_t));
    return;
  }
  memset(out, 0, a.pl * c * sizeof(bf16_t));
  const int64_t right = a.wp - a.pl - a.w_;
  if (right > 0) memset(out + (a.pl + a.w_) * c, 0, right * c * sizeof(bf16_t));
  const float* plane = a.x + (image * c * a.h + iy) * a.w_;  // channel 0 of this row; channel k is h * w_ further
  bf16_t* row = out + a.pl * c;
  int64_t ix = 0;
  if (c == 3) {  // 16 pixels at a time: three rounded channel vectors interleaved into 48 elements
    // element i of the 48 is channel i % 3 of pixel i / 3: word (i % 3) * 16 + i / 3 of (c0, c1 | c2)
    alignas(64) static const int16_t index[48] = {
        0, 16, 32, 1, 17, 33, 2, 18, 34, 3, 19, 35, 4, 20, 36, 5, 21, 37, 6, 22, 38, 7, 23, 39,
        8, 24, 40, 9, 25, 41, 10, 26, 42, 11, 27, 43, 12, 28, 44, 13, 29, 45, 14, 30, 46, 15, 31, 47};
    const __m512i low_index = _mm512_load_si512(index);
    const __m512i high_index = _mm512_castsi256_si512(_mm256_load_si256(reinterpret_cast<const __m256i*>(index + 32)));
    const int64_t stride = a.h * a.w_;
    for (; ix + 16 <= a.w_; ix += 16) {
      const __m256i c0 = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(plane + ix));
      const __m256i c1 = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(plane + stride + ix));
      const __m256i c2 = (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(plane + 2 * stride + ix));
      const __m512i first = _mm512_inserti64x4(_mm512_castsi256_si512(c0), c1, 1);
      const __m512i second = _mm512_castsi256_si512(c2);
      _mm512_storeu_si512(row + ix * 3, _mm512_permutex2var_epi16(first, low_index, second));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + ix * 3 + 32),
                          _mm512_castsi512_si256(_mm512_permutex2var_epi16(first, high_index, second)));
    }
  }
  for (; ix < a.w_; ++ix)
    for (int64_t k = 0; k < c; ++k) {
      const __m128 v = _mm_set_ss(plane[k * a.h * a.w_ + ix]);
      row[ix * c + k] = static_cast<bf16_t>(_mm_extract_epi16((__m128i)_mm_cvtneps_pbh(v), 0));
    }
}

// The dot products of pair p of one kernel row (its weights at w, the row of pixel 0 at x); `alone`: the row's last
// element, whose neighbour is masked to zero
template <int NB, int NW, bool ALONE>
__attribute__((always_inline)) static inline void stem_pair(__m512 (&acc)[NB][NW], const bf16_t* x, const bf16_t* w,
                                                           int64_t wblock, int64_t xs, int64_t p) {
  __m512bh wv[NB];
  UNROLLED for (int b = 0; b < NB; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(w + b * wblock + p * 32);
  UNROLLED for (int j = 0; j < NW; ++j) {
    int32_t both;
    memcpy(&both, x + j * xs + 2 * p, sizeof both);
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(ALONE ? both & 0xFFFF : both);
    UNROLLED for (int b = 0; b < NB; ++b) acc[b][j] = _mm512_dpbf16_ps(acc[b][j], wv[b], xv);
  }
}

// bf16 values as int16 keys that order as the values do, so that a max pool compares 32 lanes in one integer max:
// a negative value's magnitude bits flipped (-0 below +0), every NaN made +NaN, above +inf. Its own inverse on
// numbers, and a NaN comes back a NaN.
static inline __m256i order_keys(__m256i h, __mmask16 nan) {
  h = _mm256_mask_mov_epi16(h, nan, _mm256_set1_epi16(0x7FC0));
  return _mm256_xor_si256(h, _mm256_and_si256(_mm256_srai_epi16(h, 15), _mm256_set1_epi16(0x7FFF)));
}
static inline __m512i order_keys(__m512i k) {
  return _mm512_xor_si512(k, _mm512_and_si512(_mm512_srai_epi16(k, 15), _mm512_set1_epi16(0x7FFF)));
}

// y: the tile's first pixel at channel block ob0, its pixels ldy elements apart; blocks past oc are not stored, or,
// with KEYS (a pooled stem's rows), all blocks are stored as order_keys
template <int NB, int NW, bool KEYS>
static inline void stem_pair_tile(const StemPairArgs& a, const bf16_t* x, bf16_t* y, int64_t ldy, int64_t ob0) {
  const int64_t elements = a.c * a.kw, whole = elements / 2, pairs = (elements + 1) / 2, wblock = a.kh * pairs * 32;
  const int64_t xs = a.sw * a.c, row = a.wp * a.c;
  __m512 acc[NB][NW];
  UNROLLED for (int b = 0; b < NB; ++b) {
    const __m512 bias = _mm512_loadu_ps(a.bias + (ob0 + b) * 16);
    UNROLLED for (int j = 0; j < NW; ++j) acc[b][j] = bias;
  }
  // the output two tiles on, asked for ahead (as the fp32 kernel's)
  UNROLLED for (int j = 2 * NW; j < 3 * NW; ++j)
    UNROLLED for (int b = 0; b < NB; b += 2)
      _mm_prefetch(reinterpret_cast<const char*>(y + j * ldy + b * 16), _MM_HINT_ET0);
  const bf16_t* w = a.w + ob0 * wblock;
  for (int64_t ky = 0; ky < a.kh; ++ky, x += row, w += pairs * 32) {
    for (int64_t p = 0; p < whole; ++p) stem_pair<NB, NW, false>(acc, x, w, wblock, xs, p);
    if (whole < pairs) stem_pair<NB, NW, true>(acc, x, w, wblock, xs, whole);
  }
  const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi);
  UNROLLED for (int j = 0; j < NW; ++j)
    UNROLLED for (int b = 0; b < NB; ++b) {
      const int64_t oc0 = (ob0 + b) * 16;
      const __m512 c = clamped(acc[b][j], lo, hi);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(c);
      __m256i* const out = reinterpret_cast<__m256i*>(y + j * ldy + b * 16);
      if (KEYS)
        _mm256_storeu_si256(out, order_keys(v, _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q)));
      else if (oc0 + 16 <= a.oc)  // unmasked where the block is whole: AMD's masked stores are slow
        _mm256_storeu_si256(out, v);
      else
        _mm256_mask_storeu_epi16(out, first_lanes(a.oc - oc0), v);
    }
}

template <int NB, int NW, bool KEYS>
static inline void stem_pair_tile_upto(const StemPairArgs& a, const bf16_t* x, bf16_t* y, int64_t ldy, int64_t ob0,
                                       int64_t count) {
  if constexpr (NW > 1) {
    if (count < NW) return stem_pair_tile_upto<NB, NW - 1, KEYS>(a, x, y, ldy, ob0, count);
  }
  stem_pair_tile<NB, NW, KEYS>(a, x, y, ldy, ob0);
}

// One output row (x: its first window's first row in the padded copy) for blocks [ob0, ob0 + nb), pixels ldy apart
template <bool KEYS>
static void stem_pair_row(const StemPairArgs& a, const bf16_t* x, bf16_t* y, int64_t ldy, int64_t ob0, int64_t nb) {
  for (int64_t ox = 0; ox < a.ow; ox += 6) {
    const bf16_t* xt = x + ox * a.sw * a.c;
    bf16_t* yt = y + ox * ldy;
    const int64_t count = a.ow - ox < 6 ? a.ow - ox : 6;
    switch (nb) {
      case 4: stem_pair_tile_upto<4, 6, KEYS>(a, xt, yt, ldy, ob0, count); break;
      case 3: stem_pair_tile_upto<3, 6, KEYS>(a, xt, yt, ldy, ob0, count); break;
      case 2: stem_pair_tile_upto<2, 6, KEYS>(a, xt, yt, ldy, ob0, count); break;
      default: stem_pair_tile_upto<1, 6, KEYS>(a, xt, yt, ldy, ob0, count); break;
    }
  }
}

// The calling thread's padded NHWC bf16 copy of the image, filled by the team inside a parallel region
static bf16_t* stem_scratch(const StemPairArgs& a) {
  thread_local std::vector<bf16_t> scratch;
  const size_t size = a.n * a.hp * a.wp * a.c + 2;  // + 2: the last pair's 32-bit read
  if (scratch.size() < size) scratch.resize(size);
  return scratch.data();
}

static void stem_pack(const StemPairArgs& a, bf16_t* padded) {
#pragma omp for schedule(static)
  for (int64_t r = 0; r < a.n * a.hp; ++r) stem_pack_row(a, padded + r * a.wp * a.c, r / a.hp, r % a.hp);
}

extern "C" void kiln_stem_pairs_bf16(const StemPairArgs* args, int64_t threads) {
  const StemPairArgs& a = *args;
  bf16_t* const padded = stem_scratch(a);
  const int64_t image = a.hp * a.wp * a.c, ocb = (a.oc + 15) / 16, groups = (ocb + 3) / 4;
#pragma omp parallel num_threads(threads)
  {
    stem_pack(a, padded);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < a.n * a.oh * groups; ++task) {
      const int64_t g = task % groups, out_row = task / groups, image_index = out_row / a.oh, oy = out_row % a.oh;
      const int64_t ob0 = g * 4, nb = ocb - ob0 < 4 ? ocb - ob0 : 4;
      stem_pair_row<false>(a, padded + image_index * image + oy * a.sh * a.wp * a.c,
                           a.y + out_row * a.ow * a.oc + ob0 * 16, a.oc, ob0, nb);
    }
  }
}

// The bf16 stem with the max pool after it (fuse_stem_pool): a task is a band of pooled rows of one image for up to
// four blocks of 16 channels. It computes each convolution row its windows reach once, into a ring of pool_k rows in
// the thread's cache, and pools each pooled row from the ring, so the convolution's output is never written out.
// A band recomputes the row it shares with the band above (a 3x3 window of stride 2: one row in 2 * band + 1). The
// pool's padding never wins and a NaN in a window is the result, as in max_pool_nhwc; its sizes (ceil mode or not)
// come from the caller.
struct StemPoolArgs {
  StemPairArgs conv;            // conv.y unused
  bf16_t* y;                    // pooled, NHWC
  int64_t pool_k, pool_s, pool_pad, poh, pow_;
  int64_t band;                 // pooled rows a task
};

// Pooled row q from the ring's rows [y0, y1) of the convolution (order keys, lanes = ldr a pixel): the maximum down
// each column into `columns`, then across each window of columns, 32 lanes an integer max; out: the pooled row's
// first pixel at the task's first channel, its pixels oc apart, `valid` channels of them stored
static void pool_row_from_ring(const StemPoolArgs& p, const bf16_t* ring, int64_t ldr, int64_t y0, int64_t y1,
                               bf16_t* columns, bf16_t* out, int64_t valid) {
  const StemPairArgs& a = p.conv;
  const bf16_t* rows[16];  // the window's rows in the ring (pool_k <= 16: native.py's POOL_MAX_KERNEL)
  for (int64_t oy = y0; oy < y1; ++oy) rows[oy - y0] = ring + (oy % p.pool_k) * a.ow * ldr;
  const int64_t count = y1 - y0, whole = ldr / 32 * 32;  // a ring pixel of 16 or 48 lanes ends in half a vector
  for (int64_t e = 0; e < a.ow * ldr; e += ldr) {
    for (int64_t c = e; c < e + whole; c += 32) {
      __m512i best = _mm512_loadu_si512(rows[0] + c);
      for (int64_t r = 1; r < count; ++r) best = _mm512_max_epi16(best, _mm512_loadu_si512(rows[r] + c));
      _mm512_storeu_si512(columns + c, best);
    }
    if (whole < ldr) {
      const int64_t c = e + whole;
      __m256i best = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[0] + c));
      for (int64_t r = 1; r < count; ++r)
        best = _mm256_max_epi16(best, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + c)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(columns + c), best);
    }
  }
  for (int64_t px = 0; px < p.pow_; ++px) {
    const int64_t x0 = px * p.pool_s - p.pool_pad > 0 ? px * p.pool_s - p.pool_pad : 0;
    const int64_t x1 = px * p.pool_s - p.pool_pad + p.pool_k < a.ow ? px * p.pool_s - p.pool_pad + p.pool_k : a.ow;
    for (int64_t c = 0; c < valid; c += 32) {
      const __mmask32 m = valid - c >= 32 ? 0xFFFFFFFF : (__mmask32)((1ull << (valid - c)) - 1);
      __m512i best = _mm512_maskz_loadu_epi16(m, columns + x0 * ldr + c);
      for (int64_t ox = x0 + 1; ox < x1; ++ox) best = _mm512_max_epi16(best, _mm512_maskz_loadu_epi16(m, columns + ox * ldr + c));
      if (m == 0xFFFFFFFF)
        _mm512_storeu_si512(out + px * a.oc + c, order_keys(best));
      else
        _mm512_mask_storeu_epi16(out + px * a.oc + c, m, order_keys(best));
    }
  }
}

extern "C" void kiln_stem_pool_bf16(const StemPoolArgs* args, int64_t threads) {
  const StemPoolArgs& p = *args;
  const StemPairArgs& a = p.conv;
  bf16_t* const padded = stem_scratch(a);
  const int64_t image = a.hp * a.wp * a.c, ocb = (a.oc + 15) / 16, groups = (ocb + 3) / 4;
  const int64_t bands = (p.poh + p.band - 1) / p.band;
#pragma omp parallel num_threads(threads)
  {
    stem_pack(a, padded);
    thread_local std::vector<bf16_t> ring_rows;  // pool_k rows of the convolution, then one of column maxima
    if (ring_rows.size() < static_cast<size_t>((p.pool_k + 1) * a.ow * 64)) ring_rows.resize((p.pool_k + 1) * a.ow * 64);
    bf16_t* const ring = ring_rows.data();
    bf16_t* const columns = ring + p.pool_k * a.ow * 64;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < a.n * bands * groups; ++task) {
      const int64_t g = task % groups, band = task / groups % bands, n = task / groups / bands;
      const int64_t ob0 = g * 4, nb = ocb - ob0 < 4 ? ocb - ob0 : 4, ldr = nb * 16;
      const int64_t q1 = (band + 1) * p.band < p.poh ? (band + 1) * p.band : p.poh;
      int64_t computed = -1;  // the last convolution row in the ring
      for (int64_t q = band * p.band; q < q1; ++q) {
        const int64_t y0 = q * p.pool_s - p.pool_pad > 0 ? q * p.pool_s - p.pool_pad : 0;
        const int64_t y1 = q * p.pool_s - p.pool_pad + p.pool_k < a.oh ? q * p.pool_s - p.pool_pad + p.pool_k : a.oh;
        for (int64_t oy = computed >= y0 ? computed + 1 : y0; oy < y1; ++oy)
          stem_pair_row<true>(a, padded + n * image + oy * a.sh * a.wp * a.c, ring + (oy % p.pool_k) * a.ow * ldr, ldr,
                              ob0, nb);
        computed = y1 - 1 > computed ? y1 - 1 : computed;
        pool_row_from_ring(p, ring, ldr, y0, y1, columns, p.y + ((n * p.poh + q) * p.pow_) * a.oc + ob0 * 16,
                           a.oc - ob0 * 16 < ldr ? a.oc - ob0 * 16 : ldr);
      }
    }
  }
}
#endif

// Max pooling over NHWC: each output pixel takes the maximum of its window's taps inside the input (padding never
// wins), 16 channels at a time; a NaN anywhere in the window is the result, as in torch's max_pool2d.
// _mm512_max_ps drops a NaN met before a larger value, and checking every tap for NaN costs 1.6x the pool. So a
// window is first reduced with a running sum beside the maximum, which is NaN wherever a tap was NaN (or where
// infinities of both signs met, or the sum overflowed); only the lanes whose sum is NaN are reduced again, exactly.
struct PoolArgs {
  const void* x; void* y;
  int64_t n, h, w_, c, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
};

struct Window { int64_t ky0, ky1, kx0, kx1, y0, x0; };  // taps inside the input; the input pixel of tap (0, 0)

// The taps t of a window, [*k0, *k1) within [0, k), whose position start + t * d lies in [lo, hi)
static inline void taps_inside(int64_t start, int64_t k, int64_t d, int64_t lo, int64_t hi, int64_t* k0, int64_t* k1) {
  *k0 = start < lo ? (lo - start + d - 1) / d : 0;
  *k1 = hi <= start ? 0 : (hi - start + d - 1) / d;
  if (*k0 > k) *k0 = k;
  if (*k1 > k) *k1 = k;
  if (*k1 < *k0) *k1 = *k0;
}

// The maxima of NB consecutive 16-channel blocks' windows, side by side: NB independent chains keep the core busy
// (one block at a time waits on each max's latency) and ask for a pixel's blocks together. K > 0: a whole K x K
// window of dilation 1 inside the input, its taps unrolled (the 3x3 pools of ResNet and SqueezeNet: 2.5x fewer cycles
// than the loop over the window's bounds).
template <int NB, int K, typename T>
static inline void window_max(const PoolArgs& a, const T* base, const Window& win, __mmask16 last_mask, T* out) {
  __m512 best[NB], probe[NB];
  const int64_t ky0 = K ? 0 : win.ky0, ky1 = K ? K : win.ky1, kx0 = K ? 0 : win.kx0, kx1 = K ? K : win.kx1;
  const int64_t dh = K ? 1 : a.dh, dw = K ? 1 : a.dw;
  UNROLLED for (int b = 0; b < NB; ++b) best[b] = _mm512_set1_ps(-__builtin_inff()), probe[b] = _mm512_setzero_ps();
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const T* in = base + ((win.y0 + ky * dh) * a.w_ + win.x0) * a.c;
    for (int64_t kx = kx0; kx < kx1; ++kx) {
      const T* tap = in + kx * dw * a.c;
      UNROLLED for (int b = 0; b < NB; ++b) {
        const __m512 v = load16(tap + b * 16, b == NB - 1 ? last_mask : (__mmask16)0xFFFF);
        best[b] = _mm512_max_ps(best[b], v);
        probe[b] = _mm512_add_ps(probe[b], v);
      }
    }
  }
  UNROLLED for (int b = 0; b < NB; ++b) {
    const __mmask16 mask = b == NB - 1 ? last_mask : (__mmask16)0xFFFF;
    const __mmask16 nan = _mm512_cmp_ps_mask(probe[b], probe[b], _CMP_UNORD_Q);
    if (nan) {  // rare: reduce this block again, tap by tap, marking the lanes that met a NaN
      __mmask16 met = 0;
      for (int64_t ky = win.ky0; ky < win.ky1; ++ky) {
        const T* in = base + ((win.y0 + ky * a.dh) * a.w_ + win.x0) * a.c + b * 16;
        for (int64_t kx = win.kx0; kx < win.kx1; ++kx) {
          const __m512 v = load16(in + kx * a.dw * a.c, mask);
          met |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
      }
      best[b] = _mm512_mask_mov_ps(best[b], met, _mm512_set1_ps(__builtin_nanf("")));
    }
    store16(out + b * 16, mask, best[b]);
  }
}

static const int64_t PREFETCH_PIXELS = 8;

// One output pixel's channels, up to 4 blocks at a time
template <int K, typename T>
static inline void pixel_max(const PoolArgs& a, const T* image, const Window& win, int64_t blocks, __mmask16 last_mask,
                             T* out) {
  int64_t b = 0;
  for (; b + 4 < blocks; b += 4) window_max<4, K, T>(a, image + b * 16, win, 0xFFFF, out + b * 16);
  switch (blocks - b) {
    case 4: window_max<4, K, T>(a, image + b * 16, win, last_mask, out + b * 16); break;
    case 3: window_max<3, K, T>(a, image + b * 16, win, last_mask, out + b * 16); break;
    case 2: window_max<2, K, T>(a, image + b * 16, win, last_mask, out + b * 16); break;
    default: window_max<1, K, T>(a, image + b * 16, win, last_mask, out + b * 16); break;
  }
}

template <typename T>
static void max_pool_nhwc(const PoolArgs& a, int64_t threads) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t blocks = (a.c + 15) / 16;
  const __mmask16 last_mask = first_lanes(a.c - (blocks - 1) * 16);
  const bool three_by_three = a.kh == 3 && a.kw == 3 && a.dh == 1 && a.dw == 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t row = 0; row < a.n * a.oh; ++row) {
    const int64_t n = row / a.oh, oy = row % a.oh;
    const T* image = x + n * a.h * a.w_ * a.c;
    Window win;
    win.y0 = oy * a.sh - a.ph;
    taps_inside(win.y0, a.kh, a.dh, 0, a.h, &win.ky0, &win.ky1);
    for (int64_t ox = 0; ox < a.ow; ++ox) {
      win.x0 = ox * a.sw - a.pw;
      taps_inside(win.x0, a.kw, a.dw, 0, a.w_, &win.kx0, &win.kx1);
      T* out = y + ((n * a.oh + oy) * a.ow + ox) * a.c;
      if (ox + PREFETCH_PIXELS < a.ow) {
        // the input pixels that the window PREFETCH_PIXELS on adds in each of its rows, and that pixel's output,
        // asked for ahead: a pool over an input that has left the cache (a batch of 8) waited on every row's misses
        const int64_t px = win.x0 + PREFETCH_PIXELS * a.sw + (a.kw - 1) * a.dw, pn = a.sw * a.c * (int64_t)sizeof(T);
        if (px >= 0 && px < a.w_)
          for (int64_t ky = win.ky0; ky < win.ky1; ++ky) {
            const char* line = reinterpret_cast<const char*>(image + ((win.y0 + ky * a.dh) * a.w_ + px) * a.c);
            for (int64_t off = 0; off < pn; off += 64) _mm_prefetch(line - off, _MM_HINT_T0);
          }
        const char* ahead = reinterpret_cast<const char*>(out + PREFETCH_PIXELS * a.c);
        for (int64_t off = 0; off < a.c * (int64_t)sizeof(T); off += 64) _mm_prefetch(ahead + off, _MM_HINT_ET0);
      }
      const bool whole = three_by_three && win.ky0 == 0 && win.ky1 == 3 && win.kx0 == 0 && win.kx1 == 3;
      if (whole) pixel_max<3, T>(a, image, win, blocks, last_mask, out);
      else pixel_max<0, T>(a, image, win, blocks, last_mask, out);
    }
  }
}

KILN_TYPED(kiln_max_pool_nhwc, max_pool_nhwc, PoolArgs)

// Average pooling over NHWC with pads of their own at each end: each output pixel is the sum of its window's taps
// inside the input, divided by the taps counted: those inside the input, or (count_include_pad) those inside the
// padded input, [-ph, h + ph_end) x [-pw, w + pw_end), never the extra columns ceil mode adds past it.
struct AvgPoolArgs {
  const void* x; void* y;
  int64_t n, h, w_, c, oh, ow, kh, kw, sh, sw, ph, pw, ph_end, pw_end, count_include_pad;
};

template <typename T>
static void average_pool_nhwc(const AvgPoolArgs& a, int64_t threads) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t blocks = (a.c + 15) / 16;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t row = 0; row < a.n * a.oh; ++row) {
    const int64_t n = row / a.oh, oy = row % a.oh, y0 = oy * a.sh - a.ph;
    int64_t ky0, ky1, cy0, cy1;
    taps_inside(y0, a.kh, 1, 0, a.h, &ky0, &ky1);
    taps_inside(y0, a.kh, 1, -a.ph, a.h + a.ph_end, &cy0, &cy1);
    for (int64_t ox = 0; ox < a.ow; ++ox) {
      const int64_t x0 = ox * a.sw - a.pw;
      int64_t kx0, kx1, cx0, cx1;
      taps_inside(x0, a.kw, 1, 0, a.w_, &kx0, &kx1);
      taps_inside(x0, a.kw, 1, -a.pw, a.w_ + a.pw_end, &cx0, &cx1);
      const float counted = a.count_include_pad ? (float)((cy1 - cy0) * (cx1 - cx0)) : (float)((ky1 - ky0) * (kx1 - kx0));
      const __m512 count = _mm512_set1_ps(counted);
      T* out = y + ((n * a.oh + oy) * a.ow + ox) * a.c;
      for (int64_t b = 0; b < blocks; ++b) {
        const __mmask16 mask = first_lanes(a.c - b * 16);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t ky = ky0; ky < ky1; ++ky) {
          const T* in = x + ((n * a.h + y0 + ky) * a.w_ + x0) * a.c + b * 16;
          for (int64_t kx = kx0; kx < kx1; ++kx) sum = _mm512_add_ps(sum, load16(in + kx * a.c, mask));
        }
        store16(out + b * 16, mask, _mm512_div_ps(sum, count));
      }
    }
  }
}

KILN_TYPED(kiln_average_pool_nhwc, average_pool_nhwc, AvgPoolArgs)

// The mean over each image's pixels of NHWC `x`, per channel (a global average pool): fp32 sums. A task takes one
// image's run of up to MEAN_BLOCKS 16-channel blocks and walks its pixels in order, so that each pixel's channels
// are read as one contiguous piece (a task per block would read one cache line per pixel, a pixel's width apart:
// ResNet-50 b8's 2048 channels at 7x7 took 0.49 ms that way, against 0.05 for onnxruntime).
struct MeanArgs { const void* x; void* y; int64_t n, pixels, c; };

static const int64_t MEAN_BLOCKS = 8;

template <int NB, typename T>
static inline void blocks_mean(const MeanArgs& a, const T* in, T* out, __mmask16 last_mask, __m512 scale) {
  __m512 sum[NB];
  UNROLLED for (int b = 0; b < NB; ++b) sum[b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < a.pixels; ++p)
    UNROLLED for (int b = 0; b < NB; ++b)
      sum[b] = _mm512_add_ps(sum[b], load16(in + p * a.c + b * 16, b == NB - 1 ? last_mask : (__mmask16)0xFFFF));
  UNROLLED for (int b = 0; b < NB; ++b)
    store16(out + b * 16, b == NB - 1 ? last_mask : (__mmask16)0xFFFF, _mm512_mul_ps(sum[b], scale));
}

template <typename T>
static void pixel_mean(const MeanArgs& a, int64_t threads) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t blocks = (a.c + 15) / 16, runs = (blocks + MEAN_BLOCKS - 1) / MEAN_BLOCKS;
  const __m512 scale = _mm512_set1_ps(1.0f / (float)a.pixels);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < a.n * runs; ++t) {
    const int64_t image = t / runs, b0 = t % runs * MEAN_BLOCKS;
    const int64_t nb = blocks - b0 < MEAN_BLOCKS ? blocks - b0 : MEAN_BLOCKS;
    const __mmask16 last = b0 + nb == blocks ? first_lanes(a.c - (blocks - 1) * 16) : (__mmask16)0xFFFF;
    const T* in = x + image * a.pixels * a.c + b0 * 16;
    T* out = y + image * a.c + b0 * 16;
    switch (nb) {
      case 8: blocks_mean<8, T>(a, in, out, last, scale); break;
      case 7: blocks_mean<7, T>(a, in, out, last, scale); break;
      case 6: blocks_mean<6, T>(a, in, out, last, scale); break;
      case 5: blocks_mean<5, T>(a, in, out, last, scale); break;
      case 4: blocks_mean<4, T>(a, in, out, last, scale); break;
      case 3: blocks_mean<3, T>(a, in, out, last, scale); break;
      case 2: blocks_mean<2, T>(a, in, out, last, scale); break;
      default: blocks_mean<1, T>(a, in, out, last, scale); break;
    }
  }
}

KILN_TYPED(kiln_pixel_mean, pixel_mean, MeanArgs)

// NCHW to NHWC (an engine's input image before its first convolution): a task takes a run of pixels of one image,
// reading each channel's run contiguously and writing each pixel's channels together
struct TransposeArgs { const void* x; void* y; int64_t n, c, pixels; };

static const int64_t TRANSPOSE_PIXELS = 256;

template <typename T>
static void nchw_to_nhwc(const TransposeArgs& a, int64_t threads) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t runs = (a.pixels + TRANSPOSE_PIXELS - 1) / TRANSPOSE_PIXELS;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < a.n * runs; ++t) {
    const int64_t image = t / runs, p0 = t % runs * TRANSPOSE_PIXELS;
    const int64_t p1 = p0 + TRANSPOSE_PIXELS < a.pixels ? p0 + TRANSPOSE_PIXELS : a.pixels;
    const T* in = x + image * a.c * a.pixels;
    T* out = y + image * a.pixels * a.c;
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < a.c; ++c) out[p * a.c + c] = in[c * a.pixels + p];
  }
}
KILN_TYPED(kiln_nchw_to_nhwc, nchw_to_nhwc, TransposeArgs)

// Local response normalization across the channels of NHWC `x` (ONNX's LRN): y = x * (bias + scale * s)^-beta, s the
// sum of squares over channels [c - before, c + after] inside the image's channels, in one pass: each 16-channel
// block sums before + after + 1 shifted loads, the lanes outside the channels masked off. beta is 0.75 (AlexNet's
// and GoogLeNet's: d^-0.75 = r * sqrt(r) = r * r * rsqrt(r), r = 1 / sqrt(d)), 0.5 or 1. The reciprocal square roots
// are the 14-bit estimate and one Newton step (a few ulp): the square root and division they replace took 3x as long.
struct LrnArgs {
  const void* x; void* y;
  int64_t pixels, c, before, after;
  float scale, bias;
  int64_t power;  // beta: 0 -> 0.75, 1 -> 0.5, 2 -> 1
};

// 1 / sqrt(d) for d > 0 to a few ulp: the estimate, refined once, r * (1.5 - 0.5 * d * r * r); an infinite d
// gives 0 (the step alone would give NaN)
static inline __m512 reciprocal_sqrt(__m512 d) {
  const __m512 r = _mm512_rsqrt14_ps(d);
  const __m512 refined = _mm512_mul_ps(r, _mm512_fnmadd_ps(_mm512_mul_ps(_mm512_mul_ps(d, r), r), _mm512_set1_ps(0.5f),
                                                           _mm512_set1_ps(1.5f)));
  return _mm512_mask_mov_ps(refined, _mm512_cmp_ps_mask(r, _mm512_setzero_ps(), _CMP_EQ_OQ), r);
}

template <typename T>
static void lrn_nhwc(const LrnArgs& a, int64_t threads) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t blocks = (a.c + 15) / 16;
  const __m512 scale = _mm512_set1_ps(a.scale), bias = _mm512_set1_ps(a.bias);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t p = 0; p < a.pixels; ++p) {
    const T* xp = x + p * a.c;
    T* yp = y + p * a.c;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * 16;
      const __mmask16 own = first_lanes(a.c - c0);
      __m512 sum = _mm512_setzero_ps();
      if (c0 >= a.before && c0 + 16 + a.after <= a.c) {  // every lane's window inside the channels
        for (int64_t o = -a.before; o <= a.after; ++o) {
          const __m512 v = load16(xp + c0 + o, (__mmask16)0xFFFF);
          sum = _mm512_fmadd_ps(v, v, sum);
        }
      } else for (int64_t o = -a.before; o <= a.after; ++o) {
        const int64_t start = c0 + o;  // the channel lane 0 reads
        const int64_t lo = start < 0 ? -start : 0, hi = a.c - start < 16 ? a.c - start : 16;
        if (hi <= lo) continue;
        const __mmask16 inside = (__mmask16)(first_lanes(hi) & ~first_lanes(lo) & own);
        const __m512 v = load16(xp + start, inside);
        sum = _mm512_fmadd_ps(v, v, sum);
      }
      const __m512 d = _mm512_fmadd_ps(sum, scale, bias);
      const __m512 v = load16(xp + c0, own);
      const __m512 r = reciprocal_sqrt(d);
      __m512 factor = r;                                                                        // beta 0.5
      if (a.power == 2) factor = _mm512_mul_ps(r, r);                                           // beta 1
      if (a.power == 0) factor = _mm512_mul_ps(_mm512_mul_ps(r, r), reciprocal_sqrt(r));        // beta 0.75
      store16(yp + c0, own, _mm512_mul_ps(v, factor));
    }
  }
}

KILN_TYPED(kiln_lrn_nhwc, lrn_nhwc, LrnArgs)

// softmax(s * scale + mask) over each row of n scores, in place: attention's scaled, masked softmax in one pass over
// the scores instead of three (torch's scale, mask add and softmax took 0.20, 0.19 and 0.55 ms on BERT-base b8's
// [8, 12, 128, 128] bf16 scores). Rows are [d0][d1][d2]; the fp32 mask's element for row (i0, i1, i2) and column j is
// mask[i0 * m0 + i1 * m1 + i2 * m2 + j * mn] (a broadcast dimension has stride 0). Sums in fp32; a row whose every
// score is -inf comes out NaN, as torch's softmax gives.
struct SoftmaxArgs {
  void* s; const float* mask;   // s: fp32 or bf16, contiguous rows; mask: null, or fp32 addressed by the strides
  int64_t d0, d1, d2, n;
  int64_t m0, m1, m2, mn;       // mn: 1, or 0 for one mask value across the row
  float scale;
};

// e^x for fp32 lanes: 2^(x log2 e) split into an integer power (applied by scalef) and a degree-6 polynomial of the
// rest (relative error under 2e-7); x below -104 counts as -104 (e^x underflows to 0 either way) and a NaN stays
// NaN (max returns its second operand where one is NaN)
static inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-104.0f), x), _mm512_set1_ps(1.44269504088896341f));
  const __m512 whole = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, whole), _mm512_set1_ps(0.693147180559945309f));  // |r| <= ln2 / 2
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, whole);
}

// softmax(s * scale + mask) over one row of n, written to out (which may be s itself: each element is read before it
// is written); mask: null, or the row's fp32 values (mn 1) or one value for the whole row (mn 0). The masked, native
// softmax and the bf16 attention's both run it. An fp32 row keeps its scaled scores, then their exponentials, in
// place from one pass to the next; a bf16 one computes them again (the row is in L1), so that they round to bf16 once.
template <typename In, typename Out>
static inline void softmax_row(In* s, Out* out, int64_t n, __m512 scale, const float* mask, int64_t mn) {
  auto scaled = [&](int64_t j, __mmask16 m) {  // the scores j.. scaled and masked
    const __m512 v = _mm512_mul_ps(load16(s + j, m), scale);
    return mask ? _mm512_add_ps(v, mn ? _mm512_maskz_loadu_ps(m, mask + j) : _mm512_set1_ps(mask[0])) : v;
  };
  constexpr bool keep = std::is_same_v<In, float>;
  auto kept = [&](int64_t j, __mmask16 m, __m512 v) {  // a masked store only for the row's tail: AMD's are slow
    if (m == 0xFFFF) _mm512_storeu_ps(reinterpret_cast<float*>(s + j), v);
    else _mm512_mask_storeu_ps(s + j, m, v);
  };
  // pass 1: their maximum
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = first_lanes(n - j);
    const __m512 v = scaled(j, m);
    if constexpr (keep) kept(j, m, v);
    top = _mm512_mask_max_ps(top, m, top, v);
  }
  const float largest = _mm512_reduce_max_ps(top);
  if (largest == -INFINITY) {  // every score masked out
    for (int64_t j = 0; j < n; j += 16) store16(out + j, first_lanes(n - j), _mm512_set1_ps(NAN));
    return;
  }
  // pass 2: the sum of e^(v - max); pass 3: each e^(v - max) divided by the sum
  const __m512 shift = _mm512_set1_ps(largest);
  auto exponential = [&](int64_t j, __mmask16 m) {
    const __m512 v = keep ? _mm512_maskz_loadu_ps(m, s + j) : scaled(j, m);
    return _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(v, shift)));
  };
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = first_lanes(n - j);
    const __m512 e = exponential(j, m);
    if constexpr (keep) kept(j, m, e);
    total = _mm512_add_ps(total, e);
  }
  const __m512 inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = first_lanes(n - j);
    const __m512 e = keep ? _mm512_maskz_loadu_ps(m, s + j) : exponential(j, m);
    store16(out + j, m, _mm512_mul_ps(e, inverse));
  }
}

template <typename T>
static void masked_softmax(const SoftmaxArgs& a, int64_t threads) {
  T* const scores = static_cast<T*>(a.s);
  const int64_t rows = a.d0 * a.d1 * a.d2;
  const __m512 scale = _mm512_set1_ps(a.scale);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < rows; ++row) {
    const float* mask =
        a.mask ? a.mask + row / (a.d1 * a.d2) * a.m0 + row / a.d2 % a.d1 * a.m1 + row % a.d2 * a.m2 : nullptr;
    softmax_row(scores + row * a.n, scores + row * a.n, a.n, scale, mask, a.mn);
  }
}

KILN_TYPED(kiln_masked_softmax, masked_softmax, SoftmaxArgs)

#ifdef __AVX512BF16__
// bf16 attention in one pass a head: o = softmax(q k^T * scale + mask) v for q, k, v [b][h][s][d] (any strides, d
// contiguous), o [b][h][s][d] contiguous. A task takes one (batch, head): it packs k as [keys/16][d/2][16][2] and v as
// [d/16][keys/2][16][2] for AVX512-BF16's dot products, forms the scores of NW queries at a time in fp32, applies
// scale, mask and softmax to them in fp32 and rounds the probabilities to bf16 once, then multiplies them by v. The
// scores never leave L1 and never round to bf16 (torch's bf16 product rounds them before the softmax).
struct AttentionArgs {
  const bf16_t* q; const bf16_t* k; const bf16_t* v; const float* mask; bf16_t* o;
  int64_t batch, heads, queries, keys, d;      // keys a multiple of 16, d a multiple of 16
  int64_t qs[3], ks[3], vs[3];                 // strides (elements) of batch, head and row
  int64_t ms[4];                               // the fp32 mask's strides of batch, head, query and key (0: broadcast)
  float scale;
};

// scores[j][16 keys of block kb] for NW queries: acc[NB key blocks][NW]
template <int NB, int NW>
static inline void attention_scores(const bf16_t* q, int64_t q_row, const bf16_t* kp, int64_t d, int64_t kb0,
                                    float* scores, int64_t keys) {
  __m512 acc[NB][NW];
  UNROLLED for (int b = 0; b < NB; ++b)
    UNROLLED for (int j = 0; j < NW; ++j) acc[b][j] = _mm512_setzero_ps();
  patch_sums<NB, NW>(acc, q, q_row, kp + kb0 * d * 16, d);
  UNROLLED for (int j = 0; j < NW; ++j)
    UNROLLED for (int b = 0; b < NB; ++b) _mm512_storeu_ps(scores + j * keys + (kb0 + b) * 16, acc[b][j]);
}

// o[j][16 channels of block db] for NW queries from their bf16 probabilities p (keys apart) and the packed v
template <int NB, int NW>
static inline void attention_values(const bf16_t* p, const bf16_t* vp, int64_t keys, int64_t db0, bf16_t* o,
                                    int64_t d) {
  __m512 acc[NB][NW];
  UNROLLED for (int b = 0; b < NB; ++b)
    UNROLLED for (int j = 0; j < NW; ++j) acc[b][j] = _mm512_setzero_ps();
  patch_sums<NB, NW>(acc, p, keys, vp + db0 * keys * 16, keys);
  UNROLLED for (int j = 0; j < NW; ++j)
    UNROLLED for (int b = 0; b < NB; ++b) store16(o + j * d + (db0 + b) * 16, 0xFFFF, acc[b][j]);
}

template <int NW>
static void attention_rows(const AttentionArgs& a, const bf16_t* q, const bf16_t* kp, const bf16_t* vp,
                           const float* mask, float* scores, bf16_t* probabilities, bf16_t* o, int64_t count) {
  if constexpr (NW > 1) {
    if (count < NW) return attention_rows<NW - 1>(a, q, kp, vp, mask, scores, probabilities, o, count);
  }
  const int64_t keys = a.keys, d = a.d, key_blocks = keys / 16, d_blocks = d / 16;
  for (int64_t kb = 0; kb < key_blocks; kb += 4) {
    switch (key_blocks - kb < 4 ? key_blocks - kb : 4) {
      case 4: attention_scores<4, NW>(q, a.qs[2], kp, d, kb, scores, keys); break;
      case 3: attention_scores<3, NW>(q, a.qs[2], kp, d, kb, scores, keys); break;
      case 2: attention_scores<2, NW>(q, a.qs[2], kp, d, kb, scores, keys); break;
      default: attention_scores<1, NW>(q, a.qs[2], kp, d, kb, scores, keys); break;
    }
  }
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int j = 0; j < NW; ++j)  // softmax(scores * scale + mask) per query, in fp32, rounded to bf16 once
    softmax_row(scores + j * keys, probabilities + j * keys, keys, scale, mask ? mask + j * a.ms[2] : nullptr, a.ms[3]);
  for (int64_t db = 0; db < d_blocks; db += 4) {
    switch (d_blocks - db < 4 ? d_blocks - db : 4) {
      case 4: attention_values<4, NW>(probabilities, vp, keys, db, o, d); break;
      case 3: attention_values<3, NW>(probabilities, vp, keys, db, o, d); break;
      case 2: attention_values<2, NW>(probabilities, vp, keys, db, o, d); break;
      default: attention_values<1, NW>(probabilities, vp, keys, db, o, d); break;
    }
  }
}

extern "C" void kiln_attention_bf16(const AttentionArgs* args, int64_t threads) {
  const AttentionArgs& a = *args;
  const int64_t keys = a.keys, d = a.d;
  constexpr int W = 6;
  // v's rows in pairs: lane t of a packed word holds channels t of two consecutive keys
  __m512i interleave;
  {
    alignas(64) int16_t index[32];
    for (int t = 0; t < 16; ++t) { index[2 * t] = t; index[2 * t + 1] = 16 + t; }
    interleave = _mm512_load_si512(index);
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < a.batch * a.heads; ++task) {
    const int64_t b = task / a.heads, h = task % a.heads;
    const bf16_t* const q = a.q + b * a.qs[0] + h * a.qs[1];
    const bf16_t* const k = a.k + b * a.ks[0] + h * a.ks[1];
    const bf16_t* const v = a.v + b * a.vs[0] + h * a.vs[1];
    bf16_t* const o = a.o + (b * a.heads + h) * a.queries * d;
    const float* const mask = a.mask ? a.mask + b * a.ms[0] + h * a.ms[1] : nullptr;
    thread_local std::vector<char> scratch;
    const size_t packed = keys * d * sizeof(bf16_t), rows = W * keys;
    if (scratch.size() < 2 * packed + rows * (sizeof(float) + sizeof(bf16_t)) + 64)
      scratch.resize(2 * packed + rows * (sizeof(float) + sizeof(bf16_t)) + 64);
    bf16_t* const kp = reinterpret_cast<bf16_t*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    bf16_t* const vp = kp + keys * d;
    float* const scores = reinterpret_cast<float*>(vp + keys * d);
    bf16_t* const probabilities = reinterpret_cast<bf16_t*>(scores + rows);
    // k as [keys/16][d/2][16 keys][2 channels]: word `pair` of 16 key rows (offsets in bf16 elements, scale 2)
    const __m512i key_rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(static_cast<int32_t>(a.ks[2])));
    for (int64_t kb = 0; kb < keys / 16; ++kb)
      for (int64_t pair = 0; pair < d / 2; ++pair) {
        const __m512i words = _mm512_i32gather_epi32(key_rows, k + kb * 16 * a.ks[2] + 2 * pair, 2);
        _mm512_storeu_si512(kp + (kb * (d / 2) + pair) * 32, words);
      }
    // v as [d/16][keys/2][16 channels][2 keys]
    for (int64_t db = 0; db < d / 16; ++db)
      for (int64_t pair = 0; pair < keys / 2; ++pair) {
        const __m256i first = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 2 * pair * a.vs[2] + db * 16));
        const __m256i second = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + (2 * pair + 1) * a.vs[2] + db * 16));
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
        _mm512_storeu_si512(vp + (db * (keys / 2) + pair) * 32, _mm512_permutexvar_epi16(interleave, both));
      }
    for (int64_t i = 0; i < a.queries; i += W)
      attention_rows<W>(a, q + i * a.qs[2], kp, vp, mask ? mask + i * a.ms[2] : nullptr, scores, probabilities,
                        o + i * d, a.queries - i < W ? a.queries - i : W);
  }
}
#endif

#ifdef __AVX512BF16__
// A bf16 matrix product with its epilogue: y[i][j] = act(x[i] . w[j] + bias[j] (+ residual[i][j])), x bf16 rows of k
// (k even), w packed as [n/16][k/2][16][2] (blocks of 16 output columns, zero-padded; pairs along k for AVX512-BF16's
// dot products), fp32 sums and bias; residual and y fp32 or bf16 (T). A thread takes a contiguous range of the
// 64-column panels and, chunk of rows by chunk, runs each panel over the chunk in register tiles of 6 rows x 4
// blocks (patch_sums' layout). While it runs a panel over a chunk, it asks for its next panel a line per pair of k,
// and during its last, for the panel it will run first in the engine's next product (next_w, packed the same way):
// the weights of a BERT layer (12 MB in bf16) come from memory at every run, and oneDNN's product waited on them
// (128 rows x 768 -> 768: 0.19 ms with its weights in cache, 0.40 from memory).
struct GemmArgs {
  const bf16_t* x; const bf16_t* w; const float* bias; const void* residual; void* y;
  int64_t m, k, n;              // rows, reduction (even), output columns
  int64_t ldx, ldr, ldy;        // elements between rows of x, residual and y
  int64_t activation;           // GEMM_* below
  float lo, hi;                 // GEMM_CLAMP's bounds
  const bf16_t* next_w;         // the next product's packed weights, or null
  int64_t next_n, next_k;
};
enum { GEMM_NONE = 0, GEMM_CLAMP = 1, GEMM_GELU = 2, GEMM_GELU_TANH = 3 };

// erf(x) for fp32 lanes: Abramowitz and Stegun 7.1.26 (absolute error under 1.5e-7), odd by its sign
static inline __m512 erf16(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(ax, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 r = _mm512_fnmadd_ps(p, exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), ax), ax)), _mm512_set1_ps(1.0f));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), _mm512_and_si512(_mm512_castps_si512(x),
                                                                                      _mm512_set1_epi32(INT32_MIN))));
}

static inline __m512 gemm_activation(__m512 v, const GemmArgs& a) {
  switch (a.activation) {
    case GEMM_CLAMP: return clamped(v, _mm512_set1_ps(a.lo), _mm512_set1_ps(a.hi));
    case GEMM_GELU:  // x / 2 (1 + erf(x / sqrt 2))
      return _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.5f)),
                           _mm512_add_ps(_mm512_set1_ps(1.0f), erf16(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)))));
    case GEMM_GELU_TANH: {  // x / 2 (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3); 1 + tanh(u) = 2 / (1 + e^-2u)
      const __m512 u = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(v, v), v), _mm512_set1_ps(0.044715f), v),
                                     _mm512_set1_ps(0.79788456080286536f));
      const __m512 e = exp16(_mm512_mul_ps(u, _mm512_set1_ps(-2.0f)));
      return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    }
    default: return v;
  }
}

template <int NB, int NW, typename T>
static inline void gemm_tile(const GemmArgs& a, int64_t i0, int64_t b0, const char*& ahead, const char* ahead_end) {
  const int64_t k = a.k;
  const bf16_t* const x = a.x + i0 * a.ldx;
  const bf16_t* const w = a.w + b0 * k * 16;
  __m512 acc[NB][NW];
  UNROLLED for (int b = 0; b < NB; ++b) {
    const __m512 bias = _mm512_loadu_ps(a.bias + (b0 + b) * 16);
    UNROLLED for (int j = 0; j < NW; ++j) acc[b][j] = bias;
  }
  for (int64_t pair = 0; pair < k / 2; ++pair) {
    if (ahead < ahead_end) {
      _mm_prefetch(ahead, _MM_HINT_T1);
      ahead += 64;
    }
    __m512bh wv[NB];
    UNROLLED for (int b = 0; b < NB; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(w + b * k * 16 + pair * 32);
    UNROLLED for (int j = 0; j < NW; ++j) {
      int32_t both;
      memcpy(&both, x + j * a.ldx + 2 * pair, sizeof both);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(both);
      UNROLLED for (int b = 0; b < NB; ++b) acc[b][j] = _mm512_dpbf16_ps(acc[b][j], wv[b], xv);
    }
  }
  const T* const residual = static_cast<const T*>(a.residual);
  T* const y = static_cast<T*>(a.y);
  UNROLLED for (int b = 0; b < NB; ++b) {
    const int64_t col = (b0 + b) * 16;
    const __mmask16 mask = first_lanes(a.n - col);
    UNROLLED for (int j = 0; j < NW; ++j) {
      __m512 v = acc[b][j];
      if (residual) v = _mm512_add_ps(v, load16(residual + (i0 + j) * a.ldr + col, mask));
      store16(y + (i0 + j) * a.ldy + col, mask, gemm_activation(v, a));
    }
  }
}

template <int NB, typename T>
static void gemm_rows(const GemmArgs& a, int64_t i0, int64_t i1, int64_t b0, const char*& ahead, const char* ahead_end) {
  int64_t i = i0;
  for (; i + 6 <= i1; i += 6) gemm_tile<NB, 6, T>(a, i, b0, ahead, ahead_end);
  switch (i1 - i) {
    case 5: gemm_tile<NB, 5, T>(a, i, b0, ahead, ahead_end); break;
    case 4: gemm_tile<NB, 4, T>(a, i, b0, ahead, ahead_end); break;
    case 3: gemm_tile<NB, 3, T>(a, i, b0, ahead, ahead_end); break;
    case 2: gemm_tile<NB, 2, T>(a, i, b0, ahead, ahead_end); break;
    case 1: gemm_tile<NB, 1, T>(a, i, b0, ahead, ahead_end); break;
    default: break;
  }
}

// A thread's share of a product: a range of the 64-column panels over all rows where there are panels enough for
// every thread, else (a 1x1 convolution to 64 channels) a range of the rows, in whole tiles, over all panels
struct GemmShare { int64_t panel0, panel1, row0, row1; };
static GemmShare gemm_share(int64_t m, int64_t n, int64_t me, int64_t team) {
  const int64_t panels = ((n + 15) / 16 + 3) / 4;
  if (panels >= team) return {panels * me / team, panels * (me + 1) / team, 0, m};
  const int64_t tiles = (m + 5) / 6, t0 = tiles * me / team, t1 = tiles * (me + 1) / team;
  return {0, panels, t0 * 6 < m ? t0 * 6 : m, t1 * 6 < m ? t1 * 6 : m};
}

// The bytes [begin, end) of the panel a thread `me` of `team` runs first in a product of n columns and k (none for
// a null w)
static void first_panel(const bf16_t* w, int64_t n, int64_t k, int64_t me, int64_t team, const char*& begin,
                        const char*& end) {
  begin = end = nullptr;
  if (!w) return;
  const GemmShare share = gemm_share(0, n, me, team);  // the panels a thread takes do not depend on the rows
  if (share.panel0 >= share.panel1) return;
  const int64_t blocks = (n + 15) / 16;
  const char* const weights = reinterpret_cast<const char*>(w);
  const char* const weights_end = weights + blocks * 16 * k * sizeof(bf16_t);
  begin = weights + share.panel0 * 4 * 16 * k * sizeof(bf16_t);
  end = begin + 4 * 16 * k * sizeof(bf16_t) < weights_end ? begin + 4 * 16 * k * sizeof(bf16_t) : weights_end;
}

template <typename T>
static void gemm_bf16(const GemmArgs& a, int64_t rows_per_chunk, int64_t threads) {
  const int64_t blocks = (a.n + 15) / 16, panel_bytes = 4 * 16 * a.k * sizeof(bf16_t);
  const char* const weights = reinterpret_cast<const char*>(a.w);
  const char* const weights_end = weights + blocks * 16 * a.k * sizeof(bf16_t);
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
    const GemmShare share = gemm_share(a.m, a.n, me, team);
    for (int64_t i0 = share.row0; i0 < share.row1; i0 += rows_per_chunk) {
      const int64_t i1 = i0 + rows_per_chunk < share.row1 ? i0 + rows_per_chunk : share.row1;
      for (int64_t panel = share.panel0; panel < share.panel1; ++panel) {
        // the panel this thread runs next: the following one; for the next chunk its first again (still in cache);
        // after the last chunk, its first of the next product
        const char *ahead = nullptr, *ahead_end = nullptr;
        if (panel + 1 < share.panel1) {
          ahead = weights + (panel + 1) * panel_bytes;
          ahead_end = ahead + panel_bytes < weights_end ? ahead + panel_bytes : weights_end;
        } else if (i1 == share.row1) {
          first_panel(a.next_w, a.next_n, a.next_k, me, team, ahead, ahead_end);
        }
        const int64_t b0 = panel * 4, nb = blocks - b0 < 4 ? blocks - b0 : 4;
        switch (nb) {
          case 4: gemm_rows<4, T>(a, i0, i1, b0, ahead, ahead_end); break;
          case 3: gemm_rows<3, T>(a, i0, i1, b0, ahead, ahead_end); break;
          case 2: gemm_rows<2, T>(a, i0, i1, b0, ahead, ahead_end); break;
          default: gemm_rows<1, T>(a, i0, i1, b0, ahead, ahead_end); break;
        }
      }
    }
  }
}

extern "C" void kiln_gemm_bf16(const GemmArgs* args, int64_t rows_per_chunk, int64_t threads) {
  gemm_bf16<bf16_t>(*args, rows_per_chunk, threads);
}
extern "C" void kiln_gemm_bf16_fp32(const GemmArgs* args, int64_t rows_per_chunk, int64_t threads) {
  gemm_bf16<float>(*args, rows_per_chunk, threads);
}
#endif

// y = clamp(x * scale[c] + shift[c], lo, hi) over a tensor seen as [outer][c][inner]: NHWC is inner 1 (16 channels
// at a time; the input may be a channel slice of a wider NHWC buffer, pixels ldx apart, the output contiguous),
// NCHW is outer n and inner h*w (16 pixels of one channel at a time). One pass over memory, where
// torch's addcmul and relu take two, and in bf16 each converts on its own.
struct AffineArgs {
  const void* x; void* y; const float* scale; const float* shift;
  int64_t outer, c, inner;
  int64_t ldx;  // inner 1: elements from one input pixel to the next (c, or more in a slice of a wider buffer)
  float lo, hi;
};

// elements one task covers: large enough that handing out tasks costs nothing, small enough to balance two cores
static const int64_t AFFINE_TASK = 1 << 14;

// one row of `count` elements whose per-element scale and shift are s[i], t[i] (NHWC: a pixel's channels)
template <typename T>
static inline void affine_row(const T* x, T* y, const float* __restrict s,
                              const float* __restrict t, int64_t count, __m512 lo, __m512 hi) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512 v = _mm512_fmadd_ps(load16(x + i, 0xFFFF), _mm512_loadu_ps(s + i), _mm512_loadu_ps(t + i));
    store16(y + i, 0xFFFF, clamped(v, lo, hi));
  }
  if (i < count) {
    const __mmask16 m = first_lanes(count - i);
    const __m512 v = _mm512_fmadd_ps(load16(x + i, m), _mm512_maskz_loadu_ps(m, s + i), _mm512_maskz_loadu_ps(m, t + i));
    store16(y + i, m, clamped(v, lo, hi));
  }
}

// one plane of `count` elements of one channel (NCHW), scale s and shift t
template <typename T>
static inline void affine_plane(const T* x, T* y, __m512 s, __m512 t, int64_t count,
                                __m512 lo, __m512 hi) {
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 m = first_lanes(count - i);
    store16(y + i, m, clamped(_mm512_fmadd_ps(load16(x + i, m), s, t), lo, hi));
  }
}

template <typename T>
static void channel_affine(const AffineArgs& a, int64_t threads) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const float* scale = a.scale;
  const float* shift = a.shift;
  const int64_t outer = a.outer, c = a.c, inner = a.inner;
  const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi);
  if (inner == 1) {
    const int64_t rows_per_task = AFFINE_TASK / c > 0 ? AFFINE_TASK / c : 1;
    const int64_t tasks = (outer + rows_per_task - 1) / rows_per_task;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t r1 = (task + 1) * rows_per_task < outer ? (task + 1) * rows_per_task : outer;
      for (int64_t r = task * rows_per_task; r < r1; ++r) affine_row(x + r * a.ldx, y + r * c, scale, shift, c, lo, hi);
    }
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t plane = 0; plane < outer * c; ++plane) {
    const int64_t ch = plane % c;
    affine_plane(x + plane * inner, y + plane * inner, _mm512_set1_ps(scale[ch]), _mm512_set1_ps(shift[ch]), inner, lo, hi);
  }
}

KILN_TYPED(kiln_channel_affine, channel_affine, AffineArgs)

// A bf16 convolution on AMX tiles (fp32 sums), as an implicit matrix product over an input that native.py prepares
// (or reads in place) so that every tap of the kernel reads a constant offset from the output pixel:
//  - output pixels of an image are numbered q = oy * wv + ox, the columns past ow computed and dropped;
//  - output pixel q's input pixel for tap t is  image * image_pixels + q + taps[t], in units of c channels.
// A 1x1 convolution reads its NHWC input in place (wv = ow). Others read a prepared copy: zero-padded and,
// for a stride s > 1, split into s x s phase images (pixel (s*y + a, s*x + b) in phase (a, b)), so that consecutive
// output pixels read consecutive input pixels. Input channels are a multiple of 16.
// A task computes 32 output pixels (2 tiles of 16 rows) for pairs of 16 output channels (2 tiles of 16 columns),
// summing over every tap and input channel in AMX's 4 accumulator tiles, then adds bias and residual, clamps,
// rounds to bf16 and writes the pixels that exist. Weights are packed as [oc/16][tap][c/2][16][2].
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#include <string.h>

struct AmxConvArgs {
  const bf16_t* x; const bf16_t* w; const float* bias; const void* residual; bf16_t* y;
  const int64_t* taps;           // input pixel offset of each tap
  int64_t n, c, pixels;          // images, channels (a multiple of 16), pixels in the input buffer
  int64_t image_pixels, wv, tap_count;
  int64_t oh, ow, oc, ldy;       // output NHWC; ldy elements from one output pixel to the next
  int64_t residual_bf16;         // the residual's type: bf16 (1) or fp32 (0)
  float lo, hi;
};

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// The kernel asks Linux once for permission to use the tile registers (arch_prctl ARCH_REQ_XCOMP_PERM, 0x1023, for
// XTILEDATA, 18); 1 where granted.
extern "C" int kiln_amx_init() { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }
extern "C" int kiln_native_amx() { return 1; }

static void configure_tiles(int64_t kstep) {
  TileConfig config;
  memset(&config, 0, sizeof(config));
  config.palette = 1;
  for (int t = 0; t < 4; ++t) { config.rows[t] = 16; config.colsb[t] = 64; }           // sums: 16 px x 16 oc
  for (int t = 4; t < 6; ++t) { config.rows[t] = 16; config.colsb[t] = kstep * 2; }    // input: 16 px x kstep ic
  for (int t = 6; t < 8; ++t) { config.rows[t] = kstep / 2; config.colsb[t] = 64; }    // weights: kstep/2 pairs x 16 oc
  _tile_loadconfig(&config);
}

// Where a tile of 16 input rows is loaded from, and the bytes between its rows: the buffer itself, or a zeroed
// copy where some rows lie past its last pixel (the last pixels of a 1x1 convolution, which reads its input in
// place). GCC's tile intrinsics take the tile's number as a literal, so the caller loads.
static inline const bf16_t* input_rows(const AmxConvArgs& a, int64_t pixel, int64_t k0, int64_t kstep, bf16_t* scratch,
                                       int64_t* bytes) {
  const bf16_t* p = a.x + pixel * a.c + k0;
  *bytes = a.c * 2;
  if (pixel + 15 < a.pixels) return p;
  memset(scratch, 0, 16 * 32 * 2);
  for (int64_t r = 0; r < 16 && pixel + r < a.pixels; ++r) memcpy(scratch + r * kstep, p + r * a.c, kstep * 2);
  *bytes = kstep * 2;
  return scratch;
}

template <int PAIRS>
static void amx_block(const AmxConvArgs& a, int64_t image, int64_t q0, int64_t ob0, int64_t kstep, float* sums,
                      bf16_t* scratch) {
  const int64_t wblock = a.tap_count * a.c * 16;
  const int64_t first = image * a.image_pixels + q0;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t tap = 0; tap < a.tap_count; ++tap) {
    const int64_t pixel = first + a.taps[tap];
    const bf16_t* w0 = a.w + ob0 * wblock + tap * a.c * 16;
    for (int64_t k0 = 0; k0 < a.c; k0 += kstep) {
      int64_t bytes;
      const bf16_t* rows = input_rows(a, pixel, k0, kstep, scratch, &bytes);
      _tile_loadd(4, rows, bytes);
      rows = input_rows(a, pixel + 16, k0, kstep, scratch + 16 * 32, &bytes);
      _tile_loadd(5, rows, bytes);
      _tile_loadd(6, w0 + k0 * 16, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      if (PAIRS == 2) {
        _tile_loadd(7, w0 + wblock + k0 * 16, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, sums, 64);
  _tile_stored(1, sums + 256, 64);
  if (PAIRS == 2) {
    _tile_stored(2, sums + 512, 64);
    _tile_stored(3, sums + 768, 64);
  }
  const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi);
  // output pixel q0 + r is (oy, ox), stepped along without a division per pixel
  int64_t oy = q0 / a.wv, ox = q0 % a.wv - 1;
  for (int64_t r = 0; r < 32; ++r) {
    if (++ox == a.wv) { ox = 0; ++oy; }
    if (oy >= a.oh || ox >= a.ow) continue;
    const int64_t p = (image * a.oh + oy) * a.ow + ox;
    for (int b = 0; b < PAIRS; ++b) {
      const int64_t oc0 = (ob0 + b) * 16;
      const __mmask16 mask = first_lanes(a.oc - oc0);
      __m512 v = _mm512_add_ps(_mm512_load_ps(sums + b * 512 + r * 16), _mm512_loadu_ps(a.bias + oc0));
      if (a.residual) {
        const int64_t at = p * a.oc + oc0;
        v = _mm512_add_ps(v, a.residual_bf16 ? load16(static_cast<const bf16_t*>(a.residual) + at, mask)
                                             : load16(static_cast<const float*>(a.residual) + at, mask));
      }
      store16(a.y + p * a.ldy + oc0, mask, clamped(v, lo, hi));
    }
  }
}

extern "C" void kiln_conv_amx(const AmxConvArgs* args, int64_t pairs_per_task, int64_t threads) {
  const AmxConvArgs& a = *args;
  const int64_t kstep = a.c % 32 == 0 ? 32 : 16;
  const int64_t ocb = (a.oc + 15) / 16, pairs = (ocb + 1) / 2;
  const int64_t groups = (pairs + pairs_per_task - 1) / pairs_per_task;
  const int64_t q_count = (a.oh - 1) * a.wv + a.ow, blocks = (q_count + 31) / 32;
  const int64_t tasks = a.n * blocks * groups;
#pragma omp parallel num_threads(threads)
  {
    alignas(64) float sums[4 * 256];
    alignas(64) bf16_t scratch[2 * 16 * 32];
    configure_tiles(kstep);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t g = t / (a.n * blocks), image = t % (a.n * blocks) / blocks, block = t % blocks;
      const int64_t pair1 = (g + 1) * pairs_per_task < pairs ? (g + 1) * pairs_per_task : pairs;
      for (int64_t pair = g * pairs_per_task; pair < pair1; ++pair) {
        if (2 * pair + 1 < ocb) amx_block<2>(a, image, block * 32, 2 * pair, kstep, sums, scratch);
        else amx_block<1>(a, image, block * 32, 2 * pair, kstep, sums, scratch);
      }
    }
    _tile_release();
  }
}

// The AMX convolution's prepared input from bf16 `x`, indexed as NCHW with element strides (sn, sc, sh, sw): for
// a < pa, b < pb, phase image (a, b) of hq x wq NHWC pixels holds the zero-padded input's pixel (s*y + a, s*x + b)
// (zero past its edge); images one after another, then `tail` zero pixels. At s = 1 it is the padded image.
struct PrepareArgs {
  const bf16_t* x; bf16_t* y;
  int64_t n, c, h, w, sn, sc, sh, sw, ph, pw, s, pa, pb, hq, wq, tail;
};

static inline void copy_pixel(bf16_t* out, const bf16_t* in, int64_t c, int64_t sc) {
  if (sc == 1) { memcpy(out, in, c * 2); return; }
  for (int64_t ch = 0; ch < c; ++ch) out[ch] = in[ch * sc];
}

extern "C" void kiln_prepare_phases(const PrepareArgs* args, int64_t threads) {
  const PrepareArgs& a = *args;
  const int64_t rows = a.n * a.pa * a.pb * a.hq;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = r % a.hq, phase = r / a.hq % (a.pa * a.pb), image = r / a.hq / (a.pa * a.pb);
    const int64_t iy = a.s * y + phase / a.pb - a.ph, b = phase % a.pb;
    bf16_t* out = a.y + r * a.wq * a.c;
    if (iy < 0 || iy >= a.h) { memset(out, 0, a.wq * a.c * 2); continue; }
    const bf16_t* in = a.x + image * a.sn + iy * a.sh;
    int64_t x = 0;
    for (; x < a.wq && a.s * x + b - a.pw < 0; ++x) memset(out + x * a.c, 0, a.c * 2);
    if (a.s == 1 && a.sc == 1 && a.sw == a.c) {  // NHWC rows: the interior in one copy
      const int64_t count = a.w - (x + b - a.pw) < a.wq - x ? a.w - (x + b - a.pw) : a.wq - x;
      memcpy(out + x * a.c, in + (x + b - a.pw) * a.c, count * a.c * 2);
      x += count;
    }
    for (; x < a.wq && a.s * x + b - a.pw < a.w; ++x) copy_pixel(out + x * a.c, in + (a.s * x + b - a.pw) * a.sw, a.c, a.sc);
    if (x < a.wq) memset(out + x * a.c, 0, (a.wq - x) * a.c * 2);
  }
  memset(a.y + rows * a.wq * a.c, 0, a.tail * a.c * 2);
}

#else
extern "C" int kiln_amx_init() { return 0; }
extern "C" int kiln_native_amx() { return 0; }
#endif

// Replaying a recorded run (replay.py): each call is a kernel entry point above, its argument structure (whose
// activation pointers were fixed when the run was planned) and its trailing integers. Patches first set the pointers
// that change from run to run (the engine's inputs, the outputs of layers that run in Python) from `sources`.
struct ReplayCall { const void* function; char* args; int64_t params[5]; int64_t param_count; };
struct ReplayPatch { int64_t call, field, source, delta; };

typedef void (*Kernel1)(const void*, int64_t);
typedef void (*Kernel2)(const void*, int64_t, int64_t);
typedef void (*Kernel3)(const void*, int64_t, int64_t, int64_t);
typedef void (*Kernel5)(const void*, int64_t, int64_t, int64_t, int64_t, int64_t);

extern "C" void kiln_replay(ReplayCall* calls, int64_t count, const ReplayPatch* patches, int64_t patch_count,
                            const int64_t* sources) {
  for (int64_t i = 0; i < patch_count; ++i) {
    const ReplayPatch& p = patches[i];
    *reinterpret_cast<int64_t*>(calls[p.call].args + p.field) = sources[p.source] + p.delta;
  }
  for (int64_t i = 0; i < count; ++i) {
    const ReplayCall& c = calls[i];
    const int64_t* q = c.params;
    switch (c.param_count) {
      case 1: reinterpret_cast<Kernel1>(c.function)(c.args, q[0]); break;
      case 2: reinterpret_cast<Kernel2>(c.function)(c.args, q[0], q[1]); break;
      case 3: reinterpret_cast<Kernel3>(c.function)(c.args, q[0], q[1], q[2]); break;
      case 5: reinterpret_cast<Kernel5>(c.function)(c.args, q[0], q[1], q[2], q[3], q[4]); break;
      default: __builtin_trap();  // replay.py records only the kernels above
    }
  }
}
