//! Shared by the CUDA tests: one backend per test binary (or a skip when this machine has no usable
//! GPU), a lock that runs the GPU tests of a binary one at a time (they share the backend's stream and
//! its decode-graph state), fresh random inputs, error measures.
#![allow(dead_code)]
use std::sync::{Mutex, MutexGuard, OnceLock};

use xlstm_cuda::CudaBackend;

static BACKEND: OnceLock<Option<CudaBackend>> = OnceLock::new();
static LOCK: Mutex<()> = Mutex::new(());

/// The shared backend and the GPU lock, or None (with a printed SKIP line) without a usable GPU.
pub fn gpu(test: &str) -> Option<(CudaBackend, MutexGuard<'static, ()>)> {
    let b = BACKEND.get_or_init(|| match CudaBackend::new(0) {
        Ok(b) => {
            eprintln!("cuda tests on {}", b.device_name());
            Some(b)
        }
        Err(e) => {
            eprintln!("SKIP (no usable CUDA device): {e}");
            None
        }
    });
    match b {
        Some(b) => Some((b.clone(), LOCK.lock().unwrap_or_else(|p| p.into_inner()))),
        None => {
            eprintln!("SKIP {test}: no usable CUDA device on this machine");
            None
        }
    }
}

/// xorshift64* with a seed from the clock (printed by `Rng::fresh`), so every run draws new inputs.
pub struct Rng(u64);

impl Rng {
    pub fn fresh(test: &str) -> Self {
        let seed = std::env::var("XLSTM_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
        });
        eprintln!("{test}: seed {seed} (XLSTM_TEST_SEED={seed} repeats it)");
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| ((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// ‖a − b‖ / ‖b‖ (Frobenius); NaN anywhere fails.
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    assert!(a.iter().all(|v| v.is_finite()), "non-finite value in the CUDA result");
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}


/// A golden case folder (tests/data/NAME, or $XLSTM_TEST_DATA/NAME for binaries run elsewhere).
#[allow(unused_imports)]
pub use xlstm_core::testing::case_dir;
