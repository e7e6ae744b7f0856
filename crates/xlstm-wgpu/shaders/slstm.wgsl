// slstm.wgsl — the sLSTM cell (xlstm-lm), steps of one or many sequences; see Backend::slstm_step.
//
// Layouts: gates i, f, z, o [rows, H] (H = NH·DH, head-major), r [NH, 4·DH, DH] (gate-major rows),
// bias [4·H] (gate-major), state c, n, m, h [S, H], y [rows, H]. Row of step t of sequence b:
// t·batch + b (a batched step has steps = 1; a prefill has batch = 1, state slot 0).
// Params: 0 H, 1 NH, 2 batch, 3 steps. Bindings: 1 i, 2 f, 3 z, 4 o, 5 r, 6 bias, 7 c, 8 n, 9 m,
// 10 h (state), 11 y. One workgroup ({{WG}} invocations, striding over the head's DH channels) per
// (sequence, head) runs all steps; the previous output of the head lives in workgroup memory.
// Limits: DH ≤ 1024. A sequence is fresh (m' = ĩ) when its n is zero before step 0 (tested per
// head, which is the same for every state a step can leave).

@group(0) @binding(1) var<storage, read> gi: array<f32>;
@group(0) @binding(2) var<storage, read> gf: array<f32>;
@group(0) @binding(3) var<storage, read> gz: array<f32>;
@group(0) @binding(4) var<storage, read> go: array<f32>;
@group(0) @binding(5) var<storage, read> r: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> sc: array<f32>;
@group(0) @binding(8) var<storage, read_write> sn: array<f32>;
@group(0) @binding(9) var<storage, read_write> sm: array<f32>;
@group(0) @binding(10) var<storage, read_write> sh: array<f32>;
@group(0) @binding(11) var<storage, read_write> y: array<f32>;

var<workgroup> hp: array<f32, 1024>;
var<workgroup> nonzero: atomic<u32>;

@compute @workgroup_size({{WG}})
fn slstm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let width = pu(0u);
    let nh = pu(1u);
    let batch = pu(2u);
    let steps = pu(3u);
    let dh = width / nh;
    let b = wg.x / nh;
    let head = wg.x % nh;
    let sb = b * width + head * dh; // state offset of this head
    if (lid == 0u) { atomicStore(&nonzero, 0u); }
    workgroupBarrier();
    // Only this head's n is read: other workgroups may already be updating the other heads.
    // After any step every n is > 0 in every head, so this equals the whole-row test.
    for (var d = lid; d < dh; d += {{WG}}u) {
        if (sn[sb + d] != 0.0) { atomicOr(&nonzero, 1u); }
    }
    for (var d = lid; d < dh; d += {{WG}}u) { hp[d] = sh[sb + d]; }
    workgroupBarrier();
    let fresh0 = atomicLoad(&nonzero) == 0u;
    let rb = head * 4u * dh * dh;
    for (var t = 0u; t < steps; t++) {
        let row = t * batch + b;
        let gb = row * width + head * dh;
        let fresh = fresh0 && t == 0u;
        for (var d = lid; d < dh; d += {{WG}}u) {
            var raw: array<f32, 4>;
            for (var g = 0u; g < 4u; g++) {
                let rr = rb + (g * dh + d) * dh;
                var acc = 0.0;
                for (var j = 0u; j < dh; j++) { acc += r[rr + j] * hp[j]; }
                raw[g] = acc + bias[g * width + head * dh + d];
            }
            let ir = raw[0] + gi[gb + d];
            let fr = raw[1] + gf[gb + d];
            let zr = raw[2] + gz[gb + d];
            let orr = raw[3] + go[gb + d];
            let lfm = sm[sb + d] + log_sigmoid(fr);
            let m_new = select(max(ir, lfm), ir, fresh);
            let i_ = min(exp(ir - m_new), 1.0);
            let f_ = min(exp(lfm - m_new), 1.0);
            let c = f_ * sc[sb + d] + i_ * tanh(zr);
            let nn = f_ * sn[sb + d] + i_;
            sc[sb + d] = c;
            sn[sb + d] = nn;
            sm[sb + d] = m_new;
            let hv = sigmoid(orr) * c / nn;
            sh[sb + d] = hv;
            y[gb + d] = hv;
        }
        workgroupBarrier();
        for (var d = lid; d < dh; d += {{WG}}u) { hp[d] = sh[sb + d]; }
        workgroupBarrier();
    }
}
