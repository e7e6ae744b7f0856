//! The golden cases of tests/data through the wgpu backend (on lavapipe in CI, on a GPU elsewhere):
//! the same bounds as the CPU backend's golden tests (crates/xlstm-core/tests/golden_*.rs): logits
//! within 1e-4 relative (Frobenius) of the float64 reference, states within 1e-4, greedy
//! continuations identical.
mod common;

use common::*;
use xlstm_core::model::LogitRows;
use xlstm_core::state::LayerState;
use xlstm_core::{Backend, DType, MlstmKernel, Model};
use xlstm_wgpu::shaders::Knobs;
use xlstm_wgpu::{Api, WgpuBackend};

const TOL: f64 = 1e-4;

fn load(case: &str, dtype: DType) -> Option<Model<WgpuBackend>> {
    backend()?;
    Some(Model::load(WgpuBackend::new(Api::Any).unwrap(), &case_dir(case), dtype).expect("golden case loads"))
}

/// As [`load`], on a backend that passes kernel parameters through the uniform arena even where
/// the adapter has immediate data (the path of adapters without it).
fn load_uniform(case: &str) -> Option<Model<WgpuBackend>> {
    let cpu = backend()?.adapter_info().device_type == wgpu::DeviceType::Cpu;
    let knobs = Knobs { immediates: false, ..Knobs::for_adapter(cpu).with_env() };
    let b = WgpuBackend::with_options(Api::Any, true, Some(knobs)).unwrap();
    assert!(!b.name().contains("immediates"), "{}", b.name());
    Some(Model::load(b, &case_dir(case), DType::F32).expect("golden case loads"))
}

fn parallel(case: &str, kernel: Option<MlstmKernel>, check_state: bool) {
    let Some(mut model) = load(case, DType::F32) else { return };
    let exp = Expected::load(case);
    let ids = exp.ids("input_ids");
    let kernel = kernel.unwrap_or(MlstmKernel::Chunkwise { chunk: model.chunk_size });
    let mut st = model.new_state(1).unwrap();
    let logits = model.prefill(&ids, &mut st, kernel, LogitRows::All).unwrap();
    let err = rel_err(&logits, &exp.f64("logits_f64"));
    eprintln!("{case} {kernel:?}: rel err {err:.3e} on {}", model.backend.name());
    assert!(err < TOL, "{case} {kernel:?}: logits rel err {err:e}");
    // the last row's logits alone: the prompt's last block pruned to that row
    let (err, _) = golden_prefill_pruned(&mut model, case, kernel, LogitRows::Last);
    assert!(err < TOL, "{case} {kernel:?}, last row only: logits rel err {err:e}");
    if check_state {
        for (li, layer) in st.layers.iter().enumerate() {
            let LayerState::Mlstm { cell, .. } = layer else { panic!("xlstm-large holds mLSTM layers") };
            for (name, buf) in [("C", &cell.c), ("n", &cell.n), ("m", &cell.m)] {
                let want = exp.f64(&format!("state_{li}_{name}"));
                let got = model.backend.download(buf, want.len()).unwrap();
                let e = rel_err(&got, &want);
                assert!(e < TOL, "{case}: state_{li}_{name} rel err {e:e}");
            }
        }
    }
}

fn step(case: &str) {
    let Some(model) = load(case, DType::F32) else { return };
    step_on(model, case);
}

fn step_on(mut model: Model<WgpuBackend>, case: &str) {
    let (_, err) = golden_steps(&mut model, case);
    eprintln!("{case} step: rel err {err:.3e}");
    assert!(err < TOL, "{case}: step logits rel err {err:e}");
}

fn greedy(case: &str, chunk: Option<usize>) {
    let Some(mut model) = load(case, DType::F32) else { return };
    let chunk = chunk.unwrap_or(model.chunk_size);
    assert_greedy_matches(&mut model, case, chunk);
}

#[test]
fn large_tiny_parallel_logits_and_state() {
    parallel("large_tiny", None, true);
}
#[test]
fn large_tiny_sequence_kernel() {
    parallel("large_tiny", Some(MlstmKernel::Sequence), false);
}
#[test]
fn large_tiny_step_logits() {
    step("large_tiny");
}
#[test]
fn steps_with_parameters_in_the_uniform_arena() {
    for case in ["large_tiny", "lm_tiny"] {
        let Some(model) = load_uniform(case) else { return };
        step_on(model, case);
    }
}
#[test]
fn large_tiny_greedy() {
    greedy("large_tiny", None);
}
#[test]
fn large_tiny_bf16_sharded_parallel_logits_and_state() {
    parallel("large_tiny_bf16_sharded", None, true);
}
#[test]
fn large_tiny_bf16_sharded_step_logits() {
    step("large_tiny_bf16_sharded");
}
#[test]
fn large_tiny_bf16_sharded_greedy() {
    greedy("large_tiny_bf16_sharded", None);
}
/// Greedy decoding with the chosen token kept on the device, each step recorded before the previous
/// token is read back: the reference continuation and the same state as stepping from the host.
#[test]
fn pipelined_greedy() {
    for case in ["large_tiny", "large_tiny_bf16_sharded"] {
        let Some(mut model) = load(case, DType::F32) else { return };
        let chunk = model.chunk_size;
        xlstm_core::testing::assert_pipelined_greedy_matches(&mut model, case, chunk);
    }
}

/// Weights kept in bf16 on the device (packed pairs widened in the shaders) stay close to the f32
/// reference, as the CPU backend's bf16 path does.
#[test]
fn large_tiny_bf16_weights_close() {
    let Some(mut model) = load("large_tiny", DType::BF16) else { return };
    let (_, err, _) = golden_prefill(&mut model, "large_tiny", MlstmKernel::Chunkwise { chunk: 16 });
    assert!(err < 3e-2, "bf16 weights: rel err {err:e}");
}

#[test]
fn lm_tiny_parallel_logits() {
    for kernel in [None, Some(MlstmKernel::Chunkwise { chunk: 16 }), Some(MlstmKernel::Sequence)] {
        parallel("lm_tiny", kernel, false);
    }
}
#[test]
fn lm_tiny_step_logits() {
    step("lm_tiny");
}
#[test]
fn lm_tiny_greedy() {
    greedy("lm_tiny", Some(4));
}

/// A decode step is one submission (everything from the embedding to the logits' read-back), or
/// one per `submit_every` dispatches where the backend submits early (the GPU default; see the
/// ramp below).
#[test]
fn decode_step_is_one_submission() {
    let Some(mut model) = load("large_tiny", DType::F32) else { return };
    let mut st = model.new_state(1).unwrap();
    model.step(&[1], &mut st).unwrap();
    let (s0, d0) = model.backend.counters();
    model.step(&[2], &mut st).unwrap();
    let (s1, d1) = model.backend.counters();
    eprintln!("one decode step: {} submission(s), {} dispatches", s1 - s0, d1 - d0);
    // The first submission of the step after `submit_first` dispatches, then every N (growing
    // from 2·first by doubling with the ramp on), one for the read-back, one of slack; else one.
    let (every, ramp) = (model.backend.submit_every(), model.backend.submit_ramp());
    let (mut left, mut size, mut want) = (d1 - d0, model.backend.submit_first(), 2);
    while every > 0 && left >= size {
        left -= size;
        want += 1;
        size = if ramp { (size * 2).min(every) } else { every };
    }
    assert!(s1 - s0 <= want, "a decode step should be recorded into {want} command buffer(s), took {}", s1 - s0);
}
