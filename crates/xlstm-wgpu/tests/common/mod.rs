//! Shared by the wgpu tests: one backend per test binary (or a printed SKIP when this machine has no
//! adapter; `XLSTM_REQUIRE_WGPU=1`, set by CI where lavapipe is installed, turns the skip into a
//! failure), and the golden cases' helpers.
#![allow(dead_code)]
use std::sync::OnceLock;

use xlstm_wgpu::{Api, WgpuBackend};

pub fn backend() -> Option<&'static WgpuBackend> {
    static B: OnceLock<Option<WgpuBackend>> = OnceLock::new();
    B.get_or_init(|| match WgpuBackend::new(Api::Any) {
        Ok(b) => {
            eprintln!("wgpu tests on {}", xlstm_core::Backend::name(&b));
            Some(b)
        }
        Err(e) => {
            if std::env::var("XLSTM_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
                panic!("XLSTM_REQUIRE_WGPU=1 but no wgpu adapter: {e}");
            }
            eprintln!("SKIP: no wgpu adapter on this machine ({e}); install mesa-vulkan-drivers + libvulkan1 to run the GPU tests on the CPU");
            None
        }
    })
    .as_ref()
}

/// A fresh backend of its own (for tests that change its settings).
pub fn own_backend() -> Option<WgpuBackend> {
    backend()?;
    WgpuBackend::new(Api::Any).ok()
}

pub use xlstm_core::testing::*;
