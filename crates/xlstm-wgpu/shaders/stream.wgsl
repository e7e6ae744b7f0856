// stream.wgsl — the backend's bandwidth probes: stream_copy dst[i] = src[i] over vec4s, stream_read
// sums src (and writes only if the sum is −1, never for the zeros it is given). Each invocation has
// 4 vec4 loads in flight per loop step (grid-stride). Params: 0 len (vec4s). Bindings: 1 src, 2 dst.

@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

const WG: u32 = {{WG}}u;

@compute @workgroup_size({{WG}})
fn stream_copy(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let len = pu(0u);
    let st = nwg.x * nwg.y * WG;
    var i = group_index(wg, nwg) * WG + lid;
    for (; i + 3u * st < len; i += 4u * st) {
        let a = src[i];
        let b = src[i + st];
        let c = src[i + 2u * st];
        let d = src[i + 3u * st];
        dst[i] = a;
        dst[i + st] = b;
        dst[i + 2u * st] = c;
        dst[i + 3u * st] = d;
    }
    for (; i < len; i += st) { dst[i] = src[i]; }
}

@compute @workgroup_size({{WG}})
fn stream_read(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let len = pu(0u);
    let st = nwg.x * nwg.y * WG;
    var i = group_index(wg, nwg) * WG + lid;
    var acc = vec4<f32>(0.0);
    for (; i + 3u * st < len; i += 4u * st) {
        acc += (src[i] + src[i + st]) + (src[i + 2u * st] + src[i + 3u * st]);
    }
    for (; i < len; i += st) { acc += src[i]; }
    if (acc.x + acc.y + acc.z + acc.w == -1.0) { dst[0] = acc; }
}
