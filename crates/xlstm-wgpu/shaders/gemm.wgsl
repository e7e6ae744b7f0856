// gemm.wgsl — y[r, col0 + j] (+)= Σ_c x[r, c] · W[j, c] for many input rows (prefill): tiled and
// compute-bound, f32 arithmetic.
//
// Layouts: W [n_part, kp] as u32 words (2 bf16/f16 values per word, or 1 f32; kp a multiple of 8,
// the padding zeros), read as vec4 words; x [rows, k] f32; y [rows, n_total].
// Params: 0 n_part, 1 k, 2 rows, 3 kp, 4 n_total, 5 col0, 6 accumulate.
// Tile (knob `XLSTM_WGPU_GEMM=BMxBN`, BM 32 or 64, BN 32…256, BM·BN/32 ≤ 256 invocations): a
// workgroup of (BN/8) × (BM/4) invocations computes a BM-row × BN-weight-row tile of y, stepping k
// by 32; each invocation holds 4 rows × 8 outputs (two vec4 column groups, BN/2 apart) in named vec4
// registers — no arrays, which a driver that does not unroll would put in local memory (the first
// version, with a[TM]/b[TN]/acc[TM·TN] arrays, ran at 0.33 TFLOP/s on an H200 through Vulkan; this
// one at 64 × 128 16.5 TFLOP/s). The next k step's x and W are loaded into registers while the
// current one is multiplied out of workgroup memory ((BM + BN) · 128 bytes: x as [32][BM], W
// widened to f32 as [32][BN]; both stored so that a subgroup's stores hit consecutive words).
// Dispatch: (ceil(n_part / BN), ceil(rows / BM)).

@group(0) @binding(1) var<storage, read> w4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const BM: u32 = {{GBM}}u;
const BN: u32 = {{GBN}}u;
const BK: u32 = 32u;
// Invocations, and how many times each stages 4 x values / 16 weights per k step.
const NT: u32 = {{GBM}}u * {{GBN}}u / 32u;
const XH: u32 = 256u / {{GBN}}u;
const WH: u32 = 64u / {{GBM}}u;

var<workgroup> xs: array<vec4<f32>, 8 * {{GBM}}>;  // [BK][BM / 4]
var<workgroup> ws: array<vec4<f32>, 8 * {{GBN}}>;  // [BK][BN / 4]

// The x values invocation `lid` stages per k step: row lid % BM, columns c0 + 4·(lid / BM) + e,
// then every 4·BN/32 further, XH times (zeros past k or rows).
fn load_x(lid: u32, r_base: u32, c0: u32, rows: u32, k: u32) -> array<vec4<f32>, XH> {
    let r = r_base + lid % BM;
    let base = min(r, rows - 1u) * k;
    var out: array<vec4<f32>, XH>;
//#unroll H GXH
    {
        let c = c0 + $Hu * (BN / 8u) + (lid / BM) * 4u;
        let cs = vec4<u32>(c) + vec4<u32>(0u, 1u, 2u, 3u);
        let v = vec4<f32>(x[base + min(cs.x, k - 1u)], x[base + min(cs.y, k - 1u)], x[base + min(cs.z, k - 1u)], x[base + min(cs.w, k - 1u)]);
        out[$H] = select(vec4<f32>(0.0), v, (cs < vec4<u32>(k)) & vec4<bool>(r < rows));
    }
//#endunroll
    return out;
}

// The weights invocation `lid` stages per k step: weight row lid % BN, WH groups of 16 values from
// c0 + 16·(lid / BN), BM/2 apart, as vec4 words (16-bit: 2 a group, f32: 4; zeros past kp or n_part).
//#if F32
const WV: u32 = 4u;
//#else
const WV: u32 = 2u;
//#endif
fn load_w(lid: u32, j_base: u32, c0: u32, n_part: u32, kp: u32) -> array<vec4<u32>, WV * WH> {
    let j = j_base + lid % BN;
    let row = min(j, n_part - 1u) * kp;
    var out: array<vec4<u32>, WV * WH>;
//#unroll G GWH
    {
        let c = c0 + $Gu * (BM / 2u) + (lid / BN) * 16u;
//#if F32
//#unroll S 4
        out[$G * 4 + $S] = select(vec4<u32>(0u), w4[(row + min(c + $Su * 4u, kp - 4u)) / 4u], j < n_part && c + $Su * 4u < kp);
//#endunroll
//#else
//#unroll S 2
        out[$G * 2 + $S] = select(vec4<u32>(0u), w4[(row + min(c + $Su * 8u, kp - 8u)) / 8u], j < n_part && c + $Su * 8u < kp);
//#endunroll
//#endif
    }
//#endunroll
    return out;
}

@compute @workgroup_size({{GBN}} / 8, {{GBM}} / 4)
fn gemm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) li: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let n_part = pu(0u);
    let k = pu(1u);
    let rows = pu(2u);
    let kp = pu(3u);
    let n_total = pu(4u);
    let col0 = pu(5u);
    let accumulate = pu(6u);
    let j_base = wg.x * BN;
    let r_base = wg.y * BM;
    let tx = li.x;
    let ty = li.y;

    // c{row}{group}: rows ty·4 + row, columns tx·4 + 0..3 (group 0) and BN/2 + tx·4 + 0..3 (group 1)
    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0);
    var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);

    var xr = load_x(lid, r_base, 0u, rows, k);
    var wr = load_w(lid, j_base, 0u, n_part, kp);
    let xrow = lid % BM;
    let xk = (lid / BM) * 4u;
    let wrow = lid % BN;
    let wk = (lid / BN) * 16u;
    for (var c0 = 0u; c0 < k; c0 += BK) {
        // Stage: x column c → xs[c][row]; W value c → ws[c][row] (widened to f32).
//#unroll H GXH
        xs[(xk + $Hu * (BN / 8u) + 0u) * (BM / 4u) + xrow / 4u][xrow % 4u] = xr[$H].x;
        xs[(xk + $Hu * (BN / 8u) + 1u) * (BM / 4u) + xrow / 4u][xrow % 4u] = xr[$H].y;
        xs[(xk + $Hu * (BN / 8u) + 2u) * (BM / 4u) + xrow / 4u][xrow % 4u] = xr[$H].z;
        xs[(xk + $Hu * (BN / 8u) + 3u) * (BM / 4u) + xrow / 4u][xrow % 4u] = xr[$H].w;
//#endunroll
//#unroll G GWH
//#if F32
//#unroll S 4
        ws[(wk + $Gu * (BM / 2u) + $Su * 4u + 0u) * (BN / 4u) + wrow / 4u][wrow % 4u] = bitcast<f32>(wr[$G * 4 + $S].x);
        ws[(wk + $Gu * (BM / 2u) + $Su * 4u + 1u) * (BN / 4u) + wrow / 4u][wrow % 4u] = bitcast<f32>(wr[$G * 4 + $S].y);
        ws[(wk + $Gu * (BM / 2u) + $Su * 4u + 2u) * (BN / 4u) + wrow / 4u][wrow % 4u] = bitcast<f32>(wr[$G * 4 + $S].z);
        ws[(wk + $Gu * (BM / 2u) + $Su * 4u + 3u) * (BN / 4u) + wrow / 4u][wrow % 4u] = bitcast<f32>(wr[$G * 4 + $S].w);
//#endunroll
//#else
//#unroll S 2
        ws[(wk + $Gu * (BM / 2u) + $Su * 8u + 0u) * (BN / 4u) + wrow / 4u][wrow % 4u] = lo16(wr[$G * 2 + $S].x);
        ws[(wk + $Gu * (BM / 2u) + $Su * 8u + 1u) * (BN / 4u) + wrow / 4u][wrow % 4u] = hi16(wr[$G * 2 + $S].x);
        ws[(wk + $Gu * (BM / 2u) + $Su * 8u + 2u) * (BN / 4u) + wrow / 4u][wrow % 4u] = lo16(wr[$G * 2 + $S].y);
        ws[(wk + $Gu * (BM / 2u) + $Su * 8u + 3u) * (BN / 4u) + wrow / 4u][wrow % 4u] = hi16(wr[$G * 2 + $S].y);
        ws[(wk + $Gu * (BM / 2u) + $Su * 8u + 4u) * (BN / 4u) + wrow / 4u][wrow % 4u] = lo16(wr[$G * 2 + $S].z);
        ws[(wk + $Gu * (BM / 2u) + $Su * 8u + 5u) * (BN / 4u) + wrow / 4u][wrow % 4u] = hi16(wr[$G * 2 + $S].z);
        ws[(wk + $Gu * (BM / 2u) + $Su * 8u + 6u) * (BN / 4u) + wrow / 4u][wrow % 4u] = lo16(wr[$G * 2 + $S].w);
        ws[(wk + $Gu * (BM / 2u) + $Su * 8u + 7u) * (BN / 4u) + wrow / 4u][wrow % 4u] = hi16(wr[$G * 2 + $S].w);
//#endunroll
//#endif
//#endunroll
        workgroupBarrier();
        // The next k step's loads fly while this one is multiplied.
        if (c0 + BK < k) {
            xr = load_x(lid, r_base, c0 + BK, rows, k);
            wr = load_w(lid, j_base, c0 + BK, n_part, kp);
        }
        for (var kk = 0u; kk < BK; kk++) {
            let a = xs[kk * (BM / 4u) + ty];
            let b0 = ws[kk * (BN / 4u) + tx];
            let b1 = ws[kk * (BN / 4u) + BN / 8u + tx];
            c00 += a.x * b0; c01 += a.x * b1;
            c10 += a.y * b0; c11 += a.y * b1;
            c20 += a.z * b0; c21 += a.z * b1;
            c30 += a.w * b0; c31 += a.w * b1;
        }
        workgroupBarrier();
    }

    let acc = accumulate != 0u;
    store4(r_base + ty * 4u + 0u, j_base + tx * 4u, c00, c01, rows, n_part, n_total, col0, acc);
    store4(r_base + ty * 4u + 1u, j_base + tx * 4u, c10, c11, rows, n_part, n_total, col0, acc);
    store4(r_base + ty * 4u + 2u, j_base + tx * 4u, c20, c21, rows, n_part, n_total, col0, acc);
    store4(r_base + ty * 4u + 3u, j_base + tx * 4u, c30, c31, rows, n_part, n_total, col0, acc);
}

// One row's 8 outputs: columns j..j+3 from g0 and j+BN/2..j+BN/2+3 from g1.
fn store4(r: u32, j: u32, g0: vec4<f32>, g1: vec4<f32>, rows: u32, n_part: u32, n_total: u32, col0: u32, acc: bool) {
    if (r >= rows) {
        return;
    }
    let base = r * n_total + col0;
    for (var e = 0u; e < 4u; e++) {
        put(base, j + e, g0[e], n_part, acc);
        put(base, j + BN / 2u + e, g1[e], n_part, acc);
    }
}

fn put(base: u32, j: u32, v: f32, n_part: u32, acc: bool) {
    if (j < n_part) {
        let o = base + j;
        if (acc) { y[o] = y[o] + v; } else { y[o] = v; }
    }
}
