/* Fused CPU kernels of the BMRS noise layer (bmrs_kernel.py builds and loads this file).
 *
 * A training forward draws, for every activation element, u ~ N(mu, sigma^2) truncated to
 * [a, b] by the inverse CDF (the authors' reparameterisation), theta = exp(u), y = x * theta.
 * PyTorch needs about eight passes over the activation for this (uniform, Phi, erfinv, exp, ...);
 * here it is one pass with a counter-based random number per element, and the backward pass is
 * one more that recomputes the uniforms from the same counter and reduces the per-channel
 * gradients. Shapes: x is [outer, C, inner] in memory (inner = 1 for [B, C] and channels-last
 * activations, inner = H*W for NCHW). The forward and the backward sums work on a range of the
 * outer rows (`rows` rows whose first element is element `base` of the whole tensor, which keys
 * the uniforms), so bmrs_kernel.py runs a large tensor as fixed chunks on several threads with
 * the same result as one call.
 *
 * Per element, with g = clamp(Phi(alpha) + eps Z, clip, 1 - clip), z = Phi^-1(g), u = clamp(mu + sigma z):
 *   du/dmu = 1, du/dsigma = z (direct), du/dPhi(alpha) = sigma / phi(z), du/dZ = sigma eps / phi(z),
 * zero where a clamp is active. The per-channel sums returned are
 *   S0 = sum gu, Sz = sum gu z, Sp = sum gu / phi(z), Se = sum gu eps / phi(z),   gu = dL/du.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PATTERN 512  /* elements per parameter block in the channel-inner layout */
#define FLUSH 64     /* blocks summed in float before the sums move to double */

#define SQRT2 1.41421356237309515f
#define SQRT2PI 2.50662827463100050f

/* exp and log for the per-element loops, inlined so that they vectorise (Cephes' expf and logf
 * polynomials, about 1 ulp on the ranges used here: u in [-20, 0], z^2/2 < 10, 4g(1-g) in [4e-5, 1]). */
typedef union {
    float f;
    int32_t i;
} bits32;

static inline float exp_in(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    bits32 scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

static inline float log_in(float x) {  /* x > 0, normal */
    bits32 v;
    v.f = x;
    float e = (float)(((v.i >> 23) & 0xff) - 126);
    v.i = (v.i & 0x007fffff) | 0x3f000000;  /* mantissa in [0.5, 1) */
    float m = v.f;
    int small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
    return m + y + 0.693359375f * e;
}

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

/* uniform in (0, 1) for element i of a call keyed by (k0, k1) */
static inline float uniform01(uint32_t i, uint32_t k0, uint32_t k1) {
    uint32_t h = fmix32(i * 0x9e3779b1u + k0);
    h = fmix32(h ^ k1);
    return ((float)(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

/* Phi^-1(g) = sqrt(2) erfinv(2g - 1), with M. Giles' single-precision erfinv
 * ("Approximating the erfinv function", GPU Computing Gems, 2010); 4g(1-g) = 1 - (2g-1)^2. */
static inline float ndtri(float g) {
    float t = 2.0f * g - 1.0f;
    float w = -log_in(4.0f * g * (1.0f - g));
    float w1 = w - 2.5f;
    float p1 = 2.81022636e-08f;
    p1 = 3.43273939e-07f + p1 * w1;
    p1 = -3.5233877e-06f + p1 * w1;
    p1 = -4.39150654e-06f + p1 * w1;
    p1 = 0.00021858087f + p1 * w1;
    p1 = -0.00125372503f + p1 * w1;
    p1 = -0.00417768164f + p1 * w1;
    p1 = 0.246640727f + p1 * w1;
    p1 = 1.50140941f + p1 * w1;
    float w2 = sqrtf(w) - 3.0f;
    float p2 = -0.000200214257f;
    p2 = 0.000100950558f + p2 * w2;
    p2 = 0.00134934322f + p2 * w2;
    p2 = -0.00367342844f + p2 * w2;
    p2 = 0.00573950773f + p2 * w2;
    p2 = -0.0076224613f + p2 * w2;
    p2 = 0.00943887047f + p2 * w2;
    p2 = 1.00167406f + p2 * w2;
    p2 = 2.83297682f + p2 * w2;
    float p = w < 5.0f ? p1 : p2;
    return SQRT2 * p * t;
}

static inline float clampf(float v, float lo, float hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

static inline double clampd(double v, double lo, double hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

static inline double ndtr(double x) { return 0.5 * erfc(-x / 1.4142135623730951); }

static inline double npdf(double x) { return exp(-0.5 * x * x) / 2.5066282746310002; }

/* Per-channel sigma = exp(clamp(log sigma)), Phi(alpha) and Z, in double, stored as float. */
void bmrs_channel_params(const float *mu, const float *logsigma, int64_t C, float a, float b,
                         float ls_min, float ls_max, float *sig, float *pa, float *Z) {
    for (int64_t c = 0; c < C; c++) {
        double s = exp(clampd(logsigma[c], ls_min, ls_max));
        double pal = ndtr((a - mu[c]) / s), pbe = ndtr((b - mu[c]) / s);
        sig[c] = (float)s;
        pa[c] = (float)pal;
        Z[c] = (float)(pbe - pal);
    }
}

/* The channel-inner loops' parameter block: k rows of the C per-channel values of mu, sigma,
 * Phi(alpha) and Z, at pm, pm + kC, pm + 2kC, pm + 3kC. */
static void pattern(float *pm, const float *mu, const float *sigma, const float *pa, const float *Z,
                    int64_t k, int64_t C) {
    int64_t P = k * C;
    for (int64_t r = 0; r < k; r++)
        for (int64_t c = 0; c < C; c++) {
            pm[r * C + c] = mu[c];
            pm[P + r * C + c] = sigma[c];
            pm[2 * P + r * C + c] = pa[c];
            pm[3 * P + r * C + c] = Z[c];
        }
}

/* d/dmu and d/dlog sigma from the sums S (see the header), through sigma, Phi(alpha) and Z. */
static void channel_grads(const double *S, const float *mu, const float *logsigma, int64_t C, float a,
                          float b, float ls_min, float ls_max, float *gmu, float *gls) {
    for (int64_t c = 0; c < C; c++) {
        double s = exp(clampd(logsigma[c], ls_min, ls_max));
        double al = (a - mu[c]) / s, be = (b - mu[c]) / s, fa = npdf(al), fb = npdf(be);
        double s0 = S[c], sz = S[C + c], sp = S[2 * C + c], se = S[3 * C + c];
        gmu[c] = (float)(s0 + sp * (-fa) + se * (fa - fb));  /* sigma * (dPhi(alpha)/dmu) = -phi(alpha) */
        double gs = sz + (sp * (-al * fa) + se * (al * fa - be * fb));
        int inside = logsigma[c] >= ls_min && logsigma[c] <= ls_max;
        gls[c] = inside ? (float)(gs * s) : 0.0f;
    }
}

/* The uniforms a forward call with this key uses (for tests). */
void bmrs_uniform(float *out, int64_t n, uint64_t key) {
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int64_t i = 0; i < n; i++) out[i] = uniform01((uint32_t)i, k0, k1);
}

/* y = x * theta over `outer` rows; z (the standard-normal quantile) is kept for the backward pass;
 * cp = [sigma | Phi(alpha) | Z] per channel, computed here (bmrs_channel_params) when logsigma is
 * given, else already computed by the caller. */
void bmrs_noise_forward(const float *x, float *y, float *z_out, float *cp, int64_t outer, int64_t C,
                        int64_t inner, const float *mu, const float *logsigma, float a, float b,
                        float ls_min, float ls_max, float clip, uint64_t key, int64_t base) {
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    if (logsigma != NULL) bmrs_channel_params(mu, logsigma, C, a, b, ls_min, ls_max, cp, cp + C, cp + 2 * C);
    const float *sigma = cp, *pa = sigma + C, *Z = pa + C;
    if (inner == 1) {  /* channel-inner: rows of C; a block of k rows repeats the parameters */
        int64_t k = C >= PATTERN ? 1 : PATTERN / C, P = k * C;
        float *pm = malloc(4 * P * sizeof(float)), *ps = pm + P, *pp = ps + P, *pz = pp + P;
        pattern(pm, mu, sigma, pa, Z, k, C);
        int64_t n = outer * C;
        for (int64_t off = 0; off < n; off += P) {
            int64_t len = n - off < P ? n - off : P;
            const float *xr = x + off;
            float *yr = y + off, *zr = z_out + off;
#pragma omp simd
            for (int64_t j = 0; j < len; j++) {
                float eps = uniform01((uint32_t)(base + off + j), k0, k1);
                float z = ndtri(clampf(pp[j] + eps * pz[j], clip, 1.0f - clip));
                float u = clampf(pm[j] + ps[j] * z, a, b);
                zr[j] = z;
                yr[j] = xr[j] * exp_in(u);
            }
        }
        free(pm);
    } else {
        for (int64_t o = 0; o < outer; o++) {
            for (int64_t c = 0; c < C; c++) {
                int64_t off = (o * C + c) * inner;
                const float *xr = x + off;
                float *yr = y + off, *zr = z_out + off;
                float m = mu[c], s = sigma[c], p = pa[c], zz = Z[c];
#pragma omp simd
                for (int64_t j = 0; j < inner; j++) {
                    float eps = uniform01((uint32_t)(base + off + j), k0, k1);
                    float z = ndtri(clampf(p + eps * zz, clip, 1.0f - clip));
                    float u = clampf(m + s * z, a, b);
                    zr[j] = z;
                    yr[j] = xr[j] * exp_in(u);
                }
            }
        }
    }
}

/* gx = gy * theta over `outer` rows, and their per-channel sums S = [S0 | Sz | Sp | Se] (4C doubles),
 * from which bmrs_chunk_grads gives d/dmu and d/dlog sigma; z, cp, key and base are the forward's. */
static void noise_sums(const float *gy, const float *x, const float *z_in, const float *cp, float *gx,
                       double *S, int64_t outer, int64_t C, int64_t inner, const float *mu, float a, float b,
                       float clip, uint64_t key, int64_t base) {
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    const float *sigma = cp, *pa = sigma + C, *Z = pa + C;
    for (int64_t i = 0; i < 4 * C; i++) S[i] = 0.0;
    if (inner == 1) {
        int64_t k = C >= PATTERN ? 1 : PATTERN / C, P = k * C;
        float *pm = malloc(8 * P * sizeof(float)), *ps = pm + P, *pp = ps + P, *pz = pp + P;
        float *acc = pz + P;  /* 4 x P partial sums, flushed into doubles every FLUSH blocks */
        pattern(pm, mu, sigma, pa, Z, k, C);
        for (int64_t j = 0; j < 4 * P; j++) acc[j] = 0.0f;
        int64_t n = outer * C, blocks = 0;
        for (int64_t off = 0; off < n; off += P) {
            int64_t len = n - off < P ? n - off : P;
            const float *gyr = gy + off, *xr = x + off, *zr = z_in + off;
            float *gxr = gx + off, *a0 = acc, *a1 = acc + P, *a2 = acc + 2 * P, *a3 = acc + 3 * P;
#pragma omp simd
            for (int64_t j = 0; j < len; j++) {
                float eps = uniform01((uint32_t)(base + off + j), k0, k1);
                float graw = pp[j] + eps * pz[j];
                float z = zr[j];
                float uraw = pm[j] + ps[j] * z;
                float theta = exp_in(clampf(uraw, a, b));
                gxr[j] = gyr[j] * theta;
                float gu = (uraw >= a && uraw <= b) ? gyr[j] * xr[j] * theta : 0.0f;
                float gw = (graw >= clip && graw <= 1.0f - clip) ? gu * SQRT2PI * exp_in(0.5f * z * z) : 0.0f;
                a0[j] += gu;
                a1[j] += gu * z;
                a2[j] += gw;
                a3[j] += gw * eps;
            }
            if (++blocks % FLUSH == 0 || off + P >= n) {
                for (int64_t q = 0; q < 4; q++)
                    for (int64_t r = 0; r < k; r++)
                        for (int64_t c = 0; c < C; c++) {
                            S[q * C + c] += acc[q * P + r * C + c];
                            acc[q * P + r * C + c] = 0.0f;
                        }
            }
        }
        free(pm);
    } else {
        for (int64_t o = 0; o < outer; o++) {
            for (int64_t c = 0; c < C; c++) {
                int64_t off = (o * C + c) * inner;
                const float *gyr = gy + off, *xr = x + off, *zr = z_in + off;
                float *gxr = gx + off;
                float m = mu[c], s = sigma[c], p = pa[c], zz = Z[c];
                float s0 = 0.0f, sz = 0.0f, sp = 0.0f, se = 0.0f;
#pragma omp simd reduction(+ : s0, sz, sp, se)
                for (int64_t j = 0; j < inner; j++) {
                    float eps = uniform01((uint32_t)(base + off + j), k0, k1);
                    float graw = p + eps * zz;
                    float z = zr[j];
                    float uraw = m + s * z;
                    float theta = exp_in(clampf(uraw, a, b));
                    gxr[j] = gyr[j] * theta;
                    float gu = (uraw >= a && uraw <= b) ? gyr[j] * xr[j] * theta : 0.0f;
                    float gw = (graw >= clip && graw <= 1.0f - clip) ? gu * SQRT2PI * exp_in(0.5f * z * z) : 0.0f;
                    s0 += gu;
                    sz += gu * z;
                    sp += gw;
                    se += gw * eps;
                }
                S[c] += s0;
                S[C + c] += sz;
                S[2 * C + c] += sp;
                S[3 * C + c] += se;
            }
        }
    }
}

/* The n chunk sums at S, S + 4C, ... added in chunk order into S[0, 4C), then d/dmu and d/dlog sigma. */
void bmrs_chunk_grads(double *S, int64_t n, const float *mu, const float *logsigma, int64_t C, float a,
                      float b, float ls_min, float ls_max, float *gmu, float *gls) {
    for (int64_t i = 1; i < n; i++)
        for (int64_t j = 0; j < 4 * C; j++) S[j] += S[4 * C * i + j];
    channel_grads(S, mu, logsigma, C, a, b, ls_min, ls_max, gmu, gls);
}

/* noise_sums over `outer` rows in chunks of `chunk` rows, the sums of chunk i at S + 4Ci: the
 * chunks, not the calls, fix the order in which the sums are added (bmrs_chunk_grads), so any
 * split of the rows between threads gives the same gradients. With gmu given (a call over all
 * rows) the gradients are computed here too, and S may be NULL (a buffer of its own). */
void bmrs_noise_sums(const float *gy, const float *x, const float *z_in, const float *cp, float *gx,
                     double *S, int64_t outer, int64_t chunk, int64_t C, int64_t inner, const float *mu,
                     float a, float b, float clip, uint64_t key, int64_t base, float *gmu, float *gls,
                     const float *logsigma, float ls_min, float ls_max) {
    int64_t row = C * inner;
    double *own = S == NULL ? malloc(4 * C * ((outer + chunk - 1) / chunk) * sizeof(double)) : NULL;
    S = own != NULL ? own : S;
    for (int64_t o = 0; o < outer; o += chunk) {
        int64_t rows = outer - o < chunk ? outer - o : chunk;
        noise_sums(gy + o * row, x + o * row, z_in + o * row, cp, gx + o * row, S + 4 * C * (o / chunk),
                   rows, C, inner, mu, a, b, clip, key, base + o * row);
    }
    if (gmu != NULL)
        bmrs_chunk_grads(S, (outer + chunk - 1) / chunk, mu, logsigma, C, a, b, ls_min, ls_max, gmu, gls);
    free(own);
}

/* log Phi(x), accurate in both tails */
static double log_ndtr(double x) {
    if (x > 0.0) return log1p(-0.5 * erfc(x / 1.4142135623730951));
    if (x > -30.0) return log(0.5 * erfc(-x / 1.4142135623730951));
    double r = 1.0 / (x * x);  /* asymptotic series of the Mills ratio */
    return -0.5 * x * x - log(-x) - 0.9189385332046727 + log1p(-r * (1.0 - 3.0 * r * (1.0 - 5.0 * r)));
}

/* log(Phi(hi) - Phi(lo)) for hi > lo */
static double log_ndtr_diff(double lo, double hi) {
    double big = lo > 0.0 ? log_ndtr(-lo) : log_ndtr(hi);
    double small = lo > 0.0 ? log_ndtr(-hi) : log_ndtr(lo);
    double d = small - big;
    return big + (d > -0.6931471805599453 ? log(-expm1(d)) : log1p(-exp(d)));
}

/* weight * sum of KL(q||p) over n noise variables (truncnorm.kl_log_uniform); writes weight * dKL
 * into gmu and gls. */
double bmrs_kl(const float *mu, const float *logsigma, int64_t n, double weight, float *gmu, float *gls,
               float a, float b, float ls_min, float ls_max) {
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double s = exp(clampd(logsigma[i], ls_min, ls_max));
        double al = (a - mu[i]) / s, be = (b - mu[i]) / s;
        double lz = log_ndtr_diff(al, be);
        double ra = exp(-0.5 * al * al - 0.9189385332046727 - lz);
        double rb = exp(-0.5 * be * be - 0.9189385332046727 - lz);
        double t = al * ra - be * rb;
        total += log((double)b - a) - 1.4189385332046727 - log(s) - lz - 0.5 * t;
        double dz_mu = (ra - rb) / s, dt_mu = (-ra * (1.0 - al * al) + rb * (1.0 - be * be)) / s;
        double dz_s = (al * ra - be * rb) / s;
        double dt_s = (-al * ra * (1.0 - al * al) + be * rb * (1.0 - be * be)) / s;
        double d_mu = -dz_mu - 0.5 * (dt_mu - t * dz_mu);
        double d_s = -1.0 / s - dz_s - 0.5 * (dt_s - t * dz_s);
        int inside = logsigma[i] >= ls_min && logsigma[i] <= ls_max;
        gmu[i] = (float)(weight * d_mu);
        gls[i] = inside ? (float)(weight * d_s * s) : 0.0f;
    }
    return weight * total;
}

/* bmrs_kl over several layers in one call: layer l has counts[l] variables at mu[l], logsigma[l] and
 * weight weights[l]; its gradients go to grads at [offset, offset + n) (mu) and [offset + n,
 * offset + 2n) (log sigma), layer after layer. */
double bmrs_kl_layers(int64_t n_layers, const float *const *mu, const float *const *logsigma,
                      const int64_t *counts, const double *weights, float *grads, float a, float b,
                      float ls_min, float ls_max) {
    double total = 0.0;
    int64_t offset = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        int64_t n = counts[l];
        total += bmrs_kl(mu[l], logsigma[l], n, weights[l], grads + offset, grads + offset + n, a, b,
                         ls_min, ls_max);
        offset += 2 * n;
    }
    return total;
}
