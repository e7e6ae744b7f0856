// conv.cu — causal depthwise conv1d with a rolling input state, and the block-diagonal ("headwise")
// projection of the xlstm-lm blocks.
//
// conv: weights w [K, ch] tap-major (tap K−1 multiplies the current input), bias [ch]; the state
// [B, K−1, ch] holds each sequence's previous inputs, oldest first.
//   y[t, c] = bias[c] + Σ_tap w[tap, c]·x[t − (K−1) + tap, c] (inputs before the segment from the
//   state), then SiLU when `silu`.
// conv_seq_out: outputs of one segment, grid-stride over seq·ch (256 threads a block).
// conv_seq_state: advances the state past the segment, one thread per channel (reads its K−1 old
//   values into registers first, so the in-place update has no hazard). Runs after conv_seq_out.
// conv_step: one input per sequence, one thread per (b, c); computes y and shifts the state.
// Limits: K ≤ 17 (K−1 ≤ 16 state taps held in registers).
// headwise: out[r, b·dout + o] = Σ_j w[b, o, j]·x[r, b·din + j] (+ bias[b·dout + o]); one thread per
//   output element, grid-stride; the inner loop over din (small: headwise blocks are 4..DH wide).

__device__ __forceinline__ float silu_(float v) { return v / (1.f + expf(-v)); }

extern "C" __global__ void conv_seq_out(int ch, int K, int seq, const float* x, const float* w, const float* bias,
                                        const float* state, int silu, float* out) {
    const int taps = K - 1;
    long long total = (long long)seq * ch;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        int t = (int)(e / ch), c = (int)(e % ch);
        float acc = bias[c];
        for (int tap = 0; tap < K; ++tap) {
            int tau = t - taps + tap;
            float xv = tau >= 0 ? x[(long long)tau * ch + c] : state[(long long)(taps + tau) * ch + c];
            acc = fmaf(w[(long long)tap * ch + c], xv, acc);
        }
        out[e] = silu ? silu_(acc) : acc;
    }
}

extern "C" __global__ void conv_seq_state(int ch, int K, int seq, const float* x, float* state) {
    const int taps = K - 1;
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= ch || taps <= 0) return;
    float old[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) if (j < taps) old[j] = state[(long long)j * ch + c];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        if (j >= taps) break;
        int tau = seq - taps + j;
        float val = 0.f;
        if (tau >= 0) val = x[(long long)tau * ch + c];
        else {
#pragma unroll
            for (int i = 0; i < 16; ++i) if (i == taps + tau) val = old[i];
        }
        state[(long long)j * ch + c] = val;
    }
}

extern "C" __global__ void conv_step(int ch, int K, int batch, const float* x, const float* w, const float* bias,
                                     float* state, int silu, float* out) {
    const int taps = K - 1;
    long long total = (long long)batch * ch;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        int b = (int)(e / ch), c = (int)(e % ch);
        float* st = state + (long long)b * taps * ch + c;
        float xv = x[e];
        float acc = bias[c];
        for (int tap = 0; tap < taps; ++tap) acc = fmaf(w[(long long)tap * ch + c], st[(long long)tap * ch], acc);
        acc = fmaf(w[(long long)taps * ch + c], xv, acc);
        for (int tap = 0; tap + 1 < taps; ++tap) st[(long long)tap * ch] = st[(long long)(tap + 1) * ch];
        if (taps > 0) st[(long long)(taps - 1) * ch] = xv;
        out[e] = silu ? silu_(acc) : acc;
    }
}

extern "C" __global__ void headwise(const float* x, int rows, const float* w, int blocks, int din, int dout,
                                    const float* bias, float* out) {
    long long n = (long long)rows * blocks * dout;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        int o = (int)(e % dout);
        int b = (int)((e / dout) % blocks);
        long long r = e / ((long long)dout * blocks);
        const float* xr = x + r * blocks * din + (long long)b * din;
        const float* wr = w + ((long long)b * dout + o) * din;
        float acc = 0.f;
        for (int j = 0; j < din; ++j) acc = fmaf(wr[j], xr[j], acc);
        if (bias) acc += bias[b * dout + o];
        out[e] = acc;
    }
}
