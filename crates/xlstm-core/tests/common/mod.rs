//! Shared helpers for the golden-case tests: the cases live in `tests/data/` at the repo root
//! (copied from the reference implementations' outputs; see tests/data/README.md).
#![allow(dead_code)]
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

pub fn case_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(name)
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
    pub fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }
    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.st().tensor(name).unwrap().shape().to_vec()
    }
    /// Any float tensor as f64.
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
