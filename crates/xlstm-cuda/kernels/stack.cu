// stack.cu — one decode step of a whole xlstm-large block stack for one sequence, in one persistent
// launch (sm_90: bulk copies and mbarriers).
//
// Why: at batch 1 the step is a stream of bf16 weights (13.3 GB for the 7B shape), and separate
// kernels pay a gap, a prologue and a tail at each of their five boundaries per layer (~25 µs a
// layer of 120). Here one block per SM streams its share of every product through a ring of
// shared-memory stages filled by a producer warp with bulk copies. The weights depend on nothing the
// step computes, so the producer runs ahead across the data dependencies: while the blocks wait at a
// grid barrier, or run the mLSTM cell, the ring keeps filling with the next product's rows.
//
// Per layer (x: the residual [D], f32; all products f32-accumulated dot products):
//   P0  xn = RMSNorm(x)·w1; qkvo = [Wq; Wk; Wv; Wo] xn (bf16 rows), ĩf̃ = [Wi; Wf] xn (f32 rows)
//   P1  the mLSTM cell (mlstm.cu's step, f32 C written every step): unit u = (head, 32 columns of DV)
//       on block u; h [NH·DV]
//   P2  hn = σ(o) ⊙ LayerNorm_DV(h)·w_head (each cell block leaves its 32 values' mean and centred sum
//       of squares; every block merges a head's in a fixed order); x += Wout hn
//   P3  xn = RMSNorm(x)·w2; act[f] = act(Wg[f]·xn) · (Wu[f]·xn)
//   P4  x += Wdown act
// with a grid barrier after each phase (none after the last layer's P4 when no head follows), then
// with `head` set:
//   P5  xn = RMSNorm(x)·w_out; the LM head's logits cap·tanh((Whead xn)/cap), never stored: each
//       block keeps its best (value, index) key, merged by an atomic maximum (order-independent),
//       and the last block to finish writes the best id and logit to `picked` (greedy decoding's
//       pick, kept on the device). In place of the separate norm, product, soft cap and top-1
//       launches: 7B step, H100 4.693 → 4.661 ms; H200 3.626 → 3.625 (P5 streams the head at
//       4.4 TB/s, but the layers' code loses about as much to the longer kernel).
// The last block to finish also zeroes the barrier count and the pick's key for the next launch.
//
// Work: a phase's rows are cut into items of whole rows that fit one stage (at most 16 rows; an up
// item takes P gate rows and the same P up rows). Items are numbered through the launch, phase after
// phase, and item g belongs to block g mod gridDim, so the blocks' shares even out across phases.
// Consumers: 16 warps; thread t holds chunks t, t + 512, ... (8 values each) of the phase's input in
// registers. Each warp runs through the block's items at its own pace, leaving its shuffled partial
// sum of every row in shared memory; at the phase's end one thread per row adds the 16 in warp order
// (deterministic). What a phase's input needs that does not depend on the barrier before it (the
// RMSNorms' weights, the cell's state, P2's o and head-norm weights) is loaded between arriving at
// the barrier and waiting.
// The producer keeps at most ST_INFLIGHT copies in flight, and one while its block's consumers are
// between phases (ST_QUIET): a deeper queue slows every other access, the barriers' above all.
//
// Limits (checked on the host): D, NH·DV, FF multiples of 8 and ≤ 12,288 (3 chunks a thread);
// DK ≤ 512; DV a multiple of 8, ≤ 1,024; NH·ceil(DV / 32) ≤ gridDim.x (one unit a block, its state read before
// the barrier that precedes the cell); 16-byte aligned pointers; f32 C, no deferred updates.
// Launch: grid = SMs (one block each: all must be resident for the grid barriers), block = 544
// (16 consumer warps + the producer), dynamic shared memory STACK_SMEM; `bar` zeroed before.

#define ST_CONSUMERS 512
// ST_STAGES × ST_STAGE_BYTES: the ring (196,608 bytes: STACK_SMEM on the host)
#ifndef ST_STAGES
#define ST_STAGES 6
#endif
#ifndef ST_STAGE_BYTES
#define ST_STAGE_BYTES 32768
#endif
// copies in flight at most (the rest of the ring holds arrived stages): more only queue in the
// memory system and lengthen every other access's latency (barriers, inputs, the cell's state).
// H200, 7B batch-1 step: 1 / 2 / 3 / 4 / 6 in flight of 6 stages: 4.29 / 3.89 / 3.93 / 3.95 / 3.97 ms.
#ifndef ST_INFLIGHT
#define ST_INFLIGHT 2
#endif
// While this block's consumers are between phases — from the moment a warp takes the block's last
// stage of a phase (ST_QUIET_START=1; every stage of the phase has been issued then) or from their
// arrival at the grid barrier (0), to the end of its wait (or with ST_QUIET_END=0 to their next
// stage) — the producer keeps one copy in flight (ST_QUIET=1) or issues none (2): the phase's last
// stores, the barrier's round trips and the next input's loads are on every block's critical path,
// and meet a shorter queue. H200, 7B batch-1 step (ms): no pause 3.704; from the arrival, one / none
// in flight 3.649 / 3.616; from the last stage 3.600 / 3.674.
#ifndef ST_QUIET
#define ST_QUIET 1
#endif
// P5 (the LM head) has no barrier after it: up to the whole ring in flight (H200: 2, 4 and 6
// measured the same)
#ifndef ST_HEAD_INFLIGHT
#define ST_HEAD_INFLIGHT ST_STAGES
#endif
#ifndef ST_QUIET_END
#define ST_QUIET_END 1
#endif
#ifndef ST_QUIET_START
#define ST_QUIET_START 1
#endif
// The consumers read the layer table's pointers from a shared-memory copy of this layer's row and
// the next's (ST_LAYER_SMEM=1): from the table in global memory, every asm with a memory clobber
// makes the compiler load them again, so each load between a barrier's arrival and wait (the
// norms' weights, the cell's state, the head norm's weight) and the cell's gate biases waited on
// two dependent round trips, the pointer's and the data's.
#ifndef ST_LAYER_SMEM
#define ST_LAYER_SMEM 1
#endif
#define ST_MAX_ROWS 16
#define ST_CHUNKS 3
#define ST_DK_MAX 512
// local rows of partial sums a block's share of one phase may have
#define ST_PART_ROWS 320
static_assert(ST_PART_ROWS <= ST_CONSUMERS, "a residual phase's local rows: one a thread");

struct StackLayer {
    const float* norm1;   // [D]
    const u16* wqkvo;     // [2·NH·DK + 2·NH·DV, D] bf16: q, k, v, o rows
    const float* wgates;  // [2·NH, D] f32: ĩ rows, then f̃ rows
    const float* ibias;   // [NH] (may be null)
    const float* fbias;   // [NH] (may be null)
    const float* hnw;     // [NH·DV] head LayerNorm weight
    const u16* wout;      // [D, NH·DV]
    const float* norm2;   // [D]
    const u16* wup;       // [2·FF, D]: gate rows, then up rows
    const u16* wdown;     // [D, FF]
    float* C;             // [NH, DK, DV]
    float* n;             // [NH, DK]
    float* m;             // [NH]
};

struct StackArgs {
    const StackLayer* layers;
    int nlayers, D, NH, DK, DV, FF, act;
    float eps, cap, cell_eps, neps;
    float* x;      // [D]
    float* qkvo;   // [2·NH·DK + 2·NH·DV]
    float* gates;  // [2·NH]
    float* h;      // [NH·DV]
    float* hst;    // [NH·ceil(DV / 32)][2]: each unit's mean and centred sum of squares of its h
    float* a;      // [FF]
    u32* bar;      // grid barrier count, zero at launch (the last block leaves it so)
    u32* done;     // blocks finished, zero at launch (likewise)
    unsigned long long* best;  // P5: the best key so far, zero at launch (likewise)
    const float* fnorm;        // P5: the final RMSNorm's weight [D], or null for none
    const u16* head;           // [V, D] bf16: the LM head, or null for no P5
    int V;
    float hcap, heps;          // P5: soft cap (0: none), the final norm's eps
    u32* picked;               // P5: the best id, then its logit's bits
};

__device__ __forceinline__ void mbar_arrive(u64* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
#endif
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, u64* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
#endif
}
// Barrier of the 16 consumer warps only (the producer warp runs on).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(ST_CONSUMERS) : "memory"); }
__device__ __forceinline__ u32 ld_acquire(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Set while this block's consumers are between phases (ST_QUIET): the producer holds back.
__device__ volatile u32* quiet_flag() {
    __shared__ volatile u32 q;
    return &q;
}

// A grid barrier in two halves: this block's consumers arrive (their writes published), and later
// wait until all gridDim.x blocks have arrived at the `k`-th barrier. Between the two a block may
// issue loads that do not depend on the barrier: a fence after them would wait for them.
__device__ __forceinline__ void grid_arrive(u32* bar) {
    consumers_sync();
    if (ST_QUIET && threadIdx.x == 0) *quiet_flag() = 1;
    // a release reduction: the block's writes (ordered before it by the barrier above) are visible
    // to whoever acquires the count
    if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(bar) : "memory");
}
__device__ __forceinline__ void grid_wait(const u32* bar, u32 k) {
    if (threadIdx.x == 0) {
        const u32 target = k * gridDim.x;
        while (ld_acquire(bar) < target) {
        }
        if (ST_QUIET && ST_QUIET_END) *quiet_flag() = 0;
    }
    consumers_sync();
}

// A phase's work: `items` items, the first global item number `g0`.
struct Phase {
    int items, g0;
    // this block's first item of the phase
    __device__ int first() const {
        const int nb = gridDim.x;
        return (int)(((long long)blockIdx.x - g0 % nb + nb) % nb);
    }
};

// Rows of a bf16 [rows, K] matrix per item, and of an f32 one.
__device__ __forceinline__ int rows16(int K) { return min(ST_MAX_ROWS, ST_STAGE_BYTES / (2 * K)); }
__device__ __forceinline__ int rows32(int K) { return min(ST_MAX_ROWS, ST_STAGE_BYTES / (4 * K)); }
// gate/up pairs per item
__device__ __forceinline__ int pairs16(int K) { return min(ST_MAX_ROWS / 2, ST_STAGE_BYTES / (4 * K)); }

struct Shape {
    int nqkvo, nb16, nb32, items0, items2, items3, items4, items5;
    __device__ Shape(const StackArgs& a) {
        nqkvo = 2 * a.NH * (a.DK + a.DV);
        const int r0 = rows16(a.D), rg = rows32(a.D);
        nb16 = (nqkvo + r0 - 1) / r0;
        nb32 = (2 * a.NH + rg - 1) / rg;
        items0 = nb16 + nb32;
        items2 = (a.D + rows16(a.NH * a.DV) - 1) / rows16(a.NH * a.DV);
        items3 = (a.FF + pairs16(a.D) - 1) / pairs16(a.D);
        items4 = (a.D + rows16(a.FF) - 1) / rows16(a.FF);
        items5 = a.head ? (a.V + rows16(a.D) - 1) / rows16(a.D) : 0;
    }
};

// What the producer reads of StackArgs, by value: through a reference every field would be loaded
// again after each copy's asm (its memory clobber).
struct ProducerArgs {
    const StackLayer* layers;
    const u16* head;
    int nlayers, D, NH, DV, FF, V;
};
// Out of line (ST_PRODUCER_INLINE=0), the producer's registers do not crowd the consumers' (the
// kernel is at its 96-register cap; inline, ptxas spills more: H200 7B step 3.674 against 3.625
// ms); the shape by value (a reference would keep the consumers' copy in local memory).
#ifndef ST_PRODUCER_INLINE
#define ST_PRODUCER_INLINE 0
#endif
#if ST_PRODUCER_INLINE
#define ST_PRODUCER_ATTR __forceinline__
#else
#define ST_PRODUCER_ATTR __noinline__
#endif

// The producer: every item of this block, in the consumers' order, into the ring.
__device__ ST_PRODUCER_ATTR void stack_produce(const ProducerArgs a, const Shape s, char* ring, u64* full, u64* empty) {
    const int nb = gridDim.x;
    u32 seq = 0;
    auto put = [&](const void* src, u32 bytes, const void* src2, u32 bytes2, u32 inflight) {
        const u32 slot = seq % ST_STAGES;
        if (seq >= ST_STAGES) mbar_wait(&empty[slot], ((seq / ST_STAGES) - 1) & 1);
        if (inflight < ST_STAGES && seq >= inflight) {
            const u32 f = seq - inflight;  // that stage's next fill comes after this one
            mbar_wait(&full[f % ST_STAGES], (f / ST_STAGES) & 1);
        }
        if (ST_QUIET == 1 && seq >= 1 && *quiet_flag()) mbar_wait(&full[(seq - 1) % ST_STAGES], ((seq - 1) / ST_STAGES) & 1);
        if (ST_QUIET == 2)
            while (*quiet_flag()) {
            }
        char* dst = ring + (size_t)slot * ST_STAGE_BYTES;
        mbar_expect_tx(&full[slot], bytes + bytes2);
        bulk_copy(dst, src, bytes, &full[slot]);
        if (bytes2) bulk_copy(dst + bytes, src2, bytes2, &full[slot]);
        ++seq;
    };
    int g = 0;  // the global number of the phase's first item
    for (int l = 0; l < a.nlayers; ++l) {
        const StackLayer& L = a.layers[l];
        {
            const Phase p{s.items0, g};
            const int r0 = rows16(a.D), rg = rows32(a.D);
            for (int i = p.first(); i < p.items; i += nb) {
                if (i < s.nb16) {
                    const int row = i * r0, n = min(r0, s.nqkvo - row);
                    put(L.wqkvo + (long long)row * a.D, (u32)(n * a.D * 2), nullptr, 0, ST_INFLIGHT);
                } else {
                    const int row = (i - s.nb16) * rg, n = min(rg, 2 * a.NH - row);
                    put(L.wgates + (long long)row * a.D, (u32)(n * a.D * 4), nullptr, 0, ST_INFLIGHT);
                }
            }
            g += p.items;
        }
        {
            const Phase p{s.items2, g};
            const int K = a.NH * a.DV, r = rows16(K);
            for (int i = p.first(); i < p.items; i += nb) {
                const int row = i * r, n = min(r, a.D - row);
                put(L.wout + (long long)row * K, (u32)(n * K * 2), nullptr, 0, ST_INFLIGHT);
            }
            g += p.items;
        }
        {
            const Phase p{s.items3, g};
            const int r = pairs16(a.D);
            for (int i = p.first(); i < p.items; i += nb) {
                const int f = i * r, n = min(r, a.FF - f);
                const u32 bytes = (u32)(n * a.D * 2);
                put(L.wup + (long long)f * a.D, bytes, L.wup + (long long)(a.FF + f) * a.D, bytes, ST_INFLIGHT);
            }
            g += p.items;
        }
        {
            const Phase p{s.items4, g};
            const int r = rows16(a.FF);
            for (int i = p.first(); i < p.items; i += nb) {
                const int row = i * r, n = min(r, a.D - row);
                put(L.wdown + (long long)row * a.FF, (u32)(n * a.FF * 2), nullptr, 0, ST_INFLIGHT);
            }
            g += p.items;
        }
    }
    const Phase p{s.items5, g};
    const int r = rows16(a.D);
    for (int i = p.first(); i < p.items; i += nb) {
        const int row = i * r, n = min(r, a.V - row);
        put(a.head + (long long)row * a.D, (u32)(n * a.D * 2), nullptr, 0, ST_HEAD_INFLIGHT);
    }
}

// Σ over the 16 consumer warps of one value each, in warp order; every consumer thread gets it.
__device__ __forceinline__ float consumers_sum(float v, float* red) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) red[w] = v;
    consumers_sync();
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < ST_CONSUMERS / 32; ++i) t += red[i];
    consumers_sync();  // red is free again
    return t;
}

// Consumer side of the ring. With XLSTM_TRACE, thread 0 sums the time it waits for stages.
struct Ring {
    char* base;
    u64* full;
    u64* empty;
    u32 seq;
    u64 waited;
    __device__ const char* take() {
        if (ST_QUIET && !ST_QUIET_END && threadIdx.x == 0) *quiet_flag() = 0;
        const u32 slot = seq % ST_STAGES;
        const u64 t0 = trace_now();
        mbar_wait(&full[slot], (seq / ST_STAGES) & 1);
        waited += trace_now() - t0;
        return base + (size_t)slot * ST_STAGE_BYTES;
    }
    // this warp is done with the stage take() returned
    __device__ void release() {
        __syncwarp();
        if ((threadIdx.x & 31) == 0) mbar_arrive(&empty[seq % ST_STAGES]);
        ++seq;
    }
};

// This thread's part of one row of `K` values in the stage (bf16 or f32) against its input chunks.
template <bool F32>
__device__ __forceinline__ float row_part(const char* row, int K, const float (&xin)[ST_CHUNKS][8]) {
    const int t = threadIdx.x, c8 = K >> 3;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < ST_CHUNKS; ++j) {
        const int c = t + j * ST_CONSUMERS;
        if (c < c8) {
            if constexpr (F32) {
                const float4 w0 = ((const float4*)row)[2 * c], w1 = ((const float4*)row)[2 * c + 1];
                s = fmaf(w0.x, xin[j][0], s); s = fmaf(w0.y, xin[j][1], s); s = fmaf(w0.z, xin[j][2], s); s = fmaf(w0.w, xin[j][3], s);
                s = fmaf(w1.x, xin[j][4], s); s = fmaf(w1.y, xin[j][5], s); s = fmaf(w1.z, xin[j][6], s); s = fmaf(w1.w, xin[j][7], s);
            } else {
                const uint4 w = ((const uint4*)row)[c];
                const u32 q[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s = fmaf(__uint_as_float(q[e] << 16), xin[j][2 * e], s);
                    s = fmaf(__uint_as_float(q[e] & 0xffff0000u), xin[j][2 * e + 1], s);
                }
            }
        }
    }
    return s;
}

// One stage's `n` rows: this warp's partial dot products into part[r·17 + warp] (four rows at a
// time, their loads and shuffles independent). No barrier: each warp runs through the items at its
// own pace, and the partial sums are added once per phase (`part_sum`).
template <bool F32>
__device__ __forceinline__ void stage_parts(Ring& ring, int n, int K, const float (&xin)[ST_CHUNKS][8], float* part, bool last) {
    const char* st = ring.take();
    if (ST_QUIET && ST_QUIET_START && last && (threadIdx.x & 31) == 0) *quiet_flag() = 1;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const size_t rb = (size_t)K * (F32 ? 4 : 2);
    for (int r0 = 0; r0 < n; r0 += 4) {
        float s[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) s[q] = r0 + q < n ? row_part<F32>(st + (r0 + q) * rb, K, xin) : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
            for (int q = 0; q < 4; ++q) s[q] += __shfl_xor_sync(0xffffffffu, s[q], o);
        }
        if (lane == 0) {
#pragma unroll
            for (int q = 0; q < 4; ++q)
                if (r0 + q < n) part[(r0 + q) * 17 + w] = s[q];
        }
    }
    ring.release();
}

// The sum of local row r's 16 partial sums, in warp order.
__device__ __forceinline__ float part_sum(const float* part, int r) {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < ST_CONSUMERS / 32; ++i) t += part[r * 17 + i];
    return t;
}

// With XLSTM_TRACE: one record per block and phase (tag 100 + phase): its start, the end of its
// items, the time thread 0 waited for stages, and the layer. Thread 0 only (no block barrier:
// the producer warp has left).
__device__ __forceinline__ void stack_trace(int phase, u64 t0, u64 t1, u64 waited, int layer) {
#ifdef XLSTM_TRACE
    if (threadIdx.x == 0 && xlstm_trace_buf && xlstm_trace_cap) {
        const u64 t3 = trace_now();
        u32 sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        const u64 slot = atomicAdd((unsigned long long*)xlstm_trace_buf, 1ull) % xlstm_trace_cap;
        u64* r = xlstm_trace_buf + 8 + slot * 8;
        r[0] = 100 + phase; r[1] = ((u64)gridDim.x << 32) | blockIdx.x; r[2] = sm; r[3] = t0; r[4] = t1; r[5] = waited; r[6] = t3; r[7] = layer;
    }
#endif
}

// This thread's chunks of a vector of K values in global memory (written by other blocks: read
// past L1); zero past K.
__device__ __forceinline__ void load_input(const float* v, int K, float (&xin)[ST_CHUNKS][8]) {
    const int c8 = K >> 3;
#pragma unroll
    for (int j = 0; j < ST_CHUNKS; ++j) {
        const int c = threadIdx.x + j * ST_CONSUMERS;
#pragma unroll
        for (int e = 0; e < 8; e += 4) {
            const float4 x = c < c8 ? __ldcg((const float4*)(v + 8 * c + e)) : make_float4(0.f, 0.f, 0.f, 0.f);
            xin[j][e] = x.x;
            xin[j][e + 1] = x.y;
            xin[j][e + 2] = x.z;
            xin[j][e + 3] = x.w;
        }
    }
}

// RMSNorm(x)·w into this thread's chunks, which hold w already (loaded before the barrier that
// precedes x: the weights do not wait for it).
__device__ __forceinline__ void normed_in_place(const float* x, int D, float eps, float (&xin)[ST_CHUNKS][8], float* red) {
    const int c8 = D >> 3;
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < ST_CHUNKS; ++j) {
        const int c = threadIdx.x + j * ST_CONSUMERS;
        if (c < c8) {
#pragma unroll
            for (int e = 0; e < 8; e += 4) {
                const float4 v = __ldcg((const float4*)(x + 8 * c + e));
                ss = fmaf(v.x, v.x, ss); ss = fmaf(v.y, v.y, ss); ss = fmaf(v.z, v.z, ss); ss = fmaf(v.w, v.w, ss);
                xin[j][e] *= v.x; xin[j][e + 1] *= v.y; xin[j][e + 2] *= v.z; xin[j][e + 3] *= v.w;
            }
        }
    }
    const float r = rsqrtf(consumers_sum(ss, red) / (float)D + eps);
#pragma unroll
    for (int j = 0; j < ST_CHUNKS; ++j) {
#pragma unroll
        for (int e = 0; e < 8; ++e) xin[j][e] *= r;
    }
}

// A grid barrier (the k-th) before an RMSNorm: its weight, if any, goes into xin between arriving
// and waiting (it does not wait for the barrier).
__device__ __forceinline__ void barrier_norm_weights(u32* bar, u32 k, const float* w, int D, float (&xin)[ST_CHUNKS][8]) {
    grid_arrive(bar);
    if (w) load_input(w, D, xin);
    grid_wait(bar, k);
}

// P5 (see the header), after the last layer: out of line, so that its registers do not crowd the
// layers' loops.
// (Its arguments by value: a reference would hold the layers' values in local memory.)
__device__ __noinline__ void stack_head(const StackArgs& a, Ring ring, u32 nbar, int g, int items, float* part, float* red) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nb = gridDim.x, D = a.D;
    float xin[ST_CHUNKS][8];
    barrier_norm_weights(a.bar, nbar + 1, a.fnorm, D, xin);
    const u64 t0 = trace_now();
    if (a.fnorm) normed_in_place(a.x, D, a.heps, xin, red);
    else load_input(a.x, D, xin);
    // a block's rows may be more than its partial sums hold: its items go in groups
    const int r = rows16(D);
    const Phase p{items, g};
    unsigned long long key = 0;  // this thread's best
    for (int i = p.first(); i < p.items;) {
        const int i0 = i;
        int k = 0;
        for (; i < p.items && (k + 1) * r <= ST_PART_ROWS; i += nb, ++k) stage_parts<false>(ring, min(r, a.V - i * r), D, xin, part + k * r * 17, i + nb >= p.items);
        consumers_sync();
        for (int lr = tid; lr < k * r; lr += ST_CONSUMERS) {
            const int row = (i0 + (lr / r) * nb) * r + lr % r;
            if (row < a.V) {
                float v = part_sum(part, lr);
                if (a.hcap > 0.f) v = a.hcap * tanhf(v / a.hcap);  // as bias_soft_cap
                const unsigned long long kv = order_key(v, (u32)row);
                key = kv > key ? kv : key;
            }
        }
        consumers_sync();  // part is free again
    }
    stack_trace(5, t0, trace_now(), ring.waited, a.nlayers);
    key = warp_max_u64(key);
    __shared__ unsigned long long kred[ST_CONSUMERS / 32];
    if (lane == 0) kred[warp] = key;
    consumers_sync();
    if (tid < 32) key = warp_max_u64(tid < ST_CONSUMERS / 32 ? kred[tid] : 0ull);
    if (tid == 0) atomicMax(a.best, key);
}

// The launch's end, thread 0 of each block: the last block to get here writes the head's pick and
// leaves the counters zero for the next launch.
__device__ __noinline__ void stack_finish(const StackArgs& a) {
    __threadfence();
    if (atomicAdd(a.done, 1u) == gridDim.x - 1) {
        // every block has passed its last barrier and left its key
        __threadfence();
        if (a.head) {
            const unsigned long long b = atomicMax(a.best, 0ull);
            a.picked[0] = key_index(b);
            a.picked[1] = __float_as_uint(key_value(b));
            *a.best = 0;
        }
        *a.bar = 0;
        *a.done = 0;
    }
}

extern "C" __global__ void __launch_bounds__(ST_CONSUMERS + 32, 1) stack_step1(const __grid_constant__ StackArgs a) {
    extern __shared__ __align__(128) char smem[];
    char* ring_base = smem;
    __shared__ __align__(8) u64 full[ST_STAGES], empty[ST_STAGES];
    __shared__ float red[32];
    __shared__ float hstat[2][64];  // per head: mean, rstd (P2; NH ≤ 64)
    float* qs = (float*)(smem + ST_STAGES * ST_STAGE_BYTES);  // cell: [DK] each
    float* ks = qs + ST_DK_MAX;
    float* nn = ks + ST_DK_MAX;
    float* part = nn + ST_DK_MAX;  // [ST_PART_ROWS][17]: a phase's partial sums
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) {
        *quiet_flag() = 0;
        for (int i = 0; i < ST_STAGES; ++i) {
            mbar_init(&full[i], 1);
            mbar_init(&empty[i], ST_CONSUMERS / 32);
        }
    }
    // layer table rows 0 and 1 (ST_LAYER_SMEM); row l + 1 goes into slot (l + 1) & 1 during layer l
    __shared__ __align__(16) StackLayer lay[2];
    constexpr int LW = sizeof(StackLayer) / 8;
    if (ST_LAYER_SMEM && tid < 2 * LW && tid / LW < a.nlayers) ((u64*)lay)[tid] = ((const u64*)a.layers)[tid];
    __syncthreads();
    const Shape s(a);
    if (warp == ST_CONSUMERS / 32) {
        if (lane == 0) stack_produce(ProducerArgs{a.layers, a.head, a.nlayers, a.D, a.NH, a.DV, a.FF, a.V}, s, ring_base, full, empty);
        return;
    }
    Ring ring{ring_base, full, empty, 0, 0};
    const int nb = gridDim.x;
    const int NH = a.NH, DK = a.DK, DV = a.DV, D = a.D, K2 = NH * DV;
    const int tiles = (DV + 31) / 32, units = NH * tiles;
    float xin[ST_CHUNKS][8];
    u32 nbar = 0;
    int g = 0;  // global item number of the phase's first item
    u64 t0 = trace_now();
    auto end_phase = [&](int phase, int layer) {
        stack_trace(phase, t0, trace_now(), ring.waited, layer);
        ring.waited = 0;
    };
    auto barrier = [&]() {
        grid_arrive(a.bar);
        grid_wait(a.bar, ++nbar);
        t0 = trace_now();
    };
    // a barrier before an RMSNorm: its weights go into xin in between
    auto barrier_norm = [&](const float* w) {
        barrier_norm_weights(a.bar, ++nbar, w, D, xin);
        t0 = trace_now();
    };
    // P2 and P4: x += W·xin over `items` items of rows with K inputs. A block's local rows are
    // fewer than its threads (ST_PART_ROWS < ST_CONSUMERS): thread r owns local row r, whose old x
    // it reads before the items.
    auto residual_phase = [&](int items, int K) {
        const Phase p{items, g};
        const int r = rows16(K), first = p.first();
        const int mine = first < items ? (items - first + nb - 1) / nb : 0;
        const int row = (first + (tid / r) * nb) * r + tid % r;
        const bool own = tid < mine * r && row < D;
        const float xo = own ? __ldcg(a.x + row) : 0.f;
        int k = 0;
        for (int i = first; i < items; i += nb, ++k) stage_parts<false>(ring, min(r, D - i * r), K, xin, part + k * r * 17, i + nb >= items);
        consumers_sync();
        if (own) a.x[row] = xo + part_sum(part, tid);
        g += items;
    };
    auto layer = [&](int l) -> const StackLayer& { return ST_LAYER_SMEM ? lay[l & 1] : a.layers[l]; };
    load_input(layer(0).norm1, D, xin);
    for (int l = 0; l < a.nlayers; ++l) {
        const StackLayer& L = layer(l);
        // ---- P0: RMSNorm, q/k/v/o and the gate rows (local slots of r0 rows an item)
        normed_in_place(a.x, D, a.eps, xin, red);
        {
            const Phase p{s.items0, g};
            const int r0 = rows16(D), rg = rows32(D);
            int k = 0;
            for (int i = p.first(); i < p.items; i += nb, ++k) {
                const bool last = i + nb >= p.items;
                if (i < s.nb16) stage_parts<false>(ring, min(r0, s.nqkvo - i * r0), D, xin, part + k * r0 * 17, last);
                else stage_parts<true>(ring, min(rg, 2 * NH - (i - s.nb16) * rg), D, xin, part + k * r0 * 17, last);
            }
            consumers_sync();
            for (int r = tid; r < k * r0; r += ST_CONSUMERS) {
                const int i = p.first() + (r / r0) * nb, j = r % r0;
                if (i < s.nb16) {
                    const int row = i * r0 + j;
                    if (row < s.nqkvo) a.qkvo[row] = part_sum(part, r);
                } else {
                    const int row = (i - s.nb16) * rg + j;
                    if (j < rg && row < 2 * NH) a.gates[row] = part_sum(part, r);
                }
            }
            g += p.items;
        }
        end_phase(0, l);
        // ---- P1: the cell. This block's unit's state goes out before the barrier (it was written
        // by this block a step ago, or by the prompt).
        grid_arrive(a.bar);
        const int u = blockIdx.x;
        const bool cell = u < units;
        const int hd = cell ? u / tiles : 0, col = (cell ? u % tiles : 0) * 32 + lane;
        const bool live = cell && col < DV;
        float* C = L.C + (long long)hd * DK * DV + col;
        constexpr int PRE = 16;
        float cv[PRE];
#pragma unroll
        for (int j = 0; j < PRE; ++j) {
            const int r = warp + 16 * j;
            cv[j] = (live && r < DK) ? C[(long long)r * DV] : 0.f;
        }
        const float ne = (cell && tid < DK) ? L.n[hd * DK + tid] : 0.f;
        const float mo = cell ? L.m[hd] : 0.f;
        // the next layer's row into the slot layer l − 1 had (read next at this layer's end)
        // (by warp 1: thread 0 polls the barrier)
        if (ST_LAYER_SMEM && l >= 1 && l + 1 < a.nlayers && tid >= 32 && tid < 32 + LW) ((u64*)&lay[(l + 1) & 1])[tid - 32] = ((const u64*)(a.layers + l + 1))[tid - 32];
        grid_wait(a.bar, ++nbar);
        t0 = trace_now();
        if (cell) {
            const float* q = a.qkvo + hd * DK;
            const float* k = a.qkvo + NH * DK + hd * DK;
            const float* v = a.qkvo + 2 * NH * DK + hd * DV;
            float ip = __ldcg(a.gates + hd), fp = __ldcg(a.gates + NH + hd);
            if (L.ibias) ip += L.ibias[hd];
            if (L.fbias) fp += L.fbias[hd];
            if (a.cap > 0.f) { ip = a.cap * tanhf(ip / a.cap); fp = a.cap * tanhf(fp / a.cap); }
            const float lf = log_sigmoid(fp);
            const float mn = fmaxf(lf + mo, ip);
            const float fa = expf(lf + mo - mn), ia = expf(ip - mn);
            const float scale = 1.f / sqrtf((float)DK);
            const float vv = live ? __ldcg(v + col) : 0.f;
            if (tid < DK) {
                qs[tid] = __ldcg(q + tid) * scale;
                const float kk = ia * __ldcg(k + tid);
                ks[tid] = kk;
                nn[tid] = fa * ne + kk;
            }
            consumers_sync();
            float pn = 0.f;
            if (tid < DK) pn = qs[tid] * nn[tid];
            const float qn = consumers_sum(pn, red);
            float acc = 0.f;
            if (live) {
#pragma unroll
                for (int j = 0; j < PRE; ++j) {
                    const int r = warp + 16 * j;
                    if (r < DK) {
                        const float c = fmaf(fa, cv[j], ks[r] * vv);
                        acc = fmaf(qs[r], c, acc);
                        C[(long long)r * DV] = c;
                    }
                }
                for (int r0 = warp + 16 * PRE; r0 < DK; r0 += 16 * 8) {
                    float cw[8];
#pragma unroll
                    for (int j = 0; j < 8; ++j) cw[j] = C[(long long)min(r0 + 16 * j, DK - 1) * DV];
#pragma unroll
                    for (int j = 0; j < 8; ++j) {
                        const int r = r0 + 16 * j;
                        if (r < DK) {
                            const float c = fmaf(fa, cw[j], ks[r] * vv);
                            acc = fmaf(qs[r], c, acc);
                            C[(long long)r * DV] = c;
                        }
                    }
                }
            }
            // h: the 16 warps' sums for these 32 columns
            part[warp * 32 + lane] = acc;
            consumers_sync();
            if (warp == 0) {
                float hv = 0.f;
                if (live) {
                    float t = 0.f;
#pragma unroll
                    for (int w = 0; w < ST_CONSUMERS / 32; ++w) t += part[w * 32 + lane];
                    hv = t / (fmaxf(fabsf(qn), expf(-mn)) + a.cell_eps);
                    a.h[hd * DV + col] = hv;
                }
                // the unit's mean and centred sum of squares (merged per head in P2)
                const int nl = min(32, DV - (u % tiles) * 32);
                const float mean = warp_sum(hv) / (float)nl;
                const float d = live ? hv - mean : 0.f;
                const float m2 = warp_sum(d * d);
                if (lane == 0) { a.hst[2 * u] = mean; a.hst[2 * u + 1] = m2; }
            }
            // n and m: every block of the head read them before the barrier
            if (u % tiles == 0) {
                if (tid < DK) L.n[hd * DK + tid] = nn[tid];
                if (tid == 0) L.m[hd] = mn;
            }
        }
        end_phase(1, l);
        // P2's input is w·σ(o)·LayerNorm(h): o (from P0) and w go into xin before the barrier
        grid_arrive(a.bar);
        {
            const float* o = a.qkvo + 2 * NH * DK + NH * DV;
            const int c8 = K2 >> 3;
#pragma unroll
            for (int j = 0; j < ST_CHUNKS; ++j) {
                const int c = tid + j * ST_CONSUMERS;
#pragma unroll
                for (int e = 0; e < 8; ++e) xin[j][e] = c < c8 ? L.hnw[8 * c + e] * sigmoid_exact(__ldcg(o + 8 * c + e)) : 0.f;
            }
        }
        grid_wait(a.bar, ++nbar);
        t0 = trace_now();
        // ---- P2: head LayerNorm and output gate, out_proj + residual. Warp w takes heads w, w + 16, ...:
        // lane j holds unit j's statistics, merged pairwise (Chan et al.) in a fixed order.
        for (int hh = warp; hh < NH; hh += ST_CONSUMERS / 32) {
            const int uu = hh * tiles + lane;
            float n = lane < tiles ? (float)min(32, DV - lane * 32) : 0.f;
            float mean = lane < tiles ? __ldcg(a.hst + 2 * uu) : 0.f, m2 = lane < tiles ? __ldcg(a.hst + 2 * uu + 1) : 0.f;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float n2 = __shfl_xor_sync(0xffffffffu, n, o), mean2 = __shfl_xor_sync(0xffffffffu, mean, o), m22 = __shfl_xor_sync(0xffffffffu, m2, o);
                const float nt = n + n2;
                // the lower lane's half first, so both lanes of a pair compute the same sums
                const bool lo = (lane & o) == 0;
                const float na = lo ? n : n2, nb2 = lo ? n2 : n, ma = lo ? mean : mean2, mb = lo ? mean2 : mean;
                const float sa = lo ? m2 : m22, sb = lo ? m22 : m2;
                const float dl = mb - ma;
                if (nt > 0.f) {
                    mean = ma + dl * (nb2 / nt);
                    m2 = sa + sb + dl * dl * (na * nb2 / nt);
                }
                n = nt;
            }
            if (lane == 0) { hstat[0][hh] = mean; hstat[1][hh] = rsqrtf(m2 / (float)DV + a.neps); }
        }
        consumers_sync();
        {
            const int c8 = K2 >> 3;
#pragma unroll
            for (int j = 0; j < ST_CHUNKS; ++j) {
                const int c = tid + j * ST_CONSUMERS;
                if (c < c8) {
                    const int hh = 8 * c / DV;  // DV % 8 == 0: a chunk lies in one head
                    const float4 h0 = __ldcg((const float4*)(a.h + 8 * c)), h1 = __ldcg((const float4*)(a.h + 8 * c + 4));
                    const float hv[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
                    for (int e = 0; e < 8; ++e) xin[j][e] *= (hv[e] - hstat[0][hh]) * hstat[1][hh];
                }
            }
        }
        residual_phase(s.items2, K2);
        end_phase(2, l);
        barrier_norm(L.norm2);
        // ---- P3: RMSNorm, [gate; up] and the activation (an item's slots: n gate rows, n up rows)
        normed_in_place(a.x, D, a.eps, xin, red);
        {
            const Phase p{s.items3, g};
            const int r = pairs16(D);
            int k = 0;
            for (int i = p.first(); i < p.items; i += nb, ++k) stage_parts<false>(ring, 2 * min(r, a.FF - i * r), D, xin, part + k * 2 * r * 17, i + nb >= p.items);
            consumers_sync();
            for (int lr = tid; lr < k * r; lr += ST_CONSUMERS) {
                const int i = p.first() + (lr / r) * nb, j = lr % r, n = min(r, a.FF - i * r);
                const float* pk = part + (lr / r) * 2 * r * 17;
                if (j < n) a.a[i * r + j] = act_apply(a.act, part_sum(pk, j)) * part_sum(pk, n + j);
            }
            g += p.items;
        }
        end_phase(3, l);
        barrier();
        // ---- P4: down + residual
        load_input(a.a, a.FF, xin);
        residual_phase(s.items4, a.FF);
        end_phase(4, l);
        if (l + 1 < a.nlayers) barrier_norm(layer(l + 1).norm1);
    }
    if (a.head) stack_head(a, ring, nbar, g, s.items5, part, red);
    if (tid == 0) stack_finish(a);
}
