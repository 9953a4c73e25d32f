/* One decoding step of a Llama/Qwen2 decoder on the CPU: every layer and the head for one new
 * token per row, in one call, its work shared among threads.
 *
 * The math is fast_decode.py's (and so the model's forward): RMSNorm, q/k/v, RoPE, attention
 * over the KV cache, o_proj, SwiGLU MLP, residuals, the final norm and the head. Python packs
 * the weights and calls `tl_decode` once per step: what costs a NumPy path ~20 calls per layer
 * costs one here, and the threads (OpenMP's, see below) share every matrix product and the
 * attention heads, meeting at five barriers per layer.
 *
 * Matrices are stored in panels of TILE output columns, panel p holding columns
 * [p * TILE, (p + 1) * TILE) of the joint matrix, each panel as NV strips (K, VL): one vector of
 * columns for all K inputs, one after the other. A thread owns whole panels. A tile reads the
 * strips it needs side by side (one row: all NV; 8 rows: 2 at a time), each one sequential
 * stream of memory: with the strips interleaved, (K, TILE), a tile of 1 or 2 vectors would read
 * every fourth or second cache line, and each pass over a panel would wait on memory instead of
 * the hardware prefetcher keeping ahead of it.
 * gate_up interleaves gate and up panels (2q: gate, 2q + 1: up, same columns) so that the
 * thread that computes a column's gate also has its up and applies SiLU at once.
 *
 * Every row is computed by the same instructions in the same order whatever the batch holds,
 * so a row's logits do not depend on the rows beside it (bit for bit).
 *
 * Built by tinyllama/kernels/__init__.py with the compiler found on the machine, for that
 * machine (-march=native): TILE and the rows per tile follow its vector width.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VL 16  /* floats per vector register */
#define ACC 16 /* accumulator registers per tile (of 32) */
#elif defined(__AVX__) || defined(__ARM_NEON)
#define VL 8
#define ACC 8 /* of 16 */
#else
#define VL 4
#define ACC 8
#endif
#define NV 4 /* vectors per panel row */
#define RB (ACC / 2) /* at most this many rows per tile */
#define TILE (VL * NV)
#define LINE 16      /* floats per 64-byte cache line */
#define PREFETCH 64  /* float32 weight vectors ahead of the product, per strip (4 KiB at VL 16):
                      * further ahead than the hardware prefetcher runs by itself (int8's strips,
                      * a quarter the bytes, keep up without) */

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef int8_t vb __attribute__((vector_size(VL)));

static inline vf load_f(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline vf load_i8(const int8_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else /* compilers widen this lane by lane: correct, slower */
    vb v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(__builtin_convertvector(v, vi), vf);
#endif
}
static inline void store_f(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { return x - (vf){0}; } /* x - 0 is x, even -0: a plain broadcast */
static inline vf select_f(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* exp(x) per lane: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial (about
 * one unit in the last place), times 2^n built in the exponent bits. Below the smallest normal
 * result it gives 0, above the largest inf, and NaN stays NaN. */
static inline vf vexp(vf x) {
    const float lo = -87.33654475f, hi = 88.72283905f;
    const vf vlo = splat(lo), vhi = splat(hi);
    vf xc = select_f(x < vlo, vlo, select_f(x > vhi, vhi, x));
    const vf shifter = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vf n = (xc * 1.44269504088896341f + shifter) - shifter;
    vf r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vf y = p * (r * r) + r + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    y = y * (vf)bits;
    y = select_f(x < vlo, splat(0.0f), y);
    y = select_f(x > vhi, splat(INFINITY), y);
    return select_f(x != x, x, y);
}

static inline float vsum(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
#endif
}

/* sum a[i] * b[i], lanes first, then the lanes and the tail */
static inline float dot(const float *a, const float *b, int n) {
    vf acc = {0};
    int i = 0;
    for (; i + VL <= n; i += VL) acc += load_f(a + i) * load_f(b + i);
    float s = vsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ---- the model, as Python packs it ------------------------------------------------------ */

typedef struct {
    const void *w;        /* (panels, NV, k, VL): float32, or int8 where scale is set */
    const float *scale;   /* int8: one per output column, (panels * TILE); NULL for float32 */
    const float *bias;    /* (panels * TILE), or NULL */
    int32_t k, panels, n; /* input width, panels, real output columns */
    int32_t glu;          /* panels come in (gate, up) pairs; n counts the pairs' columns */
} tl_matrix;

typedef struct {
    const float *input_layernorm, *post_attention_layernorm; /* (hidden) gains */
    tl_matrix qkv, o_proj, gate_up, down_proj;
} tl_layer;

typedef struct {
    int32_t layers, hidden, heads, kv_heads, head_dim, vocab;
    float eps, scaling;
    const tl_layer *layer;
    const float *norm; /* (hidden) */
    tl_matrix lm_head;
} tl_model;

typedef struct {
    int32_t batch, past, rope_rows; /* rope_rows: 1 (shared by all rows) or batch */
    const int32_t *capacity;        /* per layer: positions its cache buffers hold */
    float *x;                                 /* (batch, hidden): embeddings in, overwritten */
    const float *cos, *sin; /* (rope_rows, head_dim); sin with rotate_half's sign in its first half */
    const float *mask;      /* (batch, past + 1) additive, or NULL */
    float *const *keys;     /* per layer: (batch, kv_heads, capacity[layer], head_dim), after RoPE */
    float *const *values;
    float *logits; /* (batch, vocab) */
    float *work;   /* tl_workspace floats */
} tl_step;

/* ---- matrix products -------------------------------------------------------------------- */

/* acc[r][v] = x[r] @ panel p's vectors v0 .. v0 + nv, for `rows` rows of x (row stride ldx).
 * rows and nv are constants at every call site, so the accumulators stay in registers. Each
 * output is one chain of multiply-adds over the inputs in order, whatever the tile's shape:
 * a row's result does not depend on how many rows share its tile. */
static inline __attribute__((always_inline)) void panel_product(const tl_matrix *m, int p, int v0, int nv,
                                                                const float *x, int ldx, int rows,
                                                                vf acc[RB][NV]) {
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < nv; v++) acc[r][v] = (vf){0};
    const size_t k = (size_t)m->k;
    if (m->scale) {
        const int8_t *w = (const int8_t *)m->w + ((size_t)p * NV + v0) * k * VL;
        for (size_t i = 0; i < k; i++, w += VL) {
            vf wv[NV];
            for (int v = 0; v < nv; v++) wv[v] = load_i8(w + v * k * VL);
            for (int r = 0; r < rows; r++) {
                vf xr = splat(x[r * ldx + i]);
                for (int v = 0; v < nv; v++) acc[r][v] += xr * wv[v];
            }
        }
        for (int v = 0; v < nv; v++) {
            vf s = load_f(m->scale + (size_t)p * TILE + (v0 + v) * VL);
            for (int r = 0; r < rows; r++) acc[r][v] *= s;
        }
    } else {
        const float *w = (const float *)m->w + ((size_t)p * NV + v0) * k * VL;
        for (size_t i = 0; i < k; i++, w += VL) {
            vf wv[NV];
            for (int v = 0; v < nv; v++) __builtin_prefetch(w + v * k * VL + PREFETCH * VL);
            for (int v = 0; v < nv; v++) wv[v] = load_f(w + v * k * VL);
            for (int r = 0; r < rows; r++) {
                vf xr = splat(x[r * ldx + i]);
                for (int v = 0; v < nv; v++) acc[r][v] += xr * wv[v];
            }
        }
    }
    if (m->bias) {
        for (int v = 0; v < nv; v++) {
            vf b = load_f(m->bias + (size_t)p * TILE + (v0 + v) * VL);
            for (int r = 0; r < rows; r++) acc[r][v] += b;
        }
    }
}

static inline vf silu(vf g) { return g / (1.0f + vexp(-g)); }

enum { STORE, ADD };

/* The columns of panel p for `rows` rows, `nv` vectors of a panel at a time: y = x @ W
 * (+ bias), or y += that (ADD), or for a glu matrix (pairs of panels) y = silu(gate) * up.
 * Only the n real columns are written. */
static inline __attribute__((always_inline)) void panel_rows(const tl_matrix *m, int p, const float *x, int ldx,
                                                             float *y, int ldy, int mode, int rows, int nv) {
    vf acc[RB][NV], up[RB][NV];
    float out[TILE];
    for (int v0 = 0; v0 < NV; v0 += nv) {
        int col = p * TILE + v0 * VL;
        if (col >= m->n) break;
        if (m->glu) {
            panel_product(m, 2 * p, v0, nv, x, ldx, rows, acc);
            panel_product(m, 2 * p + 1, v0, nv, x, ldx, rows, up);
            for (int r = 0; r < rows; r++)
                for (int v = 0; v < nv; v++) acc[r][v] = silu(acc[r][v]) * up[r][v];
        } else {
            panel_product(m, p, v0, nv, x, ldx, rows, acc);
        }
        int width = m->n - col < nv * VL ? m->n - col : nv * VL;
        for (int r = 0; r < rows; r++) {
            float *yr = y + (size_t)r * ldy + col;
            if (width == nv * VL && mode == STORE) {
                for (int v = 0; v < nv; v++) store_f(yr + v * VL, acc[r][v]);
                continue;
            }
            for (int v = 0; v < nv; v++) store_f(out + v * VL, acc[r][v]);
            if (mode == STORE)
                memcpy(yr, out, sizeof(float) * width);
            else
                for (int t = 0; t < width; t++) yr[t] += out[t];
        }
    }
}

/* Tiles of ACC accumulators: many rows share each weight read (ACC / 2 rows x 2 vectors, then
 * ACC / 4 rows x 4), a single row takes whole panel rows (1 x NV: enough independent chains to
 * hide the multiply-add latency). A tile of ACC rows x 1 vector, loading each weight once for
 * more rows, measured slower: it loads a broadcast input per multiply-add. */
static void matmul(const tl_matrix *m, int batch, const float *x, int ldx, float *y, int ldy, int mode, int p0,
                   int p1) {
    for (int p = p0; p < p1; p++) { /* every row of a panel while it is in the cache */
        int r = 0;
#define TILES(R, N)                                                                                   \
    for (; r + (R) <= batch; r += (R))                                                                \
        panel_rows(m, p, x + (size_t)r * ldx, ldx, y + (size_t)r * ldy, ldy, mode, (R), (N));
        TILES(ACC / 2, 2)
        TILES(ACC / 4, 4)
        TILES(1, NV)
#undef TILES
    }
}

/* ---- threads -------------------------------------------------------------------------- */

/* The threads are OpenMP's. Built with -fopenmp, this library needs libgomp.so.1, and where torch
 * has loaded its own libgomp.so.1 the loader hands us that one: the step runs on torch's thread
 * pool, so torch's threads and ours never compete for the cores between steps. */
#if defined(_OPENMP)
#include <omp.h>
#define BARRIER() _Pragma("omp barrier")
#else
#define BARRIER() ((void)0)
#endif

/* ---- the step --------------------------------------------------------------------------- */

/* y = RMSNorm(x) * gain for `batch` rows of width n: the mean square in float32, as norm.py. */
static void rms_norm(const float *x, const float *gain, float eps, int batch, int n, float *y) {
    for (int b = 0; b < batch; b++) {
        const float *xb = x + (size_t)b * n;
        float inv = 1.0f / sqrtf(dot(xb, xb, n) / n + eps);
        for (int i = 0; i < n; i++) y[(size_t)b * n + i] = gain[i] * (xb[i] * inv);
    }
}

/* out = x rotated by RoPE, one head of width d: x * cos + swap_halves(x) * sin */
static void rope(const float *x, const float *cos, const float *sin, int d, float *out) {
    int half = d / 2;
    for (int j = 0; j < half; j++) {
        out[j] = x[j] * cos[j] + x[j + half] * sin[j];
        out[j + half] = x[j + half] * cos[j + half] + x[j] * sin[j + half];
    }
}

static size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

/* Where a step's scratch memory (tl_step.work) puts what: the shared q/k/v, attention and MLP
 * rows, then each thread's own normed rows, scores and rotated query and key. Row widths of
 * the shared parts are what their matrices write (padded to whole panels). */
typedef struct {
    size_t ld_qkv, ld_attn, ld_act; /* floats per row */
    size_t scores;                  /* floats of one thread's scores (whole vectors) */
    size_t private;                 /* floats per thread */
} workspace_layout;

static workspace_layout layout_of(const tl_model *m, int batch, int positions) {
    workspace_layout w;
    w.ld_qkv = round_up((size_t)(m->heads + 2 * m->kv_heads) * m->head_dim, TILE);
    w.ld_attn = (size_t)m->heads * m->head_dim;
    w.ld_act = round_up(m->layers ? (size_t)m->layer[0].gate_up.n : 0, TILE);
    w.scores = round_up((size_t)positions, VL);
    w.private = round_up((size_t)batch * m->hidden + w.scores + 2 * (size_t)m->head_dim, 16);
    return w;
}

/* Floats of the scratch memory a step of `batch` rows over `positions` positions needs. */
size_t tl_workspace(const tl_model *m, int batch, int positions, int threads) {
    workspace_layout w = layout_of(m, batch, positions);
    return (size_t)batch * (w.ld_qkv + w.ld_attn + w.ld_act) + (size_t)threads * w.private;
}

/* out[0 .. nv * VL) = sum over t <= past of scores[t] * inv * value_t, value_t the cached row t
 * (stride D) for t < past and v_new at t = past. Two sets of sums, even and odd positions,
 * added at the end: consecutive positions do not wait on each other's multiply-adds. */
static inline __attribute__((always_inline)) void weighted_values(const float *scores, float inv,
                                                                  const float *values, const float *v_new,
                                                                  int past, int D, int nv, float *out) {
    vf even[4], odd[4];
    for (int v = 0; v < nv; v++) even[v] = odd[v] = (vf){0};
    int t = 0;
    for (; t + 1 < past; t += 2) {
        const float *v0 = values + (size_t)t * D, *v1 = v0 + D;
        vf w0 = splat(scores[t] * inv), w1 = splat(scores[t + 1] * inv);
        for (int v = 0; v < nv; v++) {
            even[v] += w0 * load_f(v0 + v * VL);
            odd[v] += w1 * load_f(v1 + v * VL);
        }
    }
    for (; t <= past; t++) {
        const float *vt = t < past ? values + (size_t)t * D : v_new;
        vf w = splat(scores[t] * inv);
        for (int v = 0; v < nv; v++) even[v] += w * load_f(vt + v * VL);
    }
    for (int v = 0; v < nv; v++) store_f(out + v * VL, even[v] + odd[v]);
}

static void attention_task(const tl_model *m, const tl_step *s, int l, int b, int h, const float *qkv,
                           size_t ld_qkv, float *attn, float *scores, float *q, float *k_new) {
    const int D = m->head_dim, H = m->heads, H_kv = m->kv_heads, G = H / H_kv, kvh = h / G;
    const int past = s->past, S = past + 1;
    const float *row = qkv + (size_t)b * ld_qkv;
    const int rope_row = s->rope_rows == 1 ? 0 : b;
    const float *cos = s->cos + (size_t)rope_row * D, *sin = s->sin + (size_t)rope_row * D;
    float *keys = s->keys[l] + ((size_t)b * H_kv + kvh) * s->capacity[l] * D;
    float *values = s->values[l] + ((size_t)b * H_kv + kvh) * s->capacity[l] * D;
    const float *v_new = row + (size_t)(H + H_kv + kvh) * D;
    rope(row + (size_t)h * D, cos, sin, D, q);
    rope(row + (size_t)(H + kvh) * D, cos, sin, D, k_new);
    /* the cache's new position is written by the group's first query head; the others read
     * the new key and value from here, so no head waits for another */
    if (h % G == 0) {
        memcpy(keys + (size_t)past * D, k_new, sizeof(float) * D);
        memcpy(values + (size_t)past * D, v_new, sizeof(float) * D);
    }
    const float *mask = s->mask ? s->mask + (size_t)b * S : NULL;
    /* Each (row, head) reads its own stretch of the cache, which the hardware prefetcher has
     * not seen coming: fetch the keys a few positions ahead, and the values (read after the
     * softmax) while the scores are computed. */
    for (int t = 0; t < past; t++) {
        const float *key = keys + (size_t)t * D, *value = values + (size_t)t * D;
        for (int line = 0; line < D; line += LINE) {
            __builtin_prefetch(key + 8 * D + line);
            __builtin_prefetch(value + line);
        }
        scores[t] = dot(q, key, D) * m->scaling;
    }
    scores[past] = dot(q, k_new, D) * m->scaling;
    if (mask)
        for (int t = 0; t < S; t++) scores[t] += mask[t];
    int S_pad = (int)round_up(S, VL);
    for (int t = S; t < S_pad; t++) scores[t] = -INFINITY;
    vf top = splat(-INFINITY);
    for (int t = 0; t < S_pad; t += VL) {
        vf v = load_f(scores + t);
        top = select_f(v > top, v, top);
    }
    float max = -INFINITY;
    for (int i = 0; i < VL; i++) max = top[i] > max ? top[i] : max;
    vf total = {0};
    for (int t = 0; t < S_pad; t += VL) {
        vf e = vexp(load_f(scores + t) - max);
        store_f(scores + t, e);
        total += e;
    }
    float inv = 1.0f / vsum(total);
    float *out = attn + (size_t)b * H * D + (size_t)h * D;
    int d = 0;
    for (; d + 4 * VL <= D; d += 4 * VL) weighted_values(scores, inv, values + d, v_new + d, past, D, 4, out + d);
    switch ((D - d) / VL) { /* a constant count at each call, so the sums stay in registers */
    case 3: weighted_values(scores, inv, values + d, v_new + d, past, D, 3, out + d); break;
    case 2: weighted_values(scores, inv, values + d, v_new + d, past, D, 2, out + d); break;
    case 1: weighted_values(scores, inv, values + d, v_new + d, past, D, 1, out + d); break;
    }
    for (d += (D - d) / VL * VL; d < D; d++) {
        float a = 0.0f;
        for (int t = 0; t < S; t++) a += scores[t] * inv * (t < past ? values[(size_t)t * D + d] : v_new[d]);
        out[d] = a;
    }
}

/* This thread's share of a product: a contiguous run of the matrix's (output) panels. */
static void share(const tl_matrix *m, int tid, int threads, int batch, const float *x, int ldx, float *y,
                  int ldy, int mode) {
    long panels = m->glu ? m->panels / 2 : m->panels;
    matmul(m, batch, x, ldx, y, ldy, mode, (int)(panels * tid / threads), (int)(panels * (tid + 1) / threads));
}

static void run_step(const tl_model *m, const tl_step *s, int tid, int threads) {
    const int B = s->batch, C = m->hidden, D = m->head_dim;
    const workspace_layout w = layout_of(m, B, s->past + 1);
    float *qkv = s->work, *attn = qkv + B * w.ld_qkv, *act = attn + B * w.ld_attn;
    float *h = act + B * w.ld_act + (size_t)tid * w.private; /* this thread's normed rows */
    float *scores = h + (size_t)B * C, *q = scores + w.scores, *k_new = q + D;
    float *x = s->x;
    for (int l = 0; l < m->layers; l++) {
        const tl_layer *L = &m->layer[l];
        rms_norm(x, L->input_layernorm, m->eps, B, C, h);
        share(&L->qkv, tid, threads, B, h, C, qkv, (int)w.ld_qkv, STORE);
        BARRIER();
        for (int task = tid; task < B * m->heads; task += threads)
            attention_task(m, s, l, task / m->heads, task % m->heads, qkv, w.ld_qkv, attn, scores, q, k_new);
        BARRIER();
        share(&L->o_proj, tid, threads, B, attn, (int)w.ld_attn, x, C, ADD);
        BARRIER();
        rms_norm(x, L->post_attention_layernorm, m->eps, B, C, h);
        share(&L->gate_up, tid, threads, B, h, C, act, (int)w.ld_act, STORE);
        BARRIER();
        share(&L->down_proj, tid, threads, B, act, (int)w.ld_act, x, C, ADD);
        BARRIER();
    }
    rms_norm(x, m->norm, m->eps, B, C, h);
    share(&m->lm_head, tid, threads, B, h, C, s->logits, m->vocab, STORE); /* the region's end waits */
}

/* One decoding step on `threads` threads (the caller among them). Returns the threads used. */
int tl_decode(const tl_model *m, const tl_step *s, int threads) {
    if (threads < 1) threads = 1;
#if defined(_OPENMP)
    if (threads > 1) {
        int used = threads;
#pragma omp parallel num_threads(threads)
        {
#pragma omp single
            used = omp_get_num_threads();
            /* the implicit barrier after `single` publishes `used` */
            run_step(m, s, omp_get_thread_num(), used);
        }
        return used;
    }
#endif
    run_step(m, s, 0, 1);
    return 1;
}

/* The layout Python packs for: output columns per panel, and per strip of a panel. */
int tl_tile(void) { return TILE; }
int tl_vector(void) { return VL; }

