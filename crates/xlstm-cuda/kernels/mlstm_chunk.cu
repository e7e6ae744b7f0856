// mlstm_chunk.cu — the chunkwise-parallel mLSTM prefill of one sequence (batch 1): a recurrent pass
// over the chunks computes the state entering each chunk, then every chunk's outputs are formed in
// parallel from that state and the chunk's own keys and values (the design of TFLA in NX-AI's
// mlstm_kernels: intra-chunk tiles, inter-chunk state recurrence). Math: shared/NOTES.md §2; layouts
// as in mlstm.cu. Chunk length L ≤ 64; the last chunk may be shorter (the math holds for any split).
//
// Three implementations, chosen on the host:
// - CUDA cores, f32 (any shape, any GPU): mlstm_chunk_states, mlstm_chunk_out, each deriving the
//   gate terms it needs itself.
// - Tensor cores, TF32 mma.sync (sm_80+, DK % 64 == 0, DV % 128 == 0, 16-byte aligned rows):
//   mlstm_chunk_gates (every chunk's gate terms, once), then mlstm_chunk_states_tc*,
//   mlstm_chunk_out_tc*, which read them. The `_exact` variants split every operand into two
//   TF32 parts (x = hi + lo, product ≈ hi·hi + hi·lo + lo·hi), which keeps f32 accuracy at three
//   times the tensor-core work; the plain ones hand the tensor cores the f32 bits, which they read as
//   TF32 (10-bit mantissa, rounded toward zero), what a model with 16-bit weights already carries,
//   and pass the states entering the chunks (Cs) as bf16, the precision NX-AI's TFLA kernels give C
//   in that product: half the bytes the two kernels store and load. Their q, k, v rows lie ldq,
//   ldk, ldv values apart (column blocks of one merged product's output, or NH·DK, NH·DV); h rows
//   NH·DV. The carried state (C, n, m) stays f32 throughout.
// - Tensor cores, bf16 mma.sync (a bf16 model's merged prompt path; the same shapes):
//   mlstm_chunk_gates, then mlstm_chunk_states_bf16, mlstm_chunk_out_bf16 on bf16 q, k, v (see
//   the section at the end).
//
// mlstm_chunk_states*: grid = (DV/64, DK/64, NH), block = 256. Runs the chunks in order for a 64×64
//   tile of C (registers), saving the state entering each chunk (Cs [nc, NH, DK, DV]: f32, bf16 in
//   the plain and bf16 tensor-core kernels; ns [nc, NH, DK]; the CUDA-core kernel also
//   ms [nc + 1, NH], the last row being the final m) and writing the final C, n to the state.
// mlstm_chunk_out (CUDA cores): grid = (ceil(DV/64), nc, NH); mlstm_chunk_out_{tc*,bf16}: grid = (DV/128,
//   nc, NH); block = 256. For one chunk and a block of DV columns: S = Q Kᵀ and Q C_prev over DK, the
//   decay matrix and stabiliser, then H = decay·Q C_prev + S̃ V, divided by the denominator. In the
//   CUDA-core kernel blocks (0, 0, h) copy the final m (mlstm_chunk_gates writes it for the others).

// One warp, for the chunk starting at t0 with L tokens: lf_t = logsigmoid(f̃_t), b_t = Σ_{s≤t} lf_s
// (inclusive) into sb[64], ĩ_t into sig[64] (lf = 0 and ĩ = −inf for t ≥ L); lane takes entries lane
// and lane + 32. The caller syncs.
__device__ __forceinline__ void chunk_scan(const float* ig, const float* fg, int NH, int h, int t0, int L, float* sb, float* sig) {
    const int lane = threadIdx.x & 31;
    const float f0 = lane < L ? fg[(long long)(t0 + lane) * NH + h] : 0.f;
    const float f1 = lane + 32 < L ? fg[(long long)(t0 + lane + 32) * NH + h] : 0.f;
    const float i0 = lane < L ? ig[(long long)(t0 + lane) * NH + h] : NEG_INF;
    const float i1 = lane + 32 < L ? ig[(long long)(t0 + lane + 32) * NH + h] : NEG_INF;
    float lf0 = lane < L ? log_sigmoid(f0) : 0.f;
    float lf1 = lane + 32 < L ? log_sigmoid(f1) : 0.f;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float y0 = __shfl_up_sync(0xffffffffu, lf0, o);
        float y1 = __shfl_up_sync(0xffffffffu, lf1, o);
        if (lane >= o) { lf0 += y0; lf1 += y1; }
    }
    float tot0 = __shfl_sync(0xffffffffu, lf0, 31);
    sb[lane] = lf0;
    sb[lane + 32] = lf1 + tot0;
    sig[lane] = i0;
    sig[lane + 32] = i1;
}

// One warp (the chunk-states kernels): after chunk_scan, the weights of the chunk's keys
// sw_t = exp(b_{L−1} − b_t + ĩ_t − m_new), the carried state's decay exp(b_{L−1} + m_prev − m_new) and
// m_new = max(b_{L−1} + m_prev, max_t(b_{L−1} − b_t + ĩ_t)).
__device__ __forceinline__ void chunk_state_gates(const float* sb, const float* sig, int L, float mp, float* sw, float* decay, float* mnew) {
    const int lane = threadIdx.x & 31;
    const float g = sb[L - 1];
    float a_0 = lane < L ? g - sb[lane] + sig[lane] : NEG_INF;
    float a_1 = lane + 32 < L ? g - sb[lane + 32] + sig[lane + 32] : NEG_INF;
    float mx = warp_max(fmaxf(a_0, a_1));
    float mn = fmaxf(g + mp, mx);
    sw[lane] = lane < L ? expf(a_0 - mn) : 0.f;
    sw[lane + 32] = lane + 32 < L ? expf(a_1 - mn) : 0.f;
    if (lane == 0) { *decay = expf(g + mp - mn); *mnew = mn; }
}

// One warp (the chunk-output kernels): the gates of the chunk at t0 (sb, sig as chunk_scan), the
// stabiliser mc_t = max(b_t + m_prev, b_t + max_{s≤t}(ĩ_s − b_s)) and the decay of the carried state
// sdec_t = exp(b_t + m_prev − mc_t).
__device__ __forceinline__ void chunk_out_gates(const float* ig, const float* fg, int NH, int h, int t0, int L, float mp,
                                                float* sb, float* sig, float* smc, float* sdec) {
    const int lane = threadIdx.x & 31;
    chunk_scan(ig, fg, NH, h, t0, L, sb, sig);
    __syncwarp();
    float x0 = lane < L ? sig[lane] - sb[lane] : NEG_INF;
    float x1 = lane + 32 < L ? sig[lane + 32] - sb[lane + 32] : NEG_INF;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float y0 = __shfl_up_sync(0xffffffffu, x0, o);
        float y1 = __shfl_up_sync(0xffffffffu, x1, o);
        if (lane >= o) { x0 = fmaxf(x0, y0); x1 = fmaxf(x1, y1); }
    }
    x1 = fmaxf(x1, __shfl_sync(0xffffffffu, x0, 31));
    float mc0 = fmaxf(sb[lane] + mp, sb[lane] + x0);
    float mc1 = fmaxf(sb[lane + 32] + mp, sb[lane + 32] + x1);
    smc[lane] = mc0;
    smc[lane + 32] = mc1;
    sdec[lane] = expf(sb[lane] + mp - mc0);
    sdec[lane + 32] = expf(sb[lane + 32] + mp - mc1);
}

// What a chunk-output block derives from its place (blockIdx.y = chunk, .z = head): the chunk's first
// token t0 and length Lk, the stabiliser m, normaliser n and C of the state entering it, and (warp 0)
// the chunk's gates into sb, sig, smc, sdec; the scale 1/√DK and row strides. Block (0, 0, h) also
// copies the final m.
struct ChunkOut {
    int t0, Lk;
    float mp, scale;
    long long qrow, vrow;  // row strides of q, k and of v, h
    const float* Cp;
    const float* np;
};
__device__ __forceinline__ ChunkOut chunk_out_begin(int NH, int DK, int DV, int seq, int L, const float* ig, const float* fg,
                                                    const float* Cs, const float* ns, const float* ms, float* m,
                                                    float* sb, float* sig, float* smc, float* sdec) {
    const int h = blockIdx.z, kc = blockIdx.y;
    ChunkOut c;
    c.t0 = kc * L;
    c.Lk = min(L, seq - c.t0);
    c.mp = ms[(long long)kc * NH + h];
    if (blockIdx.x == 0 && kc == 0 && threadIdx.x == 0) m[h] = ms[(long long)((seq + L - 1) / L) * NH + h];
    c.Cp = Cs + ((long long)kc * NH + h) * DK * DV;
    c.np = ns + ((long long)kc * NH + h) * DK;
    c.scale = 1.f / sqrtf((float)DK);
    c.qrow = (long long)NH * DK;
    c.vrow = (long long)NH * DV;
    if (threadIdx.x < 32) chunk_out_gates(ig, fg, NH, h, c.t0, c.Lk, c.mp, sb, sig, smc, sdec);
    return c;
}

extern "C" __global__ void __launch_bounds__(256) mlstm_chunk_states(
    int NH, int DK, int DV, int seq, int L,
    const float* k, const float* v, const float* ig, const float* fg,
    float* C, float* n, const float* m,
    float* Cs, float* ns, float* ms) {
    __shared__ float kw[64][65];
    __shared__ float vt[64][64];
    __shared__ float sb[64], sig[64], sw[64];
    __shared__ float s_decay, s_mnew;
    const int h = blockIdx.z;
    const int a0 = blockIdx.y * 64, c0 = blockIdx.x * 64;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int nc = (seq + L - 1) / L;
    const long long qrow = (long long)NH * DK, vrow = (long long)NH * DV;
    float cr[4][4];
    float* Ch = C + (long long)h * DK * DV;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int a = a0 + ty * 4 + i, c = c0 + tx * 4 + j;
            cr[i][j] = (a < DK && c < DV) ? Ch[(long long)a * DV + c] : 0.f;
        }
    const bool own_n = blockIdx.x == 0;
    float nr = 0.f;  // thread tid < 64 owns n[a0 + tid]
    if (own_n && tid < 64 && a0 + tid < DK) nr = n[(long long)h * DK + a0 + tid];
    float mp = m[h];
    for (int kc = 0; kc < nc; ++kc) {
        const int t0 = kc * L;
        const int Lk = min(L, seq - t0);
        // save the state entering this chunk
        float* Csk = Cs + ((long long)kc * NH + h) * DK * DV;
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int a = a0 + ty * 4 + i, c = c0 + tx * 4 + j;
                if (a < DK && c < DV) Csk[(long long)a * DV + c] = cr[i][j];
            }
        if (own_n && tid < 64 && a0 + tid < DK) ns[((long long)kc * NH + h) * DK + a0 + tid] = nr;
        if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) ms[(long long)kc * NH + h] = mp;
        if (tid < 32) {
            chunk_scan(ig, fg, NH, h, t0, Lk, sb, sig);
            __syncwarp();
            chunk_state_gates(sb, sig, Lk, mp, sw, &s_decay, &s_mnew);
        }
        __syncthreads();
        // weighted keys and values of this chunk for the tile: all 32 loads of a thread in flight
        // at once, then the stores
        {
            float kr[16], vr[16];
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                int e = tid + 256 * i, t = e >> 6, j = e & 63;
                bool in_t = t < Lk;
                kr[i] = (in_t && a0 + j < DK) ? k[(long long)(t0 + t) * qrow + (long long)h * DK + a0 + j] : 0.f;
                vr[i] = (in_t && c0 + j < DV) ? v[(long long)(t0 + t) * vrow + (long long)h * DV + c0 + j] : 0.f;
            }
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                int e = tid + 256 * i, t = e >> 6, j = e & 63;
                kw[t][j] = kr[i] * sw[t];
                vt[t][j] = vr[i];
            }
        }
        __syncthreads();
        const float dec = s_decay;
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) cr[i][j] *= dec;
        for (int t = 0; t < Lk; ++t) {
            float kk[4], vv[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) kk[i] = kw[t][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) vv[j] = vt[t][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) cr[i][j] = fmaf(kk[i], vv[j], cr[i][j]);
        }
        if (own_n && tid < 64) {
            float s = nr * dec;
            for (int t = 0; t < Lk; ++t) s += kw[t][tid];
            nr = s;
        }
        mp = s_mnew;
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int a = a0 + ty * 4 + i, c = c0 + tx * 4 + j;
            if (a < DK && c < DV) Ch[(long long)a * DV + c] = cr[i][j];
        }
    if (own_n && tid < 64 && a0 + tid < DK) n[(long long)h * DK + a0 + tid] = nr;
    if (blockIdx.x == 0 && blockIdx.y == 0 && tid == 0) ms[(long long)nc * NH + h] = mp;
}

extern "C" __global__ void __launch_bounds__(256) mlstm_chunk_out(
    int NH, int DK, int DV, int seq, int L,
    const float* q, const float* k, const float* v, const float* ig, const float* fg,
    const float* Cs, const float* ns, const float* ms, float* m, float eps, float* hout) {
    __shared__ float uni[64 * 64];  // phase 1: Qt, Kt [64][17], Ct [16][64] (3200 floats); phase 2: V tile [64][64]
    __shared__ float S[64][65];
    __shared__ float sb[64], sig[64], smc[64], sdec[64], sqn[64], sden[64];
    float (*Qt)[17] = (float (*)[17])uni;
    float (*Kt)[17] = (float (*)[17])(uni + 64 * 17);
    float (*Ct)[64] = (float (*)[64])(uni + 64 * 17 * 2);
    float (*Vt)[64] = (float (*)[64])uni;
    const int h = blockIdx.z, c0 = blockIdx.x * 64;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const ChunkOut co = chunk_out_begin(NH, DK, DV, seq, L, ig, fg, Cs, ns, ms, m, sb, sig, smc, sdec);
    const int t0 = co.t0, Lk = co.Lk;
    const long long qrow = co.qrow, vrow = co.vrow;
    const float *Cp = co.Cp, *np = co.np, scale = co.scale;
    float sacc[4][4], hacc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) { sacc[i][j] = 0.f; hacc[i][j] = 0.f; }
    float qn = 0.f;  // thread tid < 64: q_t · n_prev for t = tid
    // Tiles of 16 along DK; the next tile's 12 values per thread are loaded into registers while the
    // current one is used (software pipelining), so the loop is not bound by load latency.
    float pq[4], pk[4], pc[4];
    auto load_tile = [&](int a0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int e = tid + 256 * i;
            int t = e >> 4, a = e & 15;
            bool ok = t < Lk && a0 + a < DK;
            pq[i] = ok ? q[(long long)(t0 + t) * qrow + (long long)h * DK + a0 + a] : 0.f;
            pk[i] = ok ? k[(long long)(t0 + t) * qrow + (long long)h * DK + a0 + a] : 0.f;
            int ca = e >> 6, cc = e & 63;
            pc[i] = (a0 + ca < DK && c0 + cc < DV) ? Cp[(long long)(a0 + ca) * DV + c0 + cc] : 0.f;
        }
    };
    load_tile(0);
    for (int a0 = 0; a0 < DK; a0 += 16) {
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int e = tid + 256 * i;
            Qt[e >> 4][e & 15] = pq[i];
            Kt[e >> 4][e & 15] = pk[i];
            Ct[e >> 6][e & 63] = pc[i];
        }
        __syncthreads();
        if (a0 + 16 < DK) load_tile(a0 + 16);
#pragma unroll
        for (int a = 0; a < 16; ++a) {
            float qa[4], ka[4], ca[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) { qa[i] = Qt[ty * 4 + i][a]; ka[i] = Kt[tx * 4 + i][a]; ca[i] = Ct[a][tx * 4 + i]; }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    sacc[i][j] = fmaf(qa[i], ka[j], sacc[i][j]);
                    hacc[i][j] = fmaf(qa[i], ca[j], hacc[i][j]);
                }
        }
        if (tid < 64) {
            float s = 0.f;
            for (int a = 0; a < 16 && a0 + a < DK; ++a) s = fmaf(Qt[tid][a], np[a0 + a], s);
            qn += s;
        }
    }
    // decayed, masked, scaled S̃ into shared memory
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int t = ty * 4 + i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int s = tx * 4 + j;
            float val = 0.f;
            if (s <= t && t < Lk) val = scale * sacc[i][j] * expf(sb[t] - sb[s] + sig[s] - smc[t]);
            S[t][s] = val;
        }
    }
    if (tid < 64) sqn[tid] = qn;
    __syncthreads();  // S complete; phase-1 tiles no longer needed
    if (tid < 64) {
        int t = tid;
        float rs = 0.f;
        for (int s = 0; s < 64; ++s) rs += S[t][s];
        float den = sdec[t] * sqn[t] * scale + rs;
        sden[t] = fmaxf(fabsf(den), expf(-smc[t])) + eps;
    }
    {
        float vr[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            int e = tid + 256 * i, s = e >> 6, c = e & 63;
            vr[i] = (s < Lk && c0 + c < DV) ? v[(long long)(t0 + s) * vrow + (long long)h * DV + c0 + c] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            int e = tid + 256 * i;
            Vt[e >> 6][e & 63] = vr[i];
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int t = ty * 4 + i;
        float d = sdec[t] * scale;
#pragma unroll
        for (int j = 0; j < 4; ++j) hacc[i][j] *= d;
    }
    for (int s = 0; s < 64; ++s) {
        float sv[4], vv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) sv[i] = S[ty * 4 + i][s];
#pragma unroll
        for (int j = 0; j < 4; ++j) vv[j] = Vt[s][tx * 4 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) hacc[i][j] = fmaf(sv[i], vv[j], hacc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int t = ty * 4 + i;
        if (t >= Lk) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int c = c0 + tx * 4 + j;
            if (c < DV) hout[(long long)(t0 + t) * vrow + (long long)h * DV + c] = hacc[i][j] / sden[t];
        }
    }
}

// ---- the gate terms of every chunk, for the tensor-core kernels -----------------------------------
// mlstm_chunk_gates: grid = NH, block = 1024 (any multiple of 32). Every chunk's gate terms into G
//   ([nc, NH, CG_STRIDE]): sb, sig (chunk_scan), smc, sdec (as chunk_out_gates), sw and the carried
//   state's decay (as chunk_state_gates); m[h] becomes the final stabiliser. Per chunk one warp; the
//   stabilisers entering the chunks form a recurrence that one warp scans. Computed once here, the
//   states kernel's chunk loop and every output block no longer wait on one warp's gate math.
#define CG_SB 0
#define CG_SIG 64
#define CG_MC 128
#define CG_DEC 192
#define CG_SW 256
#define CG_DECAY 320
#define CG_G 321   // b_{L-1}: the chunk's summed log forget gates
#define CG_MX 322  // max_t (b_{L-1} − b_t + ĩ_t)
#define CG_MP 323  // the stabiliser entering the chunk
#define CG_MN 324  // and leaving it
#define CG_STRIDE 328

extern "C" __global__ void __launch_bounds__(1024) mlstm_chunk_gates(int NH, int seq, int L, const float* ig, const float* fg, float* m, float* G) {
    const int h = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int nc = (seq + L - 1) / L;
    for (int c = warp; c < nc; c += nw) {
        float* g = G + ((long long)c * NH + h) * CG_STRIDE;
        const int Lk = min(L, seq - c * L);
        chunk_scan(ig, fg, NH, h, c * L, Lk, g + CG_SB, g + CG_SIG);
        __syncwarp();
        const float sb0 = g[CG_SB + lane], sb1 = g[CG_SB + lane + 32];
        const float si0 = g[CG_SIG + lane], si1 = g[CG_SIG + lane + 32];
        // prefix max of ĩ_s − b_s (the outputs' stabiliser), kept in the smc slots until m is known
        float x0 = lane < Lk ? si0 - sb0 : NEG_INF, x1 = lane + 32 < Lk ? si1 - sb1 : NEG_INF;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float y0 = __shfl_up_sync(0xffffffffu, x0, o), y1 = __shfl_up_sync(0xffffffffu, x1, o);
            if (lane >= o) { x0 = fmaxf(x0, y0); x1 = fmaxf(x1, y1); }
        }
        x1 = fmaxf(x1, __shfl_sync(0xffffffffu, x0, 31));
        g[CG_MC + lane] = x0;
        g[CG_MC + lane + 32] = x1;
        const float gl = g[CG_SB + Lk - 1];
        const float a0 = lane < Lk ? gl - sb0 + si0 : NEG_INF, a1 = lane + 32 < Lk ? gl - sb1 + si1 : NEG_INF;
        const float mx = warp_max(fmaxf(a0, a1));
        if (lane == 0) { g[CG_G] = gl; g[CG_MX] = mx; }
    }
    __syncthreads();
    // The stabiliser leaving chunk c is f_c(m entering it), f_c(x) = max(x + g_c, mx_c): maps that
    // compose as (g_a, mx_a) then (g_b, mx_b) = (g_a + g_b, max(mx_a + g_b, mx_b)). Warp 0 scans
    // them 32 chunks at a time.
    if (warp == 0) {
        float mp = m[h];
        for (int base = 0; base < nc; base += 32) {
            const int c = base + lane;
            float* g = G + ((long long)c * NH + h) * CG_STRIDE;
            const float gc = c < nc ? g[CG_G] : 0.f;
            float gs = gc, ms = c < nc ? g[CG_MX] : NEG_INF;  // past the end: the identity
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float gp = __shfl_up_sync(0xffffffffu, gs, o), mpv = __shfl_up_sync(0xffffffffu, ms, o);
                if (lane >= o) { ms = fmaxf(mpv + gs, ms); gs = gp + gs; }
            }
            const float mout = fmaxf(mp + gs, ms);
            float min_ = __shfl_up_sync(0xffffffffu, mout, 1);
            if (lane == 0) min_ = mp;
            if (c < nc) {
                g[CG_DECAY] = expf(gc + min_ - mout);
                g[CG_MP] = min_;
                g[CG_MN] = mout;
            }
            mp = __shfl_sync(0xffffffffu, mout, 31);
        }
        if (lane == 0) m[h] = mp;
    }
    __syncthreads();
    for (int c = warp; c < nc; c += nw) {
        float* g = G + ((long long)c * NH + h) * CG_STRIDE;
        const int Lk = min(L, seq - c * L);
        const float mp = g[CG_MP], mn = g[CG_MN], gl = g[CG_G];
        for (int t = lane; t < 64; t += 32) {
            const float sb = g[CG_SB + t];
            const float mc = fmaxf(sb + mp, sb + g[CG_MC + t]);
            g[CG_MC + t] = mc;
            g[CG_DEC + t] = expf(sb + mp - mc);
            g[CG_SW + t] = t < Lk ? expf(gl - sb + g[CG_SIG + t] - mn) : 0.f;
        }
    }
}

// ---- tensor cores (TF32 mma.sync, sm_80+) --------------------------------------------------------
// Fragment layouts and the TF32 helpers: common.cuh. Shared-memory row strides are chosen so each
// fragment read hits 32 banks.

// 16-byte asynchronous copy global → shared; when !ok the destination is zero-filled (src must still
// be a valid address).
__device__ __forceinline__ void cp_async16(float* dst, const float* src, bool ok) {
#if __CUDA_ARCH__ >= 800
    u32 s = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(ok ? 16 : 0) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

#define CHUNK_STATES_PARAMS                                                                          \
    int NH, int DK, int DV, int seq, int L, const float *k, int ldk, const float *v, int ldv,         \
        const float *G, float *C, float *n, float *Cs, float *ns, int stages
#define CHUNK_STATES_ARGS NH, DK, DV, seq, L, k, ldk, v, ldv, G, C, n, Cs, ns, stages

// 8 warps over the 64×64 tile: warp w owns rows (of DK) 16·(w % 4) .. +16 and columns (of DV)
// 32·(w / 4) .. +32, i.e. four m16n8 accumulators. The chunks' keys, values and gate terms stream
// through a ring of `stages` (2 or 3) shared-memory stages filled by cp.async, stages − 1 chunks
// ahead of the one multiplied: a chunk's products are short, so the loop waits on loads, and a
// deeper ring (not more blocks: two fill every SM) hides them. Dynamic shared memory: `stages`
// stages of CS_STAGE floats (f32 operands; 3 stages where a block may have 111 KB, as on sm_80 and
// sm_90) or CB_STAGE bytes (bf16 operands). The key weights w_t multiply the keys as their
// fragments are read; the normaliser's sums Σ_t w_t k_t come from the same fragments (warps 0–3
// cover the tile's 64 rows). Operands (OPS): CS_TF32 plain TF32 on f32 keys and values, CS_EXACT
// split TF32, CS_BF16 bf16 keys and values (mma.m16n8k16 on ldmatrix'd tiles; the weighted keys
// rounded back to bf16). Cs is f32 for CS_EXACT, else bf16.
#define CS_ST 72                         // f32 row stride (floats): fragment reads hit 32 banks
#define CS_STAGE (2 * 64 * CS_ST + 68)  // keys [t][a], values [t][c], w_t and 4 gate terms
#define CB_ST 72                          // bf16 row stride (values): ldmatrix's 8 row addresses
#define CB_STAGE (2 * 64 * CB_ST * 2 + 68 * 4)  // fall in distinct 16-byte bank groups; bytes
#define CS_TF32 0
#define CS_EXACT 1
#define CS_BF16 2
template <int OPS>
__device__ __forceinline__ void chunk_states_body(int NH, int DK, int DV, int seq, int L, const void* k, int ldk, const void* v, int ldv,
                                                  const float* G, float* C, float* n, void* Cs, float* ns, int stages) {
    constexpr bool EXACT = OPS == CS_EXACT;
    constexpr int STAGE_BYTES = OPS == CS_BF16 ? CB_STAGE : CS_STAGE * 4;
    extern __shared__ __align__(16) unsigned char ring[];
    const int h = blockIdx.z, a0 = blockIdx.y * 64, c0 = blockIdx.x * 64;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, qd = lane & 3;
    const int mat = lane >> 3, mr = lane & 7;  // (bf16) the ldmatrix tile and row this lane addresses
    const int rm = (warp & 3) * 16, cw = (warp >> 2) * 32;
    const int nc = (seq + L - 1) / L;
    float* Ch = C + (long long)h * DK * DV;
    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const long long e = (long long)(a0 + rm + g) * DV + c0 + cw + 8 * j + 2 * qd;
        float2 x = *(const float2*)(Ch + e), y = *(const float2*)(Ch + e + 8LL * DV);
        acc[j][0] = x.x; acc[j][1] = x.y; acc[j][2] = y.x; acc[j][3] = y.y;
    }
    // the normaliser's rows rm + g and rm + g + 8 (warps 0–3 of the column-0 blocks, lanes qd == 0 store)
    const bool own_n = blockIdx.x == 0 && warp < 4;
    float n0 = own_n ? n[(long long)h * DK + a0 + rm + g] : 0.f, n1 = own_n ? n[(long long)h * DK + a0 + rm + g + 8] : 0.f;
    auto fill = [&](int kc, int stage) {  // chunk kc into a stage; rows past the chunk's end zero-filled
        unsigned char* st = ring + stage * STAGE_BYTES;
        const int t0 = kc * L, Lk = min(L, seq - t0);
        float* sw;
        if constexpr (OPS == CS_BF16) {
            u16* Ks = (u16*)st;
            u16* Vs = Ks + 64 * CB_ST;
            sw = (float*)(Vs + 64 * CB_ST);
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int e = tid + 256 * i, t = e >> 3, p = (e & 7) * 8;
                const long long r = t0 + (t < Lk ? t : 0);
                cp_async16((float*)(Ks + t * CB_ST + p), (const float*)((const u16*)k + r * ldk + (long long)h * DK + a0 + p), t < Lk);
                cp_async16((float*)(Vs + t * CB_ST + p), (const float*)((const u16*)v + r * ldv + (long long)h * DV + c0 + p), t < Lk);
            }
        } else {
            float* Ks = (float*)st;
            sw = Ks + 128 * CS_ST;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int e = tid + 256 * i, t = e >> 4, p = (e & 15) * 4;
                const long long r = t0 + (t < Lk ? t : 0);
                cp_async16(Ks + t * CS_ST + p, (const float*)k + r * ldk + (long long)h * DK + a0 + p, t < Lk);
                cp_async16(Ks + 64 * CS_ST + t * CS_ST + p, (const float*)v + r * ldv + (long long)h * DV + c0 + p, t < Lk);
            }
        }
        if (tid < 17) cp_async16(sw + 4 * tid, G + ((long long)kc * NH + h) * CG_STRIDE + CG_SW + 4 * tid, true);
    };
    for (int s = 0; s < stages - 1; ++s) {
        if (s < nc) fill(s, s);
        cp_async_commit();
    }
    int rd = 0, wr = stages - 1;  // the stage read this chunk, and the one filled
    for (int kc = 0; kc < nc; ++kc) {
        const int Lk = min(L, seq - kc * L);
        if (stages == 3) cp_async_wait<1>();
        else cp_async_wait<0>();
        __syncthreads();  // chunk kc landed for every thread; every thread is done with chunk kc − 1's stage
        if (kc + stages - 1 < nc) fill(kc + stages - 1, wr);
        cp_async_commit();
        wr = wr + 1 == stages ? 0 : wr + 1;
        const unsigned char* st = ring + rd * STAGE_BYTES;
        rd = rd + 1 == stages ? 0 : rd + 1;
        const float* sw = OPS == CS_BF16 ? (const float*)(st + 2 * 64 * CB_ST * 2) : (const float*)st + 128 * CS_ST;
        // the state entering this chunk
        const long long csk = ((long long)kc * NH + h) * DK * DV;
        if constexpr (EXACT) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const long long e = csk + (long long)(a0 + rm + g) * DV + c0 + cw + 8 * j + 2 * qd;
                *(float2*)((float*)Cs + e) = make_float2(acc[j][0], acc[j][1]);
                *(float2*)((float*)Cs + e + 8LL * DV) = make_float2(acc[j][2], acc[j][3]);
            }
        } else {
            // bf16 pairs; lanes qd, qd ^ 1 swap halves so that each writes 4 adjacent values and a
            // row's 4 lanes fill whole 32-byte sectors (a pair per lane would write half sectors)
            const bool odd = qd & 1;
#pragma unroll
            for (int jj = 0; jj < 4; jj += 2) {
#pragma unroll
                for (int hr = 0; hr < 2; ++hr) {  // rows g, g + 8
                    const u32 w0 = bf16x2_bits(acc[jj][2 * hr], acc[jj][2 * hr + 1]);
                    const u32 w1 = bf16x2_bits(acc[jj + 1][2 * hr], acc[jj + 1][2 * hr + 1]);
                    const u32 got = __shfl_xor_sync(0xffffffffu, odd ? w0 : w1, 1);
                    const int j = jj + odd, col = cw + 8 * j + 2 * (qd & 2);
                    const long long e = csk + (long long)(a0 + rm + g + 8 * hr) * DV + c0 + col;
                    *(uint2*)((u16*)Cs + e) = odd ? make_uint2(got, w1) : make_uint2(w0, got);
                }
            }
        }
        if (own_n && qd == 0) {
            ns[((long long)kc * NH + h) * DK + a0 + rm + g] = n0;
            ns[((long long)kc * NH + h) * DK + a0 + rm + g + 8] = n1;
        }
        const float dec = sw[64];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[j][r] *= dec;
        float p0 = 0.f, p1 = 0.f;
        if constexpr (OPS == CS_BF16) {
            const u16* Ks = (const u16*)st;
            const u16* Vs = Ks + 64 * CB_ST;
            for (int ks = 0; ks < Lk; ks += 16) {  // rows past the chunk's end are zero (keys, values, w)
                // A = (K ∘ w)ᵀ [a][t]: the keys' tiles transposed; A[0], A[2] row a = g, A[1], A[3] g + 8
                u32 A[4];
                ldmatrix_x4_trans(A, Ks + (ks + mr + 8 * (mat >> 1)) * CB_ST + rm + 8 * (mat & 1));
                const float we0 = sw[ks + 2 * qd], wo0 = sw[ks + 2 * qd + 1], we1 = sw[ks + 2 * qd + 8], wo1 = sw[ks + 2 * qd + 9];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float lo = __uint_as_float(A[i] << 16) * (i < 2 ? we0 : we1);
                    const float hi = __uint_as_float(A[i] & 0xffff0000u) * (i < 2 ? wo0 : wo1);
                    if (i & 1) p1 += lo + hi;
                    else p0 += lo + hi;
                    A[i] = bf16x2_bits(lo, hi);
                }
#pragma unroll
                for (int jj = 0; jj < 4; jj += 2) {  // B = V [t][c], n-tiles jj, jj + 1
                    u32 B[4];
                    ldmatrix_x4_trans(B, Vs + (ks + mr + 8 * (mat & 1)) * CB_ST + cw + 8 * (jj + (mat >> 1)));
                    mma_bf16(acc[jj], A, B[0], B[1]);
                    mma_bf16(acc[jj + 1], A, B[2], B[3]);
                }
            }
        } else {
            const float* Ks = (const float*)st;
            const float* Vs = Ks + 64 * CS_ST;
            for (int ks = 0; ks < Lk; ks += 8) {
                const float* k0 = Ks + (ks + qd) * CS_ST + rm + g;
                const float w0 = sw[ks + qd], w1 = sw[ks + qd + 4];
                const float ka[4] = {k0[0] * w0, k0[8] * w0, k0[4 * CS_ST] * w1, k0[4 * CS_ST + 8] * w1};
                p0 += ka[0] + ka[2];
                p1 += ka[1] + ka[3];
                const Tf<4> A = frag<EXACT>(ka);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float* v0 = Vs + (ks + qd) * CS_ST + cw + 8 * j + g;
                    const float vb[2] = {v0[0], v0[4 * CS_ST]};
                    mma_f32<EXACT>(acc[j], A, frag<EXACT>(vb));
                }
            }
        }
        if (own_n) {  // n' = decay·n + Σ_t w_t k_t: the four lanes of a row (qd) hold its partial sums
            p0 += __shfl_xor_sync(0xffffffffu, p0, 1);
            p1 += __shfl_xor_sync(0xffffffffu, p1, 1);
            p0 += __shfl_xor_sync(0xffffffffu, p0, 2);
            p1 += __shfl_xor_sync(0xffffffffu, p1, 2);
            n0 = n0 * dec + p0;
            n1 = n1 * dec + p1;
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const long long e = (long long)(a0 + rm + g) * DV + c0 + cw + 8 * j + 2 * qd;
        *(float2*)(Ch + e) = make_float2(acc[j][0], acc[j][1]);
        *(float2*)(Ch + e + 8LL * DV) = make_float2(acc[j][2], acc[j][3]);
    }
    if (own_n && qd == 0) {
        n[(long long)h * DK + a0 + rm + g] = n0;
        n[(long long)h * DK + a0 + rm + g + 8] = n1;
    }
}

extern "C" __global__ void __launch_bounds__(256) mlstm_chunk_states_tc(CHUNK_STATES_PARAMS) {
    chunk_states_body<CS_TF32>(CHUNK_STATES_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) mlstm_chunk_states_tc_exact(CHUNK_STATES_PARAMS) {
    chunk_states_body<CS_EXACT>(CHUNK_STATES_ARGS);
}

// The chunk's gate terms at gk (mlstm_chunk_gates) entry t into the output kernels' shared arrays.
__device__ __forceinline__ void chunk_out_gate_terms(const float* gk, int t, float* sb, float* sig, float* smc, float* sdec) {
    sb[t] = gk[CG_SB + t];
    sig[t] = gk[CG_SIG + t];
    smc[t] = gk[CG_MC + t];
    sdec[t] = gk[CG_DEC + t];
}
template <int M, int N>
__device__ __forceinline__ void zero_acc(float (&a)[M][N]) {
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j) a[i][j] = 0.f;
}

// The tensor-core output kernels' S̃ = scale · S ⊙ decay (causal; zero past the chunk's end) for
// this lane's accumulators sacc (rows rm + g, rm + g + 8; columns sc + 8j + 2qd, + 1), each pair of
// values handed to store(t, s, x0, x1); the rows' sums of S̃ (over the warp's 32 columns) into
// srs[t], q_t · n_prev (a quarter per thread of the quad) into sqn[tid / 4]. The caller syncs.
template <typename Store>
__device__ __forceinline__ void chunk_out_scores(const float (&sacc)[4][4], int rm, int sc, int Lk, float scale, const float* sb, const float* sig,
                                                 const float* smc, float qn, float* srs, float* sqn, Store store) {
    const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, qd = lane & 3;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int t = rm + g + 8 * hr;
        float rs = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int s = sc + 8 * j + 2 * qd;
            const float x0 = (s <= t && t < Lk) ? scale * sacc[j][2 * hr] * expf(sb[t] - sb[s] + sig[s] - smc[t]) : 0.f;
            const float x1 = (s + 1 <= t && t < Lk) ? scale * sacc[j][2 * hr + 1] * expf(sb[t] - sb[s + 1] + sig[s + 1] - smc[t]) : 0.f;
            rs += x0 + x1;
            store(t, s, x0, x1);
        }
        rs += __shfl_xor_sync(0xffffffffu, rs, 1);
        rs += __shfl_xor_sync(0xffffffffu, rs, 2);
        if (qd == 0) srs[t] = rs;
    }
    qn += __shfl_xor_sync(0xffffffffu, qn, 1);
    qn += __shfl_xor_sync(0xffffffffu, qn, 2);
    if (qd == 0) sqn[tid >> 2] = qn;
}

// Thread t < 64: the denominator of token t, max(|sdec_t · scale · q_t · n_prev + Σ_s S̃_ts|, e^(−mc_t)) + eps.
__device__ __forceinline__ void chunk_out_denominator(const float* sdec, const float* sqn, const float (*srs)[64], const float* smc, float scale, float eps, float* sden) {
    const int t = threadIdx.x;
    if (t < 64) sden[t] = fmaxf(fabsf(sdec[t] * sqn[t] * scale + srs[0][t] + srs[1][t]), expf(-smc[t])) + eps;
}

#define CHUNK_OUT_PARAMS                                                                             \
    int NH, int DK, int DV, int seq, int L, const float *q, int ldq, const float *k, int ldk,         \
        const float *v, int ldv, const float *G, const float *Cs, const float *ns, float eps, float *hout
#define CHUNK_OUT_ARGS NH, DK, DV, seq, L, q, ldq, k, ldk, v, ldv, G, Cs, ns, eps, hout

// 8 warps over 64 rows (tokens) × 128 columns: warp w owns rows 16·(w % 4) .. +16, columns
// 32·(w / 4) .. +32 of S (4 accumulators) and 64·(w / 4) .. +64 of H (8 accumulators). Phase 1
// streams DK in tiles of 16 (Q, K rows and the C_prev tile, double-buffered with cp.async); phase 2
// reuses that shared memory for S̃ and V (two halves of 32 tokens). H's accumulators pair up: in
// the pair (2p, 2p + 1) of a warp's 16 columns from hc + 16p, column n of the fragment is column
// 2n (even accumulator) or 2n + 1 (odd) — so a lane reads two adjacent values of C_prev or V for
// both (one 32-bit word of a plain kernel's bf16 C_prev) and writes four adjacent outputs.
template <bool EXACT>
__device__ __forceinline__ void chunk_out_tc(CHUNK_OUT_PARAMS) {
    // C_prev tile rows: f32 (exact) or bf16 (plain; the row stride in 16-bit values is 144, i.e.
    // 72 words: the 32 lanes' words hit 32 banks)
    constexpr int KT = 16, QS = KT + 4, CS = 128 + 8, CSH = 128 + 16, SS = 64 + 4;
    constexpr int STAGE = 2 * 64 * QS + (EXACT ? KT * CS : KT * CSH / 2);
    constexpr int BUF = 2 * STAGE > 64 * SS + 32 * CS ? 2 * STAGE : 64 * SS + 32 * CS;
    __shared__ __align__(16) float buf[BUF];
    __shared__ __align__(16) float sn[2][KT];  // n_prev's values of the stage's DK tile
    __shared__ float sb[64], sig[64], smc[64], sdec[64], sqn[64], sden[64], srs[2][64];
    const int h = blockIdx.z, c0 = blockIdx.x * 128;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, qd = lane & 3;
    const int rm = (warp & 3) * 16, sc = (warp >> 2) * 32, hc = (warp >> 2) * 64;
    const int kc = blockIdx.y, t0 = kc * L, Lk = min(L, seq - t0);
    const long long hrow = (long long)NH * DV;
    const long long cp0 = ((long long)kc * NH + h) * DK * DV;  // C_prev's first value
    const float* np = ns + ((long long)kc * NH + h) * DK;
    const float scale = 1.f / sqrtf((float)DK);
    // the chunk's gate terms (mlstm_chunk_gates); the first barrier below publishes them
    if (tid < 64) chunk_out_gate_terms(G + ((long long)kc * NH + h) * CG_STRIDE, tid, sb, sig, smc, sdec);
    float sacc[4][4], hacc[8][4];
    zero_acc(sacc);
    zero_acc(hacc);
    float qn = 0.f;  // q_t · n_prev, a quarter of each DK tile per thread (as mlstm_chunk_out_bf16)
    auto issue = [&](int stage, int a0) {
        float* Qs = buf + stage * STAGE;
        float* Ks = Qs + 64 * QS;
        float* Ct = Ks + 64 * QS;
        const int t = tid >> 2, p = (tid & 3) * 4;
        const bool ok = t < Lk;
        const long long r = t0 + (ok ? t : 0), off = (long long)h * DK + a0 + p;
        cp_async16(Qs + t * QS + p, q + r * ldq + off, ok);
        cp_async16(Ks + t * QS + p, k + r * ldk + off, ok);
        if constexpr (EXACT) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int e = tid + 256 * i, r = e >> 5, c = (e & 31) * 4;
                cp_async16(Ct + r * CS + c, Cs + cp0 + (long long)(a0 + r) * DV + c0 + c, true);
            }
        } else {
            const int r = tid >> 4, c = (tid & 15) * 8;
            cp_async16((float*)((u16*)Ct + r * CSH + c), (const float*)((const u16*)Cs + cp0 + (long long)(a0 + r) * DV + c0 + c), true);
        }
        if (tid < KT / 4) cp_async16(sn[stage] + 4 * tid, np + a0 + 4 * tid, true);
        cp_async_commit();
    };
    const int nk = DK / KT;
    issue(0, 0);
    for (int kt = 0; kt < nk; ++kt) {
        if (kt + 1 < nk) issue((kt + 1) & 1, (kt + 1) * KT);
        else cp_async_commit();  // an empty group keeps wait_group's count uniform
        cp_async_wait<1>();
        __syncthreads();
        const float* Qs = buf + (kt & 1) * STAGE;
        const float* Ks = Qs + 64 * QS;
        const float* Ct = Ks + 64 * QS;
#pragma unroll
        for (int ks = 0; ks < KT; ks += 8) {
            const float* q0 = Qs + (rm + g) * QS + ks + qd;
            const float qa[4] = {q0[0], q0[8 * QS], q0[4], q0[8 * QS + 4]};
            const Tf<4> A = frag<EXACT>(qa);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float* k0 = Ks + (sc + 8 * j + g) * QS + ks + qd;
                const float kb[2] = {k0[0], k0[4]};
                mma_f32<EXACT>(sacc[j], A, frag<EXACT>(kb));
            }
#pragma unroll
            for (int p = 0; p < 4; ++p) {  // C_prev's columns hc + 16p + 2g, + 1 (rows ks + qd, + 4)
                float ce[2], co[2];
                if constexpr (EXACT) {
                    const float* c0p = Ct + (ks + qd) * CS + hc + 16 * p + 2 * g;
                    const float2 x = *(const float2*)c0p, y = *(const float2*)(c0p + 4 * CS);
                    ce[0] = x.x; ce[1] = y.x; co[0] = x.y; co[1] = y.y;
                } else {  // a bf16 pair's bits: the low value shifted up, the high one masked
                    const u32* w = (const u32*)((const u16*)Ct + (ks + qd) * CSH + hc + 16 * p + 2 * g);
                    const u32 x = w[0], y = w[2 * CSH];
                    ce[0] = __uint_as_float(x << 16); ce[1] = __uint_as_float(y << 16);
                    co[0] = __uint_as_float(x & 0xffff0000u); co[1] = __uint_as_float(y & 0xffff0000u);
                }
                mma_f32<EXACT>(hacc[2 * p], A, frag<EXACT>(ce));
                mma_f32<EXACT>(hacc[2 * p + 1], A, frag<EXACT>(co));
            }
        }
        {
            const float4 w = *(const float4*)(Qs + (tid >> 2) * QS + (tid & 3) * 4);
            const float* nv = sn[kt & 1] + (tid & 3) * 4;
            qn = fmaf(w.x, nv[0], fmaf(w.y, nv[1], fmaf(w.z, nv[2], fmaf(w.w, nv[3], qn))));
        }
        __syncthreads();
    }
    // Phase 2. S̃ into shared memory (f32), its row sums from the fragments.
    float* Ss = buf;
    float* Vs = buf + 64 * SS;
    chunk_out_scores(sacc, rm, sc, Lk, scale, sb, sig, smc, qn, srs[warp >> 2], sqn, [&](int t, int s, float x0, float x1) { *(float2*)(Ss + t * SS + s) = make_float2(x0, x1); });
    __syncthreads();
    chunk_out_denominator(sdec, sqn, srs, smc, scale, eps, sden);
#pragma unroll
    for (int r = 0; r < 4; r += 2) {
        const float d = sdec[rm + g + 4 * r] * scale;
#pragma unroll
        for (int j = 0; j < 8; ++j) { hacc[j][r] *= d; hacc[j][r + 1] *= d; }
    }
    // H += S̃ V over the chunk's tokens, 32 at a time.
    for (int half = 0; half * 32 < Lk; ++half) {
        if (half) __syncthreads();  // the previous half's V has been read
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + 256 * i, r = e >> 5, c = (e & 31) * 4, s = half * 32 + r;
            const bool ok = s < Lk;
            cp_async16(Vs + r * CS + c, v + (long long)(t0 + (ok ? s : 0)) * ldv + (long long)h * DV + c0 + c, ok);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < 32; ks += 8) {
            if (half * 32 + ks > rm + 15) break;  // causal: S̃ is zero there for this warp's rows
            const float* s0 = Ss + (rm + g) * SS + half * 32 + ks + qd;
            const float sa[4] = {s0[0], s0[8 * SS], s0[4], s0[8 * SS + 4]};
            const Tf<4> A = frag<EXACT>(sa);
#pragma unroll
            for (int p = 0; p < 4; ++p) {  // V's columns hc + 16p + 2g, + 1 (as C_prev's above)
                const float* v0 = Vs + (ks + qd) * CS + hc + 16 * p + 2 * g;
                const float2 x = *(const float2*)v0, y = *(const float2*)(v0 + 4 * CS);
                const float ve[2] = {x.x, y.x}, vo[2] = {x.y, y.y};
                mma_f32<EXACT>(hacc[2 * p], A, frag<EXACT>(ve));
                mma_f32<EXACT>(hacc[2 * p + 1], A, frag<EXACT>(vo));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 4; r += 2) {
        const int t = rm + g + 4 * r;
        if (t >= Lk) continue;
        const float den = sden[t];
        float* o = hout + (long long)(t0 + t) * hrow + (long long)h * DV + c0 + hc + 4 * qd;
#pragma unroll
        for (int p = 0; p < 4; ++p)
            *(float4*)(o + 16 * p) = make_float4(hacc[2 * p][r] / den, hacc[2 * p + 1][r] / den, hacc[2 * p][r + 1] / den, hacc[2 * p + 1][r + 1] / den);
    }
}

// (bounded for 3 blocks per SM, as it had without the bound before q · n_prev was spread over the
// warps: 80 registers, against 94 unbounded)
extern "C" __global__ void __launch_bounds__(256, 3) mlstm_chunk_out_tc(CHUNK_OUT_PARAMS) {
    chunk_out_tc<false>(CHUNK_OUT_ARGS);
}
extern "C" __global__ void __launch_bounds__(256) mlstm_chunk_out_tc_exact(CHUNK_OUT_PARAMS) {
    chunk_out_tc<true>(CHUNK_OUT_ARGS);
}

// ---- bf16 tensor cores (mma.sync m16n8k16, sm_80+): a bf16 model's merged prompt path ----------
// q, k, v arrive as bf16 (the merged product's 16-bit output, rows ldq, ldk, ldv values apart) and
// every product takes bf16 operands with f32 accumulation, as NX-AI's TFLA kernels do for a bf16
// model: half the bytes and a quarter of the instructions of the TF32 kernels, no conversions on
// the way into the tensor cores (ldmatrix reads the tiles as stored, transposing where the product
// needs it). The states entering the chunks are bf16 (Cs), the carried state f32; the key weights
// w_t scale the keys' fragments in f32 (the normaliser's sums are taken there) before they are
// rounded back; S̃ is rounded to bf16 for S̃V, its row sums (the denominator) taken in f32.
// Grids, blocks and the gate terms as the TF32 kernels; needs DK % 64 == 0, DV % 128 == 0, rows
// and column offsets of q, k, v 16-byte aligned.

extern "C" __global__ void __launch_bounds__(256) mlstm_chunk_states_bf16(
    int NH, int DK, int DV, int seq, int L, const u16* k, int ldk, const u16* v, int ldv,
    const float* G, float* C, float* n, u16* Cs, float* ns, int stages) {
    chunk_states_body<CS_BF16>(NH, DK, DV, seq, L, k, ldk, v, ldv, G, C, n, Cs, ns, stages);
}

// 8 warps over 64 tokens × 128 columns, as chunk_out_tc: warp w owns rows 16·(w % 4) .. +16,
// columns 32·(w / 4) .. +32 of S (4 accumulators) and 64·(w / 4) .. +64 of H (8). Phase 1 streams
// DK in tiles of 32 (Q, K rows and the C_prev tile, double-buffered with cp.async); phase 2 reuses
// that shared memory for S̃ (bf16) and the chunk's V (all 64 tokens at once).
// Blocks per SM the registers are bounded for: 3 (80 registers, a few bytes spilled) took 67–69 µs
// per layer at 2,048 rows against 71–73 for 2 (126 registers; H200, ncu).
#ifndef CHUNK_OUT_BF16_BLOCKS
#define CHUNK_OUT_BF16_BLOCKS 3
#endif
extern "C" __global__ void __launch_bounds__(256, CHUNK_OUT_BF16_BLOCKS) mlstm_chunk_out_bf16(
    int NH, int DK, int DV, int seq, int L, const u16* q, int ldq, const u16* k, int ldk,
    const u16* v, int ldv, const float* G, const u16* Cs, const float* ns, float eps, float* hout) {
    constexpr int KT = 32, QS = KT + 8, CS = 128 + 8, SS = 64 + 8;  // row strides (bf16 values)
    constexpr int STAGE = 2 * 64 * QS + KT * CS;
    __shared__ __align__(16) u16 buf[2 * STAGE];  // phase 2: S̃ [64][SS], V [64][CS] (fits)
    __shared__ __align__(16) float sn[2][KT];     // n_prev's values of the stage's DK tile
    __shared__ float sb[64], sig[64], smc[64], sdec[64], sqn[64], sden[64], srs[2][64];
    const int h = blockIdx.z, c0 = blockIdx.x * 128;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, qd = lane & 3;
    const int mat = lane >> 3, mr = lane & 7;
    const int rm = (warp & 3) * 16, sc = (warp >> 2) * 32, hc = (warp >> 2) * 64;
    const int kc = blockIdx.y, t0 = kc * L, Lk = min(L, seq - t0);
    const long long hrow = (long long)NH * DV;
    const u16* Cp = Cs + ((long long)kc * NH + h) * DK * DV;
    const float* np = ns + ((long long)kc * NH + h) * DK;
    const float scale = 1.f / sqrtf((float)DK);
    // the chunk's gate terms (mlstm_chunk_gates); the first barrier below publishes them
    if (tid < 64) chunk_out_gate_terms(G + ((long long)kc * NH + h) * CG_STRIDE, tid, sb, sig, smc, sdec);
    float sacc[4][4], hacc[8][4];
    zero_acc(sacc);
    zero_acc(hacc);
    // q_t · n_prev: thread tid takes token tid / 4 and a quarter (8 values) of each DK tile, so
    // that every warp does the same work between the barriers (two warps doing all of it, with
    // n_prev read from global memory, held the others at the barrier: 20% of the kernel's time)
    float qn = 0.f;
    auto issue = [&](int stage, int a0) {
        u16* Qs = buf + stage * STAGE;
        u16* Ks = Qs + 64 * QS;
        u16* Ct = Ks + 64 * QS;
        const int t = tid >> 2, p = (tid & 3) * 8;
        const bool ok = t < Lk;
        const long long r = t0 + (ok ? t : 0), off = (long long)h * DK + a0 + p;
        cp_async16((float*)(Qs + t * QS + p), (const float*)(q + r * ldq + off), ok);
        cp_async16((float*)(Ks + t * QS + p), (const float*)(k + r * ldk + off), ok);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int e = tid + 256 * i, rr = e >> 4, c = (e & 15) * 8;
            cp_async16((float*)(Ct + rr * CS + c), (const float*)(Cp + (long long)(a0 + rr) * DV + c0 + c), true);
        }
        if (tid < KT / 4) cp_async16(sn[stage] + 4 * tid, np + a0 + 4 * tid, true);
        cp_async_commit();
    };
    const int nk = DK / KT;
    issue(0, 0);
    for (int kt = 0; kt < nk; ++kt) {
        if (kt + 1 < nk) issue((kt + 1) & 1, (kt + 1) * KT);
        else cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const u16* Qs = buf + (kt & 1) * STAGE;
        const u16* Ks = Qs + 64 * QS;
        const u16* Ct = Ks + 64 * QS;
#pragma unroll
        for (int ks = 0; ks < KT; ks += 16) {
            u32 A[4];
            ldmatrix_x4(A, Qs + (rm + (lane & 15)) * QS + ks + 8 * (lane >> 4));
#pragma unroll
            for (int jj = 0; jj < 4; jj += 2) {  // S += Q Kᵀ: B [a][s] = K [s][a] as stored
                u32 B[4];
                ldmatrix_x4(B, Ks + (sc + 8 * (jj + (mat >> 1)) + mr) * QS + ks + 8 * (mat & 1));
                mma_bf16(sacc[jj], A, B[0], B[1]);
                mma_bf16(sacc[jj + 1], A, B[2], B[3]);
            }
#pragma unroll
            for (int jj = 0; jj < 8; jj += 2) {  // H += Q C_prev: B [a][c], transposed tiles
                u32 B[4];
                ldmatrix_x4_trans(B, Ct + (ks + 8 * (mat & 1) + mr) * CS + hc + 8 * (jj + (mat >> 1)));
                mma_bf16(hacc[jj], A, B[0], B[1]);
                mma_bf16(hacc[jj + 1], A, B[2], B[3]);
            }
        }
        {
            const int a = (tid & 3) * 8;
            const uint4 w = *(const uint4*)(Qs + (tid >> 2) * QS + a);
            const float* nv = sn[kt & 1] + a;
            const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                qn = fmaf(__uint_as_float(ws[i] << 16), nv[2 * i], qn);
                qn = fmaf(__uint_as_float(ws[i] & 0xffff0000u), nv[2 * i + 1], qn);
            }
        }
        __syncthreads();
    }
    // Phase 2. S̃: row sums in f32, the values as bf16 into Ss.
    u16* Ss = buf;
    u16* Vs = buf + 64 * SS;
    chunk_out_scores(sacc, rm, sc, Lk, scale, sb, sig, smc, qn, srs[warp >> 2], sqn, [&](int t, int s, float x0, float x1) { *(u32*)(Ss + t * SS + s) = bf16x2_bits(x0, x1); });
    // the chunk's values: 64 rows of 128 bf16 (rows past the chunk's end zero-filled)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int e = tid + 256 * i, r = e >> 4, c = (e & 15) * 8;
        const bool ok = r < Lk;
        cp_async16((float*)(Vs + r * CS + c), (const float*)(v + (long long)(t0 + (ok ? r : 0)) * ldv + (long long)h * DV + c0 + c), ok);
    }
    cp_async_commit();
    __syncthreads();  // S̃ and its row sums complete
    chunk_out_denominator(sdec, sqn, srs, smc, scale, eps, sden);
#pragma unroll
    for (int r = 0; r < 4; r += 2) {
        const float d = sdec[rm + g + 4 * r] * scale;
#pragma unroll
        for (int j = 0; j < 8; ++j) { hacc[j][r] *= d; hacc[j][r + 1] *= d; }
    }
    cp_async_wait<0>();
    __syncthreads();  // V landed; sden published
#pragma unroll
    for (int ks = 0; ks < 64; ks += 16) {
        if (ks > rm + 15 || ks >= Lk) break;  // causal: S̃ is zero there for this warp's rows
        u32 A[4];
        ldmatrix_x4(A, Ss + (rm + (lane & 15)) * SS + ks + 8 * (lane >> 4));
#pragma unroll
        for (int jj = 0; jj < 8; jj += 2) {  // H += S̃ V: B [s][c], transposed tiles
            u32 B[4];
            ldmatrix_x4_trans(B, Vs + (ks + 8 * (mat & 1) + mr) * CS + hc + 8 * (jj + (mat >> 1)));
            mma_bf16(hacc[jj], A, B[0], B[1]);
            mma_bf16(hacc[jj + 1], A, B[2], B[3]);
        }
    }
#pragma unroll
    for (int r = 0; r < 4; r += 2) {
        const int t = rm + g + 4 * r;
        if (t >= Lk) continue;
        const float den = sden[t];
        float* o = hout + (long long)(t0 + t) * hrow + (long long)h * DV + c0 + hc + 2 * qd;
#pragma unroll
        for (int j = 0; j < 8; ++j) *(float2*)(o + 8 * j) = make_float2(hacc[j][r] / den, hacc[j][r + 1] / den);
    }
}
