// reduce.wgsl — workgroup sum shared by the norm and mLSTM kernels (prepended where used).
// With SUBGROUP: subgroupAdd inside each subgroup, then one partial per subgroup through workgroup
// memory (subgroup size read at run time, never assumed). Without: a shared-memory tree.
// Every invocation of the workgroup must call it (it has barriers); all get the total.

var<workgroup> red: array<f32, {{WG}}>;

fn wg_sum(v: f32, lid: u32 {{SG_FN}}) -> f32 {
//#if SUBGROUP
    let s = subgroupAdd(v);
    if (sgl == 0u) { red[lid / sgs] = s; }
    workgroupBarrier();
    var t = 0.0;
    let ns = ({{WG}}u + sgs - 1u) / sgs;
    for (var i = 0u; i < ns; i++) { t += red[i]; }
    workgroupBarrier();
    return t;
//#else
    red[lid] = v;
    workgroupBarrier();
    for (var s = {{WG}}u / 2u; s > 0u; s = s / 2u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    let t = red[0];
    workgroupBarrier();
    return t;
//#endif
}
