// topk.wgsl — the LM head's selection on the device: each workgroup takes one block of
// {{WG}}·4 logits of one row, applies the soft cap (cap·tanh(v/cap); cap 0 = none) and writes the
// block's k best as (index, key) u32 pairs, best first; the host merges the blocks' candidates.
// Order: f32::total_cmp descending, ties lower index first (the CPU's top_k_of): the key is the
// value's bits mapped so that unsigned order is total order (negatives inverted, sign set on the
// rest). A block with fewer than k values ends its list with index 0xffffffff.
// Round r picks the best value ordered after round r−1's pick, so nothing needs marking: each
// invocation keeps its 4 values in registers, the workgroup's best comes from subgroupMax/Min and
// one partial per subgroup (or a workgroup-memory tree without subgroups).
// Params: 0 rows, 1 n (values per row), 2 k, 3 cap (bits), 4 blocks per row.
// Bindings: 1 logits [rows, n], 2 cand [rows, blocks, k, 2] (u32). Dispatch (blocks, rows).
// top1_merge (k = 1, greedy decoding on the device): one workgroup per row merges the blocks'
// candidates in the same order and writes the row's best index to `best` (binding 3, u32 [rows]).
// Dispatch (1, rows).

@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> cand: array<u32>;

const WG: u32 = {{WG}}u;
const NONE: u32 = 0xffffffffu;

var<workgroup> rkey: array<u32, {{WG}}>;
var<workgroup> ridx: array<u32, {{WG}}>;
var<workgroup> win_key: u32;
var<workgroup> win_idx: u32;

fn order_key(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    return select(b | 0x80000000u, ~b, (b >> 31u) == 1u);
}

// (ka, ia) before (kb, ib) in the selection order; NONE indices come last.
fn better(ka: u32, ia: u32, kb: u32, ib: u32) -> bool {
    if (ib == NONE) { return ia != NONE; }
    if (ia == NONE) { return false; }
    return ka > kb || (ka == kb && ia < ib);
}

// The workgroup's best of every invocation's (key, index), left in rkey[0], ridx[0] (a tree in
// workgroup memory; every invocation calls it).
fn tree_best(lid: u32, key: u32, idx: u32) {
    rkey[lid] = key;
    ridx[lid] = idx;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h / 2u) {
        if (lid < h && better(rkey[lid + h], ridx[lid + h], rkey[lid], ridx[lid])) {
            rkey[lid] = rkey[lid + h];
            ridx[lid] = ridx[lid + h];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size({{WG}})
fn top_k(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32 {{SG_PARAMS}}) {
    let n = pu(1u);
    let k = pu(2u);
    let cap = pf(3u);
    let blocks = pu(4u);
    let r = wg.y;
    let blk = wg.x;
//#unroll e 4
    let i$e = blk * WG * 4u + $e * WG + lid;
    var v$e = logits[r * n + min(i$e, n - 1u)];
    if (cap > 0.0) { v$e = cap * tanh(v$e / cap); }
    let k$e = order_key(v$e);
    let x$e = select(NONE, i$e, i$e < n);
//#endunroll
    var pk = 0u;
    var pi = NONE;
    let out = (r * blocks + blk) * k;
    for (var round = 0u; round < k; round++) {
        var bk = 0u;
        var bi = NONE;
//#unroll e 4
        // ordered after the previous pick (every value in the first round)
        if ((pi == NONE || better(pk, pi, k$e, x$e)) && better(k$e, x$e, bk, bi)) { bk = k$e; bi = x$e; }
//#endunroll
//#if SUBGROUP
        let mk = subgroupMax(select(0u, bk, bi != NONE));
        let mi = subgroupMin(select(NONE, bi, bi != NONE && bk == mk));
        if (sgl == 0u) {
            rkey[lid / sgs] = mk;
            ridx[lid / sgs] = mi;
        }
        workgroupBarrier();
        if (lid == 0u) {
            var wk = rkey[0];
            var wi = ridx[0];
            for (var s = 1u; s < (WG + sgs - 1u) / sgs; s++) {
                if (better(rkey[s], ridx[s], wk, wi)) { wk = rkey[s]; wi = ridx[s]; }
            }
            win_key = wk;
            win_idx = wi;
        }
//#else
        tree_best(lid, bk, bi);
        if (lid == 0u) {
            win_key = rkey[0];
            win_idx = ridx[0];
        }
//#endif
        pi = workgroupUniformLoad(&win_idx);
        pk = win_key;
        if (lid == 0u) {
            cand[2u * (out + round)] = pi;
            cand[2u * (out + round) + 1u] = pk;
        }
        if (pi == NONE) { break; }
    }
}

@group(0) @binding(3) var<storage, read_write> best: array<u32>;

@compute @workgroup_size({{WG}})
fn top1_merge(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blocks = pu(4u);
    let r = wg.y;
    var bk = 0u;
    var bi = NONE;
    for (var b = lid; b < blocks; b += WG) {
        let e = 2u * (r * blocks + b);
        if (better(cand[e + 1u], cand[e], bk, bi)) { bk = cand[e + 1u]; bi = cand[e]; }
    }
    tree_best(lid, bk, bi);
    if (lid == 0u) { best[r] = ridx[0]; }
}
