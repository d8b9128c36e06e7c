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
//   f16_states     u32          1: every new state value is rounded to f16 and back (to nearest,
//                               ties to even), as the CPU kernel rounds a model trained with
//                               --state-precision f16, before the head reads it; 0: kept in f32
//   inputs (u32)   rows x (F+4) dense feature bits, item bucket, category bucket, slot, flags
//   states         capacity x S the resident states ([h | c] for an LSTM), updated in place
//   logits         rows         the head's raw logits

#define FLAG_RESET 1u

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
// rounds on the CPU) and widened back; else unchanged.
__device__ __forceinline__ float kept(float x, unsigned int f16_states) {
    if (!f16_states) return x;
    unsigned short half_bits;
    float widened;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(half_bits) : "f"(x));
    asm("cvt.f32.f16 %0, %1;" : "=f"(widened) : "h"(half_bits));
    return widened;
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
// rows_per_block * (F + 2H) floats.
extern "C" __global__ void gru_step(
    unsigned int rows, unsigned int h, unsigned int hm, unsigned int features,
    unsigned int item_buckets, unsigned int category_buckets,
    const float* __restrict__ bias_in, const float* __restrict__ dense_cols,
    const float* __restrict__ item_rows, const float* __restrict__ category_rows,
    const float* __restrict__ recurrent_cols, const float* __restrict__ bias_hn,
    const float* __restrict__ head, float head_bias, unsigned int f16_states,
    const unsigned int* __restrict__ inputs, float* __restrict__ states, float* __restrict__ logits) {
    extern __shared__ float shared[];
    const unsigned int stride = features + 4;
    const unsigned int rows_per_block = blockDim.x / h;
    const unsigned int local = threadIdx.x / h;
    const unsigned int j = threadIdx.x % h;
    const unsigned int row = blockIdx.x * rows_per_block + local;
    const bool live = local < rows_per_block && row < rows;
    float* x = shared + local * (features + 2 * h);
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
        const float next = kept(n + z * (h_old[j] - n), f16_states);
        h_new[j] = next;
        states[slot * h + j] = next;
    }
    __syncthreads();
    if (live && j == 0) logits[row] = head_logit(h, head, head_bias, h_new);
}

// One LSTM step; threads, blocks and shared memory as gru_step. A row's state is [h | c]: h in
// shared memory for the recurrent products, c read and written by its unit's thread only.
extern "C" __global__ void lstm_step(
    unsigned int rows, unsigned int h, unsigned int hm, unsigned int features,
    unsigned int item_buckets, unsigned int category_buckets,
    const float* __restrict__ bias_in, const float* __restrict__ dense_cols,
    const float* __restrict__ item_rows, const float* __restrict__ category_rows,
    const float* __restrict__ recurrent_cols,
    const float* __restrict__ head, float head_bias, unsigned int f16_states,
    const unsigned int* __restrict__ inputs, float* __restrict__ states, float* __restrict__ logits) {
    extern __shared__ float shared[];
    const unsigned int stride = features + 4;
    const unsigned int rows_per_block = blockDim.x / h;
    const unsigned int local = threadIdx.x / h;
    const unsigned int j = threadIdx.x % h;
    const unsigned int row = blockIdx.x * rows_per_block + local;
    const bool live = local < rows_per_block && row < rows;
    float* x = shared + local * (features + 2 * h);
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
        const float next = kept(o * tanh_fixed(c), f16_states);
        h_new[j] = next;
        states[slot * 2 * h + j] = next;
        states[slot * 2 * h + h + j] = kept(c, f16_states);
    }
    __syncthreads();
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
    const float* __restrict__ head, float head_bias, unsigned int f16_states,
    const unsigned int* __restrict__ inputs, float* __restrict__ states, float* __restrict__ logits) {
    extern __shared__ float shared[];
    const unsigned int stride = features + 4;
    const unsigned int rows_per_block = blockDim.x / h;
    const unsigned int local = threadIdx.x / h;
    const unsigned int j = threadIdx.x % h;
    const unsigned int row = blockIdx.x * rows_per_block + local;
    const bool live = local < rows_per_block && row < rows;
    float* x = shared + local * (features + 2 * h);
    float* y = x + features + h;
    const unsigned int* in = inputs + (size_t)row * stride;
    if (live) {
        for (unsigned int c = j; c < features; c += h) x[c] = __uint_as_float(in[c]);
    }
    __syncthreads();
    if (live) {
        const size_t slot = in[features + 2];
        const bool reset = (in[features + 3] & FLAG_RESET) != 0;
        float u[CNN_TAPS];
        for (unsigned int m = 0; m < CNN_TAPS; ++m) {
            u[m] = input_gate(m * h + j, CNN_TAPS * h, features, x, in, item_buckets, category_buckets, bias_in, dense_cols, item_rows, category_rows);
        }
        float* state = states + slot * CNN_TAPS * h;
        const float p1 = reset ? 0.0f : state[h + j];
        const float p2 = reset ? 0.0f : state[2 * h + j];
        const float pre = u[0] + p1;
        const float out = kept(pre < 0.0f ? 0.0f : pre, f16_states);
        y[j] = out;
        state[j] = out;
        state[h + j] = kept(u[1] + p2, f16_states);
        state[2 * h + j] = kept(u[2], f16_states);
    }
    __syncthreads();
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
