// common.cuh — prepended to every kernel source before NVRTC compiles it (no system headers needed).
//
// 16-bit floats are carried as raw `unsigned short` bits and converted by hand (bf16 = the top half of
// an f32; f16 through the PTX cvt instruction), so the sources need neither cuda_bf16.h nor
// cuda_fp16.h. Reductions: warp shuffles, then one shared-memory pass across warps.
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
#define NEG_INF __int_as_float(0xff800000)

#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                         // round to nearest even
    return (u16)(u >> 16);
}
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}
// v as the 16-bit bits of dtype dt (DT_BF16 or DT_F16).
__device__ __forceinline__ u16 half_bits(float v, int dt) {
    if (dt == DT_BF16) return f32_to_bf16(v);
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
// Two values as bf16 bits packed in one word (lo in the low half), rounded to nearest even.
__device__ __forceinline__ u32 bf16x2_bits(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
#endif
}
// Four values as 16-bit bits of dtype dt, packed for one 8-byte store (first value lowest).
__device__ __forceinline__ uint2 half4_bits(float a, float b, float c, float d, int dt) {
    return make_uint2((u32)half_bits(a, dt) | ((u32)half_bits(b, dt) << 16), (u32)half_bits(c, dt) | ((u32)half_bits(d, dt) << 16));
}
// out[i] = v as 16-bit bits of dtype dt (DT_BF16 or DT_F16).
__device__ __forceinline__ void store_half(u16* out, long long i, float v, int dt) { out[i] = half_bits(v, dt); }
// 16-bit bits h of dtype dt (DT_BF16 or DT_F16) as f32.
__device__ __forceinline__ float half_value(u16 h, int dt) { return dt == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h); }
__device__ __forceinline__ float load_w(const void* p, long long i, int dt) {
    if (dt == DT_F32) return ((const float*)p)[i];
    if (dt == DT_BF16) return bf16_to_f32(((const u16*)p)[i]);
    return f16_to_f32(((const u16*)p)[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `red` holds 32 floats.
// Every thread gets the result. Contains __syncthreads: call from all threads.
__device__ __forceinline__ float block_sum(float v, float* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.f;
    return warp_sum(t);
}
__device__ __forceinline__ float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : NEG_INF;
    return warp_max(t);
}
// A logit and its index as one 64-bit key whose unsigned order is the host's `top_k_of` order:
// values by IEEE total order, ties to the lower index (topk.cu, the stack kernel's LM head).
__device__ __forceinline__ unsigned long long order_key(float v, u32 i) {
    u32 u = __float_as_uint(v);
    u32 t = u ^ ((u32)((int)u >> 31) & 0x7fffffffu);  // signed total order
    return ((unsigned long long)(t ^ 0x80000000u) << 32) | (u32)~i;  // as unsigned; 0 = no key
}
// The value and index of a key (order_key's inverse: the transform keeps the sign bit).
__device__ __forceinline__ float key_value(unsigned long long key) {
    const u32 t = (u32)(key >> 32) ^ 0x80000000u;
    return __uint_as_float(t ^ ((u32)((int)t >> 31) & 0x7fffffffu));
}
__device__ __forceinline__ u32 key_index(unsigned long long key) { return ~(u32)key; }
__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u32 lo = __shfl_xor_sync(0xffffffffu, (u32)v, o), hi = __shfl_xor_sync(0xffffffffu, (u32)(v >> 32), o);
        unsigned long long w = ((unsigned long long)hi << 32) | lo;
        v = w > v ? w : v;
    }
    return v;
}
__device__ __forceinline__ float sigmoid_exact(float x) { return 1.f / (1.f + expf(-x)); }
// σ(x) through the fast exponential and division (relative error ~1e-6, against 2^-9 for the bf16
// rounding that follows): for results written in 16 bits only, where expf's and the IEEE
// division's instructions would bound a streaming kernel.
__device__ __forceinline__ float sigmoid_fast(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }
__device__ __forceinline__ float log_sigmoid(float x) { return fminf(x, 0.f) - log1pf(expf(-fabsf(x))); }

// Programmatic dependent launch (Hopper): a kernel launched with the programmatic-serialization
// attribute may start while the previous kernel drains; it must call pdl_wait() before it reads what
// that kernel wrote (or writes what it reads). pdl_trigger() lets the next kernel start launching.
// Both are no-ops before sm_90 and for kernels launched without the attribute.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Tensor cores, TF32 mma.sync (sm_80+).
// m16n8k8 fragments (g = lane / 4, q = lane % 4): A (16×8, row-major) a0 (g, q), a1 (g+8, q),
// a2 (g, q+4), a3 (g+8, q+4); B (8×8) b0 (q, g), b1 (q+4, g); C (16×8) c0, c1 (g, 2q, 2q+1),
// c2, c3 (g+8, 2q, 2q+1).

__device__ __forceinline__ u32 to_tf32(float x) {
    u32 r;
#if __CUDA_ARCH__ >= 800
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
#else
    r = __float_as_uint(x);
#endif
    return r;
}

// An operand fragment as TF32: hi = tf32(x), lo = tf32(x − hi) (lo is only used by exact products,
// and the compiler drops it otherwise).
template <int N>
struct Tf {
    u32 hi[N], lo[N];
    __device__ __forceinline__ explicit Tf(const float (&x)[N]) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            hi[i] = to_tf32(x[i]);
            lo[i] = to_tf32(x[i] - __uint_as_float(hi[i]));
        }
    }
    // An operand's f32 bits as they are (plain products only): the tensor core reads the top 19
    // bits, i.e. rounds toward zero (relative error below 2^-10, against 2^-11 for rounding to
    // nearest) without a conversion.
    __device__ __forceinline__ static Tf raw(const float (&x)[N]) {
        Tf t;
#pragma unroll
        for (int i = 0; i < N; ++i) { t.hi[i] = __float_as_uint(x[i]); t.lo[i] = 0u; }
        return t;
    }
  private:
    __device__ __forceinline__ Tf() {}
};
// An operand fragment for mma_f32<EXACT>: split in two TF32 parts for exact products, the bits as
// they are for plain ones (no conversions: the kernels' plain products are issue-bound).
template <bool EXACT, int N>
__device__ __forceinline__ Tf<N> frag(const float (&x)[N]) {
    if constexpr (EXACT) return Tf<N>(x);
    else return Tf<N>::raw(x);
}

__device__ __forceinline__ void mma_tf32(float* d, const u32* a, const u32* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += A·B; EXACT adds the two cross terms of the split (small terms first).
template <bool EXACT>
__device__ __forceinline__ void mma_f32(float* d, const Tf<4>& a, const Tf<2>& b) {
    if (EXACT) {
        mma_tf32(d, a.lo, b.hi);
        mma_tf32(d, a.hi, b.lo);
    }
    mma_tf32(d, a.hi, b.hi);
}

// Hopper's asynchronous bulk copies (TMA) complete on an mbarrier in shared memory. Callers run
// them on sm_90+ only.
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(u64* bar, u32 count) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n\tfence.proxy.async.shared::cta;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}
// Arrives on `bar` (one of its `count`), announcing `bytes` of copies that complete it.
__device__ __forceinline__ void mbar_expect_tx(u64* bar, u32 bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(u64* bar, u32 parity) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n\t.reg .pred p;\n\tWAIT_%=:\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n\t@!p bra WAIT_%=;\n\t}" ::"r"(smem_addr(bar)), "r"(parity)
        : "memory");
#endif
}

// Tensor cores, bf16 mma.sync m16n8k16 (sm_80+), f32 accumulation. Fragments (g = lane / 4,
// q = lane % 4; two bf16 per register, the lower k first): A (16×16) a0 (g, 2q..), a1 (g+8, 2q..),
// a2 (g, 2q+8..), a3 (g+8, 2q+8..); B (16×8) b0 (k 2q.., n g), b1 (k 2q+8.., n g); C as m16n8k8.
// ldmatrix loads four 8×8 bf16 tiles from shared memory, lanes 8i..8i+7 giving tile i's row
// addresses (16 contiguous bytes each); .trans hands each thread the transposed pairs.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const u16* p) {
#if __CUDA_ARCH__ >= 800
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const u16* p) {
#if __CUDA_ARCH__ >= 800
    u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#endif
}
__device__ __forceinline__ void mma_bf16(float* d, const u32 (&a)[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Activations, numbered as in the Rust enum `Activation`: 0 GELU (exact), 1 SiLU, 2 ReLU,
// 3 ReLU², 4 sigmoid, 5 SELU. act_apply16: the same for a result written in 16 bits only (SiLU
// and sigmoid through sigmoid_fast).
__device__ __forceinline__ float act_apply(int act, float x) {
    switch (act) {
        case 0: return 0.5f * x * erfcf(-x * 0.70710678118654752f);
        case 1: return x / (1.f + expf(-x));
        case 2: return fmaxf(x, 0.f);
        case 3: { float r = fmaxf(x, 0.f); return r * r; }
        case 4: return 1.f / (1.f + expf(-x));
        default: return 1.0507009873554805f * (x > 0.f ? x : 1.6732632423543772f * (expf(x) - 1.f));
    }
}
__device__ __forceinline__ float act_apply16(int act, float x) {
    if (act == 1) return x * sigmoid_fast(x);
    if (act == 4) return sigmoid_fast(x);
    return act_apply(act, x);
}

// Timing trace, compiled in only when the host defines XLSTM_TRACE (XLSTM_CUDA_TRACE=1): thread 0 of
// every traced block appends one record of 8 u64 to the host's buffer `xlstm_trace_buf` (word 0 is
// the record counter, records start at word 8, a ring of `xlstm_trace_cap` records): kernel tag,
// (grid size << 32 | block), SM, and the block's start, after-pdl_wait, prologue-done and end times
// (%globaltimer, ns). Without XLSTM_TRACE every call below compiles to nothing.
#ifdef XLSTM_TRACE
__device__ u64* xlstm_trace_buf;
__device__ u32 xlstm_trace_cap;
__device__ __forceinline__ u64 trace_now() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void trace_record(u32 tag, u64 t0, u64 t1, u64 t2) {
    __syncthreads();
    if (threadIdx.x == 0 && xlstm_trace_buf && xlstm_trace_cap) {
        u64 t3 = trace_now();
        u32 sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        u64 slot = atomicAdd((unsigned long long*)xlstm_trace_buf, 1ull) % xlstm_trace_cap;
        u64* r = xlstm_trace_buf + 8 + slot * 8;
        u64 grid = (u64)gridDim.x * gridDim.y * gridDim.z, blk = blockIdx.x + (u64)blockIdx.y * gridDim.x;
        r[0] = tag; r[1] = (grid << 32) | blk; r[2] = sm; r[3] = t0; r[4] = t1; r[5] = t2; r[6] = t3; r[7] = 0;
    }
}
#else
__device__ __forceinline__ u64 trace_now() { return 0; }
__device__ __forceinline__ void trace_record(u32, u64, u64, u64) {}
#endif
