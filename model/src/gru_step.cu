// The GPU serving steps of the intent network's cells (GRU, LSTM, causal convolution): the same arithmetic as the
// CPU kernel (model/src/kernel.rs), operation for operation, on states that stay resident in a
// slab.
//
// Built to PTX by model/build.rs with --fmad=false (no multiply-add contraction, as in Rust),
// IEEE division and no flush-to-zero: a row's result is bit-for-bit the CPU kernel's, whatever
// rows share its launch.
//
// Layout (all f32 unless noted; H hidden units, hm per packed member, G = 3H for a GRU, 4H for
// an LSTM, 3H for a convolution's taps; S = H for a GRU, 2H for an LSTM, 3H for a convolution):
//   bias_in        G            input-gate bias with the recurrent bias added (a GRU's n without)
//   dense_cols     F x G        dense-feature weights, one column per feature
//   item_rows      Bi x G       W_item . E_item per bucket (Bi = 0: none)
//   category_rows  Bc x G       W_cat . E_cat per bucket (Bc = 0: none)
//   recurrent_cols k x hm x (G/k) each member's recurrent block, column i = weights of h_i
//   bias_hn        H            a GRU's recurrent bias of the n gate
//   head           H            head weights
//   precision      u32          how every new state value is kept before the head reads it, as
//                               the CPU kernel keeps them (`StatePrecision::round`): 0 in f32;
//                               1 rounded to f16 and back (to nearest, ties to even); 2 rounded
//                               to the int8 block format (intentflow_schemas::int8: blocks of 8
//                               from the row's start, q · 2^e)
//   inputs (u32)   rows x (F+4) dense feature bits, item bucket, category bucket, slot, flags
//   states         capacity x S the resident states ([h | c] for an LSTM), updated in place
//   logits         rows         the head's raw logits

#define FLAG_RESET 1u
#define PRECISION_F16 1u
#define PRECISION_INT8 2u
// Per row of a launch, shared floats: the features, the old hidden units, the new state (up to
// 3H: [h | c] for an LSTM, [y | P_1 | P_2] for a convolution).
#define SHARED_PER_ROW(features, h) ((features) + 4 * (h))

__device__ __forceinline__ float exp_fixed(float x) {
    const float LOG2E = 1.44269504088896340736f;
    const float LN2_HI = 0.6933594f;
    const float LN2_LO = -2.1219444e-4f;
    const float SHIFT = 12582912.0f;
    // f32::clamp: NaN passes through.
    if (x < -87.0f) x = -87.0f;
    if (x > 88.0f) x = 88.0f;
    float n = (x * LOG2E + SHIFT) - SHIFT;
    float r = (x - n * LN2_HI) - n * LN2_LO;
    float p = 1.9875691e-4f;
    p = p * r + 1.3981999e-3f;
    p = p * r + 8.333452e-3f;
    p = p * r + 4.1665796e-2f;
    p = p * r + 1.6666665e-1f;
    p = p * r + 5.0000001e-1f;
    float y = (p * r) * r + r + 1.0f;
    return y * __int_as_float(((int)n + 127) << 23);
}

__device__ __forceinline__ float sigmoid_fixed(float x) { return 1.0f / (1.0f + exp_fixed(-x)); }

__device__ __forceinline__ float tanh_fixed(float x) { return 1.0f - 2.0f / (exp_fixed(2.0f * x) + 1.0f); }

// A new state value as the model keeps it: with f16 states, rounded to IEEE half precision (to
// nearest, ties to even, subnormals kept: PTX cvt.rn without .ftz, as `StatePrecision::round`
// rounds on the CPU) and widened back; else unchanged (int8 blocks round the whole row after).
__device__ __forceinline__ float kept(float x, unsigned int precision) {
    if (precision != PRECISION_F16) return x;
    unsigned short half_bits;
    float widened;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(half_bits) : "f"(x));
    asm("cvt.f32.f16 %0, %1;" : "=f"(widened) : "h"(half_bits));
    return widened;
}

// 2^e as a float, e from -126 to 127.
__device__ __forceinline__ float pow2(int e) { return __uint_as_float((unsigned int)(e + 127) << 23); }

// Value i of a new state row of s values (shared, unrounded) rounded to its int8 block, as
// intentflow_schemas::int8::round_int8 rounds it: blocks of 8 from the row's start, the
// smallest exponent e (at least -120) with the block's largest magnitude <= 127 * 2^e, then
// to the nearest multiple of 2^e, ties to even; a block with a NaN or a magnitude of 2^126 or
// more is kept.
__device__ __forceinline__ float int8_kept(const float* row, unsigned int i, unsigned int s) {
    const float TOO_LARGE = 8.507059e37f;
    const unsigned int first = i - i % 8, last = min(first + 8, s);
    float m = 0.0f;
    for (unsigned int k = first; k < last; ++k) {
        const float a = fabsf(row[k]);
        if (!(a < TOO_LARGE)) return row[i];
        m = fmaxf(m, a);
    }
    const int k = (int)((__float_as_uint(m) >> 23) & 0xFF) - 127;
    const int e = k - 6 < -120 ? -120 : (m * pow2(6 - k) <= 127.0f ? k - 6 : k - 5);
    const float SHIFT = 12582912.0f;
    return ((row[i] * pow2(-e) + SHIFT) - SHIFT) * pow2(e);
}

// With int8 states, rounds the new state row (`parts` x h values in shared memory, unrounded)
// in place: each unit's thread rounds its values j + m * h. Every thread of the launch calls it
// (it synchronises), before the row is stored or read by the head.
__device__ __forceinline__ void int8_round_row(float* row, unsigned int j, unsigned int h, unsigned int parts, bool live) {
    float rounded[3];
    if (live) {
        for (unsigned int m = 0; m < parts; ++m) rounded[m] = int8_kept(row, j + m * h, parts * h);
    }
    __syncthreads();
    if (live) {
        for (unsigned int m = 0; m < parts; ++m) row[j + m * h] = rounded[m];
    }
    __syncthreads();
}

// The input pre-activation of row `at` of the G = g rows (gates or taps): its bias, the dense
// product in feature order, then the item and category tables' rows, as the CPU kernel sums them.
__device__ __forceinline__ float input_gate(
    unsigned int at, unsigned int g, unsigned int features, const float* x, const unsigned int* in,
    unsigned int item_buckets, unsigned int category_buckets,
    const float* __restrict__ bias_in, const float* __restrict__ dense_cols,
    const float* __restrict__ item_rows, const float* __restrict__ category_rows) {
    float acc = bias_in[at];
    for (unsigned int c = 0; c < features; ++c) acc = acc + dense_cols[c * g + at] * x[c];
    if (item_buckets > 0) acc = acc + item_rows[(size_t)min(in[features], item_buckets - 1) * g + at];
    if (category_buckets > 0) acc = acc + category_rows[(size_t)min(in[features + 1], category_buckets - 1) * g + at];
    return acc;
}

// Gate `gate`'s recurrent product for unit j: its member's block (hm units, `gates` gates) times
// the member's old hidden units, in unit order.
__device__ __forceinline__ float recurrent_gate(
    unsigned int gate, unsigned int gates, unsigned int j, unsigned int hm,
    const float* __restrict__ recurrent_cols, const float* h_old) {
    const unsigned int m = j / hm, kg = gates * hm;
    const float* block = recurrent_cols + (size_t)m * hm * kg + gate * hm + j % hm;
    const float* hidden = h_old + m * hm;
    float r = 0.0f;
    for (unsigned int i = 0; i < hm; ++i) r = r + block[i * kg] * hidden[i];
    return r;
}

// The head's logit of a row's h new outputs, summed in unit order.
__device__ __forceinline__ float head_logit(unsigned int h, const float* __restrict__ head, float head_bias, const float* out) {
    float logit = head_bias;
    for (unsigned int u = 0; u < h; ++u) logit = logit + head[u] * out[u];
    return logit;
}

// One thread per (row, hidden unit); blockDim.x = rows_per_block * h. Dynamic shared memory:
// rows_per_block * SHARED_PER_ROW(F, H) floats.
extern "C" __global__ void gru_step(
    unsigned int rows, unsigned int h, unsigned int hm, unsigned int features,
    unsigned int item_buckets, unsigned int category_buckets,
    const float* __restrict__ bias_in, const float* __restrict__ dense_cols,
    const float* __restrict__ item_rows, const float* __restrict__ category_rows,
    const float* __restrict__ recurrent_cols, const float* __restrict__ bias_hn,
    const float* __restrict__ head, float head_bias, unsigned int precision,
    const unsigned int* __restrict__ inputs, float* __restrict__ states, float* __restrict__ logits) {
    extern __shared__ float shared[];
    const unsigned int stride = features + 4;
    const unsigned int rows_per_block = blockDim.x / h;
    const unsigned int local = threadIdx.x / h;
    const unsigned int j = threadIdx.x % h;
    const unsigned int row = blockIdx.x * rows_per_block + local;
    const bool live = local < rows_per_block && row < rows;
    float* x = shared + local * SHARED_PER_ROW(features, h);
    float* h_old = x + features;
    float* h_new = h_old + h;
    const unsigned int* in = inputs + (size_t)row * stride;
    size_t slot = 0;
    if (live) {
        slot = in[features + 2];
        for (unsigned int c = j; c < features; c += h) x[c] = __uint_as_float(in[c]);
        h_old[j] = (in[features + 3] & FLAG_RESET) ? 0.0f : states[slot * h + j];
    }
    __syncthreads();
    if (live) {
        float g[3], rec[3];
        for (unsigned int gate = 0; gate < 3; ++gate) {
            g[gate] = input_gate(gate * h + j, 3 * h, features, x, in, item_buckets, category_buckets, bias_in, dense_cols, item_rows, category_rows);
            rec[gate] = recurrent_gate(gate, 3, j, hm, recurrent_cols, h_old);
        }
        const float r = sigmoid_fixed(g[0] + rec[0]);
        const float z = sigmoid_fixed(g[1] + rec[1]);
        const float n = tanh_fixed(g[2] + r * (rec[2] + bias_hn[j]));
        h_new[j] = kept(n + z * (h_old[j] - n), precision);
    }
    __syncthreads();
    if (precision == PRECISION_INT8) int8_round_row(h_new, j, h, 1, live);
    if (live) states[slot * h + j] = h_new[j];
    if (live && j == 0) logits[row] = head_logit(h, head, head_bias, h_new);
}

// One LSTM step; threads, blocks and shared memory as gru_step. A row's state is [h | c]: the
// old h in shared memory for the recurrent products, c read by its unit's thread only, the new
// [h | c] in shared memory until it is kept.
extern "C" __global__ void lstm_step(
    unsigned int rows, unsigned int h, unsigned int hm, unsigned int features,
    unsigned int item_buckets, unsigned int category_buckets,
    const float* __restrict__ bias_in, const float* __restrict__ dense_cols,
    const float* __restrict__ item_rows, const float* __restrict__ category_rows,
    const float* __restrict__ recurrent_cols,
    const float* __restrict__ head, float head_bias, unsigned int precision,
    const unsigned int* __restrict__ inputs, float* __restrict__ states, float* __restrict__ logits) {
    extern __shared__ float shared[];
    const unsigned int stride = features + 4;
    const unsigned int rows_per_block = blockDim.x / h;
    const unsigned int local = threadIdx.x / h;
    const unsigned int j = threadIdx.x % h;
    const unsigned int row = blockIdx.x * rows_per_block + local;
    const bool live = local < rows_per_block && row < rows;
    float* x = shared + local * SHARED_PER_ROW(features, h);
    float* h_old = x + features;
    float* h_new = h_old + h;
    const unsigned int* in = inputs + (size_t)row * stride;
    size_t slot = 0;
    bool reset = false;
    if (live) {
        slot = in[features + 2];
        reset = (in[features + 3] & FLAG_RESET) != 0;
        for (unsigned int c = j; c < features; c += h) x[c] = __uint_as_float(in[c]);
        h_old[j] = reset ? 0.0f : states[slot * 2 * h + j];
    }
    __syncthreads();
    if (live) {
        float g[4], rec[4];
        for (unsigned int gate = 0; gate < 4; ++gate) {
            g[gate] = input_gate(gate * h + j, 4 * h, features, x, in, item_buckets, category_buckets, bias_in, dense_cols, item_rows, category_rows);
            rec[gate] = recurrent_gate(gate, 4, j, hm, recurrent_cols, h_old);
        }
        const float i = sigmoid_fixed(g[0] + rec[0]);
        const float f = sigmoid_fixed(g[1] + rec[1]);
        const float cand = tanh_fixed(g[2] + rec[2]);
        const float o = sigmoid_fixed(g[3] + rec[3]);
        const float c_old = reset ? 0.0f : states[slot * 2 * h + h + j];
        // h from the unrounded c, then both rounded: as the CPU rounds the whole state after.
        const float c = f * c_old + i * cand;
        h_new[j] = kept(o * tanh_fixed(c), precision);
        h_new[h + j] = kept(c, precision);
    }
    __syncthreads();
    if (precision == PRECISION_INT8) int8_round_row(h_new, j, h, 2, live);
    if (live) {
        states[slot * 2 * h + j] = h_new[j];
        states[slot * 2 * h + h + j] = h_new[h + j];
    }
    if (live && j == 0) logits[row] = head_logit(h, head, head_bias, h_new);
}

#define CNN_TAPS 3

// One step of the causal convolution; threads, blocks and shared memory as gru_step. A row's
// state is [y | P_1 | P_2]: each unit's thread reads its taps u_m of the event and writes
// y = relu(u_0 + P_1), P_1 = u_1 + P_2, P_2 = u_2 (no recurrence: no other unit's values).
extern "C" __global__ void cnn_step(
    unsigned int rows, unsigned int h, unsigned int features,
    unsigned int item_buckets, unsigned int category_buckets,
    const float* __restrict__ bias_in, const float* __restrict__ dense_cols,
    const float* __restrict__ item_rows, const float* __restrict__ category_rows,
    const float* __restrict__ head, float head_bias, unsigned int precision,
    const unsigned int* __restrict__ inputs, float* __restrict__ states, float* __restrict__ logits) {
    extern __shared__ float shared[];
    const unsigned int stride = features + 4;
    const unsigned int rows_per_block = blockDim.x / h;
    const unsigned int local = threadIdx.x / h;
    const unsigned int j = threadIdx.x % h;
    const unsigned int row = blockIdx.x * rows_per_block + local;
    const bool live = local < rows_per_block && row < rows;
    float* x = shared + local * SHARED_PER_ROW(features, h);
    float* y = x + features + h;
    const unsigned int* in = inputs + (size_t)row * stride;
    size_t slot = 0;
    if (live) {
        for (unsigned int c = j; c < features; c += h) x[c] = __uint_as_float(in[c]);
    }
    __syncthreads();
    if (live) {
        slot = in[features + 2];
        const bool reset = (in[features + 3] & FLAG_RESET) != 0;
        float u[CNN_TAPS];
        for (unsigned int m = 0; m < CNN_TAPS; ++m) {
            u[m] = input_gate(m * h + j, CNN_TAPS * h, features, x, in, item_buckets, category_buckets, bias_in, dense_cols, item_rows, category_rows);
        }
        const float* old = states + slot * CNN_TAPS * h;
        const float p1 = reset ? 0.0f : old[h + j];
        const float p2 = reset ? 0.0f : old[2 * h + j];
        const float pre = u[0] + p1;
        y[j] = kept(pre < 0.0f ? 0.0f : pre, precision);
        y[h + j] = kept(u[1] + p2, precision);
        y[2 * h + j] = kept(u[2], precision);
    }
    __syncthreads();
    if (precision == PRECISION_INT8) int8_round_row(y, j, h, CNN_TAPS, live);
    if (live) {
        float* state = states + slot * CNN_TAPS * h;
        for (unsigned int m = 0; m < CNN_TAPS; ++m) state[m * h + j] = y[m * h + j];
    }
    if (live && j == 0) logits[row] = head_logit(h, head, head_bias, y);
}

// states[slots[i]] = hidden[i] for each of n rows.
extern "C" __global__ void scatter_states(unsigned int n, unsigned int h, const unsigned int* __restrict__ slots,
                                          const float* __restrict__ hidden, float* __restrict__ states) {
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)n * h) return;
    const size_t i = t / h, j = t % h;
    states[(size_t)slots[i] * h + j] = hidden[t];
}

// hidden[i] = states[slots[i]] for each of n rows.
extern "C" __global__ void gather_states(unsigned int n, unsigned int h, const unsigned int* __restrict__ slots,
                                         const float* __restrict__ states, float* __restrict__ hidden) {
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)n * h) return;
    const size_t i = t / h, j = t % h;
    hidden[t] = states[(size_t)slots[i] * h + j];
}
