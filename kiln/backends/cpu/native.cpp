// kiln's native CPU kernels (AVX-512), built by native.py: a direct fp32 NHWC convolution, max pooling and a
// per-channel affine map with a clamp (an inference BatchNormalization + ReLU), the last two in fp32 or bf16.
//
// The convolution:
// Weights are packed as [oc/16][kh][kw][ic][16]. A task computes one output row segment for up to four blocks of
// 16 output channels; the input channels run in blocks whose weights stay in L1 across the segment, the partial
// sums kept in the output. Bias starts the sum; the residual add and a clamp (ReLU, Clip) finish it.
#include <immintrin.h>
#include <stdint.h>

static inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
}

struct ConvArgs {
  const float* x; const float* w; const float* bias; const float* residual; float* y;
  int64_t n, h, w_, c;          // input, NHWC
  int64_t oh, ow, oc;           // output, NHWC
  int64_t ldy;                  // floats from one output pixel to the next: oc, or more in a slice of a wider buffer
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  float lo, hi;                 // clamp after the residual: ReLU is [0, inf)
};

struct Span { int64_t n, oy, ob0, ic0, ic1; bool first, last; };

template <int NB, int NW, bool EDGE>
static inline void tile(const ConvArgs& a, const Span& s, int64_t ox0) {
  __m512 acc[NB][NW];
  const int64_t pixel0 = (s.n * a.oh + s.oy) * a.ow + ox0;
  const int64_t out0 = pixel0 * a.ldy;
  __mmask16 mask[NB];
  for (int b = 0; b < NB; ++b) mask[b] = first_lanes(a.oc - (s.ob0 + b) * 16);
  for (int b = 0; b < NB; ++b) {
    const int64_t oc0 = (s.ob0 + b) * 16;
    const __m512 bias = _mm512_loadu_ps(a.bias + oc0);
    for (int j = 0; j < NW; ++j)
      acc[b][j] = s.first ? bias : _mm512_maskz_loadu_ps(mask[b], a.y + out0 + j * a.ldy + oc0);
  }
  const int64_t wblock = a.kh * a.kw * a.c * 16;
  const int64_t xs = a.sw * a.c;
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
      const float* xp = xrow + ix0 * a.c;
      const float* wp = a.w + s.ob0 * wblock + (ky * a.kw + kx) * a.c * 16;
      for (int64_t ic = s.ic0; ic < s.ic1; ++ic) {
        __m512 wv[NB];
        for (int b = 0; b < NB; ++b) wv[b] = _mm512_loadu_ps(wp + b * wblock + ic * 16);
        for (int j = 0; j < NW; ++j) {
          if (EDGE && (j < j0 || j >= j1)) continue;
          const __m512 xv = _mm512_set1_ps(xp[j * xs + ic]);
          for (int b = 0; b < NB; ++b) acc[b][j] = _mm512_fmadd_ps(wv[b], xv, acc[b][j]);
        }
      }
    }
  }
  const __m512 lo = _mm512_set1_ps(a.lo), hi = _mm512_set1_ps(a.hi);
  for (int j = 0; j < NW; ++j) {
    for (int b = 0; b < NB; ++b) {
      const int64_t oc0 = (s.ob0 + b) * 16;
      __m512 v = acc[b][j];
      if (s.last) {
        if (a.residual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask[b], a.residual + (pixel0 + j) * a.oc + oc0));
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
      }
      _mm512_mask_storeu_ps(a.y + out0 + j * a.ldy + oc0, mask[b], v);
    }
  }
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

// Max pooling over NHWC: each output pixel takes the maximum of its window's taps inside the input (padding never
// wins), 16 channels at a time; a NaN anywhere in the window is the result, as in torch's max_pool2d.
struct PoolArgs {
  const void* x; void* y;
  int64_t n, h, w_, c, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
};

template <typename T>
static void max_pool_nhwc(const PoolArgs& a, int64_t threads) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t blocks = (a.c + 15) / 16;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t row = 0; row < a.n * a.oh; ++row) {
    const int64_t n = row / a.oh, oy = row % a.oh;
    int64_t ky0 = 0, ky1 = a.kh;  // taps inside the input: [ky0, ky1)
    while (ky0 < a.kh && oy * a.sh - a.ph + ky0 * a.dh < 0) ++ky0;
    while (ky1 > ky0 && oy * a.sh - a.ph + (ky1 - 1) * a.dh >= a.h) --ky1;
    for (int64_t ox = 0; ox < a.ow; ++ox) {
      int64_t kx0 = 0, kx1 = a.kw;
      while (kx0 < a.kw && ox * a.sw - a.pw + kx0 * a.dw < 0) ++kx0;
      while (kx1 > kx0 && ox * a.sw - a.pw + (kx1 - 1) * a.dw >= a.w_) --kx1;
      T* out = y + ((n * a.oh + oy) * a.ow + ox) * a.c;
      for (int64_t b = 0; b < blocks; ++b) {
        const __mmask16 mask = first_lanes(a.c - b * 16);
        __m512 best = _mm512_set1_ps(-__builtin_inff());
        __mmask16 nan = 0;
        for (int64_t ky = ky0; ky < ky1; ++ky) {
          const T* in = x + ((n * a.h + oy * a.sh - a.ph + ky * a.dh) * a.w_) * a.c + b * 16;
          for (int64_t kx = kx0; kx < kx1; ++kx) {
            const __m512 v = load16(in + (ox * a.sw - a.pw + kx * a.dw) * a.c, mask);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            best = _mm512_max_ps(best, v);
          }
        }
        best = _mm512_mask_mov_ps(best, nan, _mm512_set1_ps(__builtin_nanf("")));
        store16(out + b * 16, mask, best);
      }
    }
  }
}

extern "C" void kiln_max_pool_nhwc(const PoolArgs* args, int64_t threads) {
  max_pool_nhwc<float>(*args, threads);
}

#ifdef __AVX512BF16__
extern "C" void kiln_max_pool_nhwc_bf16(const PoolArgs* args, int64_t threads) {
  max_pool_nhwc<bf16_t>(*args, threads);
}
#endif

// y = clamp(x * scale[c] + shift[c], lo, hi) over a tensor seen as [outer][c][inner]: NHWC is inner 1 (16 channels
// at a time), NCHW is outer n and inner h*w (16 pixels of one channel at a time). One pass over memory, where
// torch's addcmul and relu take two, and in bf16 each converts on its own.
struct AffineArgs {
  const void* x; void* y; const float* scale; const float* shift;
  int64_t outer, c, inner;
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
    store16(y + i, 0xFFFF, _mm512_min_ps(_mm512_max_ps(v, lo), hi));
  }
  if (i < count) {
    const __mmask16 m = first_lanes(count - i);
    const __m512 v = _mm512_fmadd_ps(load16(x + i, m), _mm512_maskz_loadu_ps(m, s + i), _mm512_maskz_loadu_ps(m, t + i));
    store16(y + i, m, _mm512_min_ps(_mm512_max_ps(v, lo), hi));
  }
}

// one plane of `count` elements of one channel (NCHW), scale s and shift t
template <typename T>
static inline void affine_plane(const T* x, T* y, __m512 s, __m512 t, int64_t count,
                                __m512 lo, __m512 hi) {
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 m = first_lanes(count - i);
    store16(y + i, m, _mm512_min_ps(_mm512_max_ps(_mm512_fmadd_ps(load16(x + i, m), s, t), lo), hi));
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
      for (int64_t r = task * rows_per_task; r < r1; ++r) affine_row(x + r * c, y + r * c, scale, shift, c, lo, hi);
    }
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t plane = 0; plane < outer * c; ++plane) {
    const int64_t ch = plane % c;
    affine_plane(x + plane * inner, y + plane * inner, _mm512_set1_ps(scale[ch]), _mm512_set1_ps(shift[ch]), inner, lo, hi);
  }
}

extern "C" void kiln_channel_affine(const AffineArgs* args, int64_t threads) {
  channel_affine<float>(*args, threads);
}

#ifdef __AVX512BF16__
extern "C" void kiln_channel_affine_bf16(const AffineArgs* args, int64_t threads) {
  channel_affine<bf16_t>(*args, threads);
}
#endif
