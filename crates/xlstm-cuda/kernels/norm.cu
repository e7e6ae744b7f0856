// norm.cu — RMSNorm and LayerNorm-per-group over f32 rows.
//
// rms_norm:  out[r, j] = x[r, j] · rsqrt(mean_j x[r, :]² + eps) · w[j]; optional 16-bit copy of the
//            result (`out_h`, bf16 or f16 bits per `hdt`) for a following cuBLAS product.
//            Launch: grid = rows, block = 256 (any multiple of 32 up to 1024).
// group_norm: per row r and group g of `group` values: (x − mean)·rsqrt(var + eps)·w[j] (+ bias[j]),
//            biased variance, two passes over the group (mean, then centred squares), f32 throughout;
//            optional `gate`: the result is multiplied by sigmoid(gate[r, j]) (the mLSTM output gate);
//            optional 16-bit copy `out_h` as for rms_norm.
//            Launch: grid = (width / group, rows), block = 256.
// Limits: width, group < 2^31; `red` scratch is 32 floats of shared memory.

extern "C" __global__ void rms_norm(const float* x, int width, const float* w, float eps, float* out, u16* out_h, int hdt) {
    __shared__ float red[32];
    long long base = (long long)blockIdx.x * width;
    float ss = 0.f;
    for (int j = threadIdx.x; j < width; j += blockDim.x) { float v = x[base + j]; ss = fmaf(v, v, ss); }
    float tot = block_sum(ss, red);
    float r = rsqrtf(tot / (float)width + eps);
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
        float v = x[base + j] * r * w[j];
        out[base + j] = v;
        if (out_h) store_half(out_h, base + j, v, hdt);
    }
}

extern "C" __global__ void group_norm(const float* x, int width, int group, const float* w, const float* bias, float eps,
                                      const float* gate, float* out, u16* out_h, int hdt) {
    __shared__ float red[32];
    long long base = (long long)blockIdx.y * width + (long long)blockIdx.x * group;
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
        if (gate) y *= sigmoid_exact(gate[base + j]);
        out[base + j] = y;
        if (out_h) store_half(out_h, base + j, y, hdt);
    }
}
