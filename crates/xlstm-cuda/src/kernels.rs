//! Kernel sources (embedded with `include_str!`) and their run-time compilation with NVRTC.
//!
//! Each `kernels/*.cu` file is one op family; `common.cuh` is prepended to every one (no system
//! headers are needed). PTX is cached on disk under `$XLSTM_CACHE_DIR` or `~/.cache/xlstm/ptx/`,
//! keyed by a hash of the full source, the options and the NVRTC version, per target architecture.
use std::path::PathBuf;

use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};

pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// (file stem, source) of every kernel family.
pub const SOURCES: &[(&str, &str)] = &[
    ("elementwise", include_str!("../kernels/elementwise.cu")),
    ("norm", include_str!("../kernels/norm.cu")),
    ("gemv", include_str!("../kernels/gemv.cu")),
    ("mlstm", include_str!("../kernels/mlstm.cu")),
    ("mlstm_chunk", include_str!("../kernels/mlstm_chunk.cu")),
    ("conv", include_str!("../kernels/conv.cu")),
    ("slstm", include_str!("../kernels/slstm.cu")),
    ("topk", include_str!("../kernels/topk.cu")),
    ("stack", include_str!("../kernels/stack.cu")),
];

/// The compilable text of one family: the common header, then the file (line numbers restart so
/// compiler messages point into the .cu file).
pub fn full_source(name: &str, src: &str) -> String {
    format!("{COMMON}\n#line 1 \"{name}.cu\"\n{src}")
}

/// Whether libnvrtc can be loaded on this machine.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Option<(i32, i32)> {
    let (mut a, mut b) = (0, 0);
    // SAFETY: plain out-parameters; the library was checked to be loadable by the caller.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
    (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((a, b))
}

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("XLSTM_CACHE_DIR") {
        return Some(PathBuf::from(d).join("ptx"));
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("xlstm").join("ptx"));
    }
    std::env::var("HOME").ok().map(|h| PathBuf::from(h).join(".cache").join("xlstm").join("ptx"))
}

/// Whether kernels are built with the timing trace (`XLSTM_CUDA_TRACE=1`; common.cuh, `CudaBackend::trace_take`).
pub fn trace_enabled() -> bool {
    std::env::var("XLSTM_CUDA_TRACE").is_ok_and(|v| v == "1")
}

fn options(arch: &str) -> Vec<String> {
    let mut o = vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()];
    if trace_enabled() {
        o.push("-DXLSTM_TRACE".into());
    }
    // kernel experiments: macro definitions for the sources' tuning knobs (e.g. -DCHUNK_OUT_BF16_BLOCKS=3)
    if let Ok(defs) = std::env::var("XLSTM_CUDA_DEFINES") {
        o.extend(defs.split_whitespace().filter(|d| d.starts_with("-D")).map(String::from));
    }
    o
}

/// Compiles one family to PTX for `arch` (e.g. `compute_90`), through the disk cache unless
/// `use_cache` is false. Errors carry NVRTC's log.
pub fn compile(name: &str, src: &str, arch: &str, use_cache: bool) -> Result<String, String> {
    let full = full_source(name, src);
    let ver = nvrtc_version().unwrap_or((0, 0));
    let mut h = fnv1a(full.as_bytes(), 0xcbf2_9ce4_8422_2325);
    h = fnv1a(options(arch).join(" ").as_bytes(), h);
    h = fnv1a(format!("{}.{}", ver.0, ver.1).as_bytes(), h);
    let path = cache_dir().map(|d| d.join(format!("{name}-{arch}-{h:016x}.ptx")));
    if use_cache {
        if let Some(p) = &path {
            if let Ok(ptx) = std::fs::read_to_string(p) {
                if ptx.contains(".entry") {
                    return Ok(ptx);
                }
            }
        }
    }
    let opts = CompileOptions { options: options(arch), name: Some(format!("{name}.cu")), ..Default::default() };
    let ptx = compile_ptx_with_opts(&full, opts).map_err(|e| describe(name, e))?.to_src();
    if let Some(p) = &path {
        // A cache that cannot be written is no error: the next run compiles again.
        if let Some(dir) = p.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = p.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &ptx).is_ok() {
                    let _ = std::fs::rename(&tmp, p);
                }
            }
        }
    }
    Ok(ptx)
}

fn describe(name: &str, e: CompileError) -> String {
    match e {
        CompileError::CompileError { nvrtc, log, .. } => {
            format!("NVRTC could not compile kernels/{name}.cu ({nvrtc:?}):\n{}", log.to_string_lossy())
        }
        other => format!("NVRTC failed on kernels/{name}.cu: {other:?}"),
    }
}
