//! CPU matrix products with weights kept in 16 bits and math in f32.
//!
//! Decode (a few rows) is memory-bound: [`gemv`] streams each weight row once, converts it in
//! registers (bf16 → f32 is a 16-bit shift, f16 → f32 one instruction) and dots it with every input
//! row. Prefill (many rows) is compute-bound: [`gemm_blocked`] converts a block of weight rows to f32
//! once and hands it to the `gemm` crate, so the conversion is amortised over all rows.
use gemm::Parallelism;
use rayon::prelude::*;

use super::SyncPtr;
use crate::tensor::DType;

/// Weights of a [`super::CpuBackend`] matrix.
pub enum MatData {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    BF16(Vec<u16>),
    /// IEEE f16 bit patterns.
    F16(Vec<u16>),
}

/// A `[rows, cols]` weight matrix in host memory.
pub struct CpuMat {
    pub rows: usize,
    pub cols: usize,
    pub data: MatData,
}

impl CpuMat {
    pub fn dtype(&self) -> DType {
        match self.data {
            MatData::F32(_) => DType::F32,
            MatData::BF16(_) => DType::BF16,
            MatData::F16(_) => DType::F16,
        }
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.cols * self.dtype().size()
    }

    /// Row `r` converted to f32 into `out`.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let (a, b) = (r * self.cols, (r + 1) * self.cols);
        match &self.data {
            MatData::F32(w) => out.copy_from_slice(&w[a..b]),
            MatData::BF16(w) => out.iter_mut().zip(&w[a..b]).for_each(|(o, &x)| *o = bf16_to_f32(x)),
            MatData::F16(w) => out.iter_mut().zip(&w[a..b]).for_each(|(o, &x)| *o = f16_to_f32(x)),
        }
    }
}

/// Inputs of at most this many rows take the streaming GEMV path.
pub const GEMV_MAX_ROWS: usize = 4;

use std::sync::atomic::{AtomicUsize, Ordering};
/// Weight rows per parallel GEMV task (the tile's first number).
static ROW_BLOCK: AtomicUsize = AtomicUsize::new(32);
/// Weight rows per converted GEMM block (the tile's second number; 0 = sized from the thread count).
static GEMM_BLOCK: AtomicUsize = AtomicUsize::new(0);

/// Sets the matrix-product tile at run time (`XLSTM_GEMM_TILE=ROWSxCOLS`): `gemv_rows` weight rows
/// per parallel GEMV task, `gemm_rows` weight rows per converted GEMM block (0 = automatic).
/// Results are the same for every tile; only speed changes.
pub fn set_tile(gemv_rows: usize, gemm_rows: usize) {
    ROW_BLOCK.store(gemv_rows.max(1), Ordering::Relaxed);
    GEMM_BLOCK.store(gemm_rows, Ordering::Relaxed);
}

/// The current tile: (GEMV rows per task, GEMM rows per block, 0 = automatic).
pub fn tile() -> (usize, usize) {
    (ROW_BLOCK.load(Ordering::Relaxed), GEMM_BLOCK.load(Ordering::Relaxed))
}

/// `y[m, n] = x[m, k] · wᵀ`.
pub fn matmul(x: &[f32], m: usize, w: &CpuMat, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    debug_assert!(x.len() >= m * k && y.len() >= m * n);
    if m == 0 {
        return;
    }
    if m <= GEMV_MAX_ROWS {
        gemv(x, m, w, y, simd_level());
    } else {
        gemm_blocked(x, m, w, y);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

pub fn simd_level() -> Simd {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return Simd::Avx512;
    }
    Simd::Scalar
}

/// Streaming product for a few input rows; parallel over blocks of weight rows.
pub fn gemv(x: &[f32], m: usize, w: &CpuMat, y: &mut [f32], simd: Simd) {
    let (n, k) = (w.rows, w.cols);
    assert!(m <= GEMV_MAX_ROWS);
    let yp = SyncPtr(y.as_mut_ptr());
    let rb = ROW_BLOCK.load(Ordering::Relaxed);
    (0..n.div_ceil(rb)).into_par_iter().for_each(|blk| {
        let mut acc = [0f32; GEMV_MAX_ROWS];
        for j in blk * rb..((blk + 1) * rb).min(n) {
            dot_row(w, j, x, m, k, &mut acc, simd);
            for (r, a) in acc.iter().enumerate().take(m) {
                // SAFETY: each (r, j) is written by exactly one task.
                unsafe { *yp.get().add(r * n + j) = *a };
            }
        }
    });
}

/// Fused LM head for a few input rows: logits = cap·tanh((x wᵀ)/cap) computed block by block, keeping
/// only each row's `k` largest (id, logit), best first; the full logits are never written out.
pub fn head_top_k(x: &[f32], m: usize, w: &CpuMat, cap: f32, k: usize) -> Vec<Vec<(u32, f32)>> {
    let (n, kdim) = (w.rows, w.cols);
    assert!(m <= GEMV_MAX_ROWS && k > 0);
    let simd = simd_level();
    let rb = ROW_BLOCK.load(Ordering::Relaxed).max(k);
    let partial: Vec<Vec<Vec<(u32, f32)>>> = (0..n.div_ceil(rb))
        .into_par_iter()
        .map(|blk| {
            let mut best = vec![Vec::with_capacity(k + 1); m];
            let mut acc = [0f32; GEMV_MAX_ROWS];
            for j in blk * rb..((blk + 1) * rb).min(n) {
                dot_row(w, j, x, m, kdim, &mut acc, simd);
                for r in 0..m {
                    let v = if cap > 0.0 { cap * (acc[r] / cap).tanh() } else { acc[r] };
                    push_top(&mut best[r], k, j as u32, v);
                }
            }
            best
        })
        .collect();
    (0..m)
        .map(|r| {
            let mut best = Vec::with_capacity(k + 1);
            for part in &partial {
                for &(id, v) in &part[r] {
                    push_top(&mut best, k, id, v);
                }
            }
            best
        })
        .collect()
}

/// Keeps `best` the k largest by value, sorted descending (ties: lower id first, as argmax does).
#[inline]
fn push_top(best: &mut Vec<(u32, f32)>, k: usize, id: u32, v: f32) {
    if best.len() == k && !(v > best[k - 1].1 || (v == best[k - 1].1 && id < best[k - 1].0)) {
        return;
    }
    let pos = best.partition_point(|&(bi, bv)| bv > v || (bv == v && bi < id));
    best.insert(pos, (id, v));
    best.truncate(k);
}

#[inline]
fn dot_row(w: &CpuMat, j: usize, x: &[f32], m: usize, k: usize, acc: &mut [f32; GEMV_MAX_ROWS], simd: Simd) {
    let off = j * k;
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe {
            use avx512::*;
            match &w.data {
                MatData::F32(d) => dot_rows_f32(d[off..off + k].as_ptr(), x, m, k, acc),
                MatData::BF16(d) => dot_rows_bf16(d[off..off + k].as_ptr(), x, m, k, acc),
                MatData::F16(d) => dot_rows_f16(d[off..off + k].as_ptr(), x, m, k, acc),
            }
        },
        Simd::Scalar => {
            for (r, a) in acc.iter_mut().enumerate().take(m) {
                let xr = &x[r * k..(r + 1) * k];
                *a = match &w.data {
                    MatData::F32(d) => scalar_dot(&d[off..off + k], xr, |v| v),
                    MatData::BF16(d) => scalar_dot(&d[off..off + k], xr, bf16_to_f32),
                    MatData::F16(d) => scalar_dot(&d[off..off + k], xr, f16_to_f32),
                };
            }
        }
    }
}

#[inline(always)]
fn bf16_to_f32(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

#[inline(always)]
fn f16_to_f32(v: u16) -> f32 {
    half::f16::from_bits(v).to_f32()
}

/// Eight partial sums, so the compiler can vectorise where no explicit SIMD path exists.
#[inline]
fn scalar_dot<T: Copy>(w: &[T], x: &[f32], cvt: impl Fn(T) -> f32) -> f32 {
    let mut s = [0f32; 8];
    let chunks = w.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            s[l] += cvt(w[c * 8 + l]) * x[c * 8 + l];
        }
    }
    let mut t: f32 = s.iter().sum();
    for i in chunks * 8..w.len() {
        t += cvt(w[i]) * x[i];
    }
    t
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Dot of one weight row (16-wide loads, two accumulators per input row) with `m` input rows.
    /// One function per weight dtype, so the widening load is inlined into the loop.
    macro_rules! dot_rows {
        ($name:ident, $t:ty, |$p:ident| $load:expr, |$v:ident| $scalar:expr) => {
            #[target_feature(enable = "avx512f")]
            pub unsafe fn $name(w: *const $t, x: &[f32], m: usize, k: usize, acc: &mut [f32; super::GEMV_MAX_ROWS]) {
                let mut a0 = [_mm512_setzero_ps(); super::GEMV_MAX_ROWS];
                let mut a1 = [_mm512_setzero_ps(); super::GEMV_MAX_ROWS];
                let xp = x.as_ptr();
                let mut i = 0;
                while i + 32 <= k {
                    let w0 = { let $p = w.add(i); $load };
                    let w1 = { let $p = w.add(i + 16); $load };
                    for r in 0..m {
                        a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp.add(r * k + i)), a0[r]);
                        a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(r * k + i + 16)), a1[r]);
                    }
                    i += 32;
                }
                while i + 16 <= k {
                    let w0 = { let $p = w.add(i); $load };
                    for r in 0..m {
                        a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp.add(r * k + i)), a0[r]);
                    }
                    i += 16;
                }
                for r in 0..m {
                    let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
                    for t in i..k {
                        let $v = *w.add(t);
                        s += $scalar * x[r * k + t];
                    }
                    acc[r] = s;
                }
            }
        };
    }

    dot_rows!(dot_rows_f32, f32, |p| _mm512_loadu_ps(p), |v| v);
    dot_rows!(dot_rows_bf16, u16, |p| _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)), 16)), |v| super::bf16_to_f32(v));
    dot_rows!(dot_rows_f16, u16, |p| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)), |v| super::f16_to_f32(v));
}

/// Many input rows: convert a block of weight rows to f32 and multiply with the `gemm` crate.
pub fn gemm_blocked(x: &[f32], m: usize, w: &CpuMat, y: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    if let MatData::F32(d) = &w.data {
        // SAFETY: pointers and strides describe x [m,k], wᵀ [k,n] and y [m,n], all in bounds.
        unsafe {
            gemm::gemm(
                m, n, k, y.as_mut_ptr(), 1, n as isize, false, x.as_ptr(), 1, k as isize, d.as_ptr(), k as isize, 1,
                0.0, 1.0, false, false, false, Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        return;
    }
    // Blocks big enough to amortise gemm's packing, small enough to stay in cache and give each thread work.
    let block = match GEMM_BLOCK.load(Ordering::Relaxed) {
        0 => (n.div_ceil(rayon::current_num_threads() * 4)).clamp(16, 256),
        b => b,
    };
    let yp = SyncPtr(y.as_mut_ptr());
    (0..n.div_ceil(block)).into_par_iter().for_each(|b| {
        let (j0, j1) = (b * block, ((b + 1) * block).min(n));
        let mut wf = vec![0f32; (j1 - j0) * k];
        for j in j0..j1 {
            w.row_f32(j, &mut wf[(j - j0) * k..(j - j0 + 1) * k]);
        }
        // SAFETY: this task writes only columns j0..j1 of y.
        unsafe {
            gemm::gemm(
                m, j1 - j0, k, yp.get().add(j0), 1, n as isize, false, x.as_ptr(), 1, k as isize, wf.as_ptr(),
                k as isize, 1, 0.0, 1.0, false, false, false, Parallelism::None,
            );
        }
    });
}
