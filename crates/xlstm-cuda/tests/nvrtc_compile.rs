//! Every kernel source compiles with NVRTC (for Hopper, compute_90a as the backend compiles for sm_90
//! and compute_90, and Ampere, compute_80), without
//! a GPU: only libnvrtc is needed (CI installs the `nvidia-cuda-nvrtc` wheel for this; see .ci/run).
//! Skips with a message when libnvrtc cannot be loaded, unless XLSTM_REQUIRE_NVRTC=1.
use xlstm_cuda::kernels;

#[test]
fn every_kernel_source_compiles_with_nvrtc() {
    if !kernels::nvrtc_available() {
        let msg = "libnvrtc not found (install the nvidia-cuda-nvrtc wheel and put its lib folder on LD_LIBRARY_PATH)";
        if std::env::var("XLSTM_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("{msg}, but XLSTM_REQUIRE_NVRTC=1");
        }
        eprintln!("SKIP every_kernel_source_compiles_with_nvrtc: {msg}");
        return;
    }
    eprintln!("NVRTC {:?}", kernels::nvrtc_version());
    if let Ok(dir) = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels")) {
        let files = dir.filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "cu")).count();
        assert_eq!(kernels::SOURCES.len(), files, "every kernels/*.cu file is in kernels::SOURCES");
    }
    for arch in ["compute_90a", "compute_90", "compute_80"] {
        for (name, src) in kernels::SOURCES {
            let ptx = kernels::compile(name, src, arch, false).unwrap_or_else(|e| panic!("{e}"));
            assert!(ptx.contains(".entry"), "{name}.cu ({arch}): PTX without kernels");
            eprintln!("kernels/{name}.cu -> {arch}: {} bytes of PTX", ptx.len());
        }
    }
}
