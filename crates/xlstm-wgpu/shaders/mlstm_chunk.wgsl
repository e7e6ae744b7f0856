// mlstm_chunk.wgsl — the chunkwise-parallel mLSTM prefill of one sequence (NOTES §2; the design of
// TFLA in NX-AI's mlstm_kernels, as crates/xlstm-cuda/kernels/mlstm_chunk.cu): a recurrent pass over
// the chunks computes the state entering each chunk, then every chunk's outputs are formed in
// parallel from that state and the chunk's own keys and values. Any split gives the same result.
//
// Layouts: q, k [seq, NH·DK], v [seq, NH·DV], ĩ, f̃ [seq, NH] (pre-activations, bias and cap
// applied), h [seq, NH·DV]; state C [NH, DK, DV], n [NH, DK], m [NH] (stabilised as the recurrent
// step keeps them); scratch Cs [nc, NH, DK, DV], ns [nc, NH, DK], ms [nc + 1, NH]: the state
// entering each chunk, the last row of ms the final m. Params: 0 NH, 1 DK, 2 DV, 3 seq, 4 L (chunk
// length ≤ 32; the last chunk may be shorter), 5 eps (bits).
// Per chunk: b_t = Σ_{s≤t} logσ(f̃_s) (inclusive), ĩ_t.
//
// mlstm_chunk_states (bindings 2 k, 3 v, 4 ĩ, 5 f̃, 6 C rw, 7 n rw, 8 m, 9 Cs, 10 ns, 11 ms):
//   workgroup 16×16 = one 16×16 tile of C (one element an invocation), chunks in order; per chunk
//   m' = max(b_L + m, max_t(b_L − b_t + ĩ_t)), C ← e^(b_L+m−m')·C + Σ_t e^(b_L−b_t+ĩ_t−m')·k_t v_tᵀ,
//   n likewise with k_t. Dispatch (ceil(DV/16), ceil(DK/16), NH).
// mlstm_chunk_out (bindings 1 q, 2 k, 3 v, 4 ĩ, 5 f̃, 8 m rw, 9 Cs, 10 ns, 11 ms, 12 h): workgroup
//   16×16 for one chunk of one head and 64 columns of DV: S = Q Kᵀ and Q C_prev over DK in tiles of
//   16, the stabiliser mc_t = max(b_t + m, b_t + max_{s≤t}(ĩ_s − b_s)), decay e^(b_t+m−mc_t), then
//   H = decay·Q̂ C_prev + S̃ V over the denominator max(|decay·q̂·n_prev + Σ_s S̃|, e^(−mc_t)) + eps.
//   Workgroups (0, 0, h) copy the final m. Dispatch (ceil(DV/64), nc, NH).

@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> ig: array<f32>;
@group(0) @binding(5) var<storage, read> fg: array<f32>;
@group(0) @binding(6) var<storage, read_write> C: array<f32>;
@group(0) @binding(7) var<storage, read_write> n: array<f32>;
@group(0) @binding(8) var<storage, read_write> m: array<f32>;
@group(0) @binding(9) var<storage, read_write> Cs: array<f32>;
@group(0) @binding(10) var<storage, read_write> ns: array<f32>;
@group(0) @binding(11) var<storage, read_write> ms: array<f32>;
@group(0) @binding(12) var<storage, read_write> hout: array<f32>;

const TL: u32 = 32u;
const NEG_INF: f32 = -3.0e38;

// The chunk's gates: sb[t] = b_t, sig[t] = ĩ_t for t < len (one invocation).
var<workgroup> sb: array<f32, TL>;
var<workgroup> sig: array<f32, TL>;
// States: the keys' weights; out: the stabiliser and the carried state's decay per token.
var<workgroup> sw: array<f32, TL>;
var<workgroup> sdec: array<f32, TL>;
var<workgroup> wscal: array<f32, 2>;

fn chunk_gates(h: u32, nh: u32, t0: u32, len: u32) {
    var b = 0.0;
    for (var t = 0u; t < len; t++) {
        b += log_sigmoid(fg[(t0 + t) * nh + h]);
        sb[t] = b;
        sig[t] = ig[(t0 + t) * nh + h];
    }
}

// Weighted keys and values of one chunk for a states tile: kt[t][a], vt[t][c].
var<workgroup> kt: array<array<f32, 16>, TL>;
var<workgroup> vt: array<array<f32, 16>, TL>;

@compute @workgroup_size(16, 16)
fn mlstm_chunk_states(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) li: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let nh = pu(0u);
    let dk = pu(1u);
    let dv = pu(2u);
    let seq = pu(3u);
    let L = pu(4u);
    let h = wg.z;
    let a0 = wg.y * 16u;
    let c0 = wg.x * 16u;
    let a = a0 + li.y;
    let c = c0 + li.x;
    let inside = a < dk && c < dv;
    let nc = (seq + L - 1u) / L;
    let own_n = wg.x == 0u && li.x == 0u && a < dk;
    let first = wg.x == 0u && wg.y == 0u && lid == 0u;
    let ci = (h * dk + min(a, dk - 1u)) * dv + min(c, dv - 1u);
    var cr = select(0.0, C[ci], inside);
    var nr = select(0.0, n[h * dk + min(a, dk - 1u)], own_n);
    var mp = m[h];
    for (var kc = 0u; kc < nc; kc++) {
        let t0 = kc * L;
        let len = min(L, seq - t0);
        // the state entering this chunk
        if (inside) { Cs[((kc * nh + h) * dk + a) * dv + c] = cr; }
        if (own_n) { ns[(kc * nh + h) * dk + a] = nr; }
        if (first) { ms[kc * nh + h] = mp; }
        if (lid == 0u) {
            chunk_gates(h, nh, t0, len);
            let g = sb[len - 1u];
            var mx = NEG_INF;
            for (var t = 0u; t < len; t++) { mx = max(mx, g - sb[t] + sig[t]); }
            let mn = max(g + mp, mx);
            for (var t = 0u; t < len; t++) { sw[t] = exp(g - sb[t] + sig[t] - mn); }
            wscal[0] = exp(g + mp - mn);
            wscal[1] = mn;
        }
        workgroupBarrier();
        for (var e = lid; e < len * 16u; e += 256u) {
            let t = e / 16u;
            let j = e % 16u;
            kt[t][j] = select(0.0, k[(t0 + t) * nh * dk + h * dk + min(a0 + j, dk - 1u)] * sw[t], a0 + j < dk);
            vt[t][j] = select(0.0, v[(t0 + t) * nh * dv + h * dv + min(c0 + j, dv - 1u)], c0 + j < dv);
        }
        workgroupBarrier();
        let decay = wscal[0];
        cr *= decay;
        nr *= decay;
        for (var t = 0u; t < len; t++) {
            cr += kt[t][li.y] * vt[t][li.x];
            nr += kt[t][li.y];
        }
        mp = wscal[1];
        workgroupBarrier();
    }
    if (inside) { C[ci] = cr; }
    if (own_n) { n[h * dk + a] = nr; }
    if (first) { ms[nc * nh + h] = mp; }
}

// Out: phase 1 tiles (Q [TL][17], K [TL][17], C_prev [16][64]) and phase 2's V [TL][64] share `uni`.
const QT: u32 = 0u;
const KT: u32 = 544u;
const CT: u32 = 1088u;
var<workgroup> uni: array<f32, 2112>;
var<workgroup> S: array<array<f32, 33>, TL>;
var<workgroup> smc: array<f32, TL>;
var<workgroup> sqn: array<f32, TL>;
var<workgroup> sden: array<f32, TL>;

@compute @workgroup_size(16, 16)
fn mlstm_chunk_out(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) li: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let nh = pu(0u);
    let dk = pu(1u);
    let dv = pu(2u);
    let seq = pu(3u);
    let L = pu(4u);
    let eps = pf(5u);
    let h = wg.z;
    let kc = wg.y;
    let c0 = wg.x * 64u;
    let t0 = kc * L;
    let len = min(L, seq - t0);
    let nc = (seq + L - 1u) / L;
    let mp = ms[kc * nh + h];
    if (wg.x == 0u && kc == 0u && lid == 0u) { m[h] = ms[nc * nh + h]; }
    let cb = (kc * nh + h) * dk * dv;
    let nb = (kc * nh + h) * dk;
    let scale = 1.0 / sqrt(f32(dk));
    if (lid == 0u) {
        chunk_gates(h, nh, t0, len);
        var run = NEG_INF;
        for (var t = 0u; t < len; t++) {
            run = max(run, sig[t] - sb[t]);
            let mc = max(sb[t] + mp, sb[t] + run);
            smc[t] = mc;
            sdec[t] = exp(sb[t] + mp - mc);
        }
    }
    // S[t][s] for t = 2·ly + i, s = 2·lx + j; H[t][c] for t = 2·ly + i, c = c0 + 4·lx + j.
    var sacc: array<f32, 4>;
    var hacc: array<f32, 8>;
    var qn = 0.0;
    for (var a0 = 0u; a0 < dk; a0 += 16u) {
        workgroupBarrier();
        for (var e = lid; e < TL * 16u; e += 256u) {
            let t = e / 16u;
            let a = e % 16u;
            let ok = t < len && a0 + a < dk;
            let r = (t0 + min(t, len - 1u)) * nh * dk + h * dk + min(a0 + a, dk - 1u);
            uni[QT + t * 17u + a] = select(0.0, q[r], ok);
            uni[KT + t * 17u + a] = select(0.0, k[r], ok);
        }
        for (var e = lid; e < 16u * 64u; e += 256u) {
            let a = e / 64u;
            let cc = e % 64u;
            let ok = a0 + a < dk && c0 + cc < dv;
            uni[CT + a * 64u + cc] = select(0.0, Cs[cb + min(a0 + a, dk - 1u) * dv + min(c0 + cc, dv - 1u)], ok);
        }
        workgroupBarrier();
        for (var a = 0u; a < 16u; a++) {
            let q0 = uni[QT + (2u * li.y) * 17u + a];
            let q1 = uni[QT + (2u * li.y + 1u) * 17u + a];
            let k0 = uni[KT + (2u * li.x) * 17u + a];
            let k1 = uni[KT + (2u * li.x + 1u) * 17u + a];
            sacc[0] += q0 * k0;
            sacc[1] += q0 * k1;
            sacc[2] += q1 * k0;
            sacc[3] += q1 * k1;
            for (var j = 0u; j < 4u; j++) {
                let cv = uni[CT + a * 64u + 4u * li.x + j];
                hacc[j] += q0 * cv;
                hacc[4u + j] += q1 * cv;
            }
        }
        if (lid < TL) {
            for (var a = 0u; a < 16u && a0 + a < dk; a++) { qn += uni[QT + lid * 17u + a] * ns[nb + a0 + a]; }
        }
    }
    // decayed, masked, scaled S̃
    for (var i = 0u; i < 2u; i++) {
        let t = 2u * li.y + i;
        for (var j = 0u; j < 2u; j++) {
            let s = 2u * li.x + j;
            var val = 0.0;
            if (s <= t && t < len) { val = scale * sacc[2u * i + j] * exp(sb[t] - sb[s] + sig[s] - smc[t]); }
            S[t][s] = val;
        }
    }
    if (lid < TL) { sqn[lid] = qn; }
    workgroupBarrier();
    if (lid < TL) {
        let t = lid;
        var rs = 0.0;
        for (var s = 0u; s < TL; s++) { rs += S[t][s]; }
        let den = sdec[t] * sqn[t] * scale + rs;
        sden[t] = select(1.0, max(abs(den), exp(-smc[t])) + eps, t < len);
    }
    for (var e = lid; e < TL * 64u; e += 256u) {
        let s = e / 64u;
        let cc = e % 64u;
        let ok = s < len && c0 + cc < dv;
        uni[s * 64u + cc] = select(0.0, v[(t0 + min(s, len - 1u)) * nh * dv + h * dv + min(c0 + cc, dv - 1u)], ok);
    }
    workgroupBarrier();
    for (var i = 0u; i < 2u; i++) {
        let t = 2u * li.y + i;
        let d = select(0.0, sdec[t] * scale, t < len);
        for (var j = 0u; j < 4u; j++) { hacc[4u * i + j] *= d; }
    }
    for (var s = 0u; s < TL; s++) {
        let s0 = S[2u * li.y][s];
        let s1 = S[2u * li.y + 1u][s];
        for (var j = 0u; j < 4u; j++) {
            let vv = uni[s * 64u + 4u * li.x + j];
            hacc[j] += s0 * vv;
            hacc[4u + j] += s1 * vv;
        }
    }
    for (var i = 0u; i < 2u; i++) {
        let t = 2u * li.y + i;
        if (t < len) {
            for (var j = 0u; j < 4u; j++) {
                let c = c0 + 4u * li.x + j;
                if (c < dv) { hout[(t0 + t) * nh * dv + h * dv + c] = hacc[4u * i + j] / sden[t]; }
            }
        }
    }
}
