// kiln's native CPU kernels (AVX-512, fp32, NHWC), built by native.py: a direct convolution and max pooling.
//
// The convolution:
// Weights are packed as [oc/16][kh][kw][ic][16]. A task computes one output row segment for up to four blocks of
// 16 output channels; the input channels run in blocks whose weights stay in L1 across the segment, the partial
// sums kept in the output. Bias starts the sum; the residual add and a clamp (ReLU, Clip) finish it.
#include <immintrin.h>
#include <stdint.h>

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
  for (int b = 0; b < NB; ++b) {
    const int64_t left = a.oc - (s.ob0 + b) * 16;
    mask[b] = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
  }
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

// Max pooling over NHWC: each output pixel takes the maximum of its window's taps inside the input (padding never
// wins), 16 channels at a time; a NaN anywhere in the window is the result, as in torch's max_pool2d.
struct PoolArgs {
  const float* x; float* y;
  int64_t n, h, w_, c, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw;
};

extern "C" void kiln_max_pool_nhwc(const PoolArgs* args, int64_t threads) {
  const PoolArgs& a = *args;
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
      float* out = a.y + ((n * a.oh + oy) * a.ow + ox) * a.c;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t left = a.c - b * 16;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        __m512 best = _mm512_set1_ps(-__builtin_inff());
        __mmask16 nan = 0;
        for (int64_t ky = ky0; ky < ky1; ++ky) {
          const float* in = a.x + ((n * a.h + oy * a.sh - a.ph + ky * a.dh) * a.w_) * a.c + b * 16;
          for (int64_t kx = kx0; kx < kx1; ++kx) {
            const __m512 v = _mm512_maskz_loadu_ps(mask, in + (ox * a.sw - a.pw + kx * a.dw) * a.c);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            best = _mm512_max_ps(best, v);
          }
        }
        best = _mm512_mask_mov_ps(best, nan, _mm512_set1_ps(__builtin_nanf("")));
        _mm512_mask_storeu_ps(out + b * 16, mask, best);
      }
    }
  }
}
