//! Every WGSL variant the backend can build (each kernel file × weight dtype × subgroups on/off, with
//! the default knobs of both adapter classes, and kernel parameters as immediate data) is parsed and validated by naga and translated to Metal
//! Shading Language, entry point by entry point, with explicit buffer slots (no fake bindings) —
//! as wgpu's Metal backend does on macOS. A kernel naga's MSL writer rejects cannot land. (This is
//! naga's check, not Apple's compiler: see the README for what is verified on Apple hardware.)
use naga::back::msl;
use naga::valid::{Capabilities, ShaderStages, SubgroupOperationSet, ValidationFlags, Validator};
use xlstm_wgpu::shaders::{all_variants, source, Knobs};

fn to_msl(name: &str, wgsl: &str) -> usize {
    let module = naga::front::wgsl::parse_str(wgsl).unwrap_or_else(|e| panic!("{name}: WGSL parse error:\n{}", e.emit_to_string(wgsl)));
    // SUBGROUP: requested only where the adapter has it (the variants without it use none).
    // SHADER_FLOAT16_IN_FLOAT32 (unpack2x16float): a downlevel flag every Vulkan, Metal and DX12
    // adapter has; it is not the SHADER_F16 feature (no f16 arithmetic is used).
    // IMMEDIATES: the variants with kernel parameters as immediate data (push constants).
    let mut validator = Validator::new(ValidationFlags::all(), Capabilities::SUBGROUP | Capabilities::SHADER_FLOAT16_IN_FLOAT32 | Capabilities::IMMEDIATES);
    validator.subgroup_stages(ShaderStages::COMPUTE).subgroup_operations(SubgroupOperationSet::all());
    let info = validator.validate(&module).unwrap_or_else(|e| panic!("{name}: naga validation error:\n{}", e.emit_to_string(wgsl)));
    // Every resource gets the Metal buffer slot of its binding number, for every entry point.
    let mut resources = msl::BindingMap::new();
    for (_, g) in module.global_variables.iter() {
        if let Some(rb) = &g.binding {
            let mutable = matches!(g.space, naga::AddressSpace::Storage { access } if access.contains(naga::StorageAccess::STORE));
            resources.insert(*rb, msl::BindTarget { buffer: Some(rb.binding as u8), mutable, ..Default::default() });
        }
    }
    let mut per_entry_point_map = msl::EntryPointResourceMap::new();
    for ep in &module.entry_points {
        per_entry_point_map.insert(ep.name.clone(), msl::EntryPointResources { resources: resources.clone(), immediates_buffer: Some(29), sizes_buffer: Some(30) });
    }
    let options = msl::Options { lang_version: (2, 4), per_entry_point_map, fake_missing_bindings: false, ..Default::default() };
    let mut count = 0;
    for ep in &module.entry_points {
        let pipeline = msl::PipelineOptions { entry_point: Some((naga::ShaderStage::Compute, ep.name.clone())), ..Default::default() };
        let (msl_src, _) = msl::write_string(&module, &info, &options, &pipeline).unwrap_or_else(|e| panic!("{name}/{}: MSL translation failed: {e:?}", ep.name));
        assert!(msl_src.contains("kernel void"), "{name}/{}: no kernel in the MSL", ep.name);
        count += 1;
    }
    count
}

#[test]
fn every_wgsl_variant_translates_to_msl() {
    let mut entries = 0;
    let uniform = Knobs { immediates: false, ..Knobs::for_adapter(false) };
    for knobs in [Knobs::for_adapter(false), Knobs::for_adapter(true), uniform] {
        for v in all_variants() {
            let name = format!("{}.wgsl [{:?}, subgroups {}]", v.file, v.dtype, v.subgroup);
            entries += to_msl(&name, &source(&v, &knobs));
        }
    }
    eprintln!("{entries} entry points translated to MSL");
    assert!(entries >= 3 * 30, "expected every kernel's entry points, got {entries}");
}

/// The preprocessor keeps the right branch and substitutes every knob.
#[test]
fn preprocessor() {
    let text = "a\n//#if X\nb\n//#if Y\nc\n//#else\nd\n//#endif\n//#else\ne\n//#endif\n{{K}}\n";
    let subst = [("K", "7".to_string())].into_iter().collect();
    assert_eq!(xlstm_wgpu::shaders::preprocess(text, &["X"], &subst), "a\nb\nd\n7\n");
    assert_eq!(xlstm_wgpu::shaders::preprocess(text, &["X", "Y"], &subst), "a\nb\nc\n7\n");
    assert_eq!(xlstm_wgpu::shaders::preprocess(text, &[], &subst), "a\ne\n7\n");
    let loops = "//#unroll i 2\n//#unroll j K\nx$i$j\n//#endunroll\ny$i\n//#endunroll\n";
    assert_eq!(xlstm_wgpu::shaders::preprocess(loops, &[], &subst), format!("{}y0\n{}y1\n", (0..7).map(|j| format!("x0{j}\n")).collect::<String>(), (0..7).map(|j| format!("x1{j}\n")).collect::<String>()));
    for v in all_variants() {
        let s = source(&v, &Knobs::for_adapter(false));
        assert!(!s.contains("{{"), "{}: an unsubstituted knob: {:?}", v.file, s.lines().find(|l| l.contains("{{")));
        let left = |l: &str| l.contains('$') || l.trim_start().starts_with("//#");
        assert!(!s.lines().any(left), "{}: a directive or loop variable left: {:?}", v.file, s.lines().find(|l| left(l)));
    }
}
