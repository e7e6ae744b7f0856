//! Shared by the wgpu tests: one backend per test binary (or a printed SKIP when this machine has no
//! adapter; `XLSTM_REQUIRE_WGPU=1`, set by CI where lavapipe is installed, turns the skip into a
//! failure), and the golden cases' helpers.
#![allow(dead_code)]
use std::path::PathBuf;
use std::sync::OnceLock;

use safetensors::{Dtype, SafeTensors};
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

/// `tests/data/NAME`; `XLSTM_TEST_DATA` points elsewhere (a test binary run away from its checkout).
pub fn case_dir(name: &str) -> PathBuf {
    match std::env::var("XLSTM_TEST_DATA") {
        Ok(d) if !d.is_empty() => PathBuf::from(d).join(name),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(name),
    }
}

pub struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    pub fn load(case: &str) -> Self {
        Expected { bytes: std::fs::read(case_dir(case).join("expected.safetensors")).expect("expected.safetensors") }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    pub fn f64(&self, name: &str) -> Vec<f64> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
        match t.dtype() {
            Dtype::F64 => t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::F32 => t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            d => panic!("{name}: unexpected dtype {d:?}"),
        }
    }
    pub fn ids(&self, name: &str) -> Vec<u32> {
        let st = self.st();
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::I64);
        t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
    }
}

/// Relative Frobenius error ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

pub fn rel_err32(a: &[f32], b: &[f32]) -> f64 {
    rel_err(a, &b.iter().map(|&x| x as f64).collect::<Vec<_>>())
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}
