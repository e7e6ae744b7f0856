// norm.wgsl — RMSNorm and per-group LayerNorm (the mLSTM's per-head norm), f32 statistics.
//
// rms_norm: out[r, j] = x[r, j] · rsqrt(mean_j(x[r]²) + eps) · weight[j].
//   Params: 0 rows, 1 width, 2 eps (bits). Bindings: 1 x, 2 weight, 3 out. One workgroup per row.
// group_norm: per group of `group` values, (x − mean) · rsqrt(biased var + eps) · weight[j]
//   (+ bias[j] when has_bias), then × σ(gate[r, j]) when gated (the mLSTM output gate, fused).
//   Params: 0 rows, 1 width, 2 group, 3 eps (bits), 4 has_bias, 5 gated. Bindings: 1 x, 2 weight,
//   4 bias, 5 gate, 6 out. One workgroup per (row, group), spread over y past 65535.
// Workgroup: {{WG}} invocations striding over the row/group; sums through wg_sum (reduce.wgsl).

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;

@group(0) @binding(3) var<storage, read_write> rms_out: array<f32>;

@compute @workgroup_size({{WG}})
fn rms_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32 {{SG_PARAMS}}) {
    let rows = pu(0u);
    let width = pu(1u);
    let eps = pf(2u);
    let r = group_index(wg, nwg);
    if (r >= rows) { return; }
    let base = r * width;
    var s = 0.0;
    for (var j = lid; j < width; j += {{WG}}u) { let v = x[base + j]; s += v * v; }
    let total = wg_sum(s, lid {{SG_ARGS}});
    let inv = 1.0 / sqrt(total / f32(width) + eps);
    for (var j = lid; j < width; j += {{WG}}u) { rms_out[base + j] = x[base + j] * inv * weight[j]; }
}

@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read> gate: array<f32>;
@group(0) @binding(6) var<storage, read_write> gn_out: array<f32>;

@compute @workgroup_size({{WG}})
fn group_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32 {{SG_PARAMS}}) {
    let rows = pu(0u);
    let width = pu(1u);
    let group = pu(2u);
    let eps = pf(3u);
    let has_bias = pu(4u);
    let gated = pu(5u);
    let groups = width / group;
    let u = group_index(wg, nwg);
    if (u >= rows * groups) { return; }
    let r = u / groups;
    let col0 = (u % groups) * group;
    let base = r * width + col0;
    var s = 0.0;
    for (var j = lid; j < group; j += {{WG}}u) { s += x[base + j]; }
    let mean = wg_sum(s, lid {{SG_ARGS}}) / f32(group);
    var q = 0.0;
    for (var j = lid; j < group; j += {{WG}}u) { let d = x[base + j] - mean; q += d * d; }
    let inv = 1.0 / sqrt(wg_sum(q, lid {{SG_ARGS}}) / f32(group) + eps);
    for (var j = lid; j < group; j += {{WG}}u) {
        var v = (x[base + j] - mean) * inv * weight[col0 + j];
        if (has_bias != 0u) { v += bias[col0 + j]; }
        if (gated != 0u) { v *= sigmoid(gate[base + j]); }
        gn_out[base + j] = v;
    }
}
