// embed.wgsl — out[r, c] = table[ids[r], c] widened to f32, for the table rows held by one part.
//
// Layouts: table [rows_part, kp] u32 words (2 bf16/f16 per word or 1 f32), ids [n] u32 holding each
// row's index inside this part or 0xffffffff when the token lives in another part, out [n, d].
// Params: 0 n, 1 d, 2 kp, 3 where the ids are: 0 the buffer; 1 inline in params 4.. (n ≤ 28, the
// buffer a dummy: a decode step then creates no buffer); 2 the buffer, holding vocabulary ids (the
// ones the device chose), this part's rows being params 4 (first) and 5 (count).
// Workgroup: {{WG}} invocations, one output value each, grid-stride.

@group(0) @binding(1) var<storage, read> table: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size({{WG}})
fn embed(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let n = pu(0u);
    let d = pu(1u);
    let kp = pu(2u);
    let mode = pu(3u);
    let stride = nwg.x * nwg.y * {{WG}}u;
    for (var i = group_index(wg, nwg) * {{WG}}u + lid; i < n * d; i += stride) {
        let r = i / d;
        let c = i % d;
        var id: u32;
        if (mode == 1u) {
            id = pu(4u + r);
        } else {
            id = ids[r];
        }
        if (mode == 2u) {
            id = select(0xffffffffu, id - pu(4u), id >= pu(4u) && id - pu(4u) < pu(5u));
        }
        if (id != 0xffffffffu) {
            let e = id * kp + c;
//#if F32
            out[i] = bitcast<f32>(table[e]);
//#else
            let u = table[e / 2u];
            out[i] = select(lo16(u), hi16(u), (e & 1u) == 1u);
//#endif
        }
    }
}
