// conv.wgsl — causal depthwise conv1d with a rolling input state (xlstm-lm's CausalConv1d).
//
// Layouts: x [rows, ch], w [kernel, ch] (tap-major; tap kernel−1 multiplies the current input),
// bias [ch], state [S, taps = kernel−1, ch] (previous inputs, oldest first), out [rows, ch].
// Params: 0 rows, 1 ch, 2 kernel, 3 per_row (1: row b is one step of sequence b, state slot b;
// 0: the rows are consecutive inputs of one sequence, state slot 0), 4 silu.
// conv_out   (bindings 1 x, 2 w, 3 bias, 4 state, 5 out): one invocation per output, grid-stride.
// conv_state (bindings 1 x, 6 state rw): one invocation per (sequence, channel) shifts the state
//            past the inputs: state[j] = [state; x][len + j]; ascending j reads only rows above j,
//            so the update is in place.
// Workgroup: {{WG}} invocations; dispatch up to 65535 × y groups.

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> state_in: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> state: array<f32>;

@compute @workgroup_size({{WG}})
fn conv_out(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let rows = pu(0u);
    let ch = pu(1u);
    let kernel = pu(2u);
    let per_row = pu(3u);
    let silu = pu(4u);
    let taps = kernel - 1u;
    let st = nwg.x * nwg.y * {{WG}}u;
    for (var i = group_index(wg, nwg) * {{WG}}u + lid; i < rows * ch; i += st) {
        let t = i / ch;
        let c = i % ch;
        // sequence start row and position of t inside its sequence
        let s0 = select(0u, t, per_row != 0u);
        let slot = select(0u, t, per_row != 0u);
        let p = t - s0;
        var acc = bias[c];
        for (var tap = 0u; tap < kernel; tap++) {
            let tau = i32(p) - i32(taps) + i32(tap);
            var v: f32;
            if (tau >= 0) {
                v = x[(s0 + u32(tau)) * ch + c];
            } else {
                v = state_in[(slot * taps + u32(i32(taps) + tau)) * ch + c];
            }
            acc += w[tap * ch + c] * v;
        }
        if (silu != 0u) { acc = acc / (1.0 + exp(-acc)); }
        out[i] = acc;
    }
}

@compute @workgroup_size({{WG}})
fn conv_state(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let rows = pu(0u);
    let ch = pu(1u);
    let kernel = pu(2u);
    let per_row = pu(3u);
    let taps = kernel - 1u;
    let seqs = select(1u, rows, per_row != 0u);
    let len = select(rows, 1u, per_row != 0u);
    let st = nwg.x * nwg.y * {{WG}}u;
    for (var i = group_index(wg, nwg) * {{WG}}u + lid; i < seqs * ch; i += st) {
        let s = i / ch;
        let c = i % ch;
        let s0 = s * len; // first x row of this sequence
        for (var j = 0u; j < taps; j++) {
            let tau = i32(len) - i32(taps) + i32(j);
            var v: f32;
            if (tau >= 0) {
                v = x[(s0 + u32(tau)) * ch + c];
            } else {
                v = state[(s * taps + u32(i32(taps) + tau)) * ch + c];
            }
            state[(s * taps + j) * ch + c] = v;
        }
    }
}
