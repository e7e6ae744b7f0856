// stream.wgsl — the backend's bandwidth probes: stream_copy dst[i] = src[i] over vec4s, stream_read
// sums src (and writes only if the sum is −1, never for the zeros it is given). Blocked like the
// GEMV's weight reads: a block is 8·{{WG}} consecutive vec4s, each invocation has its 8 loads of a
// block in flight at once; workgroup g takes the `iters` consecutive blocks from block g·iters (so
// a workgroup lives for several blocks rather than one). Params: 0 len (vec4s), 1 iters (≥ 1).
// Bindings: 1 src, 2 dst. Dispatch: ceil(len / (8·{{WG}}·iters)) groups, spread over y past 65535.

@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

const WG: u32 = {{WG}}u;

@compute @workgroup_size({{WG}})
fn stream_copy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let len = pu(0u);
    let iters = pu(1u);
    for (var it = 0u; it < iters; it++) {
        let i = (group_index(wg, nwg) * iters + it) * 8u * WG + lid;
        if (i + 7u * WG < len) {
//#unroll j 8
            let a$j = src[i + $j * WG];
//#endunroll
//#unroll j 8
            dst[i + $j * WG] = a$j;
//#endunroll
        } else {
            for (var j = 0u; j < 8u; j++) {
                if (i + j * WG < len) { dst[i + j * WG] = src[i + j * WG]; }
            }
        }
    }
}

@compute @workgroup_size({{WG}})
fn stream_read(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let len = pu(0u);
    let iters = pu(1u);
    var acc = vec4<f32>(0.0);
    for (var it = 0u; it < iters; it++) {
        let i = (group_index(wg, nwg) * iters + it) * 8u * WG + lid;
        if (i + 7u * WG < len) {
//#unroll j 8
            let a$j = src[i + $j * WG];
//#endunroll
            acc += ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
        } else {
            for (var j = 0u; j < 8u; j++) {
                if (i + j * WG < len) { acc += src[i + j * WG]; }
            }
        }
    }
    if (acc.x + acc.y + acc.z + acc.w == -1.0) { dst[0] = acc; }
}
