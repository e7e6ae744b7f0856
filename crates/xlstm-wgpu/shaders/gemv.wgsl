// gemv.wgsl — y[r, col0 + j] (+)= Σ_c x[r, c] · W[j, c] for a few input rows (decode): memory-bound,
// each weight row is streamed once and used for every input row.
//
// Layouts: W [n_part, kp] (row-major, u32 words read 4 at a time: 8 bf16/f16 or 4 f32 values per
// vec4, rows padded to kp = round_up(k, 8) with zeros), x [rows, k] f32, y [rows, n_total] f32.
// Params: 0 n_part, 1 k, 2 rows (≤ {{B}}), 3 kq (vec4 words per W row), 4 n_total, 5 col0,
// 6 accumulate (1: y += x·Wᵀ, 0: y = x·Wᵀ).
// Workgroup: {{WG}} invocations own {{R}} consecutive weight rows; each invocation walks the row in
// vec4 steps of stride {{WG}} accumulating {{R}}×{{B}} partial sums, which are then summed over the
// workgroup (subgroupAdd + workgroup memory, or a workgroup-memory tree without subgroups).
// Dispatch: ceil(n_part / {{R}}) groups (spread over y past 65535). Limits: rows ≤ {{B}}.

@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const WG: u32 = {{WG}}u;
const R: u32 = {{R}}u;
const B: u32 = {{B}}u;
const RB: u32 = {{R}}u * {{B}}u;

var<workgroup> part: array<f32, {{WG}} * {{R}} * {{B}}>;

@compute @workgroup_size({{WG}})
fn gemv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32 {{SG_PARAMS}}) {
    let n_part = pu(0u);
    let k = pu(1u);
    let rows = pu(2u);
    let kq = pu(3u);
    let n_total = pu(4u);
    let col0 = pu(5u);
    let accumulate = pu(6u);
    let j0 = group_index(wg, nwg) * R;
    if (j0 >= n_part) { return; } // uniform: the whole workgroup leaves

    var acc: array<f32, {{R}} * {{B}}>;
    for (var i = 0u; i < RB; i++) { acc[i] = 0.0; }

    for (var q = lid; q < kq; q += WG) {
//#if F32
        let c = q * 4u;
        var xv: array<vec4<f32>, {{B}}>;
        for (var r = 0u; r < B; r++) {
            if (r < rows) {
                let o = r * k + c;
                xv[r] = vec4<f32>(select(0.0, x[o], c < k), select(0.0, x[o + 1u], c + 1u < k),
                                  select(0.0, x[o + 2u], c + 2u < k), select(0.0, x[o + 3u], c + 3u < k));
            }
        }
        for (var jj = 0u; jj < R; jj++) {
            let j = min(j0 + jj, n_part - 1u);
            let wv = bitcast<vec4<f32>>(w[j * kq + q]);
            for (var r = 0u; r < B; r++) {
                if (r < rows) { acc[jj * B + r] += dot(wv, xv[r]); }
            }
        }
//#else
        let c = q * 8u;
        var xa: array<vec4<f32>, {{B}}>;
        var xb: array<vec4<f32>, {{B}}>;
        for (var r = 0u; r < B; r++) {
            if (r < rows) {
                let o = r * k + c;
                xa[r] = vec4<f32>(select(0.0, x[o], c < k), select(0.0, x[o + 1u], c + 1u < k),
                                  select(0.0, x[o + 2u], c + 2u < k), select(0.0, x[o + 3u], c + 3u < k));
                xb[r] = vec4<f32>(select(0.0, x[o + 4u], c + 4u < k), select(0.0, x[o + 5u], c + 5u < k),
                                  select(0.0, x[o + 6u], c + 6u < k), select(0.0, x[o + 7u], c + 7u < k));
            }
        }
        for (var jj = 0u; jj < R; jj++) {
            let j = min(j0 + jj, n_part - 1u);
            let u = w[j * kq + q];
            let wa = vec4<f32>(lo16(u.x), hi16(u.x), lo16(u.y), hi16(u.y));
            let wb = vec4<f32>(lo16(u.z), hi16(u.z), lo16(u.w), hi16(u.w));
            for (var r = 0u; r < B; r++) {
                if (r < rows) { acc[jj * B + r] += dot(wa, xa[r]) + dot(wb, xb[r]); }
            }
        }
//#endif
    }

//#if SUBGROUP
    // One partial per subgroup and output, then invocation t < RB adds up output t's partials.
    let ns = (WG + sgs - 1u) / sgs;
    let sg = lid / sgs;
    for (var i = 0u; i < RB; i++) {
        let s = subgroupAdd(acc[i]);
        if (sgl == 0u) { part[sg * RB + i] = s; }
    }
    workgroupBarrier();
    if (lid < RB) {
        var t = 0.0;
        for (var g = 0u; g < ns; g++) { t += part[g * RB + lid]; }
        part[lid] = t;
    }
//#else
    for (var i = 0u; i < RB; i++) { part[lid * RB + i] = acc[i]; }
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            for (var i = 0u; i < RB; i++) { part[lid * RB + i] += part[(lid + s) * RB + i]; }
        }
        workgroupBarrier();
    }
//#endif
    workgroupBarrier();
    if (lid < RB) {
        let jj = lid / B;
        let r = lid % B;
        let j = j0 + jj;
        if (j < n_part && r < rows) {
            let o = r * n_total + col0 + j;
            let v = part[lid];
            if (accumulate != 0u) { y[o] = y[o] + v; } else { y[o] = v; }
        }
    }
}
