/* Lesson 15: decode matmuls on quantized weights, for a few rows.
 *
 * numba does not vectorize nibble unpacking (its integer arithmetic widens to 64 bits, which
 * AVX2 cannot convert to floats in a vector), the short per-group loops of grouped int8 codes,
 * or int8 x int8 products summed in integers, so these kernels are C with AVX2 intrinsics (and
 * plain loops where AVX2 is missing), compiled on first use by nanoengine/quant/native.py and
 * called from numba, which splits the output rows between threads: a call computes outputs
 * n_first..n_last-1 of every activation row. Each output is one fixed sequence of additions
 * whatever the number of rows, so a row gets the same bits alone or in a batch.
 *
 * Grouped weights: w = code * scale + min per (output row n, group g of group_size inputs), so
 *     out[m, n] = sum_g scale[n, g] * dot(codes_g, x_g) + sum_g min[n, g] * xsum[m, g],
 * with xsum the sums of the float activations over each group (the caller computes them once).
 * The activations come as float32 (xscale NULL), or quantized to int8 with one scale per
 * (row, group) (GGUF's blocks on the fast path, as llama.cpp runs them: W4A8, W8A8 per group);
 * then each group's dot product is summed exactly in int32 and scaled by scale * xscale.
 *
 * int4_rows, Int4Weight's layout: row n is k / 2 bytes; in group g, byte j holds the code of
 * input j in its low nibble and of input j + group_size / 2 in its high nibble (codes 0..15).
 * int8_grouped_rows, GroupedInt8Weight's layout (group-major): codes [groups, N, group_size],
 * scales and mins [groups, N] (mins NULL for the symmetric types).
 * int8_int8_rows, W8A8 (nanoengine/quant/w8a8.py): int8 activations with a scale per row times
 * int8 weights [N, k] with a scale per output row, summed exactly in int32.
 */
#include <stdint.h>
#include <stddef.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int32_t sum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* 16 codes (bytes' low or high nibbles, already masked) times 16 floats, added to a0/a1. */
static inline void fma16(__m128i codes, const float *x, __m256 *a0, __m256 *a1) {
    *a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), _mm256_loadu_ps(x), *a0);
    *a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8))),
                          _mm256_loadu_ps(x + 8), *a1);
}
#endif

/* sum_g min[g * stride] * xsum[g]: the mins' share of one output (min NULL: none). */
static inline float shift_of(const float *min, int64_t stride, const float *xsum, int64_t groups) {
    float shift = 0.0f;
    if (min != NULL)
        for (int64_t g = 0; g < groups; g++) shift += min[g * stride] * xsum[g];
    return shift;
}

/* One output of a 4-bit row w: sum_g scale[g] * dot(codes_g, x_g), float activations x. */
static float int4_dot_float(const uint8_t *w, const float *x, const float *scale, int64_t groups, int64_t group_size) {
    const int64_t half = group_size / 2;
#if defined(__AVX2__) && defined(__FMA__)
    if (half % 16 == 0) {
        const __m128i low = _mm_set1_epi8(15);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *wg = w + g * half;
            const float *xg = x + g * group_size;
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
        return sum8(acc);
    }
#endif
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *wg = w + g * half;
        const float *xg = x + g * group_size;
        float dot = 0.0f;
        for (int64_t j = 0; j < half; j++)
            dot += (float)(wg[j] & 15) * xg[j] + (float)(wg[j] >> 4) * xg[half + j];
        total += dot * scale[g];
    }
    return total;
}

/* The same with int8 activations xq and their scales xs per group: integer dot products. */
static float int4_dot_int8(const uint8_t *w, const int8_t *xq, const float *xs, const float *scale, int64_t groups,
                           int64_t group_size) {
    const int64_t half = group_size / 2;
#if defined(__AVX2__) && defined(__FMA__)
    if (half % 16 == 0) {
        const __m128i low = _mm_set1_epi8(15);
        const __m256i ones = _mm256_set1_epi16(1);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *wg = w + g * half;
            const int8_t *xg = xq + g * group_size;
            __m256i dot = _mm256_setzero_si256();
            for (int64_t j = 0; j < half; j += 16) {
                __m128i bytes = _mm_loadu_si128((const __m128i *)(wg + j));
                /* 16 low-nibble codes (inputs j..j+15), then 16 high ones (inputs half+j..) */
                __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
                __m256i x = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(xg + half + j)),
                                             _mm_loadu_si128((const __m128i *)(xg + j)));
                /* codes 0..15 times int8: pair sums at most 2 * 15 * 128, no saturation */
                dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), ones));
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale[g] * xs[g]), acc);
        }
        return sum8(acc);
    }
#endif
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *wg = w + g * half;
        const int8_t *xg = xq + g * group_size;
        int32_t dot = 0;
        for (int64_t j = 0; j < half; j++)
            dot += (int32_t)(wg[j] & 15) * xg[j] + (int32_t)(wg[j] >> 4) * xg[half + j];
        total += (float)dot * (scale[g] * xs[g]);
    }
    return total;
}

/* One output of group-major int8 codes (output n's group g at w + g * stride), float x. */
static float grouped_dot_float(const int8_t *w, int64_t stride, const float *x, const float *scale,
                               int64_t scale_stride, int64_t groups, int64_t group_size) {
#if defined(__AVX2__) && defined(__FMA__)
    if (group_size % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const int8_t *wg = w + g * stride;
            const float *xg = x + g * group_size;
            __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
            int64_t j = 0;
            for (; j + 16 <= group_size; j += 16) { /* two independent sums */
                __m128i sixteen = _mm_loadu_si128((const __m128i *)(wg + j));
                d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sixteen)), _mm256_loadu_ps(xg + j), d0);
                d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sixteen, 8))),
                                     _mm256_loadu_ps(xg + j + 8), d1);
            }
            if (j < group_size) { /* a tail of 8 */
                __m128i eight = _mm_loadl_epi64((const __m128i *)(wg + j));
                d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), _mm256_loadu_ps(xg + j), d0);
            }
            acc = _mm256_fmadd_ps(_mm256_add_ps(d0, d1), _mm256_set1_ps(scale[g * scale_stride]), acc);
        }
        return sum8(acc);
    }
#endif
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *wg = w + g * stride;
        const float *xg = x + g * group_size;
        float dot = 0.0f;
        for (int64_t j = 0; j < group_size; j++) dot += (float)wg[j] * xg[j];
        total += dot * scale[g * scale_stride];
    }
    return total;
}

/* The same with int8 activations xq and their scales xs per group: integer dot products. */
static float grouped_dot_int8(const int8_t *w, int64_t stride, const int8_t *xq, const float *xs, const float *scale,
                              int64_t scale_stride, int64_t groups, int64_t group_size) {
#if defined(__AVX2__) && defined(__FMA__)
    if (group_size % 16 == 0) {
        const __m128i ones = _mm_set1_epi16(1);
        __m128 acc = _mm_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const int8_t *wg = w + g * stride;
            const int8_t *xg = xq + g * group_size;
            __m128i dot = _mm_setzero_si128();
            for (int64_t j = 0; j < group_size; j += 16) {
                __m128i wv = _mm_loadu_si128((const __m128i *)(wg + j));
                __m128i xv = _mm_loadu_si128((const __m128i *)(xg + j));
                /* maddubs multiplies unsigned by signed bytes: |w| times x with w's sign, pair
                 * sums at most 2 * 127 * 128, no saturation */
                dot = _mm_add_epi32(dot, _mm_madd_epi16(_mm_maddubs_epi16(_mm_sign_epi8(wv, wv), _mm_sign_epi8(xv, wv)),
                                                        ones));
            }
            acc = _mm_fmadd_ps(_mm_cvtepi32_ps(dot), _mm_set1_ps(scale[g * scale_stride] * xs[g]), acc);
        }
        acc = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
        acc = _mm_add_ss(acc, _mm_movehdup_ps(acc));
        return _mm_cvtss_f32(acc);
    }
#endif
    float total = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *wg = w + g * stride;
        const int8_t *xg = xq + g * group_size;
        int32_t dot = 0;
        for (int64_t j = 0; j < group_size; j++) dot += (int32_t)wg[j] * xg[j];
        total += (float)dot * (scale[g * scale_stride] * xs[g]);
    }
    return total;
}

/* x [rows, k]: float32, or int8 codes when xscale [rows, groups] is not NULL; xsum [rows,
 * groups]; nibbles [N, k / 2]; scales and mins [N, groups]; out [rows, n_total]. */
void int4_rows(const void *x, const float *xscale, const float *xsum, int64_t rows, int64_t k, const uint8_t *nibbles,
               const float *scales, const float *mins, int64_t group_size, int64_t n_first, int64_t n_last, float *out,
               int64_t n_total) {
    const int64_t groups = k / group_size;
    for (int64_t n = n_first; n < n_last; n++) {
        const uint8_t *w = nibbles + n * (k / 2);
        const float *scale = scales + n * groups;
        for (int64_t m = 0; m < rows; m++) {
            float dot = xscale == NULL
                ? int4_dot_float(w, (const float *)x + m * k, scale, groups, group_size)
                : int4_dot_int8(w, (const int8_t *)x + m * k, xscale + m * groups, scale, groups, group_size);
            out[m * n_total + n] = dot + shift_of(mins + n * groups, 1, xsum + m * groups, groups);
        }
    }
}

/* x, xscale, xsum as int4_rows takes them; codes [groups, N, group_size]; scales and mins
 * [groups, N] (mins NULL: none); out [rows, n_total]. */
void int8_grouped_rows(const void *x, const float *xscale, const float *xsum, int64_t rows, int64_t k,
                       const int8_t *codes, const float *scales, const float *mins, int64_t group_size, int64_t n_first,
                       int64_t n_last, float *out, int64_t n_total) {
    const int64_t groups = k / group_size, stride = n_total * group_size;
    for (int64_t n = n_first; n < n_last; n++) {
        const int8_t *w = codes + n * group_size;
        for (int64_t m = 0; m < rows; m++) {
            float dot = xscale == NULL
                ? grouped_dot_float(w, stride, (const float *)x + m * k, scales + n, n_total, groups, group_size)
                : grouped_dot_int8(w, stride, (const int8_t *)x + m * k, xscale + m * groups, scales + n, n_total,
                                   groups, group_size);
            out[m * n_total + n] = dot + shift_of(mins == NULL ? NULL : mins + n, n_total, xsum + m * groups, groups);
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
            const __m256i ones = _mm256_set1_epi16(1);
            __m256i acc = _mm256_setzero_si256();
            for (; j + 32 <= k; j += 32) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(wn + j));
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xm + j));
                __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
            }
            dot = sum8_epi32(acc);
#endif
            for (; j < k; j++) dot += (int32_t)wn[j] * (int32_t)xm[j];
            out[m * n_total + n] = (float)dot * (xscale[m] * wscale[n]);
        }
    }
}
