//! Where decode and prefill time goes on a GPU, at the xLSTM-7B shape (random bf16 weights):
//! bandwidth ceilings, each fused decode kernel alone (µs and GB/s of weights read), the whole
//! decode step eager vs replayed from the CUDA graph at several batch sizes, and prefill at several
//! lengths. Prints one JSON line per measurement.
//!
//!   cargo run --release -p xlstm-cuda --example cuda_profile -- [--quick]
//!
//! With `--trace FILE` (kernels built with `XLSTM_CUDA_TRACE=1`) it only replays three batch-1
//! decode steps of the 7B model from their graph and writes every traced block's record (kernel
//! tag, grid size and block, SM, start / after-wait / prologue-done / end in ns) to FILE as CSV;
//! `examples/trace_summary.py FILE` sums it up per kernel of a layer (the per-op kernels:
//! `XLSTM_CUDA_STACK=0`), `examples/stack_trace.py FILE` per phase of the stack kernel (the default on
//! sm_90 for a bf16 model).
//!
//! With `--products` it only times the decode step's four products at the 7B shape for batches of
//! 3–64 rows (µs and weight GB/s; each call takes the next of four copies of the weights, so that
//! they stream from memory, not from L2).
//!
//! With `--cell [BATCH]` it only times the fused mLSTM cell step at the 7B shape (8 heads × 256 × 512) for
//! batches of 1–256, C in f32 and bf16, written every step and deferred (the default ring): µs per
//! step over 64 steps (so write-backs are included) and the state's bytes read per µs.
use std::time::Instant;

use xlstm_core::backend::{Activation, Backend, MlstmDims, MlstmKernel, MlstmState};
use xlstm_core::config::{LargeConfig, ModelConfig};
use xlstm_core::model::LogitRows;
use xlstm_core::tensor::{DType, HostTensor};
use xlstm_core::Model;
use xlstm_cuda::{ChunkKernels, ChunkPhase, CudaBackend, CudaBuf, CudaMat};

fn mat(g: &CudaBackend, r: usize, c: usize, seed: u64) -> CudaMat {
    let mut s = seed | 1;
    let v: Vec<f32> = (0..r * c)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) / (c as f32).sqrt()
        })
        .collect();
    g.matrix(HostTensor::f32(vec![r, c], v), DType::BF16).unwrap()
}

fn buf(g: &CudaBackend, n: usize, val: f32) -> CudaBuf {
    g.upload(&vec![val; n]).unwrap()
}

/// Median-free simple timing: `reps` calls after 3 warm-ups, synchronised, µs per call.
fn time(g: &CudaBackend, reps: usize, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..3 {
        f(i);
    }
    g.synchronize().unwrap();
    let t = Instant::now();
    for i in 0..reps {
        f(i);
    }
    g.synchronize().unwrap();
    t.elapsed().as_secs_f64() * 1e6 / reps as f64
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let prefill_only = std::env::args().any(|a| a == "--prefill-only");
    let g = CudaBackend::new(0).expect("a usable CUDA device");
    println!("{{\"device\":\"{}\"}}", g.device_name());
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--products") {
        products(&g);
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--cell") {
        let rows: Vec<usize> = args.get(i + 1).and_then(|r| r.parse().ok()).map_or(vec![1, 16, 64, 256], |r| vec![r]);
        cell_steps(&g, &rows);
        return;
    }
    if let Some(path) = args.iter().position(|a| a == "--trace").and_then(|i| args.get(i + 1)) {
        return trace_decode(&g, path);
    }
    let bw = g.measure_bandwidth().unwrap();
    println!("{{\"bandwidth\":{{\"copy_gb_s\":{:.0},\"read_gb_s\":{:.0}}}}}", bw.copy_gb_s, bw.read_gb_s);

    // ---- fused decode kernels at the 7B shape, batch 1 --------------------------------------------
    let (d, qk, vd, nh, ff) = (4096usize, 2048usize, 4096usize, 8usize, 10944usize);
    let sets: Vec<_> = (0..3)
        .map(|i| {
            let s = 100 * i as u64;
            (
                [mat(&g, qk, d, s + 1), mat(&g, qk, d, s + 2), mat(&g, vd, d, s + 3), mat(&g, vd, d, s + 4)],
                mat(&g, vd, d, s + 5),
                mat(&g, ff, d, s + 6),
                mat(&g, ff, d, s + 7),
                mat(&g, d, ff, s + 8),
            )
        })
        .collect();
    let gates = (g.matrix(HostTensor::f32(vec![nh, d], vec![0.01; nh * d]), DType::F32).unwrap(), g.matrix(HostTensor::f32(vec![nh, d], vec![0.01; nh * d]), DType::F32).unwrap());
    for rows in [1usize, 2, 4, 8, 16, 64] {
        let x = buf(&g, rows * d, 0.5);
        let nw = buf(&g, d, 1.0);
        let mut xn = buf(&g, rows * d, 0.0);
        let (mut q, mut k, mut v, mut o) = (buf(&g, rows * qk, 0.0), buf(&g, rows * qk, 0.0), buf(&g, rows * vd, 0.0), buf(&g, rows * vd, 0.0));
        let (mut i, mut f) = (buf(&g, rows * nh, 0.0), buf(&g, rows * nh, 0.0));
        let us = time(&g, 50, |r| {
            let s = &sets[r % 3];
            g.norm_matmuls(&x, rows, d, &nw, 1e-6, &mut xn, &[&s.0[0], &s.0[1], &s.0[2], &s.0[3], &gates.0, &gates.1], &mut [&mut q, &mut k, &mut v, &mut o, &mut i, &mut f]).unwrap();
        });
        let bytes = 2.0 * (2 * qk + 2 * vd) as f64 * d as f64;
        println!("{{\"kernel\":\"norm+qkvo+if\",\"rows\":{rows},\"us\":{us:.1},\"gb_s\":{:.0}}}", bytes / us / 1e3);
        let mut acc = buf(&g, rows * d, 0.0);
        let mut tmp = buf(&g, rows * d, 0.0);
        let hn = buf(&g, rows * vd, 0.1);
        let us = time(&g, 50, |r| g.matmul_add(&hn, rows, &sets[r % 3].1, d, &mut tmp, &mut acc).unwrap());
        println!("{{\"kernel\":\"out_proj+add\",\"rows\":{rows},\"us\":{us:.1},\"gb_s\":{:.0}}}", 2.0 * (vd * d) as f64 / us / 1e3);
        let (mut gg, mut uu, mut aa) = (buf(&g, rows * ff, 0.0), buf(&g, rows * ff, 0.0), buf(&g, rows * ff, 0.0));
        let us = time(&g, 50, |r| {
            let s = &sets[r % 3];
            g.norm_gated_up(&x, rows, d, &nw, 1e-6, &mut xn, &s.2, &s.3, ff, Activation::Silu, &mut gg, &mut uu, &mut aa).unwrap()
        });
        println!("{{\"kernel\":\"norm+gate,up+swiglu\",\"rows\":{rows},\"us\":{us:.1},\"gb_s\":{:.0}}}", 2.0 * (2 * ff * d) as f64 / us / 1e3);
        let us = time(&g, 50, |r| g.matmul_add(&aa, rows, &sets[r % 3].4, d, &mut tmp, &mut acc).unwrap());
        println!("{{\"kernel\":\"down+add\",\"rows\":{rows},\"us\":{us:.1},\"gb_s\":{:.0}}}", 2.0 * (ff * d) as f64 / us / 1e3);
        // the fused mLSTM cell (state 8 heads × 256 × 512 per sequence)
        let dims = MlstmDims { heads: nh, dk: 256, dv: 512 };
        let mut st = MlstmState { c: buf(&g, rows * nh * 256 * 512, 0.0), n: buf(&g, rows * nh * 256, 0.0), m: buf(&g, rows * nh, 0.0), dims, c_dtype: DType::F32, pending: None };
        let (ib, fb, hw) = (buf(&g, nh, 0.0), buf(&g, nh, 3.0), buf(&g, vd, 1.0));
        let (mut h, mut hn2) = (buf(&g, rows * vd, 0.0), buf(&g, rows * vd, 0.0));
        let us = time(&g, 50, |_| {
            g.mlstm_gated_cell(None, dims, rows, &q, &k, &v, &o, &mut i, &mut f, &ib, &fb, 15.0, &mut st, 1e-6, &hw, 1e-6, &mut h, &mut hn2).unwrap()
        });
        println!("{{\"kernel\":\"mlstm_cell_step\",\"rows\":{rows},\"us\":{us:.1},\"state_gb_s\":{:.0}}}", 2.0 * 4.0 * (rows * nh * 256 * 512) as f64 / us / 1e3);
    }
    // chunkwise prefill of one layer's cell over one 2048-token segment: CUDA cores, tensor cores
    // with exact (split TF32) and TF32 operands
    {
        let dims = MlstmDims { heads: nh, dk: 256, dv: 512 };
        let seq = 2048;
        let (q, k, v) = (buf(&g, seq * qk, 0.1), buf(&g, seq * qk, 0.1), buf(&g, seq * vd, 0.1));
        let (i, f) = (buf(&g, seq * nh, 0.0), buf(&g, seq * nh, 3.0));
        let mut st = MlstmState { c: buf(&g, nh * 256 * 512, 0.0), n: buf(&g, nh * 256, 0.0), m: buf(&g, nh, 0.0), dims, c_dtype: DType::F32, pending: None };
        let mut h = buf(&g, seq * vd, 0.0);
        for (name, tensor_cores, weights) in [("cuda_cores", false, DType::F32), ("tc_exact", true, DType::F32), ("tc_tf32", true, DType::BF16)] {
            g.set_weight_dtype(weights);
            for (phase, only) in [("both", None), ("states", Some(ChunkPhase::States)), ("out", Some(ChunkPhase::Out))] {
                g.set_chunk_kernels(ChunkKernels { tensor_cores, bf16: true, only });
                let us = time(&g, 10, |_| g.mlstm_prefill(MlstmKernel::Chunkwise { chunk: 64 }, dims, seq, &q, &k, &v, &i, &f, &mut st, 1e-6, &mut h).unwrap());
                println!("{{\"kernel\":\"mlstm_chunkwise_{seq}\",\"impl\":\"{name}\",\"phase\":\"{phase}\",\"us\":{us:.1}}}");
            }
        }
        g.set_chunk_kernels(ChunkKernels { tensor_cores: true, bf16: true, only: None });
    }
    if std::env::args().any(|a| a == "--chunk-only") {
        return;
    }
    // prefill-sized products through cuBLAS, each shape alone, at 512 / 2048 / 4096 rows
    for rows in [512usize, 2048, 4096] {
        for &(n, k) in &[(4096usize, 4096usize), (10944, 4096), (4096, 10944), (12304, 4096), (21888, 4096)] {
            let w = mat(&g, n, k, 7);
            let x = buf(&g, rows * k, 0.3);
            let mut o = buf(&g, rows * n, 0.0);
            let us = time(&g, 10, |_| g.matmul(&x, rows, &w, &mut o).unwrap());
            println!("{{\"gemm\":[{rows},{n},{k}],\"us\":{us:.1},\"tflop_s\":{:.0}}}", 2.0 * rows as f64 * (n * k) as f64 / us / 1e6);
        }
    }
    drop(sets);

    // ---- the whole model ------------------------------------------------------------------------
    let cfg = LargeConfig::xlstm_7b();
    let t = Instant::now();
    let mut model = Model::random(g.clone(), ModelConfig::Large(cfg), DType::BF16, 0).unwrap();
    println!("{{\"load_random_7b_s\":{:.1},\"weight_bytes_per_token\":{}}}", t.elapsed().as_secs_f64(), model.weight_bytes_per_token());
    let floor_ms = model.weight_bytes_per_token() as f64 / (bw.copy_gb_s * 1e9) * 1e3;
    let batches: &[usize] = if prefill_only { &[] } else if quick { &[1, 64] } else { &[1, 16, 64, 256] };
    for &b in batches {
        for graphs in [false, true] {
            if !graphs && b > 16 {
                continue;
            }
            g.set_graphs(graphs);
            let mut st = model.new_state(b).unwrap();
            let ids: Vec<u32> = (0..b as u32).map(|x| (x * 7919) % 50304).collect();
            for _ in 0..4 {
                model.step(&ids, &mut st).unwrap();
            }
            let n = if b >= 64 { 10 } else { 30 };
            let t = Instant::now();
            for _ in 0..n {
                model.step(&ids, &mut st).unwrap();
            }
            let ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
            println!(
                "{{\"decode\":{{\"batch\":{b},\"graphs\":{graphs},\"ms_per_step\":{ms:.3},\"tok_s\":{:.0},\"floor_ms\":{floor_ms:.3},\"ratio\":{:.3},\"stats\":{:?}}}}}",
                b as f64 / ms * 1e3,
                floor_ms / ms,
                g.graph_stats()
            );
        }
    }
    g.set_graphs(true);
    for seg in [512usize, 2048, 4096] {
        model.prefill_segment = seg;
        for len in [2048usize, 8192] {
            let ids: Vec<u32> = (0..len as u32).map(|x| (x * 2654435761u32) % 50304).collect();
            let mut best = f64::MAX;
            for _ in 0..2 {
                let mut st = model.new_state(1).unwrap();
                let t = Instant::now();
                model.prefill(&ids, &mut st, MlstmKernel::Chunkwise { chunk: 64 }, LogitRows::Last).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            let tflop = len as f64 * 2.0 * model.weight_bytes_per_token() as f64 / 2.0 / best / 1e12;
            println!("{{\"prefill\":{{\"segment\":{seg},\"tokens\":{len},\"ms\":{:.1},\"tok_s\":{:.0},\"tflop_s\":{tflop:.0}}}}}", best * 1e3, len as f64 / best);
        }
    }
    // where a prefill's time goes, op by op (each op waited for)
    model.prefill_segment = 2048;
    let ids: Vec<u32> = (0..8192u32).map(|x| (x * 2654435761u32) % 50304).collect();
    g.set_op_timing(true);
    let mut st = model.new_state(1).unwrap();
    model.prefill(&ids, &mut st, MlstmKernel::Chunkwise { chunk: 64 }, LogitRows::Last).unwrap();
    for (op, calls, s) in g.op_times() {
        println!("{{\"prefill_8192_op\":\"{op}\",\"calls\":{calls},\"ms\":{:.2}}}", s * 1e3);
    }
    g.set_op_timing(false);
}

/// The decode products (q/k/v/o merged, out_proj + residual, [gate; up], down + residual) at several
/// batch sizes, as the model calls them (`matmul`, `matmul_add`).
fn cell_steps(g: &CudaBackend, batches: &[usize]) {
    let (nh, vd) = (8usize, 4096usize);
    let dims = MlstmDims { heads: nh, dk: 256, dv: 512 };
    let default_cap = g.set_pending_cap(0);
    for &rows in batches {
        let (q, k, v, o) = (buf(g, rows * 2048, 0.1), buf(g, rows * 2048, 0.1), buf(g, rows * vd, 0.1), buf(g, rows * vd, 0.1));
        let (mut i, mut f) = (buf(g, rows * nh, 0.0), buf(g, rows * nh, 3.0));
        let (ib, fb, hw) = (buf(g, nh, 0.0), buf(g, nh, 3.0), buf(g, vd, 1.0));
        let (mut h, mut hn) = (buf(g, rows * vd, 0.0), buf(g, rows * vd, 0.0));
        for c_dtype in [DType::F32, DType::BF16] {
            for cap in [0, default_cap] {
                g.set_pending_cap(cap);
                let mut st = xlstm_core::state::mlstm_zeros(g, dims, rows, c_dtype).unwrap();
                let us = time(g, 64, |_| g.mlstm_gated_cell(None, dims, rows, &q, &k, &v, &o, &mut i, &mut f, &ib, &fb, 15.0, &mut st, 1e-6, &hw, 1e-6, &mut h, &mut hn).unwrap());
                let c_bytes = (rows * nh * 256 * 512 * c_dtype.size()) as f64;
                println!("{{\"kernel\":\"mlstm_cell_step\",\"rows\":{rows},\"c_dtype\":\"{c_dtype}\",\"pending_cap\":{cap},\"us\":{us:.1},\"c_read_gb_s\":{:.0}}}", c_bytes / us / 1e3);
                if st.pending.is_some() {
                    // folding what the 67 steps left in the rings (67 mod (cap + 1) entries)
                    g.synchronize().unwrap();
                    let t = Instant::now();
                    g.mlstm_settle(&st).unwrap();
                    g.synchronize().unwrap();
                    let us = t.elapsed().as_secs_f64() * 1e6;
                    println!("{{\"kernel\":\"mlstm_settle\",\"rows\":{rows},\"entries\":{},\"us\":{us:.1}}}", 67 % (cap + 1));
                }
            }
        }
    }
    g.set_pending_cap(default_cap);
}

fn products(g: &CudaBackend) {
    let shapes = [
        ("qkvo", 12288usize, 4096usize, false),
        ("out_proj_add", 4096, 4096, true),
        ("out_proj", 4096, 4096, false),
        ("gate_up", 21888, 4096, false),
        ("down_add", 4096, 10944, true),
        ("down", 4096, 10944, false),
    ];
    for &(name, n, k, add) in &shapes {
        let ws: Vec<CudaMat> = (0..4).map(|i| mat(g, n, k, i as u64 + 1)).collect();
        for rows in [3usize, 4, 8, 16, 32, 64] {
            let x = buf(g, rows * k, 0.01);
            let mut out = buf(g, rows * n, 0.0);
            let mut tmp = buf(g, 1, 0.0);
            let us = time(g, 40, |i| {
                let w = &ws[i % ws.len()];
                if add {
                    g.matmul_add(&x, rows, w, n, &mut tmp, &mut out).unwrap()
                } else {
                    g.matmul(&x, rows, w, &mut out).unwrap()
                }
            });
            let gb_s = (n * k * 2) as f64 / us / 1e3;
            println!("{{\"product\":\"{name}\",\"rows\":{rows},\"us\":{us:.1},\"weight_gb_s\":{gb_s:.0}}}");
        }
    }
}

/// Three graph-replayed batch-1 greedy decode steps of the 7B model (the bench's: the token chosen
/// on the device), every traced block's record to `path`.
fn trace_decode(g: &CudaBackend, path: &str) {
    let mut model = Model::random(g.clone(), ModelConfig::Large(LargeConfig::xlstm_7b()), DType::BF16, 0).unwrap();
    g.set_graphs(true);
    let mut st = model.new_state(1).unwrap();
    let mut step = |st: &mut xlstm_core::State<CudaBackend>| {
        let ticket = model.pipe_step(Some(17), st).unwrap();
        model.pipe_token(ticket).unwrap();
    };
    for _ in 0..6 {
        step(&mut st);
    }
    if g.trace_take().unwrap().is_none() {
        eprintln!("kernels were built without the trace (set XLSTM_CUDA_TRACE=1): timing the steps only");
    }
    let t = Instant::now();
    for _ in 0..3 {
        step(&mut st);
    }
    g.synchronize().unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3 / 3.0;
    let recs = g.trace_take().unwrap().unwrap_or_default();
    let mut out = String::from("tag,grid,block,sm,t0,t1,t2,t3\n");
    for r in &recs {
        out += &format!("{},{},{},{},{},{},{},{}\n", r[0], r[1] >> 32, r[1] & 0xffff_ffff, r[2], r[3], r[4], r[5], r[6]);
    }
    std::fs::write(path, out).unwrap();
    println!("{{\"trace\":{{\"records\":{},\"ms_per_step\":{ms:.3},\"file\":\"{path}\"}}}}", recs.len());
}
