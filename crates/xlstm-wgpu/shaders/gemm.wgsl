// gemm.wgsl — y[r, col0 + j] (+)= Σ_c x[r, c] · W[j, c] for many input rows (prefill): tiled,
// compute-bound. Weights are widened to f32 once per tile in workgroup memory; math is f32.
//
// Layouts: W [n_part, kp] as u32 words (2 bf16/f16 values per word, or 1 f32), x [rows, k],
// y [rows, n_total]. Params: 0 n_part, 1 k, 2 rows, 3 kp, 4 n_total, 5 col0, 6 accumulate.
// Workgroup: ({{BN}}/{{TN}}) × ({{BM}}/{{TM}}) invocations compute a {{BM}} (rows) × {{BN}} (weight
// rows) tile, {{TM}}×{{TN}} outputs each, stepping k by {{BK}}. Dispatch: (ceil(n_part/{{BN}}),
// ceil(rows/{{BM}})). Workgroup memory: 2·{{BK}}·({{BM}}+{{BN}}) floats... well within 16 KiB.

@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const BM: u32 = {{BM}}u;
const BN: u32 = {{BN}}u;
const BK: u32 = {{BK}}u;
const TM: u32 = {{TM}}u;
const TN: u32 = {{TN}}u;
const TX: u32 = {{BN}}u / {{TN}}u;
const TY: u32 = {{BM}}u / {{TM}}u;
const NT: u32 = ({{BN}}u / {{TN}}u) * ({{BM}}u / {{TM}}u);

var<workgroup> xs: array<f32, {{BK}} * {{BM}}>; // [BK][BM]
var<workgroup> ws: array<f32, {{BK}} * {{BN}}>; // [BK][BN]

fn w_at(j: u32, c: u32, kp: u32) -> f32 {
    let e = j * kp + c;
//#if F32
    return bitcast<f32>(w[e]);
//#else
    let u = w[e / 2u];
    return select(lo16(u), hi16(u), (e & 1u) == 1u);
//#endif
}

@compute @workgroup_size({{BN}} / {{TN}}, {{BM}} / {{TM}})
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

    var acc: array<f32, {{TM}} * {{TN}}>;
    for (var i = 0u; i < TM * TN; i++) { acc[i] = 0.0; }

    for (var c0 = 0u; c0 < k; c0 += BK) {
        for (var e = lid; e < BK * BM; e += NT) {
            let rr = e / BK;
            let cc = e % BK;
            let r = r_base + rr;
            let c = c0 + cc;
            xs[cc * BM + rr] = select(0.0, x[min(r, rows - 1u) * k + min(c, k - 1u)], r < rows && c < k);
        }
        for (var e = lid; e < BK * BN; e += NT) {
            let jj = e / BK;
            let cc = e % BK;
            let j = j_base + jj;
            let c = c0 + cc;
            ws[cc * BN + jj] = select(0.0, w_at(min(j, n_part - 1u), min(c, kp - 1u), kp), j < n_part && c < k);
        }
        workgroupBarrier();
        for (var cc = 0u; cc < BK; cc++) {
            var a: array<f32, {{TM}}>;
            var b: array<f32, {{TN}}>;
            for (var i = 0u; i < TM; i++) { a[i] = xs[cc * BM + li.y * TM + i]; }
            for (var t = 0u; t < TN; t++) { b[t] = ws[cc * BN + li.x * TN + t]; }
            for (var i = 0u; i < TM; i++) {
                for (var t = 0u; t < TN; t++) { acc[i * TN + t] += a[i] * b[t]; }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let r = r_base + li.y * TM + i;
        for (var t = 0u; t < TN; t++) {
            let j = j_base + li.x * TN + t;
            if (r < rows && j < n_part) {
                let o = r * n_total + col0 + j;
                if (accumulate != 0u) { y[o] = y[o] + acc[i * TN + t]; } else { y[o] = acc[i * TN + t]; }
            }
        }
    }
}
