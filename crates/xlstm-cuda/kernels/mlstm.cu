// mlstm.cu — the mLSTM cell: recurrent step (optionally fused with the gates' bias + soft cap, the
// per-head LayerNorm and the sigmoid output gate) and the chunkwise-parallel prefill.
//
// Math: shared/NOTES.md §2. Per unit u = b·NH + h (sequence b, head h): q, k [.., DK], v [.., DV],
// gate pre-activations ĩ, f̃; state C [DK, DV], n [DK], m (f32). Layouts (row-major):
// q, k [rows, NH·DK], v, h [rows, NH·DV], i, f [rows, NH], C [B, NH, DK, DV], n [B, NH, DK], m [B, NH].
//
// mlstm_step: grid = (ceil(DV / 32), B·NH), block = 512 (16 warps), dynamic shared memory 3·DK floats;
//   mlstm_step_wide (larger batches): grid = (ceil(DV / 64), B·NH), block = 256, 64 columns per block
//   as float2 (DV even). Each block owns its columns of one unit's C, streams them once (read, update, write: one warp row
//   = 128 contiguous bytes) and forms those 32 entries of h. n', q·n' and the gates are recomputed by
//   every block of the unit (DK values). Launched with programmatic dependent launch on sm_90 (waits
//   for the previous kernel before its first read). The last block of a unit to finish (an atomic counter per
//   unit, reset by that block, so the kernel can be replayed in a CUDA graph) writes n' and m', and,
//   when `hn` is set, the normalised, gated output hn = σ(o) ⊙ LayerNorm_DV(h)·w over the unit's DV
//   values. Limits: DK ≤ 4096 (shared memory), `counters` holds B·NH zeroed u32.
// mlstm_chunk_states: grid = (ceil(DV/64), ceil(DK/64), NH), block = 256. Runs the chunks of one
//   segment (batch 1) in order for a 64×64 tile of C kept in registers (4×4 per thread), saving the
//   state entering each chunk (Cs [nc, NH, DK, DV], ns [nc, NH, DK], ms [nc + 1, NH], the last row of
//   ms being the final m) and writing the final C, n to the state.
// mlstm_chunk_out: grid = (ceil(DV/64), nc, NH), block = 256. For one chunk and 64 columns of DV:
//   S = Q Kᵀ and Q C_prev over DK in tiles of 16 (4×4 register tiles), the decay matrix and stabiliser,
//   then H = decay·Q C_prev + S̃ V, divided by the denominator. Block (0, 0, h) copies the final m.
// Chunk length L ≤ 64; the last chunk may be shorter (the math holds for any split).

__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// One block: NW warps, 32·CW columns of one unit's C (lane l owns columns l·CW .. l·CW + CW − 1),
// PRE rows per warp loaded up front (more rows, if DK > PRE·NW, in batches of 8).
template <int CW, int NW, int PRE>
__device__ __forceinline__ void mlstm_step_body(
    int NH, int DK, int DV,
    const float* q, const float* k, const float* v, const float* ig, const float* fg,
    const float* ibias, const float* fbias, float cap,
    float* C, float* n, float* m, float eps, float* h,
    const float* o, const float* hnw, float neps, float* hn,
    u32* counters) {
    extern __shared__ float sm[];
    float* qs = sm;
    float* ks = sm + DK;
    float* nn = sm + 2 * DK;
    __shared__ float hred[NW][32 * CW + 1];
    __shared__ float red[32];
    __shared__ int last;
    const int u = blockIdx.y, hd = u % NH;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int col = blockIdx.x * 32 * CW + lane * CW;  // first of this lane's CW columns
    const bool live = col < DV;                         // DV % CW == 0 (checked on the host)
    float* cu = C + (long long)u * DK * DV + col;
    // Everything this kernel reads may come from the kernel before it (q, k, v, gates; the state from
    // the previous step on it), so it waits first, then loads the C columns ahead of the rest.
    pdl_trigger();
    pdl_wait();
    float cv0[PRE][CW];
#pragma unroll
    for (int j = 0; j < PRE; ++j) {
        int a = warp + j * NW;
        if (CW == 2) {
            float2 t = (live && a < DK) ? *(const float2*)(cu + (long long)a * DV) : make_float2(0.f, 0.f);
            cv0[j][0] = t.x;
            cv0[j][CW - 1] = t.y;
        } else {
            cv0[j][0] = (live && a < DK) ? cu[(long long)a * DV] : 0.f;
        }
    }
    float ip = ig[u], fp = fg[u];
    if (ibias) ip += ibias[hd];
    if (fbias) fp += fbias[hd];
    if (cap > 0.f) { ip = cap * tanhf(ip / cap); fp = cap * tanhf(fp / cap); }
    const float lf = log_sigmoid(fp);
    const float mo = m[u];
    const float mn = fmaxf(lf + mo, ip);
    const float fa = expf(lf + mo - mn), ia = expf(ip - mn);
    const float scale = 1.f / sqrtf((float)DK);
    const long long uk = (long long)u * DK;
    for (int a = tid; a < DK; a += blockDim.x) {
        qs[a] = q[uk + a] * scale;
        float kk = ia * k[uk + a];
        ks[a] = kk;
        nn[a] = fa * n[uk + a] + kk;
    }
    __syncthreads();
    float part = 0.f;
    for (int a = tid; a < DK; a += blockDim.x) part = fmaf(qs[a], nn[a], part);
    const float qn = block_sum(part, red);

    float acc[CW];
#pragma unroll
    for (int c = 0; c < CW; ++c) acc[c] = 0.f;
    if (live) {
        float vv[CW];
#pragma unroll
        for (int c = 0; c < CW; ++c) vv[c] = v[(long long)u * DV + col + c];
#pragma unroll
        for (int j = 0; j < PRE; ++j) {
            int a = warp + j * NW;
            if (a < DK) {
                float cn[CW];
#pragma unroll
                for (int c = 0; c < CW; ++c) {
                    cn[c] = fa * cv0[j][c] + ks[a] * vv[c];
                    acc[c] = fmaf(qs[a], cn[c], acc[c]);
                }
                if (CW == 2) *(float2*)(cu + (long long)a * DV) = make_float2(cn[0], cn[CW - 1]);
                else cu[(long long)a * DV] = cn[0];
            }
        }
        // Rows past the first PRE per warp (DK > PRE·NW): 8 independent loads in flight per thread
        // before any store (the stores could alias the next loads as far as the compiler knows).
        for (int a0 = warp + PRE * NW; a0 < DK; a0 += 8 * NW) {
            float cv[8][CW];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int a = a0 + j * NW;
#pragma unroll
                for (int c = 0; c < CW; ++c) cv[j][c] = a < DK ? cu[(long long)a * DV + c] : 0.f;
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int a = a0 + j * NW;
                if (a < DK) {
#pragma unroll
                    for (int c = 0; c < CW; ++c) {
                        float cn = fa * cv[j][c] + ks[a] * vv[c];
                        cu[(long long)a * DV + c] = cn;
                        acc[c] = fmaf(qs[a], cn, acc[c]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < CW; ++c) hred[warp][lane * CW + c] = acc[c];
    __syncthreads();
    if (warp == 0) {
        const float den = fmaxf(fabsf(qn), expf(-mn)) + eps;
#pragma unroll
        for (int c = 0; c < CW; ++c) {
            float s = 0.f;
            for (int w = 0; w < NW; ++w) s += hred[w][lane * CW + c];
            if (live) h[(long long)u * DV + col + c] = s / den;
        }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        u32 prev = atomicAdd(&counters[u], 1u);
        last = (prev == gridDim.x - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int a = tid; a < DK; a += blockDim.x) n[uk + a] = nn[a];
    if (tid == 0) { m[u] = mn; counters[u] = 0u; }
    if (hn) {
        const float* hu = h + (long long)u * DV;
        float s = 0.f;
        for (int j = tid; j < DV; j += blockDim.x) s += ld_cg(hu + j);
        const float mean = block_sum(s, red) / (float)DV;
        float vs = 0.f;
        for (int j = tid; j < DV; j += blockDim.x) { float d = ld_cg(hu + j) - mean; vs = fmaf(d, d, vs); }
        const float var = block_sum(vs, red) / (float)DV;
        const float r = rsqrtf(var + neps);
        for (int j = tid; j < DV; j += blockDim.x) {
            long long e = (long long)u * DV + j;
            hn[e] = (ld_cg(hu + j) - mean) * r * hnw[hd * DV + j] * sigmoid_exact(o[e]);
        }
    }
}

#define MLSTM_STEP_PARAMS                                                                          \
    int NH, int DK, int DV, const float *q, const float *k, const float *v, const float *ig,     \
        const float *fg, const float *ibias, const float *fbias, float cap, float *C, float *n,    \
        float *m, float eps, float *h, const float *o, const float *hnw, float neps, float *hn,    \
        u32 *counters
#define MLSTM_STEP_ARGS NH, DK, DV, q, k, v, ig, fg, ibias, fbias, cap, C, n, m, eps, h, o, hnw, neps, hn, counters

// Narrow tiles (32 columns, 16 warps): many blocks when there are few units (batch 1..2).
extern "C" __global__ void __launch_bounds__(512) mlstm_step(MLSTM_STEP_PARAMS) {
    mlstm_step_body<1, 16, 16>(MLSTM_STEP_ARGS);
}
// Wide tiles (64 columns as float2, 8 warps, 32 rows each in flight): fewer, fuller blocks for
// larger batches. Needs DV even.
extern "C" __global__ void __launch_bounds__(256) mlstm_step_wide(MLSTM_STEP_PARAMS) {
    mlstm_step_body<2, 8, 32>(MLSTM_STEP_ARGS);
}

// One warp: for t < L (lane and lane + 32), lf_t = logsigmoid(f̃_t), b_t = Σ_{s≤t} lf_s (inclusive),
// ig_t; entries t ≥ L get lf = 0 and ig = −inf. Writes sb[64], sig[64]. Returns nothing; the
// caller syncs.
__device__ __forceinline__ void chunk_scan(const float* ig, const float* fg, int NH, int h, int t0, int L, float* sb, float* sig) {
    const int lane = threadIdx.x & 31;
    float lf0 = lane < L ? log_sigmoid(fg[(long long)(t0 + lane) * NH + h]) : 0.f;
    float lf1 = lane + 32 < L ? log_sigmoid(fg[(long long)(t0 + lane + 32) * NH + h]) : 0.f;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float y0 = __shfl_up_sync(0xffffffffu, lf0, o);
        float y1 = __shfl_up_sync(0xffffffffu, lf1, o);
        if (lane >= o) { lf0 += y0; lf1 += y1; }
    }
    float tot0 = __shfl_sync(0xffffffffu, lf0, 31);
    sb[lane] = lf0;
    sb[lane + 32] = lf1 + tot0;
    sig[lane] = lane < L ? ig[(long long)(t0 + lane) * NH + h] : NEG_INF;
    sig[lane + 32] = lane + 32 < L ? ig[(long long)(t0 + lane + 32) * NH + h] : NEG_INF;
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
            const float g = sb[Lk - 1];
            float a_0 = tid < Lk ? g - sb[tid] + sig[tid] : NEG_INF;
            float a_1 = tid + 32 < Lk ? g - sb[tid + 32] + sig[tid + 32] : NEG_INF;
            float mx = warp_max(fmaxf(a_0, a_1));
            float mnew = fmaxf(g + mp, mx);
            sw[tid] = tid < Lk ? expf(a_0 - mnew) : 0.f;
            sw[tid + 32] = tid + 32 < Lk ? expf(a_1 - mnew) : 0.f;
            if (tid == 0) { s_decay = expf(g + mp - mnew); s_mnew = mnew; }
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
    const int h = blockIdx.z, kc = blockIdx.y, c0 = blockIdx.x * 64;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int t0 = kc * L, Lk = min(L, seq - t0);
    const int nc = (seq + L - 1) / L;
    const long long qrow = (long long)NH * DK, vrow = (long long)NH * DV;
    const float scale = 1.f / sqrtf((float)DK);
    const float mp = ms[(long long)kc * NH + h];
    if (blockIdx.x == 0 && kc == 0 && tid == 0) m[h] = ms[(long long)nc * NH + h];
    const float* Cp = Cs + ((long long)kc * NH + h) * DK * DV;
    const float* np = ns + ((long long)kc * NH + h) * DK;
    if (tid < 32) {
        chunk_scan(ig, fg, NH, h, t0, Lk, sb, sig);
        __syncwarp();
        // prefix max of ig_s − b_s, then mc_t = max(b_t + m_prev, b_t + P_t)
        float x0 = tid < Lk ? sig[tid] - sb[tid] : NEG_INF;
        float x1 = tid + 32 < Lk ? sig[tid + 32] - sb[tid + 32] : NEG_INF;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            float y0 = __shfl_up_sync(0xffffffffu, x0, o);
            float y1 = __shfl_up_sync(0xffffffffu, x1, o);
            if (tid >= o) { x0 = fmaxf(x0, y0); x1 = fmaxf(x1, y1); }
        }
        x1 = fmaxf(x1, __shfl_sync(0xffffffffu, x0, 31));
        float mc0 = fmaxf(sb[tid] + mp, sb[tid] + x0);
        float mc1 = fmaxf(sb[tid + 32] + mp, sb[tid + 32] + x1);
        smc[tid] = mc0;
        smc[tid + 32] = mc1;
        sdec[tid] = expf(sb[tid] + mp - mc0);
        sdec[tid + 32] = expf(sb[tid + 32] + mp - mc1);
    }
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
