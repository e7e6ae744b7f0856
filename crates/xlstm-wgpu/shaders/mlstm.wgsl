// mlstm.wgsl — the mLSTM cell's recurrent step (NOTES §2), per head, state in f32, in two passes.
//
// Layouts: q, k [rows, NH·DK], v [rows, NH·DV], ĩ, f̃ [rows, NH], h [rows, NH·DV]; state
// C [S, NH, DK, DV], n [S, NH, DK], m [S, NH]; scal [units, 4] (f', i', denominator) scratch.
// A "unit" u is one (sequence, head) pair: u = b·NH + head. Params: 0 NH, 1 DK, 2 DV, 3 units,
// 4 eps (bits), 5 row (token row of q/k/v/ĩ/f̃/h: 0 for a batched step, t inside a prefill loop,
// where units = NH and state slot 0), 6 gate_bias (1: ĩ, f̃ get bias and the soft cap first),
// 7 cap (bits, 0 = none).
// mlstm_gates (bindings 1 q, 2 k, 3 ĩ, 4 f̃, 5 ibias, 6 fbias, 7 n rw, 8 m rw, 9 scal rw): one
//   workgroup ({{WG}} invocations) per unit: m' = max(logσ(f̃) + m, ĩ), f' = e^(logσ(f̃)+m−m'),
//   i' = e^(ĩ−m'), n' = f'n + i'k, den = max(|q̂·n'|, e^(−m')) + eps.
// mlstm_cell (bindings 1 q, 2 k, 10 v, 11 C rw, 12 scal, 13 h rw): workgroup {{COLS}} columns of
//   C × {{SPLIT}} slices of DK; C' = f'C + i'·k vᵀ, h = q̂ᵀC' / den. Dispatch (ceil(DV/{{COLS}}), units).
// The gated decode step (one token per sequence, row 0, gate bias + cap on) in two dispatches:
// mlstm_cell_fused (bindings 1 q, 2 k, 3 ĩ, 4 f̃, 5 ibias, 6 fbias, 7 n, 8 m (read only here),
//   9 scal rw, 10 v, 11 C rw, 13 h rw): mlstm_cell's tiles, each workgroup computing its unit's
//   gates and den itself from the old n, m (the same formulas as mlstm_gates); the tile at column 0
//   leaves (f', i', m') in scal. Dispatch (ceil(DV/{{COLS}}), units).
//   Each invocation loads 8 rows of its C column before it stores any (the stores could alias the
//   next loads as far as the compiler knows, so a load-update-store loop waits on memory per row).
//   NORMED (the gated decode step in one dispatch; bindings as above + 14 norm weight, 15 o, 16 hn
//   rw, 17 counters rw, params + 8 norm eps): the last workgroup of a unit to finish (an atomic
//   count per unit, reset by that workgroup) commits n', m' and writes hn as mlstm_norm does.
//   storageBarrier() is a device-scope acquire/release fence in SPIR-V (naga) and HLSL, so the
//   other workgroups' h is visible to it; not used on Metal, whose threadgroup barrier orders
//   device memory for the threadgroup only.
// mlstm_norm (bindings 2 k, 7 n rw, 8 m rw, 9 scal, 13 h, 14 norm weight, 15 o, 16 hn rw): one
//   workgroup ({{WG}}) per unit commits the state (n' = f'n + i'k, m') and writes
//   hn = σ(o) ⊙ LayerNorm_head(h)·weight (as norm.wgsl's group_norm). Params: 0 NH, 1 DK, 2 DV,
//   3 units, 4 norm eps (bits). Dispatch: units groups, spread over y past 65535.

@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> ig: array<f32>;
@group(0) @binding(4) var<storage, read> fg: array<f32>;
@group(0) @binding(5) var<storage, read> ibias: array<f32>;
@group(0) @binding(6) var<storage, read> fbias: array<f32>;
@group(0) @binding(7) var<storage, read_write> n: array<f32>;
@group(0) @binding(8) var<storage, read_write> m: array<f32>;
@group(0) @binding(9) var<storage, read_write> scal: array<f32>;

fn capped(v: f32, cap: f32) -> f32 { return select(v, cap * tanh(v / cap), cap > 0.0); }

@compute @workgroup_size({{WG}})
fn mlstm_gates(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32 {{SG_PARAMS}}) {
    let nh = pu(0u);
    let dk = pu(1u);
    let units = pu(3u);
    let eps = pf(4u);
    let row = pu(5u);
    let gate_bias = pu(6u);
    let cap = pf(7u);
    let u = group_index(wg, nwg);
    if (u >= units) { return; }
    let head = u % nh;
    let g = row * nh + u;
    var ip = ig[g];
    var fp = fg[g];
    if (gate_bias != 0u) {
        ip = capped(ip + ibias[head], cap);
        fp = capped(fp + fbias[head], cap);
    }
    let m_old = m[u];
    let lf = log_sigmoid(fp);
    let m_new = max(lf + m_old, ip);
    let fa = exp(lf + m_old - m_new);
    let ia = exp(ip - m_new);
    let scale = 1.0 / sqrt(f32(dk));
    let qb = (row * nh + u) * dk;
    var s = 0.0;
    for (var a = lid; a < dk; a += {{WG}}u) {
        let nn = fa * n[u * dk + a] + ia * k[qb + a];
        n[u * dk + a] = nn;
        s += q[qb + a] * scale * nn;
    }
    let qn = wg_sum(s, lid {{SG_ARGS}});
    if (lid == 0u) {
        m[u] = m_new;
        scal[u * 4u] = fa;
        scal[u * 4u + 1u] = ia;
        scal[u * 4u + 2u] = max(abs(qn), exp(-m_new)) + eps;
    }
}

@group(0) @binding(10) var<storage, read> v: array<f32>;
@group(0) @binding(11) var<storage, read_write> C: array<f32>;
@group(0) @binding(12) var<storage, read> scal_in: array<f32>;
@group(0) @binding(13) var<storage, read_write> h: array<f32>;
@group(0) @binding(14) var<storage, read> norm_w: array<f32>;
@group(0) @binding(15) var<storage, read> ogate: array<f32>;
@group(0) @binding(16) var<storage, read_write> hn: array<f32>;

var<workgroup> hpart: array<f32, {{COLS}} * {{SPLIT}}>;

@compute @workgroup_size({{COLS}}, {{SPLIT}})
fn mlstm_cell(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) li: vec3<u32>) {
    let nh = pu(0u);
    let dk = pu(1u);
    let dv = pu(2u);
    let row = pu(5u);
    let u = wg.y;
    let j = wg.x * {{COLS}}u + li.x;
    let jc = min(j, dv - 1u);
    let fa = scal_in[u * 4u];
    let ia = scal_in[u * 4u + 1u];
    let den = scal_in[u * 4u + 2u];
    let scale = 1.0 / sqrt(f32(dk));
    let qb = (row * nh + u) * dk;
    let vj = v[(row * nh + u) * dv + jc];
    let cb = u * dk * dv;
    var acc = 0.0;
    if (j < dv) {
        for (var a = li.y; a < dk; a += {{SPLIT}}u) {
            let ci = cb + a * dv + j;
            let c = fa * C[ci] + ia * k[qb + a] * vj;
            C[ci] = c;
            acc += q[qb + a] * c;
        }
    }
    hpart[li.y * {{COLS}}u + li.x] = acc;
    workgroupBarrier();
    if (li.y == 0u && j < dv) {
        var t = 0.0;
        for (var s = 0u; s < {{SPLIT}}u; s++) { t += hpart[s * {{COLS}}u + li.x]; }
        h[(row * nh + u) * dv + j] = t * scale / den;
    }
}

var<workgroup> colp: array<f32, {{COLS}}>;

// The sum of v over the cell tile's {{COLS}}×{{SPLIT}} invocations (all call it; all get the total).
fn tile_sum(v: f32, li: vec3<u32>) -> f32 {
    hpart[li.y * {{COLS}}u + li.x] = v;
    workgroupBarrier();
    if (li.y == 0u) {
        var cs = 0.0;
        for (var i = 0u; i < {{SPLIT}}u; i++) { cs += hpart[i * {{COLS}}u + li.x]; }
        colp[li.x] = cs;
    }
    workgroupBarrier();
    var t = 0.0;
    for (var i = 0u; i < {{COLS}}u; i++) { t += colp[i]; }
    workgroupBarrier();
    return t;
}

//#if NORMED
@group(0) @binding(17) var<storage, read_write> counters: array<atomic<u32>>;
var<workgroup> last_group: u32;
//#endif

@compute @workgroup_size({{COLS}}, {{SPLIT}})
fn mlstm_cell_fused(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_id) li: vec3<u32>) {
    let nh = pu(0u);
    let dk = pu(1u);
    let dv = pu(2u);
    let eps = pf(4u);
    let cap = pf(7u);
    let u = wg.y;
    let j = wg.x * {{COLS}}u + li.x;
    let jc = min(j, dv - 1u);
    let cb = u * dk * dv;
    // The first 16 rows of this invocation's C column are loaded before anything else, so that
    // their latency overlaps the gate math and the loads below (nothing here waits on them yet).
//#unroll e 16
    let r$e = li.y + $eu * {{SPLIT}}u;
    let c$e = C[cb + min(r$e, dk - 1u) * dv + jc];
//#endunroll
    let head = u % nh;
    let ip = capped(ig[u] + ibias[head], cap);
    let fp = capped(fg[u] + fbias[head], cap);
    let m_old = m[u];
    let lf = log_sigmoid(fp);
    let m_new = max(lf + m_old, ip);
    let fa = exp(lf + m_old - m_new);
    let ia = exp(ip - m_new);
    let scale = 1.0 / sqrt(f32(dk));
    let qb = u * dk;
    let vj = v[u * dv + jc];
    // den = max(|q̂·n'|, e^(−m')) + eps
    let t = li.y * {{COLS}}u + li.x;
    var s = 0.0;
    for (var a = t; a < dk; a += {{COLS}}u * {{SPLIT}}u) {
        s += q[qb + a] * scale * (fa * n[qb + a] + ia * k[qb + a]);
    }
    let den = max(abs(tile_sum(s, li)), exp(-m_new)) + eps;
    if (wg.x == 0u && t == 0u) {
        scal[u * 4u] = fa;
        scal[u * 4u + 1u] = ia;
        scal[u * 4u + 2u] = m_new;
    }
    var acc = 0.0;
    if (j < dv) {
//#unroll e 16
        if (r$e < dk) {
            let cn = fa * c$e + ia * k[qb + r$e] * vj;
            C[cb + r$e * dv + j] = cn;
            acc += q[qb + r$e] * cn;
        }
//#endunroll
        // Rows past the first 16 per invocation: batches of 8 loads before their stores.
        for (var a0 = li.y + 16u * {{SPLIT}}u; a0 < dk; a0 += 8u * {{SPLIT}}u) {
//#unroll e 8
            let a$e = a0 + $eu * {{SPLIT}}u;
            let ci$e = cb + min(a$e, dk - 1u) * dv + j;
            let c$e = C[ci$e];
//#endunroll
//#unroll e 8
            if (a$e < dk) {
                let cn$e = fa * c$e + ia * k[qb + a$e] * vj;
                C[ci$e] = cn$e;
                acc += q[qb + a$e] * cn$e;
            }
//#endunroll
        }
    }
    hpart[t] = acc;
    workgroupBarrier();
    if (li.y == 0u && j < dv) {
        var hs = 0.0;
        for (var i = 0u; i < {{SPLIT}}u; i++) { hs += hpart[i * {{COLS}}u + li.x]; }
        h[u * dv + j] = hs * scale / den;
    }
//#if NORMED
    // Release this tile's h (device scope), count it; the unit's last tile acquires all of h.
    storageBarrier();
    if (t == 0u) {
        last_group = u32(atomicAdd(&counters[u], 1u) + 1u == nwg.x);
    }
    if (workgroupUniformLoad(&last_group) == 0u) {
        return;
    }
    storageBarrier();
    let neps = pf(8u);
    let base = u * dv;
    let col0 = head * dv;
    // One pass over h: sums of (h − h[0]) and its square (shifted, so the variance keeps its
    // precision however far the mean is from zero).
    let shift = h[base];
    var hs1 = 0.0;
    var hs2 = 0.0;
    for (var jj = t; jj < dv; jj += {{COLS}}u * {{SPLIT}}u) { let d = h[base + jj] - shift; hs1 += d; hs2 += d * d; }
    // The state commit (n', m') beside it, before the sums' barriers.
    for (var a = t; a < dk; a += {{COLS}}u * {{SPLIT}}u) {
        n[qb + a] = fa * n[qb + a] + ia * k[qb + a];
    }
    if (t == 0u) {
        m[u] = m_new;
        atomicStore(&counters[u], 0u);
    }
    let ms = tile_sum(hs1, li) / f32(dv);
    let var_ = max(tile_sum(hs2, li) / f32(dv) - ms * ms, 0.0);
    let mean = shift + ms;
    let inv = 1.0 / sqrt(var_ + neps);
    for (var jj = t; jj < dv; jj += {{COLS}}u * {{SPLIT}}u) {
        hn[base + jj] = (h[base + jj] - mean) * inv * norm_w[col0 + jj] * sigmoid(ogate[base + jj]);
    }
//#endif
}

@compute @workgroup_size({{WG}})
fn mlstm_norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32 {{SG_PARAMS}}) {
    let nh = pu(0u);
    let dk = pu(1u);
    let dv = pu(2u);
    let units = pu(3u);
    let eps = pf(4u);
    let u = group_index(wg, nwg);
    if (u >= units) { return; }
    let fa = scal[u * 4u];
    let ia = scal[u * 4u + 1u];
    for (var a = lid; a < dk; a += {{WG}}u) {
        n[u * dk + a] = fa * n[u * dk + a] + ia * k[u * dk + a];
    }
    if (lid == 0u) { m[u] = scal[u * 4u + 2u]; }
    let base = u * dv;
    let col0 = (u % nh) * dv;
    var s = 0.0;
    for (var j = lid; j < dv; j += {{WG}}u) { s += h[base + j]; }
    let mean = wg_sum(s, lid {{SG_ARGS}}) / f32(dv);
    var q2 = 0.0;
    for (var j = lid; j < dv; j += {{WG}}u) { let d = h[base + j] - mean; q2 += d * d; }
    let inv = 1.0 / sqrt(wg_sum(q2, lid {{SG_ARGS}}) / f32(dv) + eps);
    for (var j = lid; j < dv; j += {{WG}}u) {
        hn[base + j] = (h[base + j] - mean) * inv * norm_w[col0 + j] * sigmoid(ogate[base + j]);
    }
}
