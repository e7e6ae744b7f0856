//! Every op of the wgpu backend against the CPU backend (the reference) on fresh random inputs.
//!
//! Bounds: both backends compute in f32 from the same (already rounded) weights, so they differ
//! only by summation order and by the GPU's exp/tanh/rsqrt approximations: a few 1e-7 relative per
//! operation, growing with the length of a reduction. Plain pointwise ops and copies are held to
//! 1e-6 relative (Frobenius), reductions (matmul, norms, headwise) to 1e-5, and the recurrent cells,
//! whose exponentials amplify input differences over steps, to 1e-4. Sizes stay small (odd, not
//! multiples of any tile) so the suite is quick on lavapipe, the CPU Vulkan driver CI runs it on.
mod common;

use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xlstm_core::backend::{Activation, Backend, ConvDims, HeadwiseDims, MlstmDims, MlstmKernel, MlstmState, SlstmGates, SlstmState};
use xlstm_core::tensor::{DType, HostTensor};
use xlstm_core::CpuBackend;
use xlstm_wgpu::shaders::Knobs;
use xlstm_wgpu::WgpuBackend;

const POINT: f64 = 1e-6;
const REDUCE: f64 = 1e-5;
const CELL: f64 = 1e-4;

fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-1.0f32..1.0) * scale).collect()
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let e = rel_err32(got, want);
    assert!(e < tol, "{what}: rel err {e:e} ≥ {tol:e}");
}

macro_rules! gpu {
    () => {
        match backend() {
            Some(b) => b,
            None => return,
        }
    };
}

fn matmul_on<B: Backend>(b: &B, x: &[f32], rows: usize, w: &HostTensor, dt: DType, acc: Option<&[f32]>) -> Vec<f32> {
    let m = b.matrix(w.clone(), dt).unwrap();
    let n = w.shape[0];
    let xb = b.upload(x).unwrap();
    match acc {
        None => {
            let mut out = b.zeros(rows * n).unwrap();
            b.matmul(&xb, rows, &m, &mut out).unwrap();
            b.download(&out, rows * n).unwrap()
        }
        Some(a) => {
            let mut out = b.upload(a).unwrap();
            let mut tmp = b.zeros(rows * n).unwrap();
            b.matmul_add(&xb, rows, &m, n, &mut tmp, &mut out).unwrap();
            b.download(&out, rows * n).unwrap()
        }
    }
}

#[test]
fn matmul_all_dtypes_and_row_counts() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    // The GEMM's tile is 64 rows × 128 weight rows × 32 columns: shapes below, across and past it.
    for (n, k) in [(67, 45), (130, 256), (5, 8), (300, 200)] {
        let w = HostTensor::f32(vec![n, k], rnd(n * k, n as u64 * 31 + k as u64, 0.5));
        for dt in [DType::F32, DType::BF16, DType::F16] {
            for rows in [1, 2, 4, 5, 37, 70, 130] {
                let x = rnd(rows * k, rows as u64 + 7, 1.0);
                close(&format!("matmul {n}x{k} {dt:?} rows {rows}"), &matmul_on(g, &x, rows, &w, dt, None), &matmul_on(&cpu, &x, rows, &w, dt, None), REDUCE);
                let a = rnd(rows * n, 99, 1.0);
                close(&format!("matmul_add {n}x{k} {dt:?} rows {rows}"), &matmul_on(g, &x, rows, &w, dt, Some(&a)), &matmul_on(&cpu, &x, rows, &w, dt, Some(&a)), REDUCE);
            }
        }
    }
}

/// Every GEMM tile the knob takes, on shapes across and past its edges, against the CPU.
#[test]
fn gemm_tiles() {
    let Some(g) = backend() else { return };
    let cpu = CpuBackend::new();
    let cpu_adapter = g.adapter_info().device_type == wgpu::DeviceType::Cpu;
    for tile in [(32, 32), (32, 64), (32, 128), (32, 256), (64, 32), (64, 64), (64, 128)] {
        assert!(Knobs::gemm_ok(tile.0, tile.1));
        let knobs = Knobs { gemm: tile, ..Knobs::for_adapter(cpu_adapter).with_env() };
        let g = xlstm_wgpu::WgpuBackend::with_options(xlstm_wgpu::Api::Any, true, Some(knobs)).unwrap();
        // A tile over the adapter's workgroup memory is a clear error (lavapipe: 32 KiB, so 32x256).
        let probe = g.matrix(HostTensor::f32(vec![8, 8], vec![0.5; 64]), DType::BF16).unwrap();
        let mut out = g.zeros(8 * 8).unwrap();
        if let Err(e) = g.matmul(&g.upload(&[1.0; 64]).unwrap(), 8, &probe, &mut out) {
            assert!(e.to_string().contains("workgroup memory"), "{e}");
            continue;
        }
        for (n, k, rows) in [(300usize, 200usize, 70usize), (67, 45, 5), (130, 64, 130)] {
            let w = HostTensor::f32(vec![n, k], rnd(n * k, n as u64 + k as u64, 0.5));
            let x = rnd(rows * k, 5, 1.0);
            for dt in [DType::BF16, DType::F32] {
                close(&format!("gemm tile {tile:?} {n}x{k} rows {rows} {dt:?}"), &matmul_on(&g, &x, rows, &w, dt, None), &matmul_on(&cpu, &x, rows, &w, dt, None), REDUCE);
            }
        }
    }
    assert!(!Knobs::gemm_ok(64, 256) && !Knobs::gemm_ok(128, 64) && !Knobs::gemm_ok(48, 64));
}

#[test]
fn matmul_and_embed_over_several_parts() {
    let Some(mut g) = own_backend() else { return };
    // 3 rows of 40 bf16 (kp 40 → 80 bytes a row) per part: 10 rows make 4 parts.
    g.set_part_limit(240);
    let cpu = CpuBackend::new();
    let (n, k) = (10, 37);
    let w = HostTensor::f32(vec![n, k], rnd(n * k, 5, 1.0));
    for dt in [DType::BF16, DType::F32] {
        for rows in [1, 6] {
            let x = rnd(rows * k, 3, 1.0);
            close(&format!("parts matmul {dt:?} rows {rows}"), &matmul_on(&g, &x, rows, &w, dt, None), &matmul_on(&cpu, &x, rows, &w, dt, None), REDUCE);
        }
        let ids = [9u32, 0, 4, 4, 7];
        close(&format!("parts embed {dt:?}"), &embed_on(&g, &w, dt, &ids), &embed_on(&cpu, &w, dt, &ids), 0.0 + f64::MIN_POSITIVE);
    }
}

/// Weight pools asked for beyond the adapter's storage-binding limit are made at that limit,
/// rounded down to 32 bytes (NVIDIA's Vulkan limit, 2^31 − 4, is not a multiple of 32), with or
/// without the model's announcement of its matrix bytes.
#[test]
fn pools_above_the_binding_limit_are_capped() {
    let Some(shared) = backend() else { return };
    let cpu = CpuBackend::new();
    let cpu_adapter = shared.adapter_info().device_type == wgpu::DeviceType::Cpu;
    let knobs = Knobs { pool_bytes: u64::MAX / 4, ..Knobs::for_adapter(cpu_adapter).with_env() };
    let (n, k) = (9, 40);
    let w = HostTensor::f32(vec![n, k], rnd(n * k, 8, 1.0));
    let x = rnd(k, 9, 1.0);
    for announce in [false, true] {
        let g = WgpuBackend::with_options(xlstm_wgpu::Api::Any, true, Some(knobs.clone())).unwrap();
        if announce {
            g.expect_matrix_bytes(n * k * 2);
        }
        close(&format!("matmul in a capped pool (announced {announce})"), &matmul_on(&g, &x, 1, &w, DType::BF16, None), &matmul_on(&cpu, &x, 1, &w, DType::BF16, None), REDUCE);
    }
}

fn embed_on<B: Backend>(b: &B, w: &HostTensor, dt: DType, ids: &[u32]) -> Vec<f32> {
    let m = b.matrix(w.clone(), dt).unwrap();
    let d = w.shape[1];
    let mut out = b.zeros(ids.len() * d).unwrap();
    b.embed(&m, ids, &mut out).unwrap();
    b.download(&out, ids.len() * d).unwrap()
}

#[test]
fn embed_all_dtypes_exact() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    let (v, d) = (23, 19);
    let w = HostTensor::f32(vec![v, d], rnd(v * d, 1, 2.0));
    // Up to 28 ids travel in the dispatch's parameter words, more in a buffer: both paths.
    let few = [0u32, 22, 5, 5, 13, 1];
    let many: Vec<u32> = (0..29u32).map(|i| (i * 7) % v as u32).collect();
    for ids in [&few[..], &many[..28], &many[..]] {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            assert_eq!(embed_on(g, &w, dt, ids), embed_on(&cpu, &w, dt, ids), "embed {dt:?} of {} ids must be exact", ids.len());
        }
    }
    let m = g.matrix(w, DType::BF16).unwrap();
    let mut out = g.zeros(d).unwrap();
    assert!(g.embed(&m, &[23], &mut out).is_err(), "an out-of-range id is an error");
}

fn norms_on<B: Backend>(b: &B, x: &[f32], rows: usize, width: usize, group: usize, w: &[f32], bias: &[f32]) -> Vec<Vec<f32>> {
    let xb = b.upload(x).unwrap();
    let wb = b.upload(w).unwrap();
    let bb = b.upload(bias).unwrap();
    let mut out = b.zeros(rows * width).unwrap();
    let mut res = Vec::new();
    b.rms_norm(&xb, rows, width, &wb, 1e-6, &mut out).unwrap();
    res.push(b.download(&out, rows * width).unwrap());
    b.group_norm(&xb, rows, width, group, &wb, None, 1e-5, &mut out).unwrap();
    res.push(b.download(&out, rows * width).unwrap());
    b.group_norm(&xb, rows, width, group, &wb, Some(&bb), 1e-5, &mut out).unwrap();
    res.push(b.download(&out, rows * width).unwrap());
    b.group_norm(&xb, rows, width, width, &wb, Some(&bb), 1e-5, &mut out).unwrap();
    res.push(b.download(&out, rows * width).unwrap());
    res
}

#[test]
fn norms() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    for (rows, width, group) in [(3, 96, 32), (1, 700, 350), (5, 12, 3)] {
        let x = rnd(rows * width, 11, 3.0).iter().map(|v| v + 0.5).collect::<Vec<_>>();
        let w = rnd(width, 12, 1.0);
        let bias = rnd(width, 13, 1.0);
        for (i, (a, b)) in norms_on(g, &x, rows, width, group, &w, &bias).iter().zip(norms_on(&cpu, &x, rows, width, group, &w, &bias)).enumerate() {
            close(&format!("norm #{i} rows {rows} width {width} group {group}"), a, &b, REDUCE);
        }
    }
}

fn pointwise_on<B: Backend>(b: &B, a: &[f32], c: &[f32], rows: usize, width: usize) -> Vec<Vec<f32>> {
    let len = rows * width;
    let mut res = Vec::new();
    let ab = b.upload(a).unwrap();
    let cb = b.upload(c).unwrap();
    let bias = b.upload(&c[..width]).unwrap();
    for (with_bias, cap) in [(true, 15.0), (false, 15.0), (true, 0.0), (false, 0.0)] {
        let mut x = b.upload(a).unwrap();
        b.bias_soft_cap(&mut x, rows, width, if with_bias { Some(&bias) } else { None }, cap).unwrap();
        res.push(b.download(&x, len).unwrap());
    }
    let mut x = b.upload(a).unwrap();
    b.add(&mut x, &cb, len).unwrap();
    res.push(b.download(&x, len).unwrap());
    let mut out = b.zeros(len).unwrap();
    b.swiglu(&ab, &cb, len, &mut out).unwrap();
    res.push(b.download(&out, len).unwrap());
    for act in [Activation::Gelu, Activation::Silu, Activation::Relu, Activation::ReluSquared, Activation::Sigmoid, Activation::Selu] {
        b.gated_act(act, &ab, &cb, len, &mut out).unwrap();
        res.push(b.download(&out, len).unwrap());
    }
    let mut x = b.upload(a).unwrap();
    b.sigmoid_gate(&cb, &mut x, len).unwrap();
    res.push(b.download(&x, len).unwrap());
    let mut x = b.upload(a).unwrap();
    b.scaled_add(&mut x, &cb, &bias, rows, width).unwrap();
    res.push(b.download(&x, len).unwrap());
    // copy and copy_cols
    let mut d = b.upload(c).unwrap();
    b.copy(&ab, 3, &mut d, 5, len - 9).unwrap();
    res.push(b.download(&d, len).unwrap());
    let mut d = b.upload(c).unwrap();
    b.copy_cols(&ab, width, 2, &mut d, width, 1, rows, width - 3).unwrap();
    res.push(b.download(&d, len).unwrap());
    res
}

#[test]
fn pointwise_and_copies() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    for (rows, width) in [(3, 41), (70, 1000)] {
        let a = rnd(rows * width, 21, 20.0);
        let c = rnd(rows * width, 22, 6.0);
        for (i, (x, y)) in pointwise_on(g, &a, &c, rows, width).iter().zip(pointwise_on(&cpu, &a, &c, rows, width)).enumerate() {
            close(&format!("pointwise #{i} {rows}x{width}"), x, &y, POINT);
        }
    }
}

fn headwise_on<B: Backend>(b: &B, x: &[f32], rows: usize, w: &[f32], d: HeadwiseDims, bias: Option<&[f32]>) -> Vec<f32> {
    let xb = b.upload(x).unwrap();
    let wb = b.upload(w).unwrap();
    let bb = bias.map(|v| b.upload(v).unwrap());
    let mut out = b.zeros(rows * d.blocks * d.dout).unwrap();
    b.headwise(&xb, rows, &wb, d, bb.as_ref(), &mut out).unwrap();
    b.download(&out, rows * d.blocks * d.dout).unwrap()
}

#[test]
fn headwise() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    for (rows, d) in [(1, HeadwiseDims { blocks: 8, din: 4, dout: 4 }), (9, HeadwiseDims { blocks: 3, din: 40, dout: 33 })] {
        let x = rnd(rows * d.blocks * d.din, 31, 1.0);
        let w = rnd(d.blocks * d.dout * d.din, 32, 0.3);
        let bias = rnd(d.blocks * d.dout, 33, 1.0);
        for bs in [None, Some(bias.as_slice())] {
            close(&format!("headwise {d:?} rows {rows} bias {}", bs.is_some()), &headwise_on(g, &x, rows, &w, d, bs), &headwise_on(&cpu, &x, rows, &w, d, bs), REDUCE);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn conv_on<B: Backend>(b: &B, d: ConvDims, rows: usize, step: bool, x: &[f32], w: &[f32], bias: &[f32], state: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let xb = b.upload(x).unwrap();
    let wb = b.upload(w).unwrap();
    let bb = b.upload(bias).unwrap();
    let mut st = b.upload(state).unwrap();
    let mut out = b.zeros(rows * d.channels).unwrap();
    if step {
        b.conv1d_step(d, rows, &xb, &wb, &bb, &mut st, true, &mut out).unwrap();
    } else {
        b.conv1d_prefill(d, rows, &xb, &wb, &bb, &mut st, true, &mut out).unwrap();
        // a second segment continues from the state
        b.conv1d_prefill(d, rows, &out, &wb, &bb, &mut st, false, &mut out_copy(b, &out, rows * d.channels)).unwrap();
    }
    (b.download(&out, rows * d.channels).unwrap(), b.download(&st, state.len()).unwrap())
}

fn out_copy<B: Backend>(b: &B, _src: &B::Buf, len: usize) -> B::Buf {
    b.zeros(len).unwrap()
}

#[test]
fn conv1d() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    for kernel in [4, 1, 2] {
        let d = ConvDims { channels: 37, kernel };
        for (rows, step) in [(1, false), (2, false), (11, false), (3, true)] {
            let seqs = if step { rows } else { 1 };
            let x = rnd(rows * d.channels, 41, 1.0);
            let w = rnd(kernel * d.channels, 42, 1.0);
            let bias = rnd(d.channels, 43, 1.0);
            let state = rnd(seqs * d.taps() * d.channels, 44, 1.0);
            let (a, sa) = conv_on(g, d, rows, step, &x, &w, &bias, &state);
            let (b, sb) = conv_on(&cpu, d, rows, step, &x, &w, &bias, &state);
            close(&format!("conv k{kernel} rows {rows} step {step}"), &a, &b, POINT);
            close(&format!("conv state k{kernel} rows {rows} step {step}"), &sa, &sb, POINT);
        }
    }
}

#[derive(Clone)]
struct MlstmOut {
    h: Vec<f32>,
    /// With an out_proj: acc + out_proj · hn (acc random).
    y: Vec<f32>,
    c: Vec<f32>,
    n: Vec<f32>,
    m: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn mlstm_on<B: Backend>(b: &B, d: MlstmDims, rows: usize, batch: usize, kernel: Option<MlstmKernel>, gated: bool, seed: u64) -> MlstmOut {
    mlstm_out_on(b, d, rows, batch, kernel, gated, seed, None)
}

/// As [`mlstm_on`]; with `out_proj` (gated only), then `acc += out_proj · hn` (a 37-row matrix of
/// that dtype) as the xlstm-large block runs it, before anything else reads hn.
#[allow(clippy::too_many_arguments)]
fn mlstm_out_on<B: Backend>(b: &B, d: MlstmDims, rows: usize, batch: usize, kernel: Option<MlstmKernel>, gated: bool, seed: u64, out_proj: Option<DType>) -> MlstmOut {
    let nh = d.heads;
    let q = b.upload(&rnd(rows * nh * d.dk, seed, 1.0)).unwrap();
    let k = b.upload(&rnd(rows * nh * d.dk, seed + 1, 1.0)).unwrap();
    let v = b.upload(&rnd(rows * nh * d.dv, seed + 2, 1.0)).unwrap();
    let o = b.upload(&rnd(rows * nh * d.dv, seed + 3, 2.0)).unwrap();
    let mut i = b.upload(&rnd(rows * nh, seed + 4, 4.0)).unwrap();
    let mut f = b.upload(&rnd(rows * nh, seed + 5, 4.0).iter().map(|x| x + 3.0).collect::<Vec<_>>()).unwrap();
    let ib = b.upload(&rnd(nh, seed + 6, 1.0)).unwrap();
    let fb = b.upload(&rnd(nh, seed + 7, 1.0)).unwrap();
    let norm = b.upload(&rnd(nh * d.dv, seed + 8, 1.0)).unwrap();
    // a non-zero starting state
    let mut s = MlstmState {
        c: b.upload(&rnd(batch * nh * d.dk * d.dv, seed + 9, 0.5)).unwrap(),
        n: b.upload(&rnd(batch * nh * d.dk, seed + 10, 0.5)).unwrap(),
        m: b.upload(&rnd(batch * nh, seed + 11, 1.0)).unwrap(),
        dims: d,
        c_dtype: DType::F32,
        pending: None,
    };
    let mut h = b.zeros(rows * nh * d.dv).unwrap();
    let mut hn = b.zeros(rows * nh * d.dv).unwrap();
    let mut y = Vec::new();
    if gated {
        b.mlstm_gated_cell(kernel, d, rows, &q, &k, &v, &o, &mut i, &mut f, &ib, &fb, 15.0, &mut s, 1e-6, &norm, 1e-6, &mut h, &mut hn).unwrap();
        if let Some(dt) = out_proj {
            let dm = 37;
            let w = b.matrix(HostTensor::f32(vec![dm, nh * d.dv], rnd(dm * nh * d.dv, seed + 12, 0.3)), dt).unwrap();
            let mut acc = b.upload(&rnd(rows * dm, seed + 13, 1.0)).unwrap();
            let mut tmp = b.zeros(rows * dm).unwrap();
            b.matmul_add(&hn, rows, &w, dm, &mut tmp, &mut acc).unwrap();
            y = b.download(&acc, rows * dm).unwrap();
        }
        h = hn;
    } else {
        match kernel {
            Some(kn) => b.mlstm_prefill(kn, d, rows, &q, &k, &v, &i, &f, &mut s, 1e-6, &mut h).unwrap(),
            None => b.mlstm_step(d, rows, &q, &k, &v, &i, &f, &mut s, 1e-6, &mut h).unwrap(),
        }
    }
    MlstmOut {
        y,
        h: b.download(&h, rows * nh * d.dv).unwrap(),
        c: b.download(&s.c, batch * nh * d.dk * d.dv).unwrap(),
        n: b.download(&s.n, batch * nh * d.dk).unwrap(),
        m: b.download(&s.m, batch * nh).unwrap(),
    }
}

/// The decode cell followed by out_proj, as the xlstm-large block runs them (hn read by the
/// batch-1 GEMV right after the cell wrote it), for head widths of several GEMV workgroup shapes.
#[test]
fn gated_cell_then_out_proj() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    let dims = [MlstmDims { heads: 3, dk: 24, dv: 40 }, MlstmDims { heads: 2, dk: 16, dv: 64 }, MlstmDims { heads: 3, dk: 8, dv: 128 }, MlstmDims { heads: 2, dk: 8, dv: 512 }];
    for d in dims {
        for dt in [DType::F32, DType::BF16] {
            for rows in [1, 2] {
                let a = mlstm_out_on(g, d, rows, rows, None, true, 60, Some(dt));
                let b = mlstm_out_on(&cpu, d, rows, rows, None, true, 60, Some(dt));
                let what = format!("gated cell + out_proj {d:?} {dt:?} rows {rows}");
                close(&format!("{what}: y"), &a.y, &b.y, CELL);
                close(&format!("{what}: hn"), &a.h, &b.h, CELL);
                close(&format!("{what}: C"), &a.c, &b.c, CELL);
                close(&format!("{what}: n"), &a.n, &b.n, CELL);
                close(&format!("{what}: m"), &a.m, &b.m, CELL);
            }
        }
    }
}

/// The gated decode step in one dispatch (each unit's last workgroup commits n, m and writes the
/// head norm) and in two, at small and at xLSTM-7B's head dims (DK 256, DV 512: several load
/// batches of C per invocation, many workgroups per unit), batches 1 and 3, against the CPU; and
/// twice in a row, so the per-unit counts must have been put back to zero.
#[test]
fn gated_decode_step_in_one_and_two_dispatches() {
    let Some(g) = backend() else { return };
    let cpu = CpuBackend::new();
    let cpu_adapter = g.adapter_info().device_type == wgpu::DeviceType::Cpu;
    for one in [true, false] {
        let knobs = Knobs { cell_norm: one, ..Knobs::for_adapter(cpu_adapter).with_env() };
        let g = xlstm_wgpu::WgpuBackend::with_options(xlstm_wgpu::Api::Any, true, Some(knobs)).unwrap();
        for d in [MlstmDims { heads: 3, dk: 24, dv: 40 }, MlstmDims { heads: 2, dk: 256, dv: 512 }] {
            for batch in [1, 3] {
                let d0 = g.counters().1;
                let a = mlstm_on(&g, d, batch, batch, None, true, 80);
                assert_eq!(g.counters().1 - d0, if one { 1 } else { 2 }, "dispatches of the decode step (one: {one})");
                let b = mlstm_on(&cpu, d, batch, batch, None, true, 80);
                for rep in 0..2 {
                    let a = if rep == 0 { a.clone() } else { mlstm_on(&g, d, batch, batch, None, true, 80) };
                    let what = format!("decode step {d:?} batch {batch} one dispatch {one} #{rep}");
                    close(&format!("{what}: hn"), &a.h, &b.h, CELL);
                    close(&format!("{what}: C"), &a.c, &b.c, CELL);
                    close(&format!("{what}: n"), &a.n, &b.n, CELL);
                    close(&format!("{what}: m"), &a.m, &b.m, CELL);
                }
            }
        }
    }
}

/// The chunkwise prefill at xLSTM-7B's head dims (DK 256, DV 512: several DK tiles and DV column
/// blocks of the wgpu kernels), against the CPU's.
#[test]
fn mlstm_chunkwise_at_7b_head_dims() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    let d = MlstmDims { heads: 1, dk: 256, dv: 512 };
    let kernel = Some(MlstmKernel::Chunkwise { chunk: 64 });
    let a = mlstm_on(g, d, 80, 1, kernel, true, 70);
    let b = mlstm_on(&cpu, d, 80, 1, kernel, true, 70);
    close("mlstm chunkwise at 7B head dims: hn", &a.h, &b.h, CELL);
}

#[test]
fn mlstm_step_prefill_and_gated_cell() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    let d = MlstmDims { heads: 3, dk: 24, dv: 40 };
    let cases: Vec<(usize, usize, Option<MlstmKernel>, bool)> = vec![
        (2, 2, None, false),
        (1, 1, None, true),
        (3, 3, None, true),
        (19, 1, Some(MlstmKernel::Sequence), false),
        (19, 1, Some(MlstmKernel::Chunkwise { chunk: 8 }), false),
        (19, 1, Some(MlstmKernel::Chunkwise { chunk: 4 }), true),
        // chunks past the wgpu kernels' 32 tokens (split there), a partial last chunk
        (70, 1, Some(MlstmKernel::Chunkwise { chunk: 64 }), false),
        (33, 1, Some(MlstmKernel::Chunkwise { chunk: 16 }), true),
    ];
    for (rows, batch, kernel, gated) in cases {
        let a = mlstm_on(g, d, rows, batch, kernel, gated, 50);
        let b = mlstm_on(&cpu, d, rows, batch, kernel, gated, 50);
        let what = format!("mlstm rows {rows} batch {batch} {kernel:?} gated {gated}");
        close(&format!("{what}: h"), &a.h, &b.h, CELL);
        // The chunkwise form keeps (C, n) scaled by e^{-m} with its own m: compare outputs only there.
        if !matches!(kernel, Some(MlstmKernel::Chunkwise { .. })) {
            close(&format!("{what}: C"), &a.c, &b.c, CELL);
            close(&format!("{what}: n"), &a.n, &b.n, CELL);
            close(&format!("{what}: m"), &a.m, &b.m, CELL);
        }
    }
}

fn slstm_on<B: Backend>(b: &B, nh: usize, dh: usize, rows: usize, batch: usize, fresh: bool, seed: u64) -> Vec<Vec<f32>> {
    let w = nh * dh;
    let up = |n: usize, s: u64, sc: f32| b.upload(&rnd(n, s, sc)).unwrap();
    let (gi, gf, gz, go) = (up(rows * w, seed, 2.0), up(rows * w, seed + 1, 2.0), up(rows * w, seed + 2, 2.0), up(rows * w, seed + 3, 2.0));
    let r = up(nh * 4 * dh * dh, seed + 4, 0.3);
    let bias = up(4 * w, seed + 5, 1.0);
    let mut s = if fresh {
        SlstmState { c: b.zeros(batch * w).unwrap(), n: b.zeros(batch * w).unwrap(), m: b.zeros(batch * w).unwrap(), h: b.zeros(batch * w).unwrap(), width: w, heads: nh }
    } else {
        let pos = |n: usize, s: u64| b.upload(&rnd(n, s, 1.0).iter().map(|v| v.abs() + 0.5).collect::<Vec<_>>()).unwrap();
        SlstmState { c: up(batch * w, seed + 6, 1.0), n: pos(batch * w, seed + 7), m: up(batch * w, seed + 8, 1.0), h: up(batch * w, seed + 9, 1.0), width: w, heads: nh }
    };
    let mut y = b.zeros(rows * w).unwrap();
    let g = SlstmGates { i: &gi, f: &gf, z: &gz, o: &go };
    if rows == batch {
        b.slstm_step(batch, g, &r, &bias, &mut s, &mut y).unwrap();
    } else {
        b.slstm_prefill(rows, g, &r, &bias, &mut s, &mut y).unwrap();
    }
    vec![b.download(&y, rows * w).unwrap(), b.download(&s.c, batch * w).unwrap(), b.download(&s.n, batch * w).unwrap(), b.download(&s.m, batch * w).unwrap(), b.download(&s.h, batch * w).unwrap()]
}

#[test]
fn slstm_step_and_prefill() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    for (nh, dh) in [(4, 8), (2, 70)] {
        for (rows, batch) in [(3, 3), (13, 1), (1, 1)] {
            for fresh in [true, false] {
                let a = slstm_on(g, nh, dh, rows, batch, fresh, 60);
                let b = slstm_on(&cpu, nh, dh, rows, batch, fresh, 60);
                for (i, name) in ["y", "c", "n", "m", "h"].iter().enumerate() {
                    close(&format!("slstm nh {nh} dh {dh} rows {rows} batch {batch} fresh {fresh}: {name}"), &a[i], &b[i], CELL);
                }
            }
        }
    }
}

#[test]
fn head_top_k_matches_cpu() {
    let g = gpu!();
    let cpu = CpuBackend::new();
    let (v, d, rows) = (301, 48, 2);
    let w = HostTensor::f32(vec![v, d], rnd(v * d, 70, 1.0));
    let x = rnd(rows * d, 71, 2.0);
    let run = |b: &dyn Fn() -> Vec<Vec<(u32, f32)>>| b();
    let on_g = run(&|| {
        let m = g.matrix(w.clone(), DType::BF16).unwrap();
        let xb = g.upload(&x).unwrap();
        let mut s = g.zeros(rows * v).unwrap();
        g.head_top_k(&xb, rows, &m, v, 30.0, 5, &mut s).unwrap()
    });
    let m = cpu.matrix(w.clone(), DType::BF16).unwrap();
    let mut s = vec![0.0; rows * v];
    let on_c = cpu.head_top_k(&x, rows, &m, v, 30.0, 5, &mut s).unwrap();
    for (a, b) in on_g.iter().zip(&on_c) {
        assert_eq!(a.iter().map(|t| t.0).collect::<Vec<_>>(), b.iter().map(|t| t.0).collect::<Vec<_>>(), "top-k ids");
        for (x, y) in a.iter().zip(b) {
            assert!((x.1 - y.1).abs() < 1e-4 * y.1.abs().max(1.0), "top-k values {x:?} vs {y:?}");
        }
    }
}

/// The device selection (`topk.wgsl`) against `top_k_of` over the same device's logits (soft-capped
/// by `bias_soft_cap`): the same ids and values over several blocks, with exact ties (repeated
/// weight rows: lower id first), for k from 1 to the device limit and past it (the host path), with
/// and without a cap, for one and several rows.
#[test]
fn head_top_k_device_selection_matches_top_k_of() {
    let g = gpu!();
    top_k_check(g);
    // the workgroup-memory reduction (adapters without subgroup operations)
    top_k_check(&WgpuBackend::with_subgroups(xlstm_wgpu::Api::Any, false).unwrap());
}

fn top_k_check(g: &WgpuBackend) {
    let (v, d) = (9001, 24);
    let mut wv = rnd(v * d, 90, 1.0);
    // rows 5000..5100 repeat rows 0..100, so equal logits appear far apart (in other blocks)
    for r in 0..100 {
        let (src, dst) = (r * d, (5000 + r) * d);
        let row: Vec<f32> = wv[src..src + d].to_vec();
        wv[dst..dst + d].copy_from_slice(&row);
    }
    let m = g.matrix(HostTensor::f32(vec![v, d], wv), DType::BF16).unwrap();
    for rows in [1, 3] {
        let xb = g.upload(&rnd(rows * d, 91 + rows as u64, 2.0)).unwrap();
        for cap in [0.0f32, 3.0] {
            let mut s = g.zeros(rows * v).unwrap();
            g.matmul(&xb, rows, &m, &mut s).unwrap();
            g.bias_soft_cap(&mut s, rows, v, None, cap).unwrap();
            let logits = g.download(&s, rows * v).unwrap();
            for k in [1, 2, 8, 9, 40] {
                let mut s2 = g.zeros(rows * v).unwrap();
                let got = g.head_top_k(&xb, rows, &m, v, cap, k, &mut s2).unwrap();
                assert_eq!(got.len(), rows);
                for (r, got) in got.iter().enumerate() {
                    let want = xlstm_core::backend::top_k_of(&logits[r * v..(r + 1) * v], k);
                    assert_eq!(got, &want, "rows {rows} cap {cap} k {k}: row {r}");
                }
            }
        }
    }
}

#[test]
fn errors_are_clear() {
    let g: &WgpuBackend = gpu!();
    let a = g.zeros(10).unwrap();
    let mut b = g.zeros(5).unwrap();
    let e = g.add(&mut b, &a, 10).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("`x`"), "{e}");
    assert!(g.zeros(usize::MAX / 8).is_err());
}

/// The workgroup-memory fallback (adapters without subgroup operations) against the CPU: the
/// kernels that reduce (GEMV, norms, the mLSTM gate kernel) have two variants.
#[test]
fn fallback_without_subgroups() {
    if backend().is_none() {
        return;
    }
    let g = xlstm_wgpu::WgpuBackend::with_subgroups(xlstm_wgpu::Api::Any, false).unwrap();
    assert!(!g.has_subgroups());
    let cpu = CpuBackend::new();
    let (n, k) = (67, 45);
    let w = HostTensor::f32(vec![n, k], rnd(n * k, 81, 0.5));
    for dt in [DType::F32, DType::BF16, DType::F16] {
        for rows in [1, 3, 9] {
            let x = rnd(rows * k, 82, 1.0);
            close(&format!("fallback matmul {dt:?} rows {rows}"), &matmul_on(&g, &x, rows, &w, dt, None), &matmul_on(&cpu, &x, rows, &w, dt, None), REDUCE);
        }
    }
    let (rows, width, group) = (3, 96, 32);
    let x = rnd(rows * width, 83, 3.0);
    let (wt, bias) = (rnd(width, 84, 1.0), rnd(width, 85, 1.0));
    for (i, (a, b)) in norms_on(&g, &x, rows, width, group, &wt, &bias).iter().zip(norms_on(&cpu, &x, rows, width, group, &wt, &bias)).enumerate() {
        close(&format!("fallback norm #{i}"), a, &b, REDUCE);
    }
    let d = MlstmDims { heads: 2, dk: 16, dv: 24 };
    for (rows, batch, kernel, gated) in [(2, 2, None, false), (7, 1, Some(MlstmKernel::Sequence), true), (2, 2, None, true)] {
        let a = mlstm_on(&g, d, rows, batch, kernel, gated, 86);
        let b = mlstm_on(&cpu, d, rows, batch, kernel, gated, 86);
        close(&format!("fallback mlstm rows {rows}: h"), &a.h, &b.h, CELL);
        close(&format!("fallback mlstm rows {rows}: C"), &a.c, &b.c, CELL);
    }
}

/// The fused batch-1 compositions (RMSNorm + projections; RMSNorm + gate/up + activation) and the
/// batch-1 GEMV: (xn, outs) of `norm_matmuls` over bf16/f16 matrices with f32 gate rows beside
/// them, then `norm_gated_up`'s (xn, out) for every activation.
fn fused_on<B: Backend>(b: &B, k: usize, dt: DType, x: &[f32], nw: &[f32], mats: &[HostTensor]) -> Vec<Vec<f32>> {
    let ms: Vec<B::Mat> = mats.iter().enumerate().map(|(i, m)| b.matrix(m.clone(), if i == 2 { DType::F32 } else { dt }).unwrap()).collect();
    let xb = b.upload(x).unwrap();
    let wb = b.upload(nw).unwrap();
    let mut xn = b.zeros(k).unwrap();
    let mut outs: Vec<B::Buf> = mats.iter().map(|m| b.zeros(m.shape[0]).unwrap()).collect();
    let mut res = Vec::new();
    {
        let refs: Vec<&B::Mat> = ms[..3].iter().collect();
        let mut o: Vec<&mut B::Buf> = outs[..3].iter_mut().collect();
        b.norm_matmuls(&xb, 1, k, &wb, 1e-5, &mut xn, &refs, &mut o).unwrap();
    }
    res.push(b.download(&xn, k).unwrap());
    for (m, o) in mats[..3].iter().zip(&outs) {
        res.push(b.download(o, m.shape[0]).unwrap());
    }
    let ff = mats[3].shape[0];
    for act in [Activation::Silu, Activation::Gelu, Activation::Relu, Activation::ReluSquared, Activation::Sigmoid, Activation::Selu] {
        let (mut g, mut u, mut a) = (b.zeros(ff).unwrap(), b.zeros(ff).unwrap(), b.zeros(ff).unwrap());
        let mut xn2 = b.zeros(k).unwrap();
        b.norm_gated_up(&xb, 1, k, &wb, 1e-5, &mut xn2, &ms[3], &ms[4], ff, act, &mut g, &mut u, &mut a).unwrap();
        res.push(b.download(&xn2, k).unwrap());
        res.push(b.download(&a, ff).unwrap());
    }
    res
}

#[test]
fn fused_batch1_kernels() {
    if backend().is_none() {
        return;
    }
    let cpu = CpuBackend::new();
    use xlstm_wgpu::shaders::Knobs;
    let base = Knobs::for_adapter(true);
    // (knobs, subgroups, part limit): odd shapes of the GEMV (rows per workgroup not dividing the
    // rows, unrolled steps not dividing the chunks), runtime checks on, no subgroups, several
    // parts per matrix (several slots and dispatches).
    let cases = [
        (Knobs { mv_wg: 32, mv_rows: 3, mv_unroll: 3, ..base.clone() }, true, None),
        (Knobs { mv_wg: 64, mv_rows: 4, mv_unroll: 2, checked: true, ..base.clone() }, true, None),
        (Knobs { mv_wg: 16, mv_rows: 2, mv_unroll: 1, ..base.clone() }, false, None),
        (Knobs { mv_wg: 8, mv_rows: 5, mv_unroll: 2, ..base.clone() }, true, Some(600u64)),
    ];
    for (knobs, sg, parts) in cases {
        let mut g = xlstm_wgpu::WgpuBackend::with_options(xlstm_wgpu::Api::Any, sg, Some(knobs.clone())).unwrap();
        if let Some(p) = parts {
            g.set_part_limit(p);
        }
        for (k, dt) in [(83usize, DType::BF16), (64, DType::F16), (200, DType::BF16)] {
            let shapes = [(37usize, k), (19, k), (4, k), (29, k), (29, k)];
            let mats: Vec<HostTensor> = shapes.iter().enumerate().map(|(i, &(n, k))| HostTensor::f32(vec![n, k], rnd(n * k, 200 + i as u64 + k as u64, 0.5))).collect();
            let x = rnd(k, 210, 2.0);
            let nw = rnd(k, 211, 1.0).iter().map(|v| v + 1.0).collect::<Vec<_>>();
            let a = fused_on(&g, k, dt, &x, &nw, &mats);
            let b = fused_on(&cpu, k, dt, &x, &nw, &mats);
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                close(&format!("fused #{i} k {k} {dt:?} mv {}x{}x{} sg {sg} parts {parts:?}", knobs.mv_wg, knobs.mv_rows, knobs.mv_unroll), p, q, REDUCE);
            }
            // the plain batch-1 GEMV and its accumulate form
            for (n, kk) in [(45usize, k), (9, 8)] {
                let w = HostTensor::f32(vec![n, kk], rnd(n * kk, 220, 0.5));
                let x = rnd(kk, 221, 1.0);
                let acc = rnd(n, 222, 1.0);
                for wdt in [dt, DType::F32] {
                    close(&format!("mv {n}x{kk} {wdt:?}"), &matmul_on(&g, &x, 1, &w, wdt, None), &matmul_on(&cpu, &x, 1, &w, wdt, None), REDUCE);
                    close(&format!("mv add {n}x{kk} {wdt:?}"), &matmul_on(&g, &x, 1, &w, wdt, Some(&acc)), &matmul_on(&cpu, &x, 1, &w, wdt, Some(&acc)), REDUCE);
                }
            }
        }
    }
}
