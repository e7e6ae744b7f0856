// mv.wgsl — batch-1 GEMV for decode: y[j] (+)= Σ_c x[c] · W[j, c], several matrices ("slots") that
// share one input in one dispatch, optionally with the input's RMSNorm fused in (NORM) and, for a
// gated feed-forward, two matrices read row by row together with the activation fused in (PAIR).
//
// Weights: u32 words in one storage binding (`wa`, the pool the matrices were placed in; PAIR: the
// second matrix in `wb`), a row of a 16-bit matrix is ceil(k/8) vec4 words (8 bf16/f16 values each),
// of an f32 matrix twice that (rows padded to 8 values with zeros). Slot s starts at vec4 word
// base[s] of its binding.
// x [k] f32 read as vec4 (buffers are padded to 32 bytes, so the last 8-value chunk is readable;
// columns past k are masked). NORM: g [k] the RMSNorm weight; y = inv · Σ_c (x[c]·g[c])·W[j, c] with
// inv = rsqrt(mean(x²) + eps), the mean summed by the same invocations that read x; the dispatch's
// workgroup 0 also writes xn = x·inv·g when asked (flag bit 0).
// Params: 0 k, 1 flags (bit 0 write xn, bit 1 accumulate: y += instead of y =), 2 eps (bits),
// 3 slots (≤ 6; PAIR: 1), 4 activation (PAIR: 0 gelu, 1 silu, 2 relu, 3 relu², 4 sigmoid, 5 selu),
// 8+s rows of slot s (bit 31: f32 weights), 16+s base of slot s (PAIR: 16 gate in wa, 17 up in wb),
// 24+s first output index of slot s (its rows go to y_s[out0 + j]).
// Workgroup: {{WG}} invocations own {{R}} consecutive rows of one slot; invocation t reads the
// 8-value chunks t, t + {{WG}}, … of all {{R}} rows ({{U}} chunks per loop step, all loads first:
// {{U}}·{{R}} 16-byte weight loads in flight), so each x chunk is read once for {{R}} rows; the
// {{R}} sums (PAIR: 2·{{R}}) and the sum of squares are then reduced over the workgroup (subgroupAdd
// + workgroup memory, or a workgroup-memory tree without subgroups).
// Dispatch: Σ_s ceil(rows_s / {{R}}) groups, spread over y past 65535.

@group(0) @binding(1) var<storage, read> wa: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> wb: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> g4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> xn: array<f32>;
@group(0) @binding(6) var<storage, read_write> y0: array<f32>;
@group(0) @binding(7) var<storage, read_write> y1: array<f32>;
@group(0) @binding(8) var<storage, read_write> y2: array<f32>;
@group(0) @binding(9) var<storage, read_write> y3: array<f32>;
@group(0) @binding(10) var<storage, read_write> y4: array<f32>;
@group(0) @binding(11) var<storage, read_write> y5: array<f32>;

const WG: u32 = {{WG}}u;
const R: u32 = {{R}}u;
const U: u32 = {{U}}u;
//#if PAIR
const NR: u32 = 2u * {{R}}u;
//#else
const NR: u32 = {{R}}u;
//#endif
// Values reduced per workgroup: the row sums, then the sum of squares.
const NV: u32 = NR + 1u;

var<workgroup> red: array<f32, {{WG}} * NV>;

// 8 columns of x (natural order a = 0..3, b = 4..7), the even/odd split of the same (e, o), and the
// 16-bit weight word's dot product with them.
struct X8 { a: vec4<f32>, b: vec4<f32>, e: vec4<f32>, o: vec4<f32> }

fn x8(c: u32, k: u32, masked: bool, ss: ptr<function, f32>) -> X8 {
    var a = x4[2u * c];
    var b = x4[2u * c + 1u];
    if (masked) {
        let col = vec4<u32>(c * 8u) + vec4<u32>(0u, 1u, 2u, 3u);
        a = select(vec4<f32>(0.0), a, col < vec4<u32>(k));
        b = select(vec4<f32>(0.0), b, col + vec4<u32>(4u) < vec4<u32>(k));
    }
//#if NORM
    *ss += dot(a, a) + dot(b, b);
    a *= g4[2u * c];
    b *= g4[2u * c + 1u];
//#endif
    return X8(a, b, vec4<f32>(a.x, a.z, b.x, b.z), vec4<f32>(a.y, a.w, b.y, b.w));
}

fn dot16(u: vec4<u32>, x: X8) -> f32 {
//#if F16
    let p = unpack2x16float(u.x);
    let q = unpack2x16float(u.y);
    let r = unpack2x16float(u.z);
    let s = unpack2x16float(u.w);
    return dot(vec4<f32>(p, q), x.a) + dot(vec4<f32>(r, s), x.b);
//#else
    let lo = bitcast<vec4<f32>>(u << vec4<u32>(16u));
    let hi = bitcast<vec4<f32>>(u & vec4<u32>(0xffff0000u));
    return dot(lo, x.e) + dot(hi, x.o);
//#endif
}

fn dot32(u: vec4<u32>, v: vec4<u32>, x: X8) -> f32 {
    return dot(bitcast<vec4<f32>>(u), x.a) + dot(bitcast<vec4<f32>>(v), x.b);
}

// Row offsets (vec4 words) of this workgroup's rows; rows past the slot's end repeat its last row
// (their sums are computed and dropped), so the loops below need no per-row test. Loops over rows
// and unrolled steps are expanded by the preprocessor (`//#unroll`), so every index into `ro`,
// `acc` and the loaded words is a constant and they stay in registers.
struct Rows { a: array<u32, {{R}}>, b: array<u32, {{R}}> }

// Accumulates chunks [c0, c1) in steps of WG for 16-bit weights, U chunks per step, loads first.
fn run16(c0: u32, c1: u32, k: u32, ro: Rows, acc: ptr<function, array<f32, NR>>, ss: ptr<function, f32>) {
    var c = c0;
    for (; c + (U - 1u) * WG < c1; c += U * WG) {
//#unroll u U
//#unroll j R
        let wa$u_$j = wa[ro.a[$j] + c + $u * WG];
//#if PAIR
        let wb$u_$j = wb[ro.b[$j] + c + $u * WG];
//#endif
//#endunroll
//#endunroll
//#unroll u U
        let x$u = x8(c + $u * WG, k, false, ss);
//#unroll j R
        (*acc)[$j] += dot16(wa$u_$j, x$u);
//#if PAIR
        (*acc)[R + $j] += dot16(wb$u_$j, x$u);
//#endif
//#endunroll
//#endunroll
    }
    for (; c < c1; c += WG) {
        let xx = x8(c, k, false, ss);
//#unroll j R
        (*acc)[$j] += dot16(wa[ro.a[$j] + c], xx);
//#if PAIR
        (*acc)[R + $j] += dot16(wb[ro.b[$j] + c], xx);
//#endif
//#endunroll
    }
}

// The same for f32 weights (two vec4 words a chunk), one chunk per step; `masked` for the last,
// partial chunk.
fn run32(c0: u32, c1: u32, k: u32, masked: bool, ro: Rows, acc: ptr<function, array<f32, NR>>, ss: ptr<function, f32>) {
    for (var c = c0; c < c1; c += WG) {
        let xx = x8(c, k, masked, ss);
//#unroll j R
        (*acc)[$j] += dot32(wa[ro.a[$j] + 2u * c], wa[ro.a[$j] + 2u * c + 1u], xx);
//#if PAIR
        (*acc)[R + $j] += dot32(wb[ro.b[$j] + 2u * c], wb[ro.b[$j] + 2u * c + 1u], xx);
//#endif
//#endunroll
    }
}

// The last, partial chunk of 16-bit weights (columns past k masked; weights there are zero padding).
fn tail16(c: u32, k: u32, ro: Rows, acc: ptr<function, array<f32, NR>>, ss: ptr<function, f32>) {
    let xx = x8(c, k, true, ss);
//#unroll j R
    (*acc)[$j] += dot16(wa[ro.a[$j] + c], xx);
//#if PAIR
    (*acc)[R + $j] += dot16(wb[ro.b[$j] + c], xx);
//#endif
//#endunroll
}

fn store(s: u32, i: u32, v: f32, accumulate: bool) {
    switch s {
        case 0u: { y0[i] = select(v, y0[i] + v, accumulate); }
        case 1u: { y1[i] = select(v, y1[i] + v, accumulate); }
        case 2u: { y2[i] = select(v, y2[i] + v, accumulate); }
        case 3u: { y3[i] = select(v, y3[i] + v, accumulate); }
        case 4u: { y4[i] = select(v, y4[i] + v, accumulate); }
        default: { y5[i] = select(v, y5[i] + v, accumulate); }
    }
}

@compute @workgroup_size({{WG}})
fn mv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
      @builtin(local_invocation_index) lid: u32 {{SG_PARAMS}}) {
    let k = pu(0u);
    let flags = pu(1u);
    let nslots = pu(3u);
    let gid = group_index(wg, nwg);
    // Which slot and row block this workgroup has (uniform: the whole workgroup leaves together).
    var g = gid;
    var s = 0u;
    for (; s < nslots; s++) {
        let nb = ((pu(8u + s) & 0x7fffffffu) + R - 1u) / R;
        if (g < nb) { break; }
        g -= nb;
    }
    if (s >= nslots) { return; }
    let n = pu(8u + s) & 0x7fffffffu;
    let wide = (pu(8u + s) >> 31u) != 0u;
    let chunks = (k + 7u) / 8u;
    let stride = select(chunks, 2u * chunks, wide);
    let j0 = g * R;
    var ro: Rows;
//#unroll j R
    ro.a[$j] = pu(16u + s) + min(j0 + $j, n - 1u) * stride;
    ro.b[$j] = pu(17u) + min(j0 + $j, n - 1u) * stride;
//#endunroll

    var acc: array<f32, NR>; // zero-initialised
    var ss = 0.0;
    let full = k / 8u;
    let last = full < chunks && lid == full % WG;
    if (wide) {
        run32(lid, full, k, false, ro, &acc, &ss);
        if (last) { run32(full, full + 1u, k, true, ro, &acc, &ss); }
    } else {
        run16(lid, full, k, ro, &acc, &ss);
        if (last) { tail16(full, k, ro, &acc, &ss); }
    }

    // Workgroup sums: red[i] ends up holding value i's total (i < NR row sums, NR the squares).
//#if SUBGROUP
    let sg = lid / sgs;
    var sums: array<f32, NV>;
//#unroll j R
    sums[$j] = subgroupAdd(acc[$j]);
//#if PAIR
    sums[R + $j] = subgroupAdd(acc[R + $j]);
//#endif
//#endunroll
    sums[NR] = subgroupAdd(ss);
    if (sgl == 0u) {
//#unroll j R
        red[sg * NV + $j] = sums[$j];
//#if PAIR
        red[sg * NV + R + $j] = sums[R + $j];
//#endif
//#endunroll
        red[sg * NV + NR] = sums[NR];
    }
    workgroupBarrier();
    let nsg = (WG + sgs - 1u) / sgs;
    if (lid < NV) {
        var t = 0.0;
        for (var i = 1u; i < nsg; i++) { t += red[i * NV + lid]; }
        red[lid] += t;
    }
//#else
//#unroll j R
    red[lid * NV + $j] = acc[$j];
//#if PAIR
    red[lid * NV + R + $j] = acc[R + $j];
//#endif
//#endunroll
    red[lid * NV + NR] = ss;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h / 2u) {
        if (lid < h) {
            for (var i = 0u; i < NV; i++) { red[lid * NV + i] += red[(lid + h) * NV + i]; }
        }
        workgroupBarrier();
    }
//#endif
    workgroupBarrier();
//#if NORM
    let inv = 1.0 / sqrt(red[NR] / f32(k) + pf(2u));
    if (gid == 0u && (flags & 1u) != 0u) {
        for (var c = lid; c < k; c += WG) { xn[c] = x4[c / 4u][c % 4u] * inv * g4[c / 4u][c % 4u]; }
    }
//#else
    let inv = 1.0;
//#endif
    if (lid < R && j0 + lid < n) {
//#if PAIR
        let v = act(pu(4u), red[lid] * inv) * (red[R + lid] * inv);
//#else
        let v = red[lid] * inv;
//#endif
        store(s, pu(24u + s) + j0 + lid, v, (flags & 2u) != 0u);
    }
}
