// slstm.cu — the sLSTM cell (stabilised exponential gating, Beck et al. 2024 §2.2), step and sequence.
//
// Layouts (see Backend::slstm_step): H = NH·DH channels, head-major. Gate inputs gi, gf, gz, go
// [rows, H]; recurrent kernel r [NH, 4·DH, DH] (rows gate-major: r[h, g·DH + o, j]); bias [4·H]
// gate-major; state c, n, m, hs [B, H]; output y [rows, H].
// Per step, per channel: raw_g = gate_g + Σ_j r[h, g·DH + o, j]·h_prev[j] + bias_g;
//   lfm = m + logsigmoid(raw_f); m' = raw_i if the sequence is fresh (its head's n all zero) else
//   max(raw_i, lfm); i = min(e^(raw_i − m'), 1); f = min(e^(lfm − m'), 1); c' = f c + i tanh(raw_z);
//   n' = f n + i; h' = σ(raw_o)·c'/n'.
// slstm_run: grid = (NH, B), block = 256; runs T consecutive steps of sequence b (gate row b·T + t):
//   T = 1 for a batched step, B = 1 for a sequence. Dynamic shared memory 5·DH floats (h_prev and the
//   4·DH raw pre-activations). Freshness is judged per head (n of the head all zero), which equals the
//   per-sequence rule for states this engine makes (every step updates every channel's n).
// Limits: 5·DH·4 bytes of shared memory (DH ≤ 2400).

extern "C" __global__ void __launch_bounds__(256) slstm_run(
    int H, int NH, int T,
    const float* gi, const float* gf, const float* gz, const float* go,
    const float* r, const float* bias,
    float* c, float* n, float* m, float* hs, float* y) {
    extern __shared__ float sm[];
    __shared__ float red[32];
    const int DH = H / NH;
    float* hp = sm;
    float* raw = sm + DH;
    const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const long long sbase = (long long)b * H + (long long)h * DH;
    float nz = 0.f;
    for (int d = tid; d < DH; d += blockDim.x) {
        hp[d] = hs[sbase + d];
        if (n[sbase + d] != 0.f) nz += 1.f;
    }
    bool fresh = block_sum(nz, red) == 0.f;
    const float* rh = r + (long long)h * 4 * DH * DH;
    for (int t = 0; t < T; ++t) {
        const long long row = (long long)b * T + t;
        __syncthreads();
        for (int e = tid; e < 4 * DH; e += blockDim.x) {
            int g = e / DH, o = e % DH;
            const float* rr = rh + (long long)e * DH;
            float acc = 0.f;
            for (int j = 0; j < DH; ++j) acc = fmaf(rr[j], hp[j], acc);
            const float* gp = g == 0 ? gi : g == 1 ? gf : g == 2 ? gz : go;
            raw[e] = gp[row * H + (long long)h * DH + o] + acc + bias[(long long)g * H + (long long)h * DH + o];
        }
        __syncthreads();
        for (int d = tid; d < DH; d += blockDim.x) {
            float ir = raw[d], fr = raw[DH + d], zr = raw[2 * DH + d], orr = raw[3 * DH + d];
            float lfm = m[sbase + d] + log_sigmoid(fr);
            float mn = fresh ? ir : fmaxf(ir, lfm);
            float ia = fminf(expf(ir - mn), 1.f);
            float fa = fminf(expf(lfm - mn), 1.f);
            float og = 1.f / (1.f + expf(-orr));
            float cn = fa * c[sbase + d] + ia * tanhf(zr);
            float nn = fa * n[sbase + d] + ia;
            c[sbase + d] = cn;
            n[sbase + d] = nn;
            m[sbase + d] = mn;
            float hv = og * cn / nn;
            hp[d] = hv;
            y[row * H + (long long)h * DH + d] = hv;
        }
        fresh = false;
    }
    __syncthreads();
    for (int d = tid; d < DH; d += blockDim.x) hs[sbase + d] = hp[d];
}
