// gemv.cu — matrix × few-vectors products for decode: out[r, n] = Σ_k W[n, k] · x[r, k], r < R ≤ 4.
//
// Memory-bound: every weight is read once, 16 bytes per lane per load (8 bf16/f16 or 4 f32), with 8
// loads in flight per lane (4 per matrix for pairs), streamed past L1 (ld.global.nc.L1::no_allocate).
// One launch covers up to 8 "segments" (matrices that share the input x, e.g. q, k, v, o and the two
// gate rows of an mLSTM layer), each with its own dtype, output and epilogue:
//   mode 0: out[r·ld + n] = acc          mode 1: out[r·ld + n] += acc  (residual add)
//   mode 2: out[r·ld + n] = act(acc) · acc2, acc2 from the segment's partner matrix w2 (gated FFN)
// Prologue: x is staged in shared memory as f32 ([R, K], R·K·4 bytes of dynamic shared memory); when
// `norm_w` is set the GEMV is of the RMS-normalised rows, x·rsqrt(mean x² + eps)·norm_w: x·norm_w is
// staged and the scalar rsqrt(...) applied to each output, and block 0 also writes the normalised rows
// to `xn_out` (if set).
// Launch: block = 256 threads = 8 warps; each warp computes `rpw_s` consecutive output rows of its
// segment s (the host picks them so the grid is about one wave and every warp streams about the same
// bytes: x is staged once per block and amortised over its rows; a warp that streams twice the
// bytes of the others would finish last); grid = Σ_s ceil(n_s / (8·rpw_s)) blocks, segment s owning
// blocks from block0_s. Blocks never straddle
// segments, so dtype and mode branches are block-uniform. Each warp streams its rows as a sequence of
// rounds (8 chunks per lane) with two rounds in flight (double-buffered registers). Launched with
// programmatic dependent launch on sm_90: the first two rounds of weight loads go out before
// pdl_wait(), overlapping the previous kernel's tail; x and the outputs are touched only after it.
// Registers: at most 128 per thread (__launch_bounds__(256, 2)), so two blocks share an SM as the
// host's grid assumes (without the bound, R = 4 took 142 and ran 1.5× slower, one block per SM).
// Limits: R ∈ {1, 2, 3, 4}; vector path needs K % 8 == 0 (16-bit) / K % 4 == 0 (f32), else a scalar
// path; R·K·4 bytes of shared memory (the host raises the dynamic limit; it routes larger products to
// cuBLAS).

struct GemvSeg {
    const void* w;
    const void* w2;
    float* out;
    int n;
    int dt;
    int mode;
    int ld;
    int block0;
    int rpw;  // rows per warp
};

struct GemvArgs {
    GemvSeg seg[8];
    const float* x;
    const float* norm_w;
    float* xn_out;
    int nseg;
    int k;
    float eps;
    int act;
};

__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// 8 weights of one 16-byte chunk as f32.
__device__ __forceinline__ void unpack8(uint4 v, int dt, float* f) {
    u32 u[4] = {v.x, v.y, v.z, v.w};
    if (dt == DT_BF16) {
#pragma unroll
        for (int i = 0; i < 4; ++i) { f[2 * i] = __uint_as_float(u[i] << 16); f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u); }
    } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) { f[2 * i] = f16_to_f32((u16)(u[i] & 0xffffu)); f[2 * i + 1] = f16_to_f32((u16)(u[i] >> 16)); }
    }
}

// 8 weights of chunk c times the 8 x values of row r: x is staged "split" (the first 4 of each
// 8-value group in the lower half of the row, the last 4 in the upper half), so consecutive lanes
// read consecutive 16-byte words (no bank conflicts).
template <int R>
__device__ __forceinline__ void fma_chunk16(const float* xs, int k, int c, const float* wf, float* acc) {
    const int hk = k >> 1;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float4 a = *(const float4*)(xs + r * k + c * 4);
        float4 b = *(const float4*)(xs + r * k + hk + c * 4);
        float s = acc[r];
        s = fmaf(wf[0], a.x, s); s = fmaf(wf[1], a.y, s); s = fmaf(wf[2], a.z, s); s = fmaf(wf[3], a.w, s);
        s = fmaf(wf[4], b.x, s); s = fmaf(wf[5], b.y, s); s = fmaf(wf[6], b.z, s); s = fmaf(wf[7], b.w, s);
        acc[r] = s;
    }
}

// 4 f32 weights of chunk c (values 4c..4c+3) in the split layout.
template <int R>
__device__ __forceinline__ void fma_chunk32(const float* xs, int k, int c, uint4 v, float* acc) {
    const int hk = k >> 1;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float4 a = *(const float4*)(xs + r * k + (c & 1) * hk + (c >> 1) * 4);
        float s = acc[r];
        s = fmaf(__uint_as_float(v.x), a.x, s); s = fmaf(__uint_as_float(v.y), a.y, s);
        s = fmaf(__uint_as_float(v.z), a.z, s); s = fmaf(__uint_as_float(v.w), a.w, s);
        acc[r] = s;
    }
}

// Index of x[j] in the staged row (split layout when K % 8 == 0, else plain).
__device__ __forceinline__ int xoff(int j, int k, bool split) {
    return split ? ((j >> 2) & 1) * (k >> 1) + (j >> 3) * 4 + (j & 3) : j;
}

#define GEMV_U 8

// Loads round `base` of a row's chunks into wv (pair: chunks of w1 and w2 interleaved).
__device__ __forceinline__ void gemv_load(uint4* wv, const char* w1, const char* w2, bool pair, int base, int lane, int nch) {
#pragma unroll
    for (int u = 0; u < GEMV_U; ++u) {
        int uu = pair ? (u >> 1) : u;
        int cc = base + lane + uu * 32;
        const char* src = (pair && (u & 1)) ? w2 : w1;
        wv[u] = cc < nch ? ld_stream(src + (long long)cc * 16) : make_uint4(0, 0, 0, 0);
    }
}

// Multiply-accumulates one round (GEMV_U chunks per lane) of row `row`, starting at chunk `base`.
template <int R>
__device__ __forceinline__ void gemv_consume(const uint4* wv, const GemvSeg& sg, bool pair, bool half, int base, int lane, int nch,
                                             const float* xs, int k, float* acc, float* acc2) {
#pragma unroll
    for (int u = 0; u < GEMV_U; ++u) {
        int uu = pair ? (u >> 1) : u;
        int cc = base + lane + uu * 32;
        if (cc < nch) {
            if (pair && (u & 1)) {
                if (half) { float wf[8]; unpack8(wv[u], sg.dt, wf); fma_chunk16<R>(xs, k, cc, wf, acc2); }
                else fma_chunk32<R>(xs, k, cc, wv[u], acc2);
            } else {
                if (half) { float wf[8]; unpack8(wv[u], sg.dt, wf); fma_chunk16<R>(xs, k, cc, wf, acc); }
                else fma_chunk32<R>(xs, k, cc, wv[u], acc);
            }
        }
    }
}

// Reduces a finished row over the warp, scales it (the row's 1/rms with a norm, else 1) and writes
// it (lane 0; for one row, a residual add by the lane that holds the row's old value, `pre`, when
// the warp has at most 32 rows), then clears the accumulators.
template <int R>
__device__ __forceinline__ void gemv_finish(const GemvSeg& sg, bool pair, int act, int row, int rr, int lane, const float* scale, const float* pre, float* acc, float* acc2) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float v = warp_sum(acc[r]) * scale[r];
        float v2 = pair ? warp_sum(acc2[r]) * scale[r] : 0.f;
        if (R == 1 && sg.mode == 1 && sg.rpw <= 32) {
            if (lane == rr) sg.out[(long long)r * sg.ld + row] = pre[r] + v;
        } else if (lane == 0) {
            float* o = sg.out + (long long)r * sg.ld + row;
            if (sg.mode == 0) *o = v;
            else if (sg.mode == 1) *o += v;
            else *o = act_apply(act, v) * v2;
        }
        acc[r] = 0.f;
        acc2[r] = 0.f;
    }
}

// Stages one row of x in the split layout, U float4 per thread in flight (the registers beside the
// two weight rounds hold 8: x alone, or x and the norm weights 4 each); with NORM x·w and returns
// Σ x². One row without a norm takes 8: batch 1's down projection (10,944 values) then takes two
// round trips, not three (4.045 → 4.035 ms per step); for two rows it was slower (4.66 → 4.69).
template <int U, bool NORM>
__device__ __forceinline__ float stage_x_split(const float4* x4, const float4* w4, int k, float* xr) {
    const int k4 = k >> 2;
    float ss = 0.f;
    for (int i0 = threadIdx.x; i0 < k4; i0 += U * blockDim.x) {
        float4 v[U], nw[NORM ? U : 1];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + u * blockDim.x;
            v[u] = i < k4 ? x4[i] : make_float4(0.f, 0.f, 0.f, 0.f);
            if constexpr (NORM) nw[u] = i < k4 ? w4[i] : make_float4(1.f, 1.f, 1.f, 1.f);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + u * blockDim.x;
            if (i < k4) {
                if constexpr (NORM) {
                    ss = fmaf(v[u].x, v[u].x, ss); ss = fmaf(v[u].y, v[u].y, ss);
                    ss = fmaf(v[u].z, v[u].z, ss); ss = fmaf(v[u].w, v[u].w, ss);
                    v[u].x *= nw[u].x; v[u].y *= nw[u].y; v[u].z *= nw[u].z; v[u].w *= nw[u].w;
                }
                *(float4*)(xr + (i & 1) * (k >> 1) + (i >> 1) * 4) = v[u];
            }
        }
    }
    return ss;
}

template <int R>
__device__ __forceinline__ void gemv_body(const GemvArgs& a) {
    const u64 tr0 = trace_now();
    extern __shared__ float xs[];
    __shared__ float red[32];
    __shared__ float inv[4];
    const int k = a.k;
    const bool split = (k & 7) == 0;
    int b = blockIdx.x, s = 0;
    while (s + 1 < a.nseg && b >= a.seg[s + 1].block0) ++s;
    const GemvSeg sg = a.seg[s];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rpw = sg.rpw;
    const int row0 = (b - sg.block0) * 8 * rpw + warp * rpw;  // this warp's rows: row0 .. row0 + rpw
    const bool pair = sg.mode == 2;
    const bool half = sg.dt != DT_F32;
    const int per = half ? 8 : 4;  // weights per 16-byte chunk
    const bool vec = split;
    const int nch = k / per;
    const long long rbytes = (long long)k * (half ? 2 : 4);
    const int step = pair ? (GEMV_U / 2) : GEMV_U;  // chunks per lane per round
    const int rpr = (nch + 32 * step - 1) / (32 * step);  // rounds per row
    const int nrows = max(0, min(rpw, sg.n - row0));
    const int nrounds = vec ? nrows * rpr : 0;
    const char* w1b = (const char*)sg.w;
    const char* w2b = pair ? (const char*)sg.w2 : 0;
#define GEMV_LOAD(buf, i)                                                                          \
    {                                                                                              \
        int rw_ = row0 + (i) / rpr, bs_ = ((i) % rpr) * 32 * step;                                 \
        gemv_load(buf, w1b + rw_ * rbytes, pair ? w2b + rw_ * rbytes : 0, pair, bs_, lane, nch);   \
    }

    // Two rounds of weight loads are issued before x is staged, and the loop below keeps two rounds
    // in flight (double buffering), so each warp streams its rows without waiting between rounds.
    pdl_trigger();
    uint4 wa[GEMV_U], wb[GEMV_U];
    if (nrounds > 0) GEMV_LOAD(wa, 0);
    if (nrounds > 1) GEMV_LOAD(wb, 1);
    // Weights never change; x (and the outputs) belong to the previous kernel: wait for it here.
    pdl_wait();
    const u64 tr1 = trace_now();
    // A residual add's old values (lane j: row row0 + j) go out now, so the last row's write does not
    // wait for a read at the kernel's end (one row only: with more, the registers cost more than this
    // saves: batch 2 took 2.5% longer).
    float pre[R];
#pragma unroll
    for (int r = 0; r < R; ++r) pre[r] = (R == 1 && sg.mode == 1 && sg.rpw <= 32 && lane < nrows) ? sg.out[(long long)r * sg.ld + row0 + lane] : 0.f;

    // Stage x (one read of global memory, 16-byte loads, 4–8 in flight per thread). With a norm, x·w
    // is staged and each row's 1/rms(x) scales its finished dot products (gemv_finish), so no second
    // pass over x has to wait for the block-wide sum.
    const float4* w4 = (const float4*)a.norm_w;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float ss = 0.f;
        if (split) {
            const float4* x4 = (const float4*)(a.x + r * k);
            if (w4) ss = stage_x_split<4, true>(x4, w4, k, xs + r * k);
            else if (R == 1) stage_x_split<8, false>(x4, w4, k, xs + r * k);
            else stage_x_split<4, false>(x4, w4, k, xs + r * k);
        } else {
            for (int j = threadIdx.x; j < k; j += blockDim.x) {
                float v = a.x[r * k + j];
                ss = fmaf(v, v, ss);
                xs[r * k + j] = a.norm_w ? v * a.norm_w[j] : v;
            }
        }
        if (a.norm_w) {
            float tot = block_sum(ss, red);
            if (threadIdx.x == 0) inv[r] = rsqrtf(tot / (float)k + a.eps);
        }
    }
    __syncthreads();
    float scale[R];
#pragma unroll
    for (int r = 0; r < R; ++r) scale[r] = a.norm_w ? inv[r] : 1.f;
    if (a.norm_w && a.xn_out && b == 0) {
#pragma unroll
        for (int r = 0; r < R; ++r)
            for (int j = threadIdx.x; j < k; j += blockDim.x) a.xn_out[r * k + j] = xs[r * k + xoff(j, k, split)] * scale[r];
    }
    const u64 tr2 = trace_now();

    float acc[R], acc2[R];
#pragma unroll
    for (int r = 0; r < R; ++r) { acc[r] = 0.f; acc2[r] = 0.f; }
    if (vec) {
        for (int i = 0; i < nrounds; i += 2) {
            gemv_consume<R>(wa, sg, pair, half, (i % rpr) * 32 * step, lane, nch, xs, k, acc, acc2);
            if (i % rpr == rpr - 1) gemv_finish<R>(sg, pair, a.act, row0 + i / rpr, i / rpr, lane, scale, pre, acc, acc2);
            if (i + 2 < nrounds) GEMV_LOAD(wa, i + 2);
            if (i + 1 < nrounds) {
                gemv_consume<R>(wb, sg, pair, half, ((i + 1) % rpr) * 32 * step, lane, nch, xs, k, acc, acc2);
                if ((i + 1) % rpr == rpr - 1) gemv_finish<R>(sg, pair, a.act, row0 + (i + 1) / rpr, (i + 1) / rpr, lane, scale, pre, acc, acc2);
                if (i + 3 < nrounds) GEMV_LOAD(wb, i + 3);
            }
        }
    } else {
        for (int rr = 0; rr < nrows; ++rr) {
            const int row = row0 + rr;
            for (int j = lane; j < k; j += 32) {
                float w = load_w(sg.w, (long long)row * k + j, sg.dt);
                float w_2 = pair ? load_w(sg.w2, (long long)row * k + j, sg.dt) : 0.f;
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    float xv = xs[r * k + j];
                    acc[r] = fmaf(w, xv, acc[r]);
                    acc2[r] = fmaf(w_2, xv, acc2[r]);
                }
            }
            gemv_finish<R>(sg, pair, a.act, row, rr, lane, scale, pre, acc, acc2);
        }
    }
#undef GEMV_LOAD
    trace_record(1, tr0, tr1, tr2);
}

extern "C" __global__ void __launch_bounds__(256, 2) gemv_r1(const GemvArgs a) { gemv_body<1>(a); }
extern "C" __global__ void __launch_bounds__(256, 2) gemv_r2(const GemvArgs a) { gemv_body<2>(a); }
extern "C" __global__ void __launch_bounds__(256, 2) gemv_r3(const GemvArgs a) { gemv_body<3>(a); }
extern "C" __global__ void __launch_bounds__(256, 2) gemv_r4(const GemvArgs a) { gemv_body<4>(a); }

// dots_f32: out[m, n] = Σ_k x[m, k] · W[n, k] (+ beta · out[m, n]) for a few f32 weight rows and a
// few x rows (a decode batch's mLSTM gate rows: cuBLAS takes a split-K SGEMM and its reduction for
// these 2 MFLOP). grid = (N, M), block = 128: one dot product per block, 16-byte loads, all of them
// in flight at once for K ≤ 4096. Rows n < n0 go to out [M, n0], the others to out2 [M, N − n0]
// (two adjacent matrices' products, e.g. ĩ and f̃, straight into their buffers). Needs K % 4 == 0
// and 16-byte aligned rows.
extern "C" __global__ void __launch_bounds__(128) dots_f32(const float* W, const float* x, float* out, float* out2, int n0, int M, int N, int K, float beta) {
    __shared__ float red[32];
    const int n = blockIdx.x, m = blockIdx.y, k4 = K >> 2;
    const float4* xr = (const float4*)(x + (long long)m * K);
    const float4* wr = (const float4*)(W + (long long)n * K);
    float s = 0.f;
#pragma unroll 8
    for (int i = threadIdx.x; i < k4; i += 128) {
        const float4 a = __ldg(xr + i), b = __ldg(wr + i);
        s = fmaf(a.x, b.x, fmaf(a.y, b.y, fmaf(a.z, b.z, fmaf(a.w, b.w, s))));
    }
    s = block_sum(s, red);
    if (threadIdx.x == 0) {
        float* o = n < n0 ? out + (long long)m * n0 + n : out2 + (long long)m * (N - n0) + (n - n0);
        *o = beta != 0.f ? fmaf(beta, *o, s) : s;
    }
}

// skinny_mma: out[m, n] = Σ_k X[m, k]·W[n, k] (+ beta·out[m, n]) for up to 16 rows of x (a decode
// batch of 3–16) and many bf16 weight rows, on Hopper's warpgroup tensor cores: one warpgroup (a
// block of 4 warps) computes a 64 weight rows × 16 rows tile (wgmma m64n16k16, W as the A operand,
// x as B, both read from shared memory), streaming its weight rows × its slice of K through a ring
// of SK_STAGES stages, each filled by two TMA tile copies (W's [64 × 64 values], x's [16 × 64],
// rows past M zero-filled; 128-byte swizzle) completing on the stage's mbarrier; one thread issues
// them and refills a stage once every warp is past it. grid = (N / 64, splits): split s takes
// k-tiles [s·T/splits, (s+1)·T/splits) of T = K / 64. With splits > 1 each block leaves its
// partial [M, 64] in `parts` ([splits, M, N]) and the last of a column tile's blocks (a counter per
// tile, reset by it) adds them in split order (deterministic) and writes out. With `gated`, the
// FFN's [gate; up] with its activation: act(g)·u in 16 bits, unsplit. Needs sm_90a (the
// host compiles for it on sm_90), K % 64 == 0, N % 64 == 0, 16-byte aligned out.
// (With more rows of x — n32 / n64 tiles — it lost to cuBLASLt: the split products' partial sums
// grow with the rows; see BENCHMARKS.md.)
#define SK_KT 64
#define SK_ROWS 64
#define SK_MAX_SPLITS 8  // (the host's most)
#define SK_STAGES 4  // (the host's SKINNY_SMEM counts them)
struct __align__(64) TmaMap {
    unsigned long long v[16];
};
struct SkinnyArgs {
    TmaMap wmap;  // W [N, K], box 64 × 64
    TmaMap xmap;  // x [M, K], box 16 × 64
    float* out;
    float* parts;
    u32* counters;
    int M, N, K, ldo, splits;
    float beta;
    // gated (a FFN's [gate; up], W = the two stacked, N = 2·ff): a block takes 32 gate rows and the
    // same 32 up rows (wmap's box 32 × 64) and writes act(g)·u as 16-bit `gated_out` [M, ff]
    u16* gated_out;
    int gated, act, ff, out_dt;
};

// Element offset of 16-byte chunk c of row r in a [rows][64] tile written with the 128-byte swizzle.
__device__ __forceinline__ int sk_off(int r, int c) { return r * SK_KT + ((c ^ (r & 7)) << 3); }

__device__ __forceinline__ void tma_tile(void* dst, const TmaMap* map, int k, int row, u64* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(smem_addr(dst)),
                 "l"((unsigned long long)map), "r"(k), "r"(row), "r"(smem_addr(bar))
                 : "memory");
#endif
}

// A wgmma shared-memory matrix descriptor: a K-major tile of 128-byte rows with the 128-byte swizzle
// (8-row groups 1,024 bytes apart), 1,024-byte aligned; a k16 step is +32 bytes.
__device__ __forceinline__ u64 wg_desc(const void* p) {
    return (u64)((smem_addr(p) & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
__device__ __forceinline__ void wg_fence() {
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit_wait() {
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("wgmma.commit_group.sync.aligned;\n\twgmma.wait_group.sync.aligned 0;" ::: "memory");
#endif
}
// d[64 × 16] += A[64 × 16] · B[16 × 16] (bf16, f32 accumulation), both from shared memory.
__device__ __forceinline__ void wgmma_k16(float* d, u64 da, u64 db) {
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, %8, %9, 1, 1, 1, 0, 0;"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "l"(da), "l"(db));
#endif
}
#define SK_NP 16  // rows of x a tile (M ≤ SK_NP)
extern "C" __global__ void __launch_bounds__(128) skinny_mma(const __grid_constant__ SkinnyArgs a) {
    constexpr int NP = SK_NP;
    extern __shared__ u16 sk_raw[];
    __shared__ __align__(8) u64 full[SK_STAGES];
    u16* sk = (u16*)(((size_t)sk_raw + 1023) & ~(size_t)1023);  // the swizzle's 1024-byte atoms
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
    const int n0 = blockIdx.x * (a.gated ? SK_ROWS / 2 : SK_ROWS), T = a.K / SK_KT;
    const int tb = blockIdx.y * T / a.splits, te = (blockIdx.y + 1) * T / a.splits;
    constexpr int STAGE = (SK_ROWS + NP) * SK_KT;  // W tile, then x's
    const u32 bytes = (u32)(SK_ROWS + NP) * SK_KT * 2;
    auto issue = [&](int t) {
        u16* ws = sk + ((t - tb) % SK_STAGES) * STAGE;
        u64* bar = full + (t - tb) % SK_STAGES;
        mbar_expect_tx(bar, bytes);
        tma_tile(ws, &a.wmap, t * SK_KT, n0, bar);
        if (a.gated) tma_tile(ws + SK_ROWS / 2 * SK_KT, &a.wmap, t * SK_KT, a.ff + n0, bar);
        tma_tile(ws + SK_ROWS * SK_KT, &a.xmap, t * SK_KT, 0, bar);
    };
    if (tid == 0) {
        for (int s = 0; s < SK_STAGES; ++s) mbar_init(full + s, 1);
        for (int t = tb; t < min(te, tb + SK_STAGES); ++t) issue(t);
    }
    __syncthreads();
    float d[NP / 2];
#pragma unroll
    for (int i = 0; i < NP / 2; ++i) d[i] = 0.f;
    for (int t = tb; t < te; ++t) {
        const int slot = (t - tb) % SK_STAGES;
        mbar_wait(full + slot, ((t - tb) / SK_STAGES) & 1);
        const u16* ws = sk + slot * STAGE;
        const u64 da = wg_desc(ws), db = wg_desc(ws + SK_ROWS * SK_KT);
        wg_fence();
#pragma unroll
        for (int s = 0; s < SK_KT / 16; ++s) wgmma_k16(d, da + 2 * s, db + 2 * s);
        wg_commit_wait();
        __syncthreads();  // every warp is done with this slot: refill it
        if (tid == 0 && t + SK_STAGES < te) issue(t + SK_STAGES);
    }
    // d[4j + e]: weight row n0 + warp·16 + g (+ 8 for e ≥ 2), x row 8j + 2q (+ 1 for odd e)
    if (a.gated) {
        // warps 2–3 hold the up rows of warps 0–1's gate rows: through shared memory
        __shared__ float ups[SK_ROWS / 2][NP + 1];
        const int r0 = (warp & 1) * 16 + g;
        if (warp >= 2) {
#pragma unroll
            for (int i = 0; i < NP / 2; ++i) ups[r0 + ((i >> 1) & 1) * 8][(i >> 2) * 8 + 2 * q + (i & 1)] = d[i];
        }
        __syncthreads();
        if (warp < 2) {
#pragma unroll
            for (int i = 0; i < NP / 2; ++i) {
                const int r = r0 + ((i >> 1) & 1) * 8, m = (i >> 2) * 8 + 2 * q + (i & 1);
                if (m < a.M) store_half(a.gated_out, (long long)m * a.ff + n0 + r, act_apply16(a.act, d[i]) * ups[r][m], a.out_dt);
            }
        }
        return;
    }
    const int nr = n0 + warp * 16 + g;
    float* dst = a.splits == 1 ? a.out : a.parts + (long long)blockIdx.y * a.M * a.N;
    const long long ld = a.splits == 1 ? a.ldo : a.N;
#pragma unroll
    for (int i = 0; i < NP / 2; ++i) {
        const int m = (i >> 2) * 8 + 2 * q + (i & 1), n = nr + ((i >> 1) & 1) * 8;
        if (m < a.M) {
            float* o = dst + (long long)m * ld + n;
            *o = (a.splits == 1 && a.beta != 0.f) ? fmaf(a.beta, *o, d[i]) : d[i];
        }
    }
    if (a.splits == 1) return;
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (tid == 0) last = atomicAdd(a.counters + blockIdx.x, 1u) == (u32)a.splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // the splits' partial sums of this tile, 4 columns a thread, every split's load in flight
    // before any is added; added in split order
    for (int i = tid; i < a.M * (SK_ROWS / 4); i += 128) {
        const int m = i / (SK_ROWS / 4), n = n0 + (i % (SK_ROWS / 4)) * 4;
        float4 v[SK_MAX_SPLITS];
#pragma unroll
        for (int p = 0; p < SK_MAX_SPLITS; ++p)
            v[p] = p < a.splits ? __ldcg((const float4*)(a.parts + ((long long)p * a.M + m) * a.N + n)) : make_float4(0.f, 0.f, 0.f, 0.f);
        float4 s = v[0];
#pragma unroll
        for (int p = 1; p < SK_MAX_SPLITS; ++p) {
            s.x += v[p].x;
            s.y += v[p].y;
            s.z += v[p].z;
            s.w += v[p].w;
        }
        float4* o = (float4*)(a.out + (long long)m * a.ldo + n);
        if (a.beta != 0.f) {
            const float4 b = *o;
            s = make_float4(fmaf(a.beta, b.x, s.x), fmaf(a.beta, b.y, s.y), fmaf(a.beta, b.z, s.z), fmaf(a.beta, b.w, s.w));
        }
        *o = s;
    }
    if (tid == 0) a.counters[blockIdx.x] = 0u;
}
