//! Times the decode projections of one xLSTM-7B layer (batch 1, bf16) as the model runs them —
//! RMSNorm + q/k/v/o/ĩ/f̃, out_proj added to the residual, RMSNorm + gate/up + SwiGLU, down added to
//! the residual — for several batch-1 GEMV shapes (`XLSTM_WGPU_MV=WGxROWSxUNROLL`) and the unfused
//! path (`XLSTM_WGPU_FUSE=0`), and prints the weight-read bandwidth of each, per op and in all; the
//! last line is the best shape. Then the decode mLSTM cell of one layer (gates, cell, σ(o)·head
//! norm) for several cell tiles (`XLSTM_WGPU_CELL=COLSxSPLIT`, list in `SWEEP_CELL=32x8,16x16`).
//! Usage: `wgpu_gemv_sweep [vulkan|metal|dx12|gpu] [WGxRxU ...]`.
use xlstm_core::backend::{Activation, Backend, MlstmDims, MlstmState};
use xlstm_core::tensor::{DType, HostTensor};
use xlstm_wgpu::shaders::Knobs;
use xlstm_wgpu::{Api, WgpuBackend, WgpuBuf, WgpuMat};

struct Layer {
    qkvo: Vec<WgpuMat>,
    out_proj: WgpuMat,
    gate: WgpuMat,
    up: WgpuMat,
    down: WgpuMat,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let api = match args.next().as_deref() {
        Some("metal") => Api::Metal,
        Some("dx12") => Api::Dx12,
        Some("gpu") => Api::Any,
        _ => Api::Vulkan,
    };
    let mut shapes: Vec<Option<(u32, u32, u32)>> = args
        .filter_map(|a| {
            let v: Vec<u32> = a.split('x').filter_map(|s| s.parse().ok()).collect();
            (v.len() == 3).then(|| Some((v[0], v[1], v[2])))
        })
        .collect();
    if shapes.is_empty() {
        shapes = vec![None, Some((64, 4, 2)), Some((32, 4, 2)), Some((64, 2, 4)), Some((64, 8, 1)), Some((128, 4, 2)), Some((128, 2, 2)), Some((256, 4, 1)), Some((64, 4, 4)), Some((32, 8, 2))];
    }
    let (d, qk, ff, nh) = (4096usize, 2048usize, 10944usize, 8usize);
    let mat = |n: usize, k: usize, i: usize, dt: DType| {
        HostTensor::f32(vec![n, k], (0..n * k).map(|j| ((j.wrapping_mul(2654435761) + i) % 1000) as f32 * 1e-3 - 0.5).collect()).to_dtype(dt)
    };
    // q, k, v, o, ĩ, f̃ (gate rows in f32, as the model keeps them), out_proj, gate, up, down
    let host = [
        mat(qk, d, 0, DType::BF16),
        mat(qk, d, 1, DType::BF16),
        mat(d, d, 2, DType::BF16),
        mat(d, d, 3, DType::BF16),
        mat(nh, d, 4, DType::F32),
        mat(nh, d, 5, DType::F32),
        mat(d, d, 6, DType::BF16),
        mat(ff, d, 7, DType::BF16),
        mat(ff, d, 8, DType::BF16),
        mat(d, ff, 9, DType::BF16),
    ];
    let mut best = (0.0f64, String::new());
    for shape in shapes {
        let mut knobs = Knobs::for_adapter(false).with_env();
        let label = match shape {
            Some((wg, r, u)) => {
                (knobs.mv_wg, knobs.mv_rows, knobs.mv_unroll, knobs.fuse) = (wg, r, u, true);
                knobs.mv_plain = (wg, r, u);
                format!("{wg}x{r}x{u}")
            }
            None => {
                knobs.fuse = false;
                "unfused (old gemv)".to_string()
            }
        };
        let b = match WgpuBackend::with_options(api, true, Some(knobs)) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        let up = |i: usize| {
            let dt = if i == 4 || i == 5 { DType::F32 } else { DType::BF16 };
            b.matrix(host[i].clone(), dt).unwrap()
        };
        let l = Layer { qkvo: (0..6).map(up).collect(), out_proj: up(6), gate: up(7), up: up(8), down: up(9) };
        let bytes: Vec<usize> = host.iter().map(|t| t.shape[0] * t.shape[1] * if t.dtype() == DType::F32 { 4 } else { 2 }).collect();
        let z = |n: usize| b.zeros(n).unwrap();
        let (x, normw) = (b.upload(&vec![0.01f32; d]).unwrap(), b.upload(&vec![1.0f32; d]).unwrap());
        let (mut xn, mut a, mut g, mut u, mut y, mut res) = (z(d), z(ff), z(ff), z(ff), z(d), z(d));
        let mut outs: Vec<WgpuBuf> = [qk, qk, d, d, nh, nh].iter().map(|&n| z(n)).collect();
        let reps: usize = std::env::var("SWEEP_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
        // op 0: norm + 6 projections, 1: out_proj (+=), 2: norm + gate/up + SwiGLU, 3: down (+=)
        let op_bytes = [bytes[..6].iter().sum::<usize>(), bytes[6], bytes[7] + bytes[8], bytes[9]];
        let mut run = |op: usize| match op {
            0 => {
                let mats: Vec<&WgpuMat> = l.qkvo.iter().collect();
                let mut o: Vec<&mut WgpuBuf> = outs.iter_mut().collect();
                b.norm_matmuls(&x, 1, d, &normw, 1e-6, &mut xn, &mats, &mut o).unwrap();
            }
            1 => b.matmul_add(&xn, 1, &l.out_proj, d, &mut y, &mut res).unwrap(),
            2 => b.norm_gated_up(&x, 1, d, &normw, 1e-6, &mut xn, &l.gate, &l.up, ff, Activation::Silu, &mut g, &mut u, &mut a).unwrap(),
            _ => b.matmul_add(&a, 1, &l.down, d, &mut y, &mut res).unwrap(),
        };
        let mut time = |ops: &[usize]| {
            let mut t_best = f64::MAX;
            let mut t_rec = f64::MAX;
            for round in 0..4 {
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    for &op in ops {
                        run(op);
                    }
                }
                let rec = t.elapsed().as_secs_f64();
                b.sync().unwrap();
                if round > 0 {
                    t_best = t_best.min(t.elapsed().as_secs_f64());
                    t_rec = t_rec.min(rec);
                }
            }
            (t_best / reps as f64, t_rec / reps as f64)
        };
        let (d0, _) = b.counters();
        let (t_all, t_rec) = time(&[0, 1, 2, 3]);
        let (_, d1) = b.counters();
        let per: Vec<String> = (0..4)
            .map(|op| {
                let (t, _) = time(&[op]);
                format!("{:.1} µs {:.0} GB/s", t * 1e6, op_bytes[op] as f64 / t / 1e9)
            })
            .collect();
        let total: usize = op_bytes.iter().sum();
        let gbs = total as f64 / t_all / 1e9;
        println!(
            "mv {label}: layer {:.1} µs, {gbs:.0} GB/s ({} dispatches, host recording {:.1} µs) | norm+qkvoif {} | out_proj {} | norm+gate/up+swiglu {} | down {} ({})",
            t_all * 1e6,
            (d1 - d0) / (4 * reps as u64),
            t_rec * 1e6,
            per[0],
            per[1],
            per[2],
            per[3],
            b.name()
        );
        if gbs > best.0 && shape.is_some() {
            best = (gbs, label);
        }
    }
    println!("{}", best.1);
    cells(api);
    head(api);
    let b = WgpuBackend::new(api).unwrap();
    for iters in [1u32, 4, 8, 16, 32] {
        let bw = b.stream_bandwidth(iters).unwrap();
        println!("stream probe, {iters} blocks per workgroup: copy {:.0} GB/s, read {:.0} GB/s", bw.copy_gb_s, bw.read_gb_s);
    }
}

/// Times xLSTM-7B's LM head at batch 1 (50304 × 4096 bf16, soft cap 30) as `Model::step` runs it
/// (product, soft cap, all logits read back) and as `Model::step_top_k` does (`head_top_k`: the
/// device selects, k pairs read back), for k = 1 and 50.
fn head(api: Api) {
    let (v, d) = (50304usize, 4096usize);
    let b = WgpuBackend::new(api).unwrap();
    let w = HostTensor::f32(vec![v, d], (0..v * d).map(|j| ((j.wrapping_mul(2654435761) + 11) % 1000) as f32 * 1e-3 - 0.5).collect()).to_dtype(DType::BF16);
    let m = b.matrix(w, DType::BF16).unwrap();
    let x = b.upload(&(0..d).map(|i| (i % 7) as f32 * 0.01).collect::<Vec<_>>()).unwrap();
    let mut s = b.zeros(v).unwrap();
    let reps = 30;
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = std::time::Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() / reps as f64 * 1e6
    };
    let full = time(&mut || {
        b.matmul(&x, 1, &m, &mut s).unwrap();
        b.bias_soft_cap(&mut s, 1, v, None, 30.0).unwrap();
        std::hint::black_box(b.download(&s, v).unwrap());
    });
    let top1 = time(&mut || {
        std::hint::black_box(b.head_top_k(&x, 1, &m, v, 30.0, 1, &mut s).unwrap());
    });
    let top50 = time(&mut || {
        std::hint::black_box(b.head_top_k(&x, 1, &m, v, 30.0, 50, &mut s).unwrap());
    });
    println!("lm head ({} MB): logits read back {full:.1} µs | head_top_k k=1 {top1:.1} µs | k=50 {top50:.1} µs", (v * d * 2) >> 20);
}

/// Times `mlstm_gated_cell` at batch 1 with xLSTM-7B's dims for several cell tiles.
fn cells(api: Api) {
    let list = std::env::var("SWEEP_CELL").unwrap_or_else(|_| "64x4,32x8,16x16,32x16,16x32,64x16,8x32".into());
    let d = MlstmDims { heads: 8, dk: 256, dv: 512 };
    let (nh, w) = (d.heads, d.heads * d.dv);
    for tile in list.split(',') {
        let v: Vec<u32> = tile.split('x').filter_map(|s| s.parse().ok()).collect();
        if v.len() != 2 {
            continue;
        }
        let mut knobs = Knobs::for_adapter(false).with_env();
        (knobs.cell_cols, knobs.cell_split) = (v[0], v[1]);
        let b = WgpuBackend::with_options(api, true, Some(knobs)).unwrap();
        let z = |n: usize| b.zeros(n).unwrap();
        let (q, k, vv, o) = (z(nh * d.dk), z(nh * d.dk), z(w), z(w));
        let (mut i, mut f, ib, fb, norm) = (z(nh), z(nh), z(nh), z(nh), z(w));
        let mut s = MlstmState { c: z(nh * d.dk * d.dv), n: z(nh * d.dk), m: z(nh), dims: d, c_dtype: DType::F32, pending: None };
        let (mut h, mut hn) = (z(w), z(w));
        let reps = 50;
        let mut best = f64::MAX;
        for round in 0..4 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                b.mlstm_gated_cell(None, d, 1, &q, &k, &vv, &o, &mut i, &mut f, &ib, &fb, 15.0, &mut s, 1e-6, &norm, 1e-6, &mut h, &mut hn).unwrap();
            }
            b.sync().unwrap();
            if round > 0 {
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
        }
        println!("cell {tile}: {:.1} µs per layer (gates + cell + norm, C {} MB read + written)", best * 1e6, (nh * d.dk * d.dv * 4) >> 20);
    }
}
