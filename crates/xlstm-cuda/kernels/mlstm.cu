// mlstm.cu — the mLSTM cell's recurrent step (optionally fused with the gates' bias + soft cap, the
// per-head LayerNorm and the sigmoid output gate). The chunkwise-parallel prefill is in mlstm_chunk.cu.
//
// Math: shared/NOTES.md §2. Per unit u = b·NH + h (sequence b, head h): q, k [.., DK], v [.., DV],
// gate pre-activations ĩ, f̃; state C [DK, DV], n [DK], m (f32). Layouts (row-major):
// q, k [rows, NH·DK], v, h [rows, NH·DV], i, f [rows, NH], C [B, NH, DK, DV], n [B, NH, DK], m [B, NH];
// the rows of q, k, v and o lie ldq, ldk, ldv, ldo values apart (NH·DK, NH·DV, or the column blocks
// of one merged product's output), and hn is written as hn_dt (f32, or the next product's 16 bits).
//
// mlstm_step (mlstm_step_pair: the same, two blocks per SM): grid = (ceil(DV / 32), B·NH), block =
//   512 (16 warps), dynamic shared memory 3·DK floats;
//   mlstm_step_wide (larger batches): grid = (ceil(DV / 64), B·NH), block = 256, 64 columns per block
//   as float2 (DV even). Each block owns its columns of one unit's C, streams them once (read, update, write: one warp row
//   = 128 contiguous bytes) and forms those 32 entries of h. n', q·n' and the gates are recomputed by
//   every block of the unit (DK values). Launched with programmatic dependent launch on sm_90 (waits
//   for the previous kernel before it reads what that kernel wrote). The last block of a unit to finish (an atomic counter per
//   unit, reset by that block, so the kernel can be replayed in a CUDA graph) writes n' and m', and,
//   when `hn` is set, the normalised, gated output hn = σ(o) ⊙ LayerNorm_DV(h)·w over the unit's DV
//   values. Limits: DK ≤ 4096 (shared memory), `counters` holds B·NH zeroed u32.
//   The `_c16` entry points keep C in bf16 (rounded once per step; n, m stay f32).
//   `c_early` (decode steps): the state was written by an earlier step, not by the kernel launched
//   just before this one, so the narrow tile loads it before pdl_wait() (off with -DSTEP_EARLY_C=0).
//
// Deferred updates (the `_pend` entry points, f32 C): a step reads C but does not write it. Its
// update v kᵀ joins a ring of up to `pcap` (≤ PEND_MAX) per unit, and h adds the ring's terms to
// the stored C's:
//   C_t = e^a · C + Σ_s e^(e_s + a) v_s k_sᵀ,
// a = the log of the forget factors since C was last written (n, m stay current every step),
// e_s = ĩ_s − m_s − a_s (the entry's input factor, relative to a when it joined; e_s + a ≤ 0, so
// no factor overflows). The step that finds the ring full folds it into C while it streams C and
// writes C_t once: C's bytes go out once per pcap + 1 steps instead of every step. Each warp of a
// reading step takes one entry's part of h (PEND_MAX ≤ the tile's warps). Layout of `pend`, U units:
// count [U] u32, a [U], e [U, pcap], k [U, pcap, DK], v [U, pcap, DV]. Anything else that reads
// or writes C first runs mlstm_settle, which folds the ring in, after which the host zeroes count
// and a.

#ifndef PEND_WIDE_PRE
#define PEND_WIDE_PRE 8
#endif
#ifndef PEND_WIDE_BLOCKS
#define PEND_WIDE_BLOCKS 4
#endif
// The most entries a ring holds (`pcap` ≤ this; a multiple of 4).
#define PEND_MAX 8
#ifndef STEP_EARLY_C
#define STEP_EARLY_C 1
#endif

__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

// out[i] = v as dtype dt (DT_F32, or the 16-bit bits of DT_BF16 / DT_F16).
__device__ __forceinline__ void store_value(float* out, long long i, float v, int dt) {
    if (dt == DT_F32) out[i] = v;
    else store_half((u16*)out, i, v, dt);
}

// A lane's CW consecutive values of one row of C, held as their raw bits in CBits::W words: f32, or
// with C16 bf16 (two to a word, so a row of 4 takes the registers 2 f32 values take). The update runs
// in f32; a bf16 value is rounded once, when stored. f32 rows take CW 1 or 2, bf16 rows 1, 2 or 4.
template <int CW, bool C16>
struct CBits {
    static_assert(C16 ? (CW == 1 || CW == 2 || CW == 4) : (CW == 1 || CW == 2), "c_load / c_store take these widths");
    static constexpr int W = C16 ? (CW + 1) / 2 : CW;
};

template <int CW, bool C16>
__device__ __forceinline__ void c_load(const float* C, long long i, u32* w) {
    if constexpr (C16) {
        const u16* p = (const u16*)C + i;
        if constexpr (CW == 4) {
            const uint2 t = *(const uint2*)p;
            w[0] = t.x;
            w[1] = t.y;
        } else if constexpr (CW == 2) {
            w[0] = *(const u32*)p;
        } else {
            w[0] = *p;
        }
    } else if constexpr (CW == 2) {
        const float2 t = *(const float2*)(C + i);
        w[0] = __float_as_uint(t.x);
        w[1] = __float_as_uint(t.y);
    } else {
        w[0] = __float_as_uint(C[i]);
    }
}

// Value c of a row held as c_load left it.
template <bool C16>
__device__ __forceinline__ float c_value(const u32* w, int c) {
    if constexpr (C16) return (c & 1) ? __uint_as_float(w[c >> 1] & 0xffff0000u) : __uint_as_float(w[c >> 1] << 16);
    else return __uint_as_float(w[c]);
}

// The raw bits of CW new values (bf16: rounded to nearest even).
template <int CW, bool C16>
__device__ __forceinline__ void c_pack(const float* v, u32* w) {
    if constexpr (C16) {
#pragma unroll
        for (int c = 0; c < CW; c += 2) w[c >> 1] = (CW == 1) ? (u32)f32_to_bf16(v[0]) : bf16x2_bits(v[c], v[c + 1 < CW ? c + 1 : c]);
    } else {
#pragma unroll
        for (int c = 0; c < CW; ++c) w[c] = __float_as_uint(v[c]);
    }
}

template <int CW, bool C16>
__device__ __forceinline__ void c_store(float* C, long long i, const u32* w) {
    if constexpr (C16) {
        u16* p = (u16*)C + i;
        if constexpr (CW == 4) *(uint2*)p = make_uint2(w[0], w[1]);
        else if constexpr (CW == 2) *(u32*)p = w[0];
        else *p = (u16)w[0];
    } else if constexpr (CW == 2) {
        *(float2*)(C + i) = make_float2(__uint_as_float(w[0]), __uint_as_float(w[1]));
    } else {
        C[i] = __uint_as_float(w[0]);
    }
}

// A row's CW new values of C from its stored ones (`w`, as c_load left them): f·C + (ia·k_a)·v
// (`ks_a` = ia·k_a); with PEND the stored ones unchanged (a step that only reads C), or, when
// `flush`, e^a·C + the new entry's term + the ring's Σ_s kp[s]·vr[s] (kp: the row's PEND_MAX
// factors × k_s[a] in shared memory, 16-byte aligned; vr: the lane's v_s in registers; unused
// entries zero).
template <int CW, bool C16, bool PEND>
__device__ __forceinline__ void c_row(const u32* w, float f, float ks_a, const float* vv, bool flush, const float* kp,
                                      const float* vr, float* cn) {
    if (PEND && !flush) {
#pragma unroll
        for (int c = 0; c < CW; ++c) cn[c] = c_value<C16>(w, c);
        return;
    }
#pragma unroll
    for (int c = 0; c < CW; ++c) cn[c] = f * c_value<C16>(w, c) + ks_a * vv[c];
    if (PEND) {
#pragma unroll
        for (int e4 = 0; e4 < PEND_MAX; e4 += 4) {
            const float4 k4 = *(const float4*)(kp + e4);
#pragma unroll
            for (int c = 0; c < CW; ++c) {
                cn[c] = fmaf(k4.x, vr[e4 * CW + c], cn[c]);
                cn[c] = fmaf(k4.y, vr[(e4 + 1) * CW + c], cn[c]);
                cn[c] = fmaf(k4.z, vr[(e4 + 2) * CW + c], cn[c]);
                cn[c] = fmaf(k4.w, vr[(e4 + 3) * CW + c], cn[c]);
            }
        }
    }
}

// A state's deferred updates laid out as the header says (U units, `pcap` entries each).
struct Ring {
    u32* count;
    float* a;
    float* e;
    float* k;
    float* v;
    __device__ Ring(float* pend, int U, int pcap, int DK)
        : count((u32*)pend), a(pend + U), e(pend + 2 * U), k(e + (long long)U * pcap), v(k + (long long)U * pcap * DK) {}
};

// The operands c_row folds a ring in with: kp [DK][PEND_MAX] = e^(e_s + a)·k_s (shared memory,
// 16-byte aligned; zero past `count` entries) and vr [PEND_MAX][CW] = v_s in this lane's columns
// (registers). `slot0`: the unit's first entry (u·pcap). Contains __syncthreads.
template <int CW>
__device__ __forceinline__ void ring_fold_operands(const Ring& r, long long slot0, int count, float a, int DK, int DV,
                                                   int col, bool live, float* kp, float* vr) {
    __shared__ float fac[PEND_MAX];
    const int tid = threadIdx.x;
    if (tid < PEND_MAX) fac[tid] = tid < count ? expf(r.e[slot0 + tid] + a) : 0.f;
    __syncthreads();
    for (int i = tid; i < DK * PEND_MAX; i += blockDim.x) {
        const int row = i / PEND_MAX, e = i - row * PEND_MAX;
        kp[i] = e < count ? fac[e] * r.k[(slot0 + e) * DK + row] : 0.f;
    }
#pragma unroll
    for (int e = 0; e < PEND_MAX; ++e) {
#pragma unroll
        for (int c = 0; c < CW; ++c) vr[e * CW + c] = (e < count && live) ? r.v[(slot0 + e) * DV + col + c] : 0.f;
    }
    __syncthreads();
}

// One block: NW warps, 32·CW columns of one unit's C (lane l owns columns l·CW .. l·CW + CW − 1),
// PRE rows per warp loaded up front (more rows, if DK > PRE·NW, in batches of 8). C16: C in bf16.
template <int CW, int NW, int PRE, bool DEFER, bool EARLY, bool C16, bool PEND>
__device__ __forceinline__ void mlstm_step_body(
    int NH, int DK, int DV,
    const float* q, const float* k, const float* v, const float* ig, const float* fg,
    const float* ibias, const float* fbias, float cap,
    float* C, float* n, float* m, float eps, float* h,
    const float* o, const float* hnw, float neps, float* hn,
    u32* counters, int ldq, int ldk, int ldv, int ldo, int hn_dt, int c_early, float* pend, int pcap) {
    const u64 tr0 = trace_now();
    extern __shared__ float sm[];
    float* qs = sm;
    float* ks = sm + DK;
    float* nn = sm + 2 * DK;
    // PEND, a full ring: its k times each entry's factor [DK][PEND_MAX] (16-byte aligned: float4 reads)
    float* kp = sm + ((3 * DK + 3) & ~3);
    __shared__ float hred[NW][32 * CW + 1];
    __shared__ float red[32];
    __shared__ int last;
    const int u = blockIdx.y, hd = u % NH;
    // PEND: the ring (see the header)
    const Ring ring(pend, gridDim.y, pcap, DK);
    int pt = 0;      // entries pending
    float pa = 0.f;  // their a
    // this unit's q, k, v, o: sequence u / NH's rows lie ldq, ldk, ldv, ldo values apart
    const long long bq = u / NH, qo = bq * ldq + (long long)hd * DK, ko = bq * ldk + (long long)hd * DK;
    const long long vo = bq * ldv + (long long)hd * DV, oo = bq * ldo + (long long)hd * DV;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int col = blockIdx.x * 32 * CW + lane * CW;  // first of this lane's CW columns
    const bool live = col < DV;                         // DV % CW == 0 (checked on the host)
    const long long cu = (long long)u * DK * DV + col;  // this lane's first value of C
    // q, k, v and the gates come from the kernel before this one, so they are read after pdl_wait().
    // The state (C, n, m) too when that kernel may have written it (a prompt's token-by-token loop);
    // in a decode step it was written a whole step earlier (`c_early`), and its first PRE rows per
    // warp are loaded before the wait, overlapping the previous kernel's tail.
    pdl_trigger();
    const bool early = EARLY && STEP_EARLY_C && c_early;
    const long long uk = (long long)u * DK;
    const bool one = DK <= (int)blockDim.x;
    constexpr int W = CBits<CW, C16>::W;
    u32 cv0[PRE][W];
    float ne = 0.f, mo = 0.f;
    auto load_state = [&]() {
#pragma unroll
        for (int j = 0; j < PRE; ++j) {
            int a = warp + j * NW;
            if (live && a < DK) c_load<CW, C16>(C, cu + (long long)a * DV, cv0[j]);
            else {
#pragma unroll
                for (int w = 0; w < W; ++w) cv0[j][w] = 0u;
            }
        }
        ne = (one && tid < DK) ? n[uk + tid] : 0.f;
        mo = m[u];
        if constexpr (PEND) {
            pt = (int)ring.count[u];
            pa = ring.a[u];
        }
    };
    if (early) load_state();
    pdl_wait();
    const u64 tr1 = trace_now();
    if (!early) load_state();
    // Everything else this block reads goes out at once, before any of it is used: this lane's v
    // columns and, when DK ≤ the block's threads, one element each of q, k and n per thread.
    float vv[CW];
#pragma unroll
    for (int c = 0; c < CW; ++c) vv[c] = live ? v[vo + col + c] : 0.f;
    const float qe = (one && tid < DK) ? q[qo + tid] : 0.f;
    const float ke = (one && tid < DK) ? k[ko + tid] : 0.f;
    float ip = ig[u], fp = fg[u];
    if (ibias) ip += ibias[hd];
    if (fbias) fp += fbias[hd];
    if (cap > 0.f) { ip = cap * tanhf(ip / cap); fp = cap * tanhf(fp / cap); }
    const float lf = log_sigmoid(fp);
    const float mn = fmaxf(lf + mo, ip);
    const float fa = expf(lf + mo - mn), ia = expf(ip - mn);
    // PEND: a after this step, and whether this step writes C (the ring is full)
    const float anew = pa + (lf + mo - mn);
    const bool flush = PEND && pt >= pcap;
    const float cfac = PEND ? expf(anew) : fa;  // the factor on the stored C
    const float scale = 1.f / sqrtf((float)DK);
    if (one) {
        if (tid < DK) {
            qs[tid] = qe * scale;
            float kk = ia * ke;
            ks[tid] = kk;
            nn[tid] = fa * ne + kk;
        }
    } else {
        for (int a = tid; a < DK; a += blockDim.x) {
            qs[a] = q[qo + a] * scale;
            float kk = ia * k[ko + a];
            ks[a] = kk;
            nn[a] = fa * n[uk + a] + kk;
        }
    }
    __syncthreads();
    const u64 tr2 = trace_now();
    float part = 0.f;
    for (int a = tid; a < DK; a += blockDim.x) part = fmaf(qs[a], nn[a], part);
    const float qn = block_sum(part, red);
    // A full ring, folded into every value of C the pass below writes: its k times each entry's
    // factor (shared), its v in this lane's columns (registers).
    constexpr int KPRE = 8;
    constexpr int VR = !PEND ? 1 : (PEND_MAX * CW > KPRE + CW + 1 ? PEND_MAX * CW : KPRE + CW + 1);
    float vr[VR];  // folding: the ring's v in this lane's columns, [entry][column]
    // Not folding: this warp's ring entry (warp < pt; each warp has at most one, pt < pcap ≤ NW)
    // goes to the registers vr leaves free here (its first KPRE values of k, its v, its e), to be
    // used after the C pass: their loads wait behind C's instead of after it (batch 64: 98.5 →
    // 96.0 µs a step, batch 256: 366.5 → 357.9; H200).
    static_assert(!PEND || PEND_MAX <= NW, "one ring entry a warp");
    float* pre = vr;
    if (PEND && !flush && warp < pt) {
        const long long slot = (long long)u * pcap + warp;
#pragma unroll
        for (int j = 0; j < KPRE; ++j) pre[j] = lane + 32 * j < DK ? ring.k[slot * DK + lane + 32 * j] : 0.f;
#pragma unroll
        for (int c = 0; c < CW; ++c) pre[KPRE + c] = live ? ring.v[slot * DV + col + c] : 0.f;
        pre[KPRE + CW] = ring.e[slot];
    }
    if constexpr (PEND) {
        if (flush) ring_fold_operands<CW>(ring, (long long)u * pcap, pt, anew, DK, DV, col, live, kp, vr);
    }

    float acc[CW];
#pragma unroll
    for (int c = 0; c < CW; ++c) acc[c] = 0.f;
    if (live) {
        // With DEFER the first PRE rows' new values stay in cv0 and are stored after h has been
        // published (below), so the fence before the unit's counter waits for h alone.
#pragma unroll
        for (int j = 0; j < PRE; ++j) {
            int a = warp + j * NW;
            if (a < DK) {
                float cn[CW];
                c_row<CW, C16, PEND>(cv0[j], cfac, ks[a], vv, flush, kp + a * PEND_MAX, vr, cn);
#pragma unroll
                for (int c = 0; c < CW; ++c) acc[c] = fmaf(qs[a], cn[c], acc[c]);
                if (!PEND || flush) {
                    c_pack<CW, C16>(cn, cv0[j]);
                    if (!DEFER) c_store<CW, C16>(C, cu + (long long)a * DV, cv0[j]);
                }
            }
        }
        // Rows past the first PRE per warp (DK > PRE·NW): 8 independent loads in flight per thread
        // before any store (the stores could alias the next loads as far as the compiler knows).
        for (int a0 = warp + PRE * NW; a0 < DK; a0 += 8 * NW) {
            u32 cv[8][W];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int a = a0 + j * NW;
                c_load<CW, C16>(C, cu + (long long)min(a, DK - 1) * DV, cv[j]);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                int a = a0 + j * NW;
                if (a < DK) {
                    float cn[CW];
                    c_row<CW, C16, PEND>(cv[j], cfac, ks[a], vv, flush, kp + a * PEND_MAX, vr, cn);
#pragma unroll
                    for (int c = 0; c < CW; ++c) acc[c] = fmaf(qs[a], cn[c], acc[c]);
                    if (!PEND || flush) {
                        c_pack<CW, C16>(cn, cv[j]);
                        c_store<CW, C16>(C, cu + (long long)a * DV, cv[j]);
                    }
                }
            }
        }
    }
    if (PEND && !flush) {
        // h = e^a·(C q) + Σ_s e^(e_s + a)·(k_s·q)·v_s, the new entry's (ks = ia·k, vv) last: warp w
        // adds entries w, w + NW, ... to its part of the sum
#pragma unroll
        for (int c = 0; c < CW; ++c) acc[c] *= cfac;
        if (const int e = warp; e <= pt) {
            const long long slot = (long long)u * pcap + e;
            float d = 0.f, ve[CW];
            if (e < pt) {
#pragma unroll
                for (int c = 0; c < CW; ++c) ve[c] = pre[KPRE + c];
#pragma unroll
                for (int j = 0; j < KPRE; ++j) d = lane + 32 * j < DK ? fmaf(pre[j], qs[lane + 32 * j], d) : d;
                const float* kg = ring.k + slot * DK;
                for (int a = lane + 32 * KPRE; a < DK; a += 32) d = fmaf(kg[a], qs[a], d);
            } else {
#pragma unroll
                for (int c = 0; c < CW; ++c) ve[c] = vv[c];
                for (int a = lane; a < DK; a += 32) d = fmaf(ks[a], qs[a], d);
            }
            d = warp_sum(d);
            const float w = e < pt ? expf(pre[KPRE + CW] + anew) * d : d;
#pragma unroll
            for (int c = 0; c < CW; ++c) acc[c] = fmaf(w, ve[c], acc[c]);
        }
        // the new entry: k and e once per unit, v by every block for its columns
        const long long slot = (long long)u * pcap + pt;
        if (blockIdx.x == 0) {
            for (int a = tid; a < DK; a += blockDim.x) ring.k[slot * DK + a] = k[ko + a];
            if (tid == 0) ring.e[slot] = ip - mn - anew;
        }
        if (warp == 0 && live) {
#pragma unroll
            for (int c = 0; c < CW; ++c) ring.v[slot * DV + col + c] = vv[c];
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
    if (DEFER && live && (!PEND || flush)) {
#pragma unroll
        for (int j = 0; j < PRE; ++j) {
            int a = warp + j * NW;
            if (a < DK) c_store<CW, C16>(C, cu + (long long)a * DV, cv0[j]);
        }
    }
    __syncthreads();
    if (!last) {
        trace_record(2, tr0, tr1, tr2);
        return;
    }
    __threadfence();
    for (int a = tid; a < DK; a += blockDim.x) n[uk + a] = nn[a];
    if (tid == 0) { m[u] = mn; counters[u] = 0u; }
    if (PEND && tid == 0) {
        ring.count[u] = flush ? 0u : (u32)(pt + 1);
        ring.a[u] = flush ? 0.f : anew;
    }
    if (hn && DV <= 2 * (int)blockDim.x) {
        // One read of the unit's h (from L2: other blocks wrote it), o and w, held in registers
        // through both reductions.
        const float* hu = h + (long long)u * DV;
        float hv[2], ov[2], wv[2], s = 0.f;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int j = tid + i * blockDim.x;
            const bool in = j < DV;
            hv[i] = in ? ld_cg(hu + j) : 0.f;
            ov[i] = in ? o[oo + j] : 0.f;
            wv[i] = in ? hnw[hd * DV + j] : 0.f;
            s += hv[i];
        }
        const float mean = block_sum(s, red) / (float)DV;
        float vs = 0.f;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float d = hv[i] - mean;
            if (tid + i * (int)blockDim.x < DV) vs = fmaf(d, d, vs);
        }
        const float r = rsqrtf(block_sum(vs, red) / (float)DV + neps);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int j = tid + i * blockDim.x;
            if (j < DV) store_value(hn, (long long)u * DV + j, (hv[i] - mean) * r * wv[i] * sigmoid_exact(ov[i]), hn_dt);
        }
    } else if (hn) {
        const float* hu = h + (long long)u * DV;
        float s = 0.f;
        for (int j = tid; j < DV; j += blockDim.x) s += ld_cg(hu + j);
        const float mean = block_sum(s, red) / (float)DV;
        float vs = 0.f;
        for (int j = tid; j < DV; j += blockDim.x) { float d = ld_cg(hu + j) - mean; vs = fmaf(d, d, vs); }
        const float var = block_sum(vs, red) / (float)DV;
        const float r = rsqrtf(var + neps);
        for (int j = tid; j < DV; j += blockDim.x)
            store_value(hn, (long long)u * DV + j, (ld_cg(hu + j) - mean) * r * hnw[hd * DV + j] * sigmoid_exact(o[oo + j]), hn_dt);
    }
    trace_record(3, tr0, tr1, tr2);
}

#define MLSTM_STEP_PARAMS                                                                          \
    int NH, int DK, int DV, const float *q, const float *k, const float *v, const float *ig,     \
        const float *fg, const float *ibias, const float *fbias, float cap, float *C, float *n,    \
        float *m, float eps, float *h, const float *o, const float *hnw, float neps, float *hn,    \
        u32 *counters, int ldq, int ldk, int ldv, int ldo, int hn_dt, int c_early, float *pend, int pcap
#define MLSTM_STEP_ARGS NH, DK, DV, q, k, v, ig, fg, ibias, fbias, cap, C, n, m, eps, h, o, hnw, neps, hn, counters, ldq, ldk, ldv, ldo, hn_dt, c_early, pend, pcap

// Narrow tiles (32 columns, 16 warps): many blocks when there are few units (batch 1..2). Their C
// stores wait until h is published (DEFER), and with `c_early` their C loads go out before the wait
// (EARLY: batch 1 4.116 → 4.084 ms, batch 2 4.78 → 4.75; H200). The wide tile keeps storing as it
// goes (holding its 32 values per thread would cost it occupancy) and always loads after the wait
// (both load paths took it from 64 to 80 registers, one block per SM less).
extern "C" __global__ void __launch_bounds__(512) mlstm_step(MLSTM_STEP_PARAMS) {
    mlstm_step_body<1, 16, 16, true, true, false, false>(MLSTM_STEP_ARGS);
}
// The same bounded for two blocks per SM (64 registers), for grids of more narrow blocks than SMs
// (batches 2–4: one wave instead of two). At batch 1 (128 blocks) the unbounded one is faster:
// bounded, out_proj's GEMV blocks fit beside a step block and wait in place, but the step itself
// runs longer (batch 1 4.053 → 4.069 ms, batch 2 4.77 → 4.69 ms; H200, three pairs).
extern "C" __global__ void __launch_bounds__(512, 2) mlstm_step_pair(MLSTM_STEP_PARAMS) {
    mlstm_step_body<1, 16, 16, true, true, false, false>(MLSTM_STEP_ARGS);
}
// Wide tiles (64 columns as float2, 8 warps, 16 rows each loaded up front, the rest in batches of 8):
// fewer, fuller blocks for larger batches. Needs DV even. 64 registers, so 4 blocks share an SM;
// with 32 rows up front (96 registers, 2 blocks per SM) batch 64 took 6% longer per step, and
// 8 rows, or 4 warps, were in between.
extern "C" __global__ void __launch_bounds__(256) mlstm_step_wide(MLSTM_STEP_PARAMS) {
    mlstm_step_body<2, 8, 16, false, false, false, false>(MLSTM_STEP_ARGS);
}
// The three with C in bf16 (`--state-dtype bf16`: half the state's bytes each way).
extern "C" __global__ void __launch_bounds__(512) mlstm_step_c16(MLSTM_STEP_PARAMS) {
    mlstm_step_body<1, 16, 16, true, true, true, false>(MLSTM_STEP_ARGS);
}
extern "C" __global__ void __launch_bounds__(512, 2) mlstm_step_pair_c16(MLSTM_STEP_PARAMS) {
    mlstm_step_body<1, 16, 16, true, true, true, false>(MLSTM_STEP_ARGS);
}
// The wide one takes 128 columns (4 bf16 a lane: a warp's row is 256 contiguous bytes, as the f32
// tile's), in the registers the f32 tile's 64 take. Needs DV % 4 == 0.
extern "C" __global__ void __launch_bounds__(256) mlstm_step_wide_c16(MLSTM_STEP_PARAMS) {
    mlstm_step_body<4, 8, 16, false, false, true, false>(MLSTM_STEP_ARGS);
}

// With deferred updates of C (`pend`: see the header): the wide f32 tile only (where C's bytes
// dominate; a bf16 C's write-back costs more arithmetic per byte than the step saves). 8 rows a
// warp up front and bounded to 64 registers (4 blocks an SM; a 24-byte spill): batch 64 / 256
// 93.1 / 345.0 µs a step, against 94.0 / 352.1 with 16 rows and 80 registers (3 blocks), 95.5 /
// 353.5 with 16 rows at 64, 98.7 / 367.9 with 8 rows at 80 (H200, two rounds alike).
extern "C" __global__ void __launch_bounds__(256, PEND_WIDE_BLOCKS) mlstm_step_wide_pend(MLSTM_STEP_PARAMS) {
    mlstm_step_body<2, 8, PEND_WIDE_PRE, false, false, false, true>(MLSTM_STEP_ARGS);
}
// And the narrow one (batch 1 of the 7B shape: a block an SM).
extern "C" __global__ void __launch_bounds__(512) mlstm_step_pend(MLSTM_STEP_PARAMS) {
    mlstm_step_body<1, 16, 16, true, true, false, true>(MLSTM_STEP_ARGS);
}

// mlstm_settle: writes a state's pending updates into C (see the header) before anything other than
// a step reads or writes it. grid = (ceil(DV / 32), U), block = 256, dynamic shared memory
// PEND_MAX·DK floats. The host zeroes the counts and a after it (they are read by every block).
template <bool C16>
__device__ __forceinline__ void mlstm_settle_body(int DK, int DV, float* C, float* pend, int pcap) {
    extern __shared__ float kp[];
    const int u = blockIdx.y;
    const Ring ring(pend, gridDim.y, pcap, DK);
    const int t = (int)ring.count[u];
    if (t == 0) return;
    const float a = ring.a[u];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int col = blockIdx.x * 32 + lane;
    const bool live = col < DV;
    float vr[PEND_MAX];
    ring_fold_operands<1>(ring, (long long)u * pcap, t, a, DK, DV, col, live, kp, vr);
    if (!live) return;
    const float f = expf(a), none[1] = {0.f};  // (no new entry)
    // rows in batches of 8 loads in flight before any store
    for (int r0 = warp; r0 < DK; r0 += 8 * nw) {
        u32 w[8][1];
#pragma unroll
        for (int j = 0; j < 8; ++j) c_load<1, C16>(C, ((long long)u * DK + min(r0 + j * nw, DK - 1)) * DV + col, w[j]);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int r = r0 + j * nw;
            if (r < DK) {
                float c;
                c_row<1, C16, true>(w[j], f, 0.f, none, true, kp + r * PEND_MAX, vr, &c);
                c_pack<1, C16>(&c, w[j]);
                c_store<1, C16>(C, ((long long)u * DK + r) * DV + col, w[j]);
            }
        }
    }
}
extern "C" __global__ void __launch_bounds__(256) mlstm_settle(int DK, int DV, float* C, float* pend, int pcap, int c16) {
    if (c16) mlstm_settle_body<true>(DK, DV, C, pend, pcap);
    else mlstm_settle_body<false>(DK, DV, C, pend, pcap);
}
