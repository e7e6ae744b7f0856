// elementwise.cu — pointwise and copy ops over f32 activations, the activation → 16-bit copy for
// cuBLAS, and a read-bandwidth probe.
//
// Layouts: activations are row-major [rows, width] f32; weight tables are [V, D] in f32/bf16/f16
// (dt = DT_F32 / DT_BF16 / DT_F16). Launch shape: 1-D grid-stride loops, 256 threads a block, grid
// sized by the caller (elements / 256, capped); `embed` is one block row per token (grid.y = rows).
// Limits: lengths fit in 32-bit signed ints except where `long long` is used (indices into tables).

// out[r, :] = table[ids[r], :]  (ids already checked against V on the host)
extern "C" __global__ void embed(const void* table, int dt, const u32* ids, int d, float* out) {
    int r = blockIdx.y;
    long long row = (long long)ids[r] * d;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += gridDim.x * blockDim.x)
        out[(long long)r * d + j] = load_w(table, row + j, dt);
}

// x[r, j] = cap·tanh((x[r, j] + bias[j]) / cap); bias may be null; cap <= 0 skips the cap.
extern "C" __global__ void bias_soft_cap(float* x, int rows, int width, const float* bias, float cap) {
    int n = rows * width;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        float y = x[e] + (bias ? bias[e % width] : 0.f);
        x[e] = cap > 0.f ? cap * tanhf(y / cap) : y;
    }
}

// x += y
extern "C" __global__ void add(float* x, const float* y, int n) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) x[e] += y[e];
}

// x = sigmoid(gate) ⊙ x
extern "C" __global__ void sigmoid_gate(const float* gate, float* x, int n) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x)
        x[e] *= sigmoid_exact(gate[e]);
}

// out = act(gate) ⊙ up  (act 1 = SwiGLU's silu)
extern "C" __global__ void gated_act(int act, const float* gate, const float* up, float* out, int n) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x)
        out[e] = act_apply(act, gate[e]) * up[e];
}

// x[r, j] += scale[j] · y[r, j]
extern "C" __global__ void scaled_add(float* x, const float* y, const float* scale, int rows, int width) {
    int n = rows * width;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x)
        x[e] += scale[e % width] * y[e];
}

// dst[r·ds + doff + j] = src[r·ss + soff + j], r < rows, j < width
extern "C" __global__ void copy_cols(const float* src, int ss, int soff, float* dst, int ds, int doff, int rows, int width) {
    int n = rows * width;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        int r = e / width, j = e % width;
        dst[(long long)r * ds + doff + j] = src[(long long)r * ss + soff + j];
    }
}

// split_cols: the column blocks of one product over several adjacent matrices into their own
// buffers, in one launch: out[s].dst[r·width_s + j] = src[r·ld + off_s + j] for j < width_s.
// Launch: grid = (rows, ceil(ld / (256·V))), block = 256; V = 4 with `vec` (src, every dst 16-byte
// aligned; ld, every off and width multiples of 4: float4 copies), else 1.
struct SplitOut {
    float* dst;
    int off;
    int width;
};
struct SplitArgs {
    SplitOut out[8];
    const float* src;
    int ld;
    int rows;
    int nout;
    int vec;
};
extern "C" __global__ void split_cols(const SplitArgs a) {
    const long long r = blockIdx.x;
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * (a.vec ? 4 : 1);
    if (r >= a.rows || c >= a.ld) return;
    int s = 0;
    while (s + 1 < a.nout && c >= a.out[s + 1].off) ++s;
    const SplitOut o = a.out[s];
    if (c >= o.off + o.width) return;
    float* d = o.dst + r * o.width + (c - o.off);
    const float* p = a.src + r * a.ld + c;
    if (a.vec) *(float4*)d = *(const float4*)p;
    else *d = *p;
}

// bf16 copy of an f32 buffer (the activation operand of the cuBLAS bf16 products); dt selects
// bf16 (1) or f16 (2) bits.
extern "C" __global__ void to_half(const float* x, u16* out, int n, int dt) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        store_half(out, e, x[e], dt);
    }
}

// f32 copy of 16-bit values (dt as for to_half): a bf16 state's C, widened for the chunkwise prefill.
extern "C" __global__ void from_half(const u16* x, float* out, int n, int dt) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        out[e] = half_value(x[e], dt);
    }
}

// Σ x over n4 float4 values, grid-stride, atomically added into *out: the bench's read-bandwidth
// probe (each value is read once).
extern "C" __global__ void read_sum(const float4* x, long long n4, float* out) {
    float s = 0.f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4; i += (long long)gridDim.x * blockDim.x) {
        float4 v = x[i];
        s += (v.x + v.y) + (v.z + v.w);
    }
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) atomicAdd(out, s);
}

// out[r, j] = act(t[r, j]) · t[r, F + j]: the gated activation on one [rows, 2F] product of the
// adjacent [gate; up] weights, t in f32 or 16 bits (tdt); optional 16-bit copy `out_h` (for the down
// projection's product; with `out` null only that copy is written). Launch: grid = (rows, ceil(F / (256·V))), block = 256; V = 8 with `vec`
// (16-bit t, F % 8 == 0, t / out / out_h 16-byte aligned: 16-byte loads and stores), else 1.
extern "C" __global__ void gated_act_split(int act, const void* t, int tdt, int F, float* out, int rows, u16* out_h, int hdt, int vec) {
    const long long r = blockIdx.x;
    const int j = (blockIdx.y * blockDim.x + threadIdx.x) * (vec ? 8 : 1);
    if (r >= rows || j >= F) return;
    const long long ti = r * 2 * F + j, oi = r * F + j;
    if (!vec) {
        float y = act_apply(act, load_w(t, ti, tdt)) * load_w(t, ti + F, tdt);
        if (out) out[oi] = y;
        if (out_h) store_half(out_h, oi, y, hdt);
        return;
    }
    const uint4 g4 = *(const uint4*)((const u16*)t + ti), u4 = *(const uint4*)((const u16*)t + ti + F);
    const u32 g[4] = {g4.x, g4.y, g4.z, g4.w}, u[4] = {u4.x, u4.y, u4.z, u4.w};
    // only a 16-bit result: the fast activation (the exact one's instructions bound this kernel)
    auto actf = [&](float x) { return out ? act_apply(act, x) : act_apply16(act, x); };
    float y[8];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        y[2 * i] = actf(half_value((u16)(g[i] & 0xffffu), tdt)) * half_value((u16)(u[i] & 0xffffu), tdt);
        y[2 * i + 1] = actf(half_value((u16)(g[i] >> 16), tdt)) * half_value((u16)(u[i] >> 16), tdt);
    }
    if (out) {
        *(float4*)(out + oi) = make_float4(y[0], y[1], y[2], y[3]);
        *(float4*)(out + oi + 4) = make_float4(y[4], y[5], y[6], y[7]);
    }
    if (out_h) {
        u32 h[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) h[i] = (u32)half_bits(y[2 * i], hdt) | ((u32)half_bits(y[2 * i + 1], hdt) << 16);
        *(uint4*)(out_h + oi) = make_uint4(h[0], h[1], h[2], h[3]);
    }
}
