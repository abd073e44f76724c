/* Lesson 15: decode matmuls on quantized weights, for a few rows.
 *
 * numba does not vectorize nibble unpacking (its integer arithmetic widens to 64 bits, which
 * AVX2 cannot convert to float in a vector), the short per-group loops of grouped int8 codes,
 * or int8 x int8 products summed in integers, so these kernels are C with AVX2 intrinsics (and plain loops where AVX2 is
 * missing), compiled on first use by nanoengine/quant/native.py and called from numba, which
 * splits the output rows between threads. Each call computes outputs n_first..n_last-1.
 * Each output is one fixed sequence of additions whatever the number of rows: batch invariant.
 *
 * int4_rows, Int4Weight's layout: row n of the weight is k / 2 bytes; in group g (group_size inputs),
 * byte j holds the code of input j in its low nibble and of input j + group_size / 2 in its
 * high nibble. w = code * scale + min per (row, group), so
 *     out[m, n] = sum_g scale[n, g] * dot(codes_g, x_g) + sum_g min[n, g] * xsum[m, g],
 * with xsum the sums of x over each group (the caller computes them once per call).
 *
 * int8_grouped_rows, GroupedInt8Weight's layout (group-major): codes [groups, N, group_size],
 * scales and mins [groups, N] (mins NULL for the symmetric types), w = code * scale (+ min).
 *
 * int8_int8_rows, W8A8 (nanoengine/quant/w8a8.py): int8 activations with a scale per row times
 * int8 weights [N, k] with a scale per output row, the products summed exactly in int32.
 */
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 codes (bytes' low or high nibbles, already masked) times 16 floats, added to a0/a1. */
static inline void fma16(__m128i codes, const float *x, __m256 *a0, __m256 *a1) {
    *a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), _mm256_loadu_ps(x), *a0);
    *a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8))),
                          _mm256_loadu_ps(x + 8), *a1);
}
#endif

/* Outputs n_first..n_last-1 of every row m: x [rows, k], xsum [rows, groups], nibbles
 * [N, k / 2], scales and mins [N, groups], out [rows, n_total]. */
void int4_rows(const float *x, const float *xsum, int64_t rows, int64_t k, const uint8_t *nibbles,
               const float *scales, const float *mins, int64_t group_size, int64_t n_first,
               int64_t n_last, float *out, int64_t n_total) {
    const int64_t groups = k / group_size, half = group_size / 2;
    for (int64_t n = n_first; n < n_last; n++) {
        const uint8_t *w = nibbles + n * (k / 2);
        const float *scale = scales + n * groups, *min = mins + n * groups;
        for (int64_t m = 0; m < rows; m++) {
            const float *xm = x + m * k, *xs = xsum + m * groups;
            float total = 0.0f, shift = 0.0f;
            for (int64_t g = 0; g < groups; g++) shift += min[g] * xs[g];
#if defined(__AVX2__) && defined(__FMA__)
            if (half % 16 == 0) {
                const __m128i low = _mm_set1_epi8(15);
                __m256 acc = _mm256_setzero_ps();
                for (int64_t g = 0; g < groups; g++) {
                    const uint8_t *wg = w + g * half;
                    const float *xg = xm + g * group_size;
                    /* four independent sums: an FMA waits ~5 cycles for the one before it */
                    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                    for (int64_t j = 0; j < half; j += 16) {
                        __m128i bytes = _mm_loadu_si128((const __m128i *)(wg + j));
                        fma16(_mm_and_si128(bytes, low), xg + j, &a0, &a1);
                        fma16(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), xg + half + j, &a2, &a3);
                    }
                    a0 = _mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3));
                    acc = _mm256_fmadd_ps(a0, _mm256_set1_ps(scale[g]), acc);
                }
                out[m * n_total + n] = sum8(acc) + shift;
                continue;
            }
#endif
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *wg = w + g * half;
                const float *xg = xm + g * group_size;
                float dot = 0.0f;
                for (int64_t j = 0; j < half; j++)
                    dot += (float)(wg[j] & 15) * xg[j] + (float)(wg[j] >> 4) * xg[half + j];
                total += dot * scale[g];
            }
            out[m * n_total + n] = total + shift;
        }
    }
}

/* x [rows, k], xsum [rows, groups] (read only when mins is not NULL), out [rows, n_total]. */
void int8_grouped_rows(const float *x, const float *xsum, int64_t rows, int64_t k, const int8_t *codes,
                       const float *scales, const float *mins, int64_t group_size, int64_t n_first,
                       int64_t n_last, float *out, int64_t n_total) {
    const int64_t groups = k / group_size;
    for (int64_t n = n_first; n < n_last; n++) {
        for (int64_t m = 0; m < rows; m++) {
            const float *xm = x + m * k;
            float total = 0.0f, shift = 0.0f;
            if (mins != 0)
                for (int64_t g = 0; g < groups; g++) shift += mins[g * n_total + n] * xsum[m * groups + g];
#if defined(__AVX2__) && defined(__FMA__)
            if (group_size % 8 == 0) {
                __m256 acc = _mm256_setzero_ps();
                for (int64_t g = 0; g < groups; g++) {
                    const int8_t *wg = codes + (g * n_total + n) * group_size;
                    const float *xg = xm + g * group_size;
                    __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
                    int64_t j = 0;
                    for (; j + 16 <= group_size; j += 16) { /* two independent sums */
                        __m128i sixteen = _mm_loadu_si128((const __m128i *)(wg + j));
                        d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sixteen)), _mm256_loadu_ps(xg + j), d0);
                        d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sixteen, 8))),
                                             _mm256_loadu_ps(xg + j + 8), d1);
                    }
                    if (j < group_size) { /* a group of 8 */
                        __m128i eight = _mm_loadl_epi64((const __m128i *)(wg + j));
                        d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), _mm256_loadu_ps(xg + j), d0);
                    }
                    __m256 dot = _mm256_add_ps(d0, d1);
                    acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(scales[g * n_total + n]), acc);
                }
                out[m * n_total + n] = sum8(acc) + shift;
                continue;
            }
#endif
            for (int64_t g = 0; g < groups; g++) {
                const int8_t *wg = codes + (g * n_total + n) * group_size;
                const float *xg = xm + g * group_size;
                float dot = 0.0f;
                for (int64_t j = 0; j < group_size; j++) dot += (float)wg[j] * xg[j];
                total += dot * scales[g * n_total + n];
            }
            out[m * n_total + n] = total + shift;
        }
    }
}

/* xq [rows, k] int8 with xscale [rows]; w [N, k] int8 (codes in -127..127) with wscale [N];
 * out [rows, n_total] = (xq . w) * xscale * wscale, the dot product exact in int32 (k < 2^17). */
void int8_int8_rows(const int8_t *xq, const float *xscale, int64_t rows, int64_t k, const int8_t *w,
                    const float *wscale, int64_t n_first, int64_t n_last, float *out, int64_t n_total) {
    for (int64_t n = n_first; n < n_last; n++) {
        const int8_t *wn = w + n * k;
        for (int64_t m = 0; m < rows; m++) {
            const int8_t *xm = xq + m * k;
            int32_t dot = 0;
            int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
            /* maddubs multiplies unsigned by signed bytes: |w| times x with w's sign, in pairs
             * summed to int16 (at most 2 * 127 * 127, no saturation), then to int32 */
            const __m256i ones = _mm256_set1_epi16(1);
            __m256i acc = _mm256_setzero_si256();
            for (; j + 32 <= k; j += 32) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wn + j));
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xm + j));
                __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
            }
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
            dot = _mm_cvtsi128_si32(s);
#endif
            for (; j < k; j++) dot += (int32_t)wn[j] * (int32_t)xm[j];
            out[m * n_total + n] = (float)dot * (xscale[m] * wscale[n]);
        }
    }
}
