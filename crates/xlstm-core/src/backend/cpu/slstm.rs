//! sLSTM cell on the CPU: the stabilised exponential-gating recurrence of Beck et al. 2024 ("xLSTM",
//! §2.2, eqs. 8–17, with the stabiliser of eqs. 15–17), in the form of the `xlstm` package's vanilla
//! backend (spec: /work/notes/xlstm_lm_spec.md §5.2). Layouts: see `Backend::slstm_step`.
//!
//! Heads are independent (the recurrent matrix is block-diagonal per head and the pointwise part is per
//! channel), so one head of one sequence is one task, for a single step as for a whole segment.
use rayon::prelude::*;

use super::conv::dot;
use super::mlstm::log_sigmoid;
use super::SyncPtr;

/// What one head reads: the four input-side gate rows, its recurrent block and the full bias.
pub struct HeadParams<'a> {
    /// Gate pre-activations i, f, z, o, each row-major `[rows, width]`.
    pub gates: [&'a [f32]; 4],
    /// The recurrent kernel `[NH, 4·DH, DH]`.
    pub r: &'a [f32],
    /// `[4·width]`, gate-major.
    pub bias: &'a [f32],
    pub width: usize,
    pub dh: usize,
}

/// The per-head state slices: c, n, m, h, each `[DH]`.
pub struct HeadState<'a> {
    pub c: &'a mut [f32],
    pub n: &'a mut [f32],
    pub m: &'a mut [f32],
    pub h: &'a mut [f32],
}

/// Advances head `head` by one step on gate row `row`. `fresh`: the sequence has never been stepped
/// (its n is all zero), so m' = raw_i (the reference's first-step rule). `raw` is scratch `[4·DH]`.
#[inline]
pub fn step_head(p: &HeadParams, head: usize, row: usize, fresh: bool, s: &mut HeadState, raw: &mut [f32]) {
    let (dh, width) = (p.dh, p.width);
    let r_head = &p.r[head * 4 * dh * dh..(head + 1) * 4 * dh * dh];
    for g in 0..4 {
        let gate_row = &p.gates[g][row * width + head * dh..row * width + (head + 1) * dh];
        let bias = &p.bias[g * width + head * dh..g * width + (head + 1) * dh];
        for o in 0..dh {
            let rr = &r_head[(g * dh + o) * dh..(g * dh + o + 1) * dh];
            let rec = dot(rr, s.h);
            raw[g * dh + o] = gate_row[o] + rec + bias[o];
        }
    }
    for d in 0..dh {
        let (ir, fr, zr, or) = (raw[d], raw[dh + d], raw[2 * dh + d], raw[3 * dh + d]);
        let lfm = s.m[d] + log_sigmoid(fr);
        let m_new = if fresh { ir } else { ir.max(lfm) };
        let ig = (ir - m_new).exp().min(1.0);
        let fg = (lfm - m_new).exp().min(1.0);
        let og = 1.0 / (1.0 + (-or).exp());
        s.c[d] = fg * s.c[d] + ig * zr.tanh();
        s.n[d] = fg * s.n[d] + ig;
        s.m[d] = m_new;
        s.h[d] = og * s.c[d] / s.n[d];
    }
}

/// A sequence is fresh when its whole n is zero (true only before its first step: afterwards n ≥ min(n, 1) > 0).
fn fresh(n: &[f32]) -> bool {
    n.iter().all(|&v| v == 0.0)
}

/// One step for `batch` sequences; state `[B, width]` each, `y [B, width]`.
#[allow(clippy::too_many_arguments)]
pub fn step(p: &HeadParams, batch: usize, heads: usize, c: &mut [f32], n: &mut [f32], m: &mut [f32], h: &mut [f32], y: &mut [f32]) {
    let (dh, width) = (p.dh, p.width);
    let fresh_rows: Vec<bool> = (0..batch).map(|b| fresh(&n[b * width..(b + 1) * width])).collect();
    c[..batch * width]
        .par_chunks_mut(dh)
        .zip(n[..batch * width].par_chunks_mut(dh))
        .zip(m[..batch * width].par_chunks_mut(dh))
        .zip(h[..batch * width].par_chunks_mut(dh))
        .zip(y[..batch * width].par_chunks_mut(dh))
        .enumerate()
        .for_each(|(u, ((((c, n), m), h), y))| {
            let (b, head) = (u / heads, u % heads);
            let mut raw = vec![0f32; 4 * dh];
            let mut s = HeadState { c, n, m, h };
            step_head(p, head, b, fresh_rows[b], &mut s, &mut raw);
            y.copy_from_slice(s.h);
        });
}

/// `seq` steps of one sequence; state `[width]` each, `y [seq, width]`.
#[allow(clippy::too_many_arguments)]
pub fn prefill(p: &HeadParams, seq: usize, c: &mut [f32], n: &mut [f32], m: &mut [f32], h: &mut [f32], y: &mut [f32]) {
    let (dh, width) = (p.dh, p.width);
    let is_fresh = fresh(&n[..width]);
    let yp = SyncPtr(y.as_mut_ptr());
    c[..width]
        .par_chunks_mut(dh)
        .zip(n[..width].par_chunks_mut(dh))
        .zip(m[..width].par_chunks_mut(dh))
        .zip(h[..width].par_chunks_mut(dh))
        .enumerate()
        .for_each(|(head, (((c, n), m), h))| {
            let mut raw = vec![0f32; 4 * dh];
            let mut s = HeadState { c, n, m, h };
            for t in 0..seq {
                step_head(p, head, t, is_fresh && t == 0, &mut s, &mut raw);
                // SAFETY: head `head` writes only columns head·DH..(head+1)·DH of each row of y,
                // which holds seq·width values (checked by the caller).
                let out = unsafe { std::slice::from_raw_parts_mut(yp.get().add(t * width + head * dh), dh) };
                out.copy_from_slice(s.h);
            }
        });
}
