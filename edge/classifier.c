/* The Homeskillet request classifier as one freestanding WebAssembly kernel.
 *
 * The text rules are defined here, byte-level, and tasks/classifier.py follows them exactly (the
 * parity tests check bit-identical probabilities):
 *
 *   1. input: the first MAX_INPUT (65,536) bytes; bytes are bytes (invalid UTF-8 is not an error,
 *      it is hashed as it is). Hosts encode text as UTF-8, lone surrogates as U+FFFD.
 *   2. lower-case ASCII A-Z only; ASCII whitespace (0x09-0x0D, 0x20) splits; runs of it become one
 *      space, none at either end (NBSP, NEL and other non-ASCII spaces are ordinary bytes).
 *   3. the normalised text is cut to its first MAX_TEXT (1,500) bytes.
 *   4. tokens: maximal runs of [a-z0-9] and bytes >= 0x80, or one other non-space byte.
 *   5. grams: "w:"+token, "b:"+token+" "+next token, "c:"+s[i:i+n] for n in 3,4,5 over
 *      s = " "+text+" "; each hashed with FNV-1a 32-bit into DIM buckets (h mod DIM).
 *   6. value of a bucket with count c: LOG_TABLE[c] = float32(1 + ln c) (shipped table, no libm);
 *      norm = sqrtf(sum of value^2, buckets ascending); x = value / norm (float32 throughout).
 *   7. score_k = bias_k, then += w_k[i] * x_i over buckets ascending (float32, sequential).
 *   8. softmax: d_k = score_k - max; e_k = float32(exp_neg(d_k)) with exp_neg in double from
 *      + - * / only; total = sequential float32 sum; p_k = e_k / total.
 *
 * Build (pinned, reproducible): tasks/edge_build.py, i.e.
 *   python -m ziglang cc --target=wasm32-freestanding -mcpu=mvp -O2 -s -nostdlib \
 *       -Wl,--no-entry -ffp-contract=off -I<dir of generated classifier_weights.h> ...
 */

#include "classifier_weights.h" /* NLABELS, DIM, LOG_TABLE_SIZE, LABEL_NAMES, BIAS_BITS,
                                   WEIGHT_F16, LOG_TABLE_BITS: generated from classifier.json */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define EXPORT(name) __attribute__((export_name(name)))
#define MAX_INPUT 65536
#define MAX_TEXT 1500

static u8 input[MAX_INPUT];
static u8 text[MAX_TEXT + 2]; /* " " + normalised text + " " */
static u16 tok_start[MAX_TEXT], tok_end[MAX_TEXT];
static u16 counts[DIM];
static u16 active[DIM];
static float values[DIM];
static float weights[NLABELS * DIM];
static float probs[NLABELS];
static int ready;

static inline float bits_f32(u32 b) { union { u32 u; float f; } v; v.u = b; return v.f; }
static inline double bits_f64(u64 b) { union { u64 u; double f; } v; v.u = b; return v.f; }

static u32 f16_to_f32_bits(u16 h) {
    u32 sign = (u32)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) {
        if (m == 0) return sign;
        e = 127 - 15 + 1;
        while (!(m & 0x400)) { m <<= 1; e--; }
        return sign | (e << 23) | ((m & 0x3ff) << 13);
    }
    if (e == 31) return sign | 0x7f800000u | (m << 13);
    return sign | ((e + 112) << 23) | (m << 13);
}

static void init(void) {
    for (int i = 0; i < NLABELS * DIM; i++) weights[i] = bits_f32(f16_to_f32_bits(WEIGHT_F16[i]));
    ready = 1;
}

#define FNV_OFFSET 0x811C9DC5u
#define FNV_PRIME 0x01000193u
static inline u32 fnv(u32 h, u8 c) { return (h ^ c) * FNV_PRIME; }
static inline void count(u32 h) { counts[h % DIM]++; }

/* exp(d) for d <= 0, double precision, + - * / only; Python's _exp_neg does the same steps. */
static double exp_neg(double d) {
    if (!(d >= -104.0)) return 0.0; /* below float32's smallest subnormal (and NaN) */
    int k = (int)(-d * 1.4426950408889634 + 0.5);
    double r = d + (double)k * 0.693147180369123816490;
    r = r + (double)k * 1.90821492927058770002e-10;
    double p = 1.0;
    for (int n = 12; n >= 1; n--) p = 1.0 + p * r / (double)n;
    return p * bits_f64((u64)(1023 - k) << 52);
}

static inline int word_byte(u8 c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c >= 0x80; }

EXPORT("input_ptr") u8 *input_ptr(void) { return input; }
EXPORT("max_input") int max_input(void) { return MAX_INPUT; }
EXPORT("probs_ptr") float *probs_ptr(void) { return probs; }
EXPORT("num_labels") int num_labels(void) { return NLABELS; }
EXPORT("labels_ptr") const char *labels_ptr(void) { return LABEL_NAMES; }
EXPORT("labels_len") int labels_len(void) { return sizeof(LABEL_NAMES) - 1; }

/* Classify the first min(len, MAX_INPUT) bytes of input; probabilities land in probs; returns the
 * index of the most probable label (the first one on ties). */
EXPORT("classify") int classify(int len) {
    if (!ready) init();
    if (len < 0) len = 0;
    if (len > MAX_INPUT) len = MAX_INPUT;

    /* 1-3: normalise into text[1..n] */
    int n = 0, space = 0;
    for (int j = 0; j < len; j++) {
        u8 c = input[j];
        if (c == ' ' || (c >= 9 && c <= 13)) { space = n > 0; continue; }
        if (space) { if (n >= MAX_TEXT) break; text[1 + n++] = ' '; space = 0; }
        if (n >= MAX_TEXT) break;
        if (c >= 'A' && c <= 'Z') c += 32;
        text[1 + n++] = c;
    }
    text[0] = ' ';
    text[n + 1] = ' ';

    /* 4: tokens */
    int ntok = 0;
    for (int i = 1; i <= n;) {
        u8 c = text[i];
        if (c == ' ') { i++; continue; }
        int s = i;
        if (word_byte(c)) { while (i <= n && word_byte(text[i])) i++; }
        else i++;
        tok_start[ntok] = (u16)s; tok_end[ntok] = (u16)i; ntok++;
    }

    /* 5: grams */
    const u32 hw = fnv(fnv(FNV_OFFSET, 'w'), ':');
    const u32 hb = fnv(fnv(FNV_OFFSET, 'b'), ':');
    const u32 hc = fnv(fnv(FNV_OFFSET, 'c'), ':');
    for (int t = 0; t < ntok; t++) {
        u32 h = hw;
        for (int i = tok_start[t]; i < tok_end[t]; i++) h = fnv(h, text[i]);
        count(h);
        if (t + 1 < ntok) {
            h = hb;
            for (int i = tok_start[t]; i < tok_end[t]; i++) h = fnv(h, text[i]);
            h = fnv(h, ' ');
            for (int i = tok_start[t + 1]; i < tok_end[t + 1]; i++) h = fnv(h, text[i]);
            count(h);
        }
    }
    int padded = n + 2;
    for (int i = 0; i + 3 <= padded; i++) {
        u32 h = fnv(fnv(fnv(hc, text[i]), text[i + 1]), text[i + 2]);
        count(h);
        if (i + 4 <= padded) { h = fnv(h, text[i + 3]); count(h); }
        if (i + 5 <= padded) { h = fnv(h, text[i + 4]); count(h); }
    }

    /* 6: sublinear counts, L2 norm */
    int nact = 0;
    float sumsq = 0.0f;
    for (int i = 0; i < DIM; i++) {
        if (!counts[i]) continue;
        u32 c = counts[i] < LOG_TABLE_SIZE ? counts[i] : LOG_TABLE_SIZE - 1;
        counts[i] = 0;
        float v = bits_f32(LOG_TABLE_BITS[c]);
        values[nact] = v;
        active[nact++] = (u16)i;
        sumsq = sumsq + v * v;
    }
    float norm = __builtin_sqrtf(sumsq);
    for (int a = 0; a < nact; a++) values[a] = values[a] / norm;

    /* 7: scores */
    float score[NLABELS];
    float top = 0.0f;
    for (int k = 0; k < NLABELS; k++) {
        const float *w = weights + k * DIM;
        float s = bits_f32(BIAS_BITS[k]);
        for (int a = 0; a < nact; a++) s = s + w[active[a]] * values[a];
        score[k] = s;
        if (k == 0 || s > top) top = s;
    }

    /* 8: softmax */
    float total = 0.0f;
    for (int k = 0; k < NLABELS; k++) {
        float d = score[k] - top;
        probs[k] = (float)exp_neg((double)d);
        total = total + probs[k];
    }
    int best = 0;
    for (int k = 0; k < NLABELS; k++) {
        probs[k] = probs[k] / total;
        if (probs[k] > probs[best]) best = k;
    }
    return best;
}
