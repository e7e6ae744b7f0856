// elementwise.wgsl — pointwise and small row ops; every entry is grid-stride over its outputs with
// {{WG}} invocations per workgroup (dispatch: up to 65535 × y groups; any length).
//
// bias_soft_cap  x[r,j] = cap·tanh((x[r,j] + bias[j]) / cap)   P: 0 rows, 1 width, 2 has_bias, 3 cap (bits, 0 = none)
//                bindings 1 x (rw), 2 bias
// add            x[i] += y[i]                                 P: 0 len          bindings 3 x (rw), 4 y
// gated_act      out[i] = act(gate[i]) · up[i]                P: 0 len, 1 act (0 gelu, 1 silu, 2 relu,
//                3 relu², 4 sigmoid, 5 selu)                   bindings 5 gate, 6 up, 7 out (rw)
// sigmoid_gate   x[i] = σ(gate[i]) · x[i]                     P: 0 len          bindings 8 gate, 9 x (rw)
// scaled_add     x[r,j] += scale[j] · y[r,j]                  P: 0 rows, 1 width bindings 10 x (rw), 11 y, 12 scale
// copy_cols      dst[r·ds + do + j] = src[r·ss + so + j]      P: 0 ss, 1 so, 2 ds, 3 do, 4 rows, 5 width
//                                                              bindings 13 src, 14 dst (rw)
// headwise       out[r, b·dout + o] = Σ_j w[b,o,j]·x[r, b·din + j] (+ bias)   P: 0 rows, 1 blocks, 2 din,
//                3 dout, 4 has_bias                            bindings 15 x, 16 w, 17 bias, 18 out (rw)

const WG: u32 = {{WG}}u;

fn first(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 { return group_index(wg, nwg) * WG + lid; }
fn stride(nwg: vec3<u32>) -> u32 { return nwg.x * nwg.y * WG; }

@group(0) @binding(1) var<storage, read_write> bsc_x: array<f32>;
@group(0) @binding(2) var<storage, read> bsc_bias: array<f32>;

@compute @workgroup_size({{WG}})
fn bias_soft_cap(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let len = pu(0u) * pu(1u);
    let width = pu(1u);
    let has_bias = pu(2u);
    let cap = pf(3u);
    for (var i = first(wg, nwg, lid); i < len; i += stride(nwg)) {
        var v = bsc_x[i];
        if (has_bias != 0u) { v += bsc_bias[i % width]; }
        if (cap > 0.0) { v = cap * tanh(v / cap); }
        bsc_x[i] = v;
    }
}

@group(0) @binding(3) var<storage, read_write> add_x: array<f32>;
@group(0) @binding(4) var<storage, read> add_y: array<f32>;

@compute @workgroup_size({{WG}})
fn add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let len = pu(0u);
    for (var i = first(wg, nwg, lid); i < len; i += stride(nwg)) { add_x[i] = add_x[i] + add_y[i]; }
}

@group(0) @binding(5) var<storage, read> ga_gate: array<f32>;
@group(0) @binding(6) var<storage, read> ga_up: array<f32>;
@group(0) @binding(7) var<storage, read_write> ga_out: array<f32>;

@compute @workgroup_size({{WG}})
fn gated_act(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let len = pu(0u);
    let a = pu(1u);
    for (var i = first(wg, nwg, lid); i < len; i += stride(nwg)) { ga_out[i] = act(a, ga_gate[i]) * ga_up[i]; }
}

@group(0) @binding(8) var<storage, read> sg_gate: array<f32>;
@group(0) @binding(9) var<storage, read_write> sg_x: array<f32>;

@compute @workgroup_size({{WG}})
fn sigmoid_gate(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let len = pu(0u);
    for (var i = first(wg, nwg, lid); i < len; i += stride(nwg)) { sg_x[i] = sigmoid(sg_gate[i]) * sg_x[i]; }
}

@group(0) @binding(10) var<storage, read_write> sa_x: array<f32>;
@group(0) @binding(11) var<storage, read> sa_y: array<f32>;
@group(0) @binding(12) var<storage, read> sa_scale: array<f32>;

@compute @workgroup_size({{WG}})
fn scaled_add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let width = pu(1u);
    let len = pu(0u) * width;
    for (var i = first(wg, nwg, lid); i < len; i += stride(nwg)) { sa_x[i] = sa_x[i] + sa_scale[i % width] * sa_y[i]; }
}

@group(0) @binding(13) var<storage, read> cc_src: array<f32>;
@group(0) @binding(14) var<storage, read_write> cc_dst: array<f32>;

@compute @workgroup_size({{WG}})
fn copy_cols(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let ss = pu(0u);
    let so = pu(1u);
    let ds = pu(2u);
    let doff = pu(3u);
    let width = pu(5u);
    let len = pu(4u) * width;
    for (var i = first(wg, nwg, lid); i < len; i += stride(nwg)) {
        let r = i / width;
        let j = i % width;
        cc_dst[r * ds + doff + j] = cc_src[r * ss + so + j];
    }
}

@group(0) @binding(15) var<storage, read> hw_x: array<f32>;
@group(0) @binding(16) var<storage, read> hw_w: array<f32>;
@group(0) @binding(17) var<storage, read> hw_bias: array<f32>;
@group(0) @binding(18) var<storage, read_write> hw_out: array<f32>;

@compute @workgroup_size({{WG}})
fn headwise(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let rows = pu(0u);
    let blocks = pu(1u);
    let din = pu(2u);
    let dout = pu(3u);
    let has_bias = pu(4u);
    let wout = blocks * dout;
    let len = rows * wout;
    for (var i = first(wg, nwg, lid); i < len; i += stride(nwg)) {
        let r = i / wout;
        let col = i % wout;
        let b = col / dout;
        let xo = r * blocks * din + b * din;
        let wo = col * din; // w[b, o, :] with col = b·dout + o
        var acc = 0.0;
        for (var j = 0u; j < din; j++) { acc += hw_w[wo + j] * hw_x[xo + j]; }
        if (has_bias != 0u) { acc += hw_bias[col]; }
        hw_out[i] = acc;
    }
}
