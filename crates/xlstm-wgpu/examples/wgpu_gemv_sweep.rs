//! Times the decode GEMV (batch 1, bf16) on xLSTM-7B's matrix shapes for several workgroup shapes
//! and prints the achieved weight-read bandwidth of each; the last line is the best `WGxROWS`
//! (for `XLSTM_WGPU_GEMV`). Usage: `wgpu_gemv_sweep [vulkan|metal|dx12|gpu]`.
use xlstm_core::backend::Backend;
use xlstm_core::tensor::{DType, HostTensor};
use xlstm_wgpu::shaders::Knobs;
use xlstm_wgpu::{Api, WgpuBackend};

fn main() {
    let api = match std::env::args().nth(1).as_deref() {
        Some("metal") => Api::Metal,
        Some("dx12") => Api::Dx12,
        Some("gpu") => Api::Any,
        _ => Api::Vulkan,
    };
    // q/k (2048×4096), v/o (4096×4096), up (10944×4096), down (4096×10944)
    let shapes = [(2048usize, 4096usize), (4096, 4096), (10944, 4096), (4096, 10944)];
    let mats: Vec<HostTensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(n, k))| HostTensor::f32(vec![n, k], (0..n * k).map(|j| ((j * 2654435761 + i) % 1000) as f32 * 1e-3 - 0.5).collect()))
        .collect();
    let mut best = (0.0f64, String::new());
    for (wg, rows) in [(64, 2), (64, 4), (128, 2), (128, 4), (128, 8), (256, 4), (256, 8), (32, 4)] {
        let mut knobs = Knobs::for_adapter(false);
        knobs.gemv_wg = wg;
        knobs.gemv_rows = rows;
        let b = match WgpuBackend::with_options(api, true, Some(knobs)) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        let ms: Vec<_> = mats.iter().map(|t| b.matrix(t.clone(), DType::BF16).unwrap()).collect();
        let x = b.upload(&vec![0.01f32; 10944]).unwrap();
        let mut out = b.zeros(10944).unwrap();
        let bytes: usize = shapes.iter().map(|(n, k)| n * k * 2).sum();
        let reps = 40;
        let mut t_best = f64::MAX;
        for round in 0..3 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for m in &ms {
                    b.matmul(&x, 1, m, &mut out).unwrap();
                }
            }
            b.sync().unwrap();
            if round > 0 {
                t_best = t_best.min(t.elapsed().as_secs_f64());
            }
        }
        let gbs = (bytes * reps) as f64 / t_best / 1e9;
        println!("gemv {wg}x{rows}: {:.1} µs per 4-matrix set, {gbs:.0} GB/s ({})", t_best / reps as f64 * 1e6, b.name());
        if gbs > best.0 {
            best = (gbs, format!("{wg}x{rows}"));
        }
    }
    println!("{}", best.1);
}
