// norm.cu — RMSNorm and LayerNorm-per-group over f32 rows.
//
// rms_norm:  out[r, j] = x[r, j] · rsqrt(mean_j x[r, :]² + eps) · w[j]; optional 16-bit copy of the
//            result (`out_h`, bf16 or f16 bits per `hdt`) for a following cuBLAS product (with `out`
//            null, only that copy is written). Rows of
//            width % 4 == 0 up to 32·blockDim values (aligned) are read once, as float4 in registers.
//            Launch: grid = rows, block = 256 (any multiple of 32 up to 1024).
// group_norm: per row r and group g of `group` values: (x − mean)·rsqrt(var + eps)·w[j] (+ bias[j]),
//            biased variance, two passes over the group (mean, then centred squares), f32 throughout;
//            optional `gate` (rows `gate_ld` values apart, dtype `gdt`: f32 or 16-bit): the result
//            is multiplied by sigmoid(gate[r, j]) (the mLSTM output gate); optional 16-bit copy
//            `out_h` as for rms_norm (with `out` null, only that copy is written).
//            Launch: grid = (width / group, rows), block = 256.
// group_norm_warp (group_norm_warp4 for group ≤ 512: half the registers; group_norm_warp4h for
//            that with a 16-bit gate, kept as its bits until used): the same, one warp per
//            group held in registers (one read of x and the gate, shuffles only; σ through
//            sigmoid_fast when only the 16-bit copy is written), for group % 128 == 0 and
//            group ≤ 1024 with x, w, bias, an f32 gate, out 16-byte and out_h, a 16-bit gate 8-byte
//            aligned; `groups` = rows · width / group. Launch: grid = ceil(groups / 8), block = 256.
// rms_gate_dots: an xlstm-large layer's gate pre-activations straight from its un-normalised rows (a
//            prompt's; decode computes them in its GEMV): with y = x[r]·rsqrt(mean x[r]² + eps)·w,
//            out_i[r, j] = cap(y·gi[j] + bi[j]) and out_f[r, j] = cap(y·gf[j] + bf[j]) for j < nh ≤ 8
//            (gi, gf: f32 [nh, width]; biases may be null; cap(v) = c·tanh(v/c), none for c ≤ 0),
//            and (`out_h` not null) y's 16-bit copy as rms_norm writes it, in a second pass over
//            the block's rows (read from L2).
//            The products run on tensor cores with every operand split in two TF32 parts (f32
//            accuracy, see mma_f32): warp w of NW multiplies 16 rows by columns [w, w + 1)·width/NW
//            in steps of 16, four steps' loads at once, each lane reading 16-byte words; within a
//            step both operands take the columns in the same permuted order, which the sum does not
//            see. Needs width % (16·NW) == 0 and x, w, gi, gf 16-byte aligned.
//            Launch: grid = ceil(rows / 16), block = 32·NW (256 to 1024).
// Limits: width, group < 2^31; `red` scratch is 32 floats of shared memory.

extern "C" __global__ void rms_norm(const float* x, int width, const float* w, float eps, float* out, u16* out_h, int hdt) {
    __shared__ float red[32];
    long long base = (long long)blockIdx.x * width;
    // Rows of up to 8 float4 per thread, 16-byte aligned: one read of x, held in registers.
    const int n4 = width >> 2;
    if ((width & 3) == 0 && n4 <= 8 * (int)blockDim.x && (((size_t)x | (size_t)w | (size_t)out) & 15) == 0 && ((size_t)out_h & 7) == 0) {
        float4 v[8];
        float ss = 0.f;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int i = threadIdx.x + u * blockDim.x;
            if (i < n4) {
                v[u] = ((const float4*)(x + base))[i];
                ss = fmaf(v[u].x, v[u].x, ss); ss = fmaf(v[u].y, v[u].y, ss); ss = fmaf(v[u].z, v[u].z, ss); ss = fmaf(v[u].w, v[u].w, ss);
            }
        }
        const float r = rsqrtf(block_sum(ss, red) / (float)width + eps);
#pragma unroll
        for (int u = 0; u < 8; ++u) {
            const int i = threadIdx.x + u * blockDim.x;
            if (i < n4) {
                const float4 wv = ((const float4*)w)[i];
                const float4 y = make_float4(v[u].x * r * wv.x, v[u].y * r * wv.y, v[u].z * r * wv.z, v[u].w * r * wv.w);
                if (out) ((float4*)(out + base))[i] = y;
                if (out_h) ((uint2*)(out_h + base))[i] = half4_bits(y.x, y.y, y.z, y.w, hdt);
            }
        }
        return;
    }
    float ss = 0.f;
    for (int j = threadIdx.x; j < width; j += blockDim.x) { float v = x[base + j]; ss = fmaf(v, v, ss); }
    float tot = block_sum(ss, red);
    float r = rsqrtf(tot / (float)width + eps);
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
        float v = x[base + j] * r * w[j];
        if (out) out[base + j] = v;
        if (out_h) store_half(out_h, base + j, v, hdt);
    }
}

extern "C" __global__ void group_norm(const float* x, int width, int group, const float* w, const float* bias, float eps,
                                      const void* gate, int gate_ld, int gdt, float* out, u16* out_h, int hdt) {
    __shared__ float red[32];
    long long base = (long long)blockIdx.y * width + (long long)blockIdx.x * group;
    long long gbase = (long long)blockIdx.y * gate_ld + (long long)blockIdx.x * group;
    int j0 = blockIdx.x * group;
    float s = 0.f;
    for (int j = threadIdx.x; j < group; j += blockDim.x) s += x[base + j];
    float mean = block_sum(s, red) / (float)group;
    float v = 0.f;
    for (int j = threadIdx.x; j < group; j += blockDim.x) { float d = x[base + j] - mean; v = fmaf(d, d, v); }
    float var = block_sum(v, red) / (float)group;
    float r = rsqrtf(var + eps);
    for (int j = threadIdx.x; j < group; j += blockDim.x) {
        float y = (x[base + j] - mean) * r * w[j0 + j] + (bias ? bias[j0 + j] : 0.f);
        if (gate) y *= sigmoid_exact(load_w(gate, gbase + j, gdt));
        if (out) out[base + j] = y;
        if (out_h) store_half(out_h, base + j, y, hdt);
    }
}

// 4 values from i on (16-byte aligned f32, or 8-byte aligned 16-bit values of dtype dt) as f32.
__device__ __forceinline__ float4 load4(const void* p, long long i, int dt) {
    if (dt == DT_F32) return *(const float4*)((const float*)p + i);
    const uint2 u = *(const uint2*)((const u16*)p + i);
    return make_float4(half_value((u16)(u.x & 0xffffu), dt), half_value((u16)(u.x >> 16), dt), half_value((u16)(u.y & 0xffffu), dt), half_value((u16)(u.y >> 16), dt));
}

// NV: float4s per lane at most (group ≤ 128·NV); the registers are sized by it. G16: the gate is
// 16-bit (gdt), held as its raw bits until used (8 registers fewer than as f32: one more block per SM).
template <int NV, bool G16>
__device__ __forceinline__ void group_norm_warp_nv(const float* x, int width, int group, const float* w, const float* bias, float eps,
                                                   const void* gate, int gate_ld, int gdt, float* out, u16* out_h, int hdt, int groups) {
    const int lane = threadIdx.x & 31;
    const long long gi = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (gi >= groups) return;
    const int per_row = width / group;
    const int j0 = (int)(gi % per_row) * group;
    const long long base = (gi / per_row) * width + j0, gbase = (gi / per_row) * gate_ld + j0;
    const int nv = group >> 7;  // float4s per lane
    float4 v[NV], gv[G16 ? 1 : NV];
    uint2 gr[G16 ? NV : 1];
    float s = 0.f;
#pragma unroll
    for (int u = 0; u < NV; ++u) {
        if (u < nv) {
            v[u] = *(const float4*)(x + base + (u * 32 + lane) * 4);
            // (the gate issued with x: more in flight)
            if constexpr (G16) {
                if (gate) gr[u] = *(const uint2*)((const u16*)gate + gbase + (u * 32 + lane) * 4);
            } else {
                if (gate) gv[u] = load4(gate, gbase + (u * 32 + lane) * 4, gdt);
            }
        }
    }
#pragma unroll
    for (int u = 0; u < NV; ++u)
        if (u < nv) s += (v[u].x + v[u].y) + (v[u].z + v[u].w);
    const float mean = warp_sum(s) / (float)group;
    float q = 0.f;
#pragma unroll
    for (int u = 0; u < NV; ++u) {
        if (u < nv) {
            float a = v[u].x - mean, b = v[u].y - mean, c = v[u].z - mean, d = v[u].w - mean;
            q = fmaf(a, a, q); q = fmaf(b, b, q); q = fmaf(c, c, q); q = fmaf(d, d, q);
        }
    }
    const float r = rsqrtf(warp_sum(q) / (float)group + eps);
#pragma unroll
    for (int u = 0; u < NV; ++u) {
        if (u < nv) {
            const int j = (u * 32 + lane) * 4;
            const float4 wv = *(const float4*)(w + j0 + j);
            const float4 bv = bias ? *(const float4*)(bias + j0 + j) : make_float4(0.f, 0.f, 0.f, 0.f);
            float y[4] = {(v[u].x - mean) * r * wv.x + bv.x, (v[u].y - mean) * r * wv.y + bv.y,
                          (v[u].z - mean) * r * wv.z + bv.z, (v[u].w - mean) * r * wv.w + bv.w};
            if (gate) {
                float4 g;
                if constexpr (G16) {
                    const uint2 b = gr[u];
                    g = make_float4(half_value((u16)(b.x & 0xffffu), gdt), half_value((u16)(b.x >> 16), gdt), half_value((u16)(b.y & 0xffffu), gdt), half_value((u16)(b.y >> 16), gdt));
                } else {
                    g = gv[u];
                }
                if (out) { y[0] *= sigmoid_exact(g.x); y[1] *= sigmoid_exact(g.y); y[2] *= sigmoid_exact(g.z); y[3] *= sigmoid_exact(g.w); }
                else { y[0] *= sigmoid_fast(g.x); y[1] *= sigmoid_fast(g.y); y[2] *= sigmoid_fast(g.z); y[3] *= sigmoid_fast(g.w); }  // 16 bits only
            }
            if (out) *(float4*)(out + base + j) = make_float4(y[0], y[1], y[2], y[3]);
            if (out_h) *(uint2*)(out_h + base + j) = half4_bits(y[0], y[1], y[2], y[3], hdt);
        }
    }
}
#define GROUP_NORM_WARP_PARAMS                                                                            \
    const float *x, int width, int group, const float *w, const float *bias, float eps, const void *gate, \
        int gate_ld, int gdt, float *out, u16 *out_h, int hdt, int groups
#define GROUP_NORM_WARP_ARGS x, width, group, w, bias, eps, gate, gate_ld, gdt, out, out_h, hdt, groups
extern "C" __global__ void group_norm_warp(GROUP_NORM_WARP_PARAMS) { group_norm_warp_nv<8, false>(GROUP_NORM_WARP_ARGS); }
extern "C" __global__ void group_norm_warp4(GROUP_NORM_WARP_PARAMS) { group_norm_warp_nv<4, false>(GROUP_NORM_WARP_ARGS); }
#ifndef GROUP_NORM_4H_BLOCKS
#define GROUP_NORM_4H_BLOCKS 5  // (48 registers: 25.2-26.7 → 21.0-21.8 µs per layer at 2,048 rows against
#endif                          // group_norm_warp4's 56; bounded for 6 it spills: 24.1-26.5; H200)
extern "C" __global__ void __launch_bounds__(256, GROUP_NORM_4H_BLOCKS) group_norm_warp4h(GROUP_NORM_WARP_PARAMS) { group_norm_warp_nv<4, true>(GROUP_NORM_WARP_ARGS); }

extern "C" __global__ void __launch_bounds__(1024) rms_gate_dots(const float* x, int rows, int width, const float* w, float eps,
                                                              const float* gi, const float* gf, int nh, const float* bi,
                                                              const float* bf, float cap, float* out_i, float* out_f,
                                                              u16* out_h, int hdt) {
    constexpr int MAXW = 32, BATCH = 4;  // warps at most; 16-column steps whose loads are issued together
    __shared__ float part[MAXW][16][17];
    __shared__ float sspart[MAXW][16];
    const int NW = blockDim.x >> 5;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    const int r0 = blockIdx.x * 16, slice = width / NW, k0 = warp * slice + 4 * q, steps = slice >> 4;
    // rows past the end read the last row; their results are dropped
    const float* xa = x + (long long)min(r0 + g, rows - 1) * width + k0;
    const float* xb = x + (long long)min(r0 + g + 8, rows - 1) * width + k0;
    const bool has = g < nh;  // lanes of gate rows past nh multiply zeros
    const float* pi = gi + (long long)(has ? g : 0) * width + k0;
    const float* pf = gf + (long long)(has ? g : 0) * width + k0;
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    float ssa = 0.f, ssb = 0.f;
    auto step = [&](float4 a, float4 b, float4 c, float4 ii, float4 ff) {
        if (!has) { ii = zero; ff = zero; }
        ssa = fmaf(a.x, a.x, fmaf(a.y, a.y, fmaf(a.z, a.z, fmaf(a.w, a.w, ssa))));
        ssb = fmaf(b.x, b.x, fmaf(b.y, b.y, fmaf(b.z, b.z, fmaf(b.w, b.w, ssb))));
        // this lane's logical k = q, q + 4 are its columns 4q, 4q + 1 (first product), 4q + 2, 4q + 3 (second)
        const float a0[4] = {a.x * c.x, b.x * c.x, a.y * c.y, b.y * c.y};
        const float a1[4] = {a.z * c.z, b.z * c.z, a.w * c.w, b.w * c.w};
        const Tf<4> A0(a0), A1(a1);
        const float i0[2] = {ii.x, ii.y}, i1[2] = {ii.z, ii.w}, f0[2] = {ff.x, ff.y}, f1[2] = {ff.z, ff.w};
        mma_f32<true>(acc[0], A0, Tf<2>(i0));
        mma_f32<true>(acc[0], A1, Tf<2>(i1));
        mma_f32<true>(acc[1], A0, Tf<2>(f0));
        mma_f32<true>(acc[1], A1, Tf<2>(f1));
    };
    // (loaded unconditionally, from row 0 for lanes past nh, and zeroed after: no branch between the loads)
    auto gate = [&](const float* p, int k) { return *(const float4*)(p + k); };
    int s0 = 0;
    for (; s0 + BATCH <= steps; s0 += BATCH) {
        float4 va[BATCH], vb[BATCH], wv[BATCH], ii[BATCH], ff[BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
            const int k = (s0 + u) * 16;
            va[u] = *(const float4*)(xa + k);
            vb[u] = *(const float4*)(xb + k);
            wv[u] = *(const float4*)(w + k0 + k);
            ii[u] = gate(pi, k);
            ff[u] = gate(pf, k);
        }
#pragma unroll
        for (int u = 0; u < BATCH; ++u) step(va[u], vb[u], wv[u], ii[u], ff[u]);
    }
    for (; s0 < steps; ++s0) {
        const int k = s0 * 16;
        step(*(const float4*)(xa + k), *(const float4*)(xb + k), *(const float4*)(w + k0 + k), gate(pi, k), gate(pf, k));
    }
    ssa += __shfl_xor_sync(0xffffffffu, ssa, 1);
    ssa += __shfl_xor_sync(0xffffffffu, ssa, 2);
    ssb += __shfl_xor_sync(0xffffffffu, ssb, 1);
    ssb += __shfl_xor_sync(0xffffffffu, ssb, 2);
    if (q == 0) { sspart[warp][g] = ssa; sspart[warp][g + 8] = ssb; }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
        part[warp][g][nt * 8 + 2 * q] = acc[nt][0];
        part[warp][g][nt * 8 + 2 * q + 1] = acc[nt][1];
        part[warp][g + 8][nt * 8 + 2 * q] = acc[nt][2];
        part[warp][g + 8][nt * 8 + 2 * q + 1] = acc[nt][3];
    }
    __syncthreads();
    __shared__ float rs[16];
    if (threadIdx.x < 16) {
        float ss = 0.f;
        for (int u = 0; u < NW; ++u) ss += sspart[u][threadIdx.x];
        rs[threadIdx.x] = rsqrtf(ss / (float)width + eps);
    }
    __syncthreads();
    if (threadIdx.x < 256) {  // (blockDim ≥ 256)
        const int r = threadIdx.x >> 4, n = threadIdx.x & 15, j = n & 7;  // 16 rows × (8 ĩ, 8 f̃)
        if (r0 + r < rows && j < nh) {
            float s = 0.f;
#pragma unroll
            for (int u = 0; u < MAXW; ++u)
                if (u < NW) s += part[u][r][n];
            const float* b = n < 8 ? bi : bf;
            float v = s * rs[r] + (b ? b[j] : 0.f);
            if (cap > 0.f) v = cap * tanhf(v / cap);
            (n < 8 ? out_i : out_f)[(long long)(r0 + r) * nh + j] = v;
        }
    }
    // The normalised rows' 16-bit copy (the operand of the q, k, v, o product): the block's rows
    // again, from L2 where the first pass left them, 4 loads in flight per thread (one at a time it
    // was a chain of dependent L2 round trips: 28 → 26 µs at 2,048 rows; 8 spill).
    if (!out_h) return;
    constexpr int PASS2 = 4;
    const int n4 = width >> 2, tot = min(16, rows - r0) * n4;
    const float4* x4 = (const float4*)(x + (long long)r0 * width);
    uint2* o4 = (uint2*)(out_h + (long long)r0 * width);
    for (int e0 = threadIdx.x; e0 < tot; e0 += PASS2 * blockDim.x) {
        float4 a[PASS2];
#pragma unroll
        for (int u = 0; u < PASS2; ++u) {
            const int e = e0 + u * blockDim.x;
            if (e < tot) a[u] = x4[e];
        }
#pragma unroll
        for (int u = 0; u < PASS2; ++u) {
            const int e = e0 + u * blockDim.x;
            if (e < tot) {
                const float k = rs[e / n4];
                const float4 c = ((const float4*)w)[e % n4];  // (L1)
                o4[e] = half4_bits(a[u].x * k * c.x, a[u].y * k * c.y, a[u].z * k * c.z, a[u].w * k * c.w, hdt);
            }
        }
    }
}
