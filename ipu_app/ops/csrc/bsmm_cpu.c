/* Block-sparse matrix products for training on x86 CPUs, 16x16 blocks.
 *
 * A sparse weight W [out, in] is a list of 16x16 blocks: block k sits at block row rows[k] and block
 * column cols[k]. Three products are needed for a training step of y = x W^T:
 *   forward      Y  = X W^T        rows of X (tokens) times each block row's blocks
 *   input grad   dX = dY W         each block column's blocks (the transposed pattern)
 *   values grad  dV[k] = dY[:, rows[k]]^T X[:, cols[k]]   sampled at the active blocks only (SDDMM)
 * Blocks are visited through index lists (row_ptr/row_blk for the forward, col_ptr/col_blk for the
 * input gradient) that the host builds once per pattern.
 *
 * bf16 runs on AMX tiles (fp32 accumulation); fp32 runs on loops the compiler vectorises. On a CPU
 * without AMX, bf16 operands are widened to fp32 where they are read (the token-panel packing, or
 * bsmm_convert for the 16x16 tiles) and the results rounded back to bf16 where they are written.
 * Everything is plain C with a C ABI, called through ctypes; OpenMP splits the work.
 */
#include <stdint.h>
#include <string.h>

#define BS 16

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* bf16 <-> fp32: widening is exact; narrowing rounds to nearest even (NaN stays a quiet NaN). */
static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}
static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* dst = src with the dtype changed: bf16 -> fp32 (to_bf16 = 0) or fp32 -> bf16 (1), n elements. */
void bsmm_convert(const void *src, int64_t n, int to_bf16, void *dst, int nthreads) {
    if (to_bf16) {
        const float *s = (const float *)src;
        uint16_t *d = (uint16_t *)dst;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(s[i]);
    } else {
        const uint16_t *s = (const uint16_t *)src;
        float *d = (float *)dst;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
    }
}

/* out[f] = sum over t < T of src[t][f] in fp32 (src [T, F] contiguous, fp32 or bf16 when ``bf16``): the
 * bias gradient. Threads take strips of 64 features and sum them down the tokens. */
void bsmm_colsum(const void *src, int64_t T, int64_t F, int bf16, float *out, int nthreads) {
    const int64_t strips = (F + 63) / 64;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t s = 0; s < strips; ++s) {
        const int64_t f0 = s * 64, nf = min64(64, F - f0);
        float acc[64] = {0};
        for (int64_t t = 0; t < T; ++t) {
            if (bf16) {
                const uint16_t *row = (const uint16_t *)src + t * F + f0;
                for (int64_t f = 0; f < nf; ++f) acc[f] += bf16_to_f32(row[f]);
            } else {
                const float *row = (const float *)src + t * F + f0;
                for (int64_t f = 0; f < nf; ++f) acc[f] += row[f];
            }
        }
        memcpy(out + f0, acc, nf * sizeof(float));
    }
}

/* ------------------------------------------------------------------------------------------ fp32 */

/* acc[t][i] (t < NT) += sum over the blocks of one block row/column. ``a`` rows are tokens with
 * stride lda; ``w`` is the block laid out [kk][i] (kk the contracted index). */
static inline void f32_block_tile(int nt, const float *a, int64_t lda, const float *w, float acc[][BS]) {
    for (int kk = 0; kk < BS; ++kk) {
        const float *wr = w + kk * BS;
        for (int t = 0; t < nt; ++t) {
            const float s = a[t * lda + kk];
            for (int i = 0; i < BS; ++i) acc[t][i] += s * wr[i];
        }
    }
}

#define F32_TOKENS 16

/* One output tile: tokens [t0, t0+nt) x 16 outputs of line ``line``; blocks ptr[line]..ptr[line+1]
 * of ``blk``/``other``; weights w[k] laid out [contracted][output]. */
static void f32_tile(int nt, const float *A, int64_t lda, const float *w, const int32_t *ptr,
                     const int32_t *blk, const int32_t *other, int64_t line, const float *bias,
                     float *C, int64_t ldc) {
    float acc[F32_TOKENS][BS];
    for (int t = 0; t < F32_TOKENS; ++t)
        for (int i = 0; i < BS; ++i) acc[t][i] = bias ? bias[line * BS + i] : 0.0f;
    for (int32_t p = ptr[line]; p < ptr[line + 1]; ++p) {
        const float *a = A + (int64_t)other[p] * BS;
        const float *wk = w + (int64_t)blk[p] * BS * BS;
        if (nt == F32_TOKENS) f32_block_tile(F32_TOKENS, a, lda, wk, acc);  /* constant trip count */
        else f32_block_tile(nt, a, lda, wk, acc);
    }
    for (int t = 0; t < nt; ++t) memcpy(C + t * ldc + line * BS, acc[t], sizeof(acc[t]));
}

#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11) && !defined(BSMM_PORTABLE)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_X86 1
#define AVX512_TARGET __attribute__((target("avx512f")))

static int has_avx512f(void) {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((b >> 16) & 1);
}

static int has_avx512_bf16(void) {
    unsigned a, b, c, d;
    return has_avx512f() && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);
}

/* 16 tokens x 16 outputs in 16 registers */
AVX512_TARGET static void f32_tile_avx512(const float *A, int64_t lda, const float *w, const int32_t *ptr,
                                           const int32_t *blk, const int32_t *other, int64_t line,
                                           const float *bias, float *C, int64_t ldc) {
    __m512 acc[F32_TOKENS];
    const __m512 init = bias ? _mm512_loadu_ps(bias + line * BS) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int t = 0; t < F32_TOKENS; ++t) acc[t] = init;
    for (int32_t p = ptr[line]; p < ptr[line + 1]; ++p) {
        const float *a = A + (int64_t)other[p] * BS;
        const float *wk = w + (int64_t)blk[p] * BS * BS;
        for (int kk = 0; kk < BS; ++kk) {
            const __m512 wr = _mm512_loadu_ps(wk + kk * BS);
#pragma GCC unroll 16
            for (int t = 0; t < F32_TOKENS; ++t)
                acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(a[t * lda + kk]), wr, acc[t]);
        }
    }
#pragma GCC unroll 16
    for (int t = 0; t < F32_TOKENS; ++t) _mm512_storeu_ps(C + t * ldc + line * BS, acc[t]);
}

/* out (+)= sum over T tokens; ``first``: out starts at zero, else it holds a partial sum */
AVX512_TARGET static void f32_sddmm_avx512(const float *y, int64_t ldy, const float *x, int64_t ldx,
                                           int64_t T, float *out, int first) {
    __m512 acc[BS];
#pragma GCC unroll 16
    for (int i = 0; i < BS; ++i) acc[i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + i * BS);
    for (int64_t t = 0; t < T; ++t) {
        const float *yt = y + t * ldy;
        const __m512 xt = _mm512_loadu_ps(x + t * ldx);
#pragma GCC unroll 16
        for (int i = 0; i < BS; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(yt[i]), xt, acc[i]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < BS; ++i) _mm512_storeu_ps(out + i * BS, acc[i]);
}
#else
#define HAVE_X86 0
static int has_avx512f(void) { return 0; }
static int has_avx512_bf16(void) { return 0; }
#endif

/* ------------------------------------------------------------------ bf16 pair dot products */
/* bf16 on CPUs with AVX-512 BF16 (vdpbf16ps): acc[i] += a[2i] b[2i] + a[2i+1] b[2i+1] in fp32, on
 * 16 lanes, i.e. two contracted entries at a time, from operands that stay bf16. The kernels below
 * are written once against PAIR_* operations: the native build maps them to the instruction, the
 * portable build (no x86, or -DBSMM_PORTABLE) to fp32 multiply-adds on widened values, so that every
 * line of these kernels runs in the tests on any CPU. A vacc holds 16 fp32 sums, a vpair 16 bf16
 * pairs (32 bf16, 64 bytes). */
#if HAVE_X86
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
typedef __m512 vacc;
typedef __m512i vpair;
#define PAIR_ZERO() _mm512_setzero_ps()
#define PAIR_LOAD_ACC(p) _mm512_loadu_ps(p)
#define PAIR_STORE_ACC(p, v) _mm512_storeu_ps((p), (v))
#define PAIR_LOAD(p) _mm512_loadu_si512((const void *)(p))
#define PAIR_SPLAT(p) _mm512_set1_epi32((int)load_u32(p))  /* one pair, on every lane */
#define PAIR_DOT(acc, a, b) _mm512_dpbf16_ps((acc), (__m512bh)(a), (__m512bh)(b))
#define PAIR_STORE_BF16(dst, v) _mm256_storeu_si256((__m256i *)(dst), (__m256i)_mm512_cvtneps_pbh(v))
#define PAIR_SET1(s) _mm512_set1_ps(s)
#define PAIR_HSUM(v) _mm512_reduce_add_ps(v)
#else
#define BF16_TARGET
typedef struct { float f[16]; } vacc;
typedef struct { uint16_t h[32]; } vpair;
static inline vacc pair_zero(void) { vacc v; memset(&v, 0, sizeof(v)); return v; }
static inline vacc pair_load_acc(const float *p) { vacc v; memcpy(v.f, p, sizeof(v.f)); return v; }
static inline void pair_store_acc(float *p, vacc v) { memcpy(p, v.f, sizeof(v.f)); }
static inline vpair pair_load(const uint16_t *p) { vpair v; memcpy(v.h, p, sizeof(v.h)); return v; }
static inline vpair pair_splat(const uint16_t *p) {
    vpair v;
    for (int i = 0; i < 16; ++i) { v.h[2 * i] = p[0]; v.h[2 * i + 1] = p[1]; }
    return v;
}
static inline vacc pair_dot(vacc acc, vpair a, vpair b) {
    for (int i = 0; i < 16; ++i)
        acc.f[i] += bf16_to_f32(a.h[2 * i]) * bf16_to_f32(b.h[2 * i]) + bf16_to_f32(a.h[2 * i + 1]) * bf16_to_f32(b.h[2 * i + 1]);
    return acc;
}
static inline void pair_store_bf16(uint16_t *dst, vacc v) { for (int i = 0; i < 16; ++i) dst[i] = f32_to_bf16(v.f[i]); }
static inline vacc pair_set1(float s) { vacc v; for (int i = 0; i < 16; ++i) v.f[i] = s; return v; }
static inline float pair_hsum(vacc v) { float s = 0.0f; for (int i = 0; i < 16; ++i) s += v.f[i]; return s; }
#define PAIR_ZERO() pair_zero()
#define PAIR_LOAD_ACC(p) pair_load_acc(p)
#define PAIR_STORE_ACC(p, v) pair_store_acc((p), (v))
#define PAIR_LOAD(p) pair_load(p)
#define PAIR_SPLAT(p) pair_splat(p)
#define PAIR_DOT(acc, a, b) pair_dot((acc), (a), (b))
#define PAIR_STORE_BF16(dst, v) pair_store_bf16((dst), (v))
#define PAIR_SET1(s) pair_set1(s)
#define PAIR_HSUM(v) pair_hsum(v)
#endif

static inline uint32_t load_u32(const uint16_t *p) { uint32_t u; memcpy(&u, p, 4); return u; }
#define PANEL_PAIRS_T 16  /* tokens per feature-pair panel */

/* 1 when the bf16 pair kernels run on the instruction here (else on their portable loops). */
int bsmm_bf16_pairs_native(void) { return has_avx512_bf16(); }

/* One output tile of bf16 tokens: C[t][line*16 + o] (t < nt) = bias + sum over the line's blocks of
 * A(t, other*16 + kk) w(kk, o), two kk at a time. ``A`` is one row of 16x16 token tiles (16 tokens x
 * K features as K/16 tiles of 256 contiguous values, zero past the last token), so a block's inputs are
 * one contiguous 512-byte read (row-major rows 4 KiB apart, as at K = 2048, all fall in one L1 set).
 * ``packed[k]`` is block k in pairs of contracted entries, [8][16 outputs][2] (the layout AMX takes). */
BF16_TARGET static void bf16_tile(int nt, const uint16_t *A, const uint16_t *packed, const int32_t *ptr,
                                  const int32_t *blk, const int32_t *other, int64_t line, const float *bias,
                                  uint16_t *C, int64_t ldc) {
    vacc acc[BS];
    for (int t = 0; t < BS; ++t) acc[t] = bias ? PAIR_LOAD_ACC(bias + line * BS) : PAIR_ZERO();
    for (int32_t p = ptr[line]; p < ptr[line + 1]; ++p) {
        const uint16_t *a = A + (int64_t)other[p] * BS * BS;
        const uint16_t *wk = packed + (int64_t)blk[p] * BS * BS;
        for (int q = 0; q < BS / 2; ++q) {
            const vpair w = PAIR_LOAD(wk + q * 2 * BS);
#pragma GCC unroll 16
            for (int t = 0; t < BS; ++t) acc[t] = PAIR_DOT(acc[t], PAIR_SPLAT(a + t * BS + 2 * q), w);
        }
    }
    for (int t = 0; t < nt; ++t) PAIR_STORE_BF16(C + t * ldc + line * BS, acc[t]);
}

/* dst[tt][kb][t][j] = src[16tt + t][16kb + j] (bf16 [T, K], K a multiple of 16, leading dimension lds):
 * rows of 16x16 token tiles, zero for tokens >= T. */
static void pack_token_tiles(const uint16_t *src, int64_t T, int64_t K, int64_t lds, uint16_t *dst, int nthreads) {
    const int64_t ntiles = (T + BS - 1) / BS, kb = K / BS;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t tt = 0; tt < ntiles; ++tt)
        for (int64_t b = 0; b < kb; ++b) {
            uint16_t *d = dst + (tt * kb + b) * BS * BS;
            for (int64_t t = 0; t < BS; ++t) {
                if (tt * BS + t < T) memcpy(d + t * BS, src + (tt * BS + t) * lds + b * BS, BS * sizeof(uint16_t));
                else memset(d + t * BS, 0, BS * sizeof(uint16_t));
            }
        }
}

/* C [T, nlines*16] (bf16) = A [T, lda] (bf16) times the blocks of each line (fp32 sums, one rounding
 * at the end): bsmm_amx_lines's contract on bf16 pair dot products, any T. ``work`` holds
 * ceil(T/16) * lda * 16 bf16: A as token tiles. */
void bsmm_bf16_lines(const uint16_t *A, int64_t T, int64_t lda, const uint16_t *packed, const int32_t *ptr,
                     const int32_t *blk, const int32_t *other, int64_t nlines, const float *bias, uint16_t *C,
                     uint16_t *work, int nthreads) {
    const int64_t ntiles = (T + BS - 1) / BS, ldc = nlines * BS;
    pack_token_tiles(A, T, lda, lda, work, nthreads);
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t tt = 0; tt < ntiles; ++tt)
        for (int64_t line = 0; line < nlines; ++line) {
            const int64_t t0 = tt * BS;
            bf16_tile((int)min64(BS, T - t0), work + tt * lda * BS, packed, ptr, blk, other, line, bias,
                      C + t0 * ldc, ldc);
        }
}

/* dst[t/2][f][t%2] = src[t][f] (src [T, F] bf16, contiguous): rows in token pairs, a zero row after
 * an odd T. dst holds ceil(T/2) * F pairs. */
void bsmm_pair_rows(const uint16_t *src, int64_t T, int64_t F, uint16_t *dst, int nthreads) {
    const int64_t np = (T + 1) / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t tp = 0; tp < np; ++tp) {
        const uint16_t *r0 = src + 2 * tp * F;
        uint16_t *d = dst + tp * F * 2;
        if (2 * tp + 1 < T) {
            const uint16_t *r1 = r0 + F;
            for (int64_t f = 0; f < F; ++f) { d[2 * f] = r0[f]; d[2 * f + 1] = r1[f]; }
        } else {
            for (int64_t f = 0; f < F; ++f) { d[2 * f] = r0[f]; d[2 * f + 1] = 0; }
        }
    }
}

/* dV[k][i][j] = sum_t dY[t][rows[k]*16+i] X[t][cols[k]*16+j] (fp32) from both operands in token pairs
 * (bsmm_pair_rows: Yp [np][out][2], Xp [np][in][2]), two tokens per pair dot product. Token pairs go
 * in chunks of about 1 MiB of both, which stay in cache while the thread's blocks read them. */
BF16_TARGET void bsmm_bf16_sddmm(const uint16_t *Yp, int64_t out, const uint16_t *Xp, int64_t in, int64_t np,
                                 const int32_t *rows, const int32_t *cols, int64_t nblk, float *dV, int nthreads) {
    int64_t chunk = ((int64_t)1 << 20) / ((out + in) * 4);
    if (chunk < 8) chunk = 8;
#pragma omp parallel num_threads(nthreads)
    for (int64_t c0 = 0; c0 < np; c0 += chunk) {
        const int64_t n = min64(chunk, np - c0);
#pragma omp for schedule(static)
        for (int64_t k = 0; k < nblk; ++k) {
            const uint16_t *y = Yp + (c0 * out + (int64_t)rows[k] * BS) * 2;
            const uint16_t *x = Xp + (c0 * in + (int64_t)cols[k] * BS) * 2;
            float *o = dV + k * BS * BS;
            vacc acc[BS];
#pragma GCC unroll 16
            for (int i = 0; i < BS; ++i) acc[i] = c0 == 0 ? PAIR_ZERO() : PAIR_LOAD_ACC(o + i * BS);
            for (int64_t tp = 0; tp < n; ++tp) {
                const vpair xv = PAIR_LOAD(x + tp * in * 2);
                const uint16_t *yt = y + tp * out * 2;
#pragma GCC unroll 16
                for (int i = 0; i < BS; ++i) acc[i] = PAIR_DOT(acc[i], PAIR_SPLAT(yt + 2 * i), xv);
            }
#pragma GCC unroll 16
            for (int i = 0; i < BS; ++i) PAIR_STORE_ACC(o + i * BS, acc[i]);
        }
    }
}

/* ------------------------------------------------- bf16 pair dot products on token panels (b = 4, 8) */
/* The token-panel layout with bf16 pairs. Forward and input gradient contract over features: the
 * dense operand is packed as panels of 16 tokens of feature pairs, P[tt][f/2][16][2], so that one
 * vpair holds 16 tokens of two consecutive features, and each output row accumulates 16 tokens with
 * one pair dot product per two contracted features (weights in pairs too: w[p][j][r][2] =
 * (w(2j, r), w(2j+1, r)) of the walk's p-th block). The values gradient contracts over tokens: both
 * operands are packed as panels of 32 tokens per feature, Q[tt][f][32], whose consecutive tokens are
 * the pairs. */

/* dst[tt][j][t][q] = src[16tt + t][2j + q] (bf16 [T, F], F even, leading dimension lds), zero for
 * tokens >= T. */
void bsmm_pack_feature_pairs(const uint16_t *src, int64_t T, int64_t F, int64_t lds, uint16_t *dst, int nthreads) {
    const int64_t np = (T + PANEL_PAIRS_T - 1) / PANEL_PAIRS_T, pairs = F / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t tt = 0; tt < np; ++tt) {
        uint32_t *d = (uint32_t *)dst + tt * pairs * PANEL_PAIRS_T;
        const int64_t nt = min64(PANEL_PAIRS_T, T - tt * PANEL_PAIRS_T);
        for (int64_t t = 0; t < PANEL_PAIRS_T; ++t) {
            if (t < nt) {
                const uint16_t *row = src + (tt * PANEL_PAIRS_T + t) * lds;
                for (int64_t j = 0; j < pairs; ++j) d[j * PANEL_PAIRS_T + t] = load_u32(row + 2 * j);
            } else {
                for (int64_t j = 0; j < pairs; ++j) d[j * PANEL_PAIRS_T + t] = 0;
            }
        }
    }
}

/* dst[tt][f][u] = src[32tt + u][f] (bf16 [T, F], leading dimension lds), zero for tokens >= T. */
void bsmm_pack_token_pairs(const uint16_t *src, int64_t T, int64_t F, int64_t lds, uint16_t *dst, int nthreads) {
    const int64_t np = (T + 31) / 32, fb = (F + 15) / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t tt = 0; tt < np; ++tt)
        for (int64_t b0 = 0; b0 < fb; ++b0) {
            const int64_t f0 = b0 * 16, nf = min64(16, F - f0), nt = min64(32, T - tt * 32);
            uint16_t tile[16][32];
            memset(tile, 0, sizeof(tile));
            for (int64_t u = 0; u < nt; ++u) {
                const uint16_t *row = src + (tt * 32 + u) * lds + f0;
                for (int64_t f = 0; f < nf; ++f) tile[f][u] = row[f];
            }
            memcpy(dst + (tt * F + f0) * 32, tile, nf * 32 * sizeof(uint16_t));
        }
}

/* The output rows of block line ``line`` on one panel: c[row][16] (fp32 panel) = bias + sum over the
 * line's blocks, four rows at a time; a: the panel's feature pairs [K/2][16][2]; w: the walk's blocks
 * in pairs [p][B/2][B][2]. */
#define PAIR_PANEL_LINE(B)                                                                                \
BF16_TARGET static void pair_panel_line_##B(const uint16_t *a, const uint16_t *w, const int32_t *ptr,      \
                                            const int32_t *other, int64_t line, const float *bias, float *c) { \
    for (int g = 0; g < B; g += 4) {                                                                      \
        vacc acc[4];                                                                                      \
        for (int r = 0; r < 4; ++r) acc[r] = bias ? PAIR_SET1(bias[line * B + g + r]) : PAIR_ZERO();      \
        for (int32_t p = ptr[line]; p < ptr[line + 1]; ++p) {                                             \
            const uint16_t *ak = a + (int64_t)other[p] * (B / 2) * 32;                                    \
            const uint16_t *wk = w + (int64_t)p * B * B + g * 2;                                          \
            for (int j = 0; j < B / 2; ++j) {                                                             \
                const vpair x = PAIR_LOAD(ak + j * 32);                                                   \
                for (int r = 0; r < 4; ++r) acc[r] = PAIR_DOT(acc[r], PAIR_SPLAT(wk + (j * B + r) * 2), x); \
            }                                                                                             \
        }                                                                                                 \
        for (int r = 0; r < 4; ++r) PAIR_STORE_ACC(c + (line * B + g + r) * PANEL_PAIRS_T, acc[r]);        \
    }                                                                                                     \
}
PAIR_PANEL_LINE(4)
PAIR_PANEL_LINE(8)

typedef void (*pair_panel_line_fn)(const uint16_t *, const uint16_t *, const int32_t *, const int32_t *, int64_t,
                                   const float *, float *);

/* C fp32 panels [np][nlines*b][16] = A feature-pair panels [np][K/2][16][2] times the blocks of each
 * line (forward: block rows, w = V^T per block; input gradient: block columns, w = V per block; in
 * walk order, in pairs). Returns 0, or -1 for a block size without a kernel (b = 4, 8 have one). */
int bsmm_pair_panel_lines(const uint16_t *A, int64_t np, int64_t K, const uint16_t *w, int64_t b, const int32_t *ptr,
                          const int32_t *other, int64_t nlines, const float *bias, float *C, int nthreads) {
    const pair_panel_line_fn fn = b == 4 ? pair_panel_line_4 : b == 8 ? pair_panel_line_8 : 0;
    if (!fn) return -1;
    const int64_t N = nlines * b;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t tt = 0; tt < np; ++tt)
        for (int64_t line = 0; line < nlines; ++line)
            fn(A + tt * K * PANEL_PAIRS_T, w, ptr, other, line, bias, C + tt * N * PANEL_PAIRS_T);
    return 0;
}

/* dV[k][i][j] = sum_t G[t][rows[k]*b+i] X[t][cols[k]*b+j] from token-pair panels (G [np][out][32], X
 * [np][in][32]): 2 x 4 entries at a time, each on its own accumulator of 16 token pairs, summed across
 * at the end. Panels go in chunks of 16 (512 tokens), whose strips stay in the last-level cache. */
BF16_TARGET void bsmm_pair_panel_sddmm(const uint16_t *G, int64_t out, const uint16_t *X, int64_t in, int64_t np,
                                       int64_t b, const int32_t *rows, const int32_t *cols, int64_t nblk, float *dV,
                                       int nthreads) {
    const int64_t chunk = 16;
#pragma omp parallel num_threads(nthreads)
    for (int64_t c0 = 0; c0 < np; c0 += chunk) {
        const int64_t c1 = min64(np, c0 + chunk);
#pragma omp for schedule(static)
        for (int64_t k = 0; k < nblk; ++k) {
            float *dv = dV + k * b * b;
            for (int64_t r = 0; r < b; r += 2)
                for (int64_t c = 0; c < b; c += 4) {
                    const int64_t nr = min64(2, b - r), nc = min64(4, b - c);
                    vacc acc[2][4];
                    for (int i = 0; i < 2; ++i)
                        for (int j = 0; j < 4; ++j) acc[i][j] = PAIR_ZERO();
                    for (int64_t tt = c0; tt < c1; ++tt) {
                        const uint16_t *g = G + (tt * out + (int64_t)rows[k] * b + r) * 32;
                        const uint16_t *x = X + (tt * in + (int64_t)cols[k] * b + c) * 32;
                        const vpair y0 = PAIR_LOAD(g), y1 = PAIR_LOAD(nr == 2 ? g + 32 : g);
                        for (int j = 0; j < 4; ++j) {
                            if (j >= nc) break;
                            const vpair xv = PAIR_LOAD(x + j * 32);
                            acc[0][j] = PAIR_DOT(acc[0][j], y0, xv);
                            acc[1][j] = PAIR_DOT(acc[1][j], y1, xv);
                        }
                    }
                    for (int i = 0; i < nr; ++i)
                        for (int j = 0; j < nc; ++j) {
                            float *o = dv + (r + i) * b + c + j;
                            *o = (c0 == 0 ? 0.0f : *o) + PAIR_HSUM(acc[i][j]);
                        }
                }
        }
    }
}

/* 1 when the fp32 kernels run on AVX-512 here (else on portable C loops). */
int bsmm_f32_avx512(void) { return has_avx512f(); }

/* 1 when this CPU has bf16 dot products (AVX-512 BF16), so that dense bf16 GEMMs run at about twice
 * the fp32 speed; without them a bf16 GEMM is emulated and far slower than fp32. */
int bsmm_native_bf16(void) { return has_avx512_bf16(); }

/* C [T, nlines*16] = A [T, lda] times the sparse blocks, line by line (block rows for the forward
 * with w = V^T per block, block columns for the input gradient with w = V per block). */
void bsmm_f32_lines(const float *A, int64_t T, int64_t lda, const float *w, const int32_t *ptr,
                    const int32_t *blk, const int32_t *other, int64_t nlines, const float *bias,
                    float *C, int nthreads) {
    const int64_t ntiles = (T + F32_TOKENS - 1) / F32_TOKENS;
    const int64_t ldc = nlines * BS;
    const int vec = has_avx512f();
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t tt = 0; tt < ntiles; ++tt)
        for (int64_t line = 0; line < nlines; ++line) {
            const int64_t t0 = tt * F32_TOKENS;
            const int nt = (int)min64(F32_TOKENS, T - t0);
#if HAVE_X86
            if (vec && nt == F32_TOKENS) {
                f32_tile_avx512(A + t0 * lda, lda, w, ptr, blk, other, line, bias, C + t0 * ldc, ldc);
                continue;
            }
#endif
            f32_tile(nt, A + t0 * lda, lda, w, ptr, blk, other, line, bias, C + t0 * ldc, ldc);
        }
}

/* dV[k][i][j] = sum_t dY[t, rows[k]*16+i] X[t, cols[k]*16+j]. Tokens go in chunks of about 1 MiB of
 * dY and X, which stay in cache while the thread's blocks read them. */
void bsmm_f32_sddmm(const float *dY, int64_t ldy, const float *X, int64_t ldx, int64_t T,
                    const int32_t *rows, const int32_t *cols, int64_t nblk, float *dV, int nthreads) {
    const int vec = has_avx512f();
    int64_t chunk = ((int64_t)1 << 20) / ((ldy + ldx) * 4);
    if (chunk < 16) chunk = 16;
#pragma omp parallel num_threads(nthreads)
    for (int64_t c0 = 0; c0 < T; c0 += chunk) {
        const int64_t n = min64(chunk, T - c0);
#pragma omp for schedule(static)
        for (int64_t k = 0; k < nblk; ++k) {
            const float *y = dY + c0 * ldy + (int64_t)rows[k] * BS;
            const float *x = X + c0 * ldx + (int64_t)cols[k] * BS;
            float *out = dV + k * BS * BS;
#if HAVE_X86
            if (vec) {
                f32_sddmm_avx512(y, ldy, x, ldx, n, out, c0 == 0);
                continue;
            }
#endif
            float acc[BS][BS];
            if (c0 == 0) memset(acc, 0, sizeof(acc));
            else memcpy(acc, out, sizeof(acc));
            for (int64_t t = 0; t < n; ++t) {
                const float *yt = y + t * ldy, *xt = x + t * ldx;
                for (int i = 0; i < BS; ++i)
                    for (int j = 0; j < BS; ++j) acc[i][j] += yt[i] * xt[j];
            }
            memcpy(out, acc, sizeof(acc));
        }
    }
}

/* ------------------------------------------------------ fp32, token panels, any block size */
/* For block sizes below 16 (1, 2, 4, 8), and for 16+ on CPUs without AVX-512, the dense operands
 * are packed in token panels: P[tt][f][16] holds tokens 16tt..16tt+15 of feature f, one 64-byte
 * line per feature (tokens zero-padded to a multiple of 16). A product then works on one panel at
 * a time, whose K features take K x 64 bytes (32-128 KiB at BERT sizes: L1/L2), and each output row
 * accumulates whole token vectors: a contracted feature's 16 tokens are loaded once and used by up
 * to four output rows of the block. The vectors are GCC/Clang vector types (8 floats): AVX2 or
 * AVX-512 code with -march=native, emulated elsewhere, so there is one source for every CPU. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  /* unaligned access */
#define PANEL 16

static inline v8 v8_load(const float *p) { return *(const v8u *)p; }
static inline void v8_store(float *p, v8 v) { *(v8u *)p = v; }
static inline v8 v8_splat(float s) { return (v8){s, s, s, s, s, s, s, s}; }
static inline float v8_sum(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* dst[tt][f][j] = src[16tt + j][f] (src [T, F], leading dimension lds; fp32, or bf16 when ``bf16``),
 * zero for tokens >= T. */
void bsmm_pack(const void *src, int64_t T, int64_t F, int64_t lds, int bf16, float *dst, int nthreads) {
    const int64_t np = (T + PANEL - 1) / PANEL, fb = (F + 15) / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t tt = 0; tt < np; ++tt)
        for (int64_t b0 = 0; b0 < fb; ++b0) {
            const int64_t f0 = b0 * 16, nf = min64(16, F - f0), nt = min64(PANEL, T - tt * PANEL);
            float tile[16][PANEL];
            memset(tile, 0, sizeof(tile));
            for (int64_t j = 0; j < nt; ++j) {
                const int64_t at = (tt * PANEL + j) * lds + f0;
                if (bf16) {
                    const uint16_t *row = (const uint16_t *)src + at;
                    for (int64_t f = 0; f < nf; ++f) tile[f][j] = bf16_to_f32(row[f]);
                } else {
                    const float *row = (const float *)src + at;
                    for (int64_t f = 0; f < nf; ++f) tile[f][j] = row[f];
                }
            }
            memcpy(dst + (tt * F + f0) * PANEL, tile, nf * PANEL * sizeof(float));
        }
}

/* dst[t][f] = src[t/16][f][t%16] for t < T (dst [T, F] contiguous, fp32 or, when ``bf16``, rounded to
 * bf16): the inverse of bsmm_pack. */
void bsmm_unpack(const float *src, int64_t T, int64_t F, int bf16, void *dst, int nthreads) {
    const int64_t np = (T + PANEL - 1) / PANEL, fb = (F + 15) / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t tt = 0; tt < np; ++tt)
        for (int64_t b0 = 0; b0 < fb; ++b0) {
            const int64_t f0 = b0 * 16, nf = min64(16, F - f0), nt = min64(PANEL, T - tt * PANEL);
            const float *tile = src + (tt * F + f0) * PANEL;
            for (int64_t j = 0; j < nt; ++j) {
                const int64_t at = (tt * PANEL + j) * F + f0;
                if (bf16) {
                    uint16_t *row = (uint16_t *)dst + at;
                    for (int64_t f = 0; f < nf; ++f) row[f] = f32_to_bf16(tile[f * PANEL + j]);
                } else {
                    float *row = (float *)dst + at;
                    for (int64_t f = 0; f < nf; ++f) row[f] = tile[f * PANEL + j];
                }
            }
        }
}

/* One block of a row on two panels (a and a + pa): acc[panel][half] += w(kk) * A(kk) over the block's
 * B contracted features; B is a constant where it is inlined. */
static inline __attribute__((always_inline)) void panel_rows_block(const float *wk, const float *ak, int64_t pa,
                                                                   int B, v8 acc[2][2]) {
    for (int kk = 0; kk < B; ++kk) {
        const v8 s = v8_splat(wk[kk * B]);
        acc[0][0] += s * v8_load(ak + kk * PANEL);
        acc[0][1] += s * v8_load(ak + kk * PANEL + 8);
        acc[1][0] += s * v8_load(ak + pa + kk * PANEL);
        acc[1][1] += s * v8_load(ak + pa + kk * PANEL + 8);
    }
}

/* The output rows of block line ``line`` on one or two panels: C[row][16] = sum over the line's
 * blocks. ``a`` is a panel of A [K][16] and a + pa the next one (pa = 0: one panel; c + pc is then
 * not written), w + p*B*B the line walk's p-th block laid out [contracted][out] (gathered in walk
 * order by the caller, so weights stream). Four rows at a time when B % 4 == 0 (8 accumulators:
 * 4 rows x 2 vectors), panel after panel; else (B = 1, 2) one row on both panels at once, its blocks
 * two at a time (8 accumulators: 2 blocks x 2 panels x 2 vectors): each weight and index loaded
 * feeds 4 FMAs instead of 2. B is a constant in each instance. */
#define PANEL_LINE(B)                                                                                     \
static void panel_line_##B(const float *a, int64_t pa, const float *w, const int32_t *ptr,                 \
                           const int32_t *other, int64_t line, const float *bias, float *c, int64_t pc) {  \
    const int32_t p0 = ptr[line], p1 = ptr[line + 1];                                                      \
    if (B % 4 == 0) {                                                                                     \
        for (int q = 0; q < (pc ? 2 : 1); ++q) {                                                          \
            const float *aq = a + q * pa;                                                                 \
            float *cq = c + q * pc;                                                                       \
            for (int g = 0; g < B; g += 4) {                                                              \
                v8 acc[4][2];                                                                             \
                for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = v8_splat(bias ? bias[line * B + g + r] : 0.0f); \
                for (int32_t p = p0; p < p1; ++p) {                                                       \
                    const float *wk = w + (int64_t)p * B * B + g;                                         \
                    const float *ak = aq + (int64_t)other[p] * B * PANEL;                                 \
                    for (int kk = 0; kk < B; ++kk) {                                                      \
                        const v8 x0 = v8_load(ak + kk * PANEL), x1 = v8_load(ak + kk * PANEL + 8);        \
                        for (int r = 0; r < 4; ++r) {                                                     \
                            const v8 s = v8_splat(wk[kk * B + r]);                                        \
                            acc[r][0] += s * x0;                                                          \
                            acc[r][1] += s * x1;                                                          \
                        }                                                                                 \
                    }                                                                                     \
                }                                                                                         \
                for (int r = 0; r < 4; ++r) {                                                             \
                    v8_store(cq + (line * B + g + r) * PANEL, acc[r][0]);                                 \
                    v8_store(cq + (line * B + g + r) * PANEL + 8, acc[r][1]);                             \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        return;                                                                                           \
    }                                                                                                     \
    for (int r = 0; r < B; ++r) {                                                                         \
        v8 acc[2][2][2];  /* [block u][panel q][half] */                                                  \
        for (int u = 0; u < 2; ++u)                                                                       \
            for (int q = 0; q < 2; ++q) acc[u][q][0] = acc[u][q][1] = v8_splat(0.0f);                     \
        int32_t p = p0;                                                                                   \
        for (; p + 2 <= p1; p += 2) {                                                                     \
            if (p + 8 <= p1)  /* the panel lines three steps ahead: random L2 reads otherwise stall */    \
                for (int u = 6; u < 8; ++u) {                                                             \
                    __builtin_prefetch(a + (int64_t)other[p + u] * B * PANEL);                            \
                    __builtin_prefetch(a + pa + (int64_t)other[p + u] * B * PANEL);                       \
                }                                                                                         \
            panel_rows_block(w + (int64_t)p * B * B + r, a + (int64_t)other[p] * B * PANEL, pa, B, acc[0]);      \
            panel_rows_block(w + (int64_t)(p + 1) * B * B + r, a + (int64_t)other[p + 1] * B * PANEL, pa, B, acc[1]); \
        }                                                                                                 \
        if (p < p1) panel_rows_block(w + (int64_t)p * B * B + r, a + (int64_t)other[p] * B * PANEL, pa, B, acc[0]); \
        const v8 init = v8_splat(bias ? bias[line * B + r] : 0.0f);                                       \
        for (int q = 0; q < (pc ? 2 : 1); ++q) {                                                          \
            v8_store(c + q * pc + (line * B + r) * PANEL, init + (acc[0][q][0] + acc[1][q][0]));           \
            v8_store(c + q * pc + (line * B + r) * PANEL + 8, init + (acc[0][q][1] + acc[1][q][1]));       \
        }                                                                                                 \
    }                                                                                                     \
}
PANEL_LINE(1)
PANEL_LINE(2)
PANEL_LINE(4)
PANEL_LINE(8)
PANEL_LINE(16)
PANEL_LINE(32)
PANEL_LINE(64)

typedef void (*panel_line_fn)(const float *, int64_t, const float *, const int32_t *, const int32_t *, int64_t,
                              const float *, float *, int64_t);

static panel_line_fn panel_line_for(int64_t b) {
    switch (b) {
        case 1: return panel_line_1;
        case 2: return panel_line_2;
        case 4: return panel_line_4;
        case 8: return panel_line_8;
        case 16: return panel_line_16;
        case 32: return panel_line_32;
        case 64: return panel_line_64;
        default: return 0;
    }
}

/* C panels [np][nlines*b][16] = A panels [np][K][16] times the blocks of each line: forward (block
 * rows, w = V^T per block) or input gradient (block columns, w = V per block); ``w`` holds the
 * blocks in walk order (p = ptr[line] .. ptr[line+1]), ``other`` their other coordinate. Panels go
 * in pairs for b = 1, 2. Returns 0, or -1 for an unsupported block size. */
int bsmm_panel_lines(const float *A, int64_t np, int64_t K, const float *w, int64_t b, const int32_t *ptr,
                     const int32_t *other, int64_t nlines, const float *bias, float *C, int nthreads) {
    const panel_line_fn fn = panel_line_for(b);
    if (!fn) return -1;
    const int64_t N = nlines * b, step = b % 4 ? 2 : 1, tasks = (np + step - 1) / step;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
    for (int64_t task = 0; task < tasks; ++task)
        for (int64_t line = 0; line < nlines; ++line) {
            const int64_t tt = task * step;
            const int two = step == 2 && tt + 1 < np;
            fn(A + tt * K * PANEL, two ? K * PANEL : 0, w, ptr, other, line, bias, C + tt * N * PANEL,
               two ? N * PANEL : 0);
        }
    return 0;
}

/* dV[k] (+)= sum over panels [t0, t1) of G[row block]^T X[col block], G panels [np][out][16], X panels
 * [np][in][16]: 2 x 4 entries at a time (b % 4 == 0) or 1 x 4 (b = 1, 2: four columns of a row),
 * each on its own vector accumulator. */
static void panel_sddmm_block(const float *G, int64_t out, const float *X, int64_t in, int64_t t0, int64_t t1,
                              int64_t b, int64_t row, int64_t col, float *dv, int first) {
    const int64_t R = (b % 4 == 0) ? 2 : 1;
    for (int64_t r = 0; r < b; r += R)
        for (int64_t c = 0; c < b; c += 4) {
            const int64_t nc = min64(4, b - c);
            v8 acc[2][4];
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] = v8_splat(0.0f);
            for (int64_t tt = t0; tt < t1; ++tt) {
                const float *g = G + (tt * out + row * b + r) * PANEL;
                const float *x = X + (tt * in + col * b + c) * PANEL;
                __builtin_prefetch(x + 4 * in * PANEL);
                __builtin_prefetch(g + 4 * out * PANEL);
                for (int h = 0; h < PANEL; h += 8) {
                    const v8 y0 = v8_load(g + h), y1 = R == 2 ? v8_load(g + PANEL + h) : v8_splat(0.0f);
                    for (int j = 0; j < 4; ++j) {
                        if (j >= nc) break;
                        const v8 xv = v8_load(x + j * PANEL + h);
                        acc[0][j] += y0 * xv;
                        if (R == 2) acc[1][j] += y1 * xv;
                    }
                }
            }
            for (int i = 0; i < R; ++i)
                for (int j = 0; j < nc; ++j) {
                    float *o = dv + (r + i) * b + c + j;
                    *o = (first ? 0.0f : *o) + v8_sum(acc[i][j]);
                }
        }
}

/* The values gradient from token panels, for b = 1: blocks p0 .. p0+n-1 (n <= 4) of one line ``line``
 * of the walked operand L (a row of dY, or a column of X), each against its own line others[p] of the
 * other operand O, sharing L's loaded vectors; dv[order[p]] gets the sums. */
static void panel_sddmm_line1(const float *L, int64_t lw, const float *O, int64_t ow, int64_t t0, int64_t t1,
                              int64_t line, const int32_t *others, const int32_t *order, int64_t p0, int64_t n,
                              float *dv, int first) {
    v8 acc[4][2];
    for (int u = 0; u < 4; ++u) acc[u][0] = acc[u][1] = v8_splat(0.0f);
    int64_t off[4];
    for (int u = 0; u < 4; ++u) off[u] = (int64_t)others[p0 + (u < n ? u : 0)] * PANEL;
    for (int64_t tt = t0; tt < t1; ++tt) {
        const float *g = L + (tt * lw + line) * PANEL, *x = O + tt * ow * PANEL;
        const v8 y0 = v8_load(g), y1 = v8_load(g + 8);
        for (int u = 0; u < 4; ++u) {
            if (u >= n) break;
            __builtin_prefetch(x + off[u] + 4 * ow * PANEL);  /* four panels ahead: a stride of ow x 64 bytes */
            acc[u][0] += y0 * v8_load(x + off[u]);
            acc[u][1] += y1 * v8_load(x + off[u] + 8);
        }
    }
    for (int u = 0; u < n; ++u) {
        float *o = dv + order[p0 + u];
        *o = (first ? 0.0f : *o) + v8_sum(acc[u][0] + acc[u][1]);
    }
}

/* dV[k][i][j] = sum_t dY[t][rows[k]*b+i] X[t][cols[k]*b+j] from token panels of dY (G) and X. Panels
 * go in chunks of 32 (512 tokens), whose strips stay in the last-level cache. b = 1 walks block rows
 * (``by_row``) or block columns: ``ptr`` delimits each line's run in the walk, ``others`` is each
 * walked block's other coordinate and ``order`` its index k. */
void bsmm_panel_sddmm(const float *G, int64_t out, const float *X, int64_t in, int64_t np, int64_t b,
                      const int32_t *rows, const int32_t *cols, int64_t nblk, int by_row, const int32_t *ptr,
                      const int32_t *others, const int32_t *order, float *dV, int nthreads) {
    const int64_t chunk = 32;
    const float *L = by_row ? G : X, *O = by_row ? X : G;
    const int64_t lw = by_row ? out : in, ow = by_row ? in : out;
#pragma omp parallel num_threads(nthreads)
    for (int64_t c0 = 0; c0 < np; c0 += chunk) {
        const int64_t c1 = min64(np, c0 + chunk);
        if (b == 1) {
#pragma omp for schedule(dynamic, 8)
            for (int64_t line = 0; line < lw; ++line)
                for (int64_t p0 = ptr[line]; p0 < ptr[line + 1]; p0 += 4)
                    panel_sddmm_line1(L, lw, O, ow, c0, c1, line, others, order, p0, min64(4, ptr[line + 1] - p0),
                                      dV, c0 == 0);
        } else {
#pragma omp for schedule(static)
            for (int64_t k = 0; k < nblk; ++k)
                panel_sddmm_block(G, out, X, in, c0, c1, b, rows[k], cols[k], dV + k * b * b, c0 == 0);
        }
    }
}

/* ------------------------------------------------------------------------------- bf16 on AMX */
#if HAVE_X86
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16,avx512bw,avx512vl")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* 1 when this CPU has AMX-BF16 and the kernel let this process use the tile registers. */
int bsmm_amx_available(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return 0;          /* AMX-BF16, AMX-TILE */
    if (!has_avx512_bf16()) return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* Tiles 0,1: fp32 accumulators (16 tokens x 16 outputs each); 2,3: the tokens' 16 contracted
 * bf16 values; 4: one block in VNNI pairs (8 rows of 16 x 2). ``k_bytes`` is 32 (b = 16). */
AMX_TARGET static void config_lines(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 2; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    for (int t = 2; t < 4; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 32; }
    cfg.rows[4] = 8; cfg.colsb[4] = 64;
    _tile_loadconfig(&cfg);
}

/* 16 floats (+ bias) to 16 bf16 */
AMX_TARGET static inline void store_bf16(uint16_t *dst, const float *src, const float *bias) {
    __m512 v = _mm512_loadu_ps(src);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
    _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(v));
}

/* C [T, nlines*16] (bf16) = A [T, lda] (bf16) times the blocks of each line. T is a multiple of 32.
 * packed[k] is block k as the tile's VNNI operand: packed[k][p][o][q] = w(contracted 2p+q, output o). */
AMX_TARGET void bsmm_amx_lines(const uint16_t *A, int64_t T, int64_t lda, const uint16_t *packed,
                               const int32_t *ptr, const int32_t *blk, const int32_t *other,
                               int64_t nlines, const float *bias, uint16_t *C, int nthreads) {
    const int64_t ntiles = T / 32, ldc = nlines * BS;
#pragma omp parallel num_threads(nthreads)
    {
        config_lines();
        float acc[32][BS] __attribute__((aligned(64)));
#pragma omp for schedule(static) collapse(2)
        for (int64_t tt = 0; tt < ntiles; ++tt)
            for (int64_t line = 0; line < nlines; ++line) {
                const int64_t t0 = tt * 32;
                _tile_zero(0);
                _tile_zero(1);
                for (int32_t p = ptr[line]; p < ptr[line + 1]; ++p) {
                    const uint16_t *a = A + t0 * lda + (int64_t)other[p] * BS;
                    _tile_loadd(2, a, lda * 2);
                    _tile_loadd(3, a + 16 * lda, lda * 2);
                    _tile_loadd(4, packed + (int64_t)blk[p] * BS * BS, 64);
                    _tile_dpbf16ps(0, 2, 4);
                    _tile_dpbf16ps(1, 3, 4);
                }
                _tile_stored(0, acc[0], 64);
                _tile_stored(1, acc[16], 64);
                const float *b = bias ? bias + line * BS : NULL;
                for (int t = 0; t < 32; ++t) store_bf16(C + (t0 + t) * ldc + line * BS, acc[t], b);
            }
        _tile_release();
    }
}

/* Tokens per chunk of the values gradient: the chunk's packed operands take about 2 MiB. */
int64_t bsmm_amx_sddmm_chunk(int64_t out, int64_t in) {
    int64_t chunk = ((int64_t)2 << 20) / ((out + in) * 2) / 32 * 32;
    return chunk < 32 ? 32 : chunk > 1024 ? 1024 : chunk;
}

/* Two rows of 16 bf16 -> 16 pairs (r0[i], r1[i]) */
AMX_TARGET static inline __m512i interleave_rows(const uint16_t *r0, const uint16_t *r1) {
    static const uint16_t order[32] __attribute__((aligned(64))) = {
        0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)r0));
    const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)r1));
    return _mm512_permutex2var_epi16(a, _mm512_load_si512(order), b);
}

/* out[c] = column c of the 16x16 matrix of 32-bit elements whose rows are r[0..15] */
AMX_TARGET static inline void transpose16_epi32(__m512i r[16], __m512i out[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; ++i) {  /* per 128-bit lane L: t[2i] = cols 4L, 4L+1 of rows 2i, 2i+1 ... */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {  /* r[4m+j], lane L: column 4L+j of rows 4m..4m+3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; ++j) {  /* gather lane L of r[j], r[4+j], r[8+j], r[12+j] */
        const __m512i lo01 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), hi01 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
        const __m512i lo23 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44), hi23 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
        out[j] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
        out[4 + j] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);
        out[8 + j] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
        out[12 + j] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);
    }
}

/* acc[k][a][c] = sum_t P[t, p_line[k]*16+a] Q[t, q_line[k]*16+c] in fp32 (P [T, ldp], Q [T, ldq]),
 * for the values gradient dV[k] = dY[:, row k]^T X[:, col k]: P = dY and Q = X gives dV, P = X and
 * Q = dY gives dV^T (the caller transposes), whichever makes P the narrower operand, since P is the
 * one transposed. T is a multiple of 32. Chunk by chunk of tokens, the threads first pack the used
 * strips into ``work`` (bsmm_amx_sddmm_chunk(ldp, ldq) * (ldp + ldq) bf16) as the tiles want them,
 * P transposed (columns x tokens) and Q in token pairs, then each block accumulates on its tile,
 * in ``order``: sorted by q_line, so that a strip of the wider operand Q is read once per chunk. */
AMX_TARGET void bsmm_amx_sddmm(const uint16_t *P, int64_t ldp, const uint16_t *Q, int64_t ldq, int64_t T,
                               const int32_t *p_line, const int32_t *q_line, const uint8_t *p_used,
                               const uint8_t *q_used, const int32_t *order, int64_t nblk, float *acc,
                               uint16_t *work, int nthreads) {
    const int64_t chunk = bsmm_amx_sddmm_chunk(ldp, ldq);
    uint16_t *pt = work, *qp = work + ldp * chunk;
#pragma omp parallel num_threads(nthreads)
    {
        tile_config cfg;
        memset(&cfg, 0, sizeof(cfg));
        cfg.palette_id = 1;
        for (int t = 0; t < 6; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
        _tile_loadconfig(&cfg);
        for (int64_t c0 = 0; c0 < T; c0 += chunk) {
            const int64_t n = min64(chunk, T - c0);
#pragma omp for schedule(static) nowait
            for (int64_t line = 0; line < ldp / BS; ++line) {   /* pt[o][t] = P[c0+t][o] */
                if (!p_used[line]) continue;
                for (int64_t tb = 0; tb < n; tb += 32) {
                    __m512i r[16], col[16];
                    const uint16_t *src = P + (c0 + tb) * ldp + line * BS;
                    for (int p = 0; p < 16; ++p) r[p] = interleave_rows(src + 2 * p * ldp, src + (2 * p + 1) * ldp);
                    transpose16_epi32(r, col);
                    for (int i = 0; i < BS; ++i) _mm512_storeu_si512(pt + (line * BS + i) * chunk + tb, col[i]);
                }
            }
#pragma omp for schedule(static)
            for (int64_t tp = 0; tp < n / 2; ++tp) {            /* qp[t/2][j][t%2] = Q[c0+t][j] */
                const uint16_t *q0 = Q + (c0 + 2 * tp) * ldq;
                for (int64_t line = 0; line < ldq / BS; ++line)
                    if (q_used[line])
                        _mm512_storeu_si512(qp + tp * ldq * 2 + line * 32, interleave_rows(q0 + line * BS, q0 + ldq + line * BS));
            }
#pragma omp for schedule(static)
            for (int64_t kk = 0; kk < nblk; ++kk) {
                const int64_t k = order[kk];
                float *out = acc + k * BS * BS;
                if (c0 == 0) _tile_zero(0);
                else _tile_loadd(0, out, 64);
                const uint16_t *a = pt + (int64_t)p_line[k] * BS * chunk;
                const uint16_t *b = qp + (int64_t)q_line[k] * BS * 2;
                int64_t t = 0;
                for (; t + 64 <= n; t += 64) {
                    _tile_loadd(2, a + t, chunk * 2);
                    _tile_loadd(4, b + (t / 2) * ldq * 2, ldq * 4);
                    _tile_loadd(3, a + t + 32, chunk * 2);
                    _tile_loadd(5, b + (t / 2 + 16) * ldq * 2, ldq * 4);
                    _tile_dpbf16ps(0, 2, 4);
                    _tile_dpbf16ps(0, 3, 5);
                }
                for (; t < n; t += 32) {
                    _tile_loadd(2, a + t, chunk * 2);
                    _tile_loadd(4, b + (t / 2) * ldq * 2, ldq * 4);
                    _tile_dpbf16ps(0, 2, 4);
                }
                _tile_stored(0, out, 64);
            }
        }
        _tile_release();
    }
}
#else
int bsmm_amx_available(void) { return 0; }
int64_t bsmm_amx_sddmm_chunk(int64_t out, int64_t in) { (void)out; (void)in; return 32; }
#endif
