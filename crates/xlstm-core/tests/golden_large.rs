//! xlstm-large against the reference (Hugging Face transformers `xLSTMForCausalLM`), on the golden
//! cases in tests/data: logits within 1e-4 relative (Frobenius) of the float64 reference, states
//! after the prompt within 1e-4, greedy continuation identical.
mod common;

use common::*;
use xlstm_core::state::LayerState;
use xlstm_core::{CpuBackend, DType, LogitRows, MlstmKernel, Model};

const TOL: f64 = 1e-4;

fn load(case: &str) -> Model<CpuBackend> {
    Model::load(CpuBackend::new(), &case_dir(case), DType::F32).expect("golden case loads")
}

fn check_parallel_and_state(case: &str) {
    let exp = Expected::load(case);
    let mut model = load(case);
    let chunk = model.chunk_size;
    let kernel = MlstmKernel::Chunkwise { chunk };
    let (_, err, st) = golden_prefill(&mut model, case, kernel);
    assert!(err < TOL, "{case}: chunkwise logits rel err {err:e}");
    check_state(&exp, case, &st.layers);
    // the last row's logits alone, or none: the last block pruned, the same logits and state
    for logits in [LogitRows::Last, LogitRows::None] {
        let (err, st) = golden_prefill_pruned(&mut model, case, kernel, logits);
        assert!(err < TOL, "{case}: {logits:?} logits rel err {err:e}");
        check_state(&exp, case, &st.layers);
    }
}

fn check_state(exp: &Expected, case: &str, layers: &[LayerState<Vec<f32>>]) {
    for (li, layer) in layers.iter().enumerate() {
        let LayerState::Mlstm { cell, .. } = layer else { panic!() };
        for (name, buf) in [("C", &cell.c), ("n", &cell.n), ("m", &cell.m)] {
            let want = exp.f64(&format!("state_{li}_{name}"));
            let e = rel_err(buf, &want);
            assert!(e < TOL, "{case}: state_{li}_{name} rel err {e:e}");
        }
    }
}

fn check_step(case: &str) {
    let (_, err) = golden_steps(&mut load(case), case);
    assert!(err < TOL, "{case}: step logits rel err {err:e}");
}

fn check_greedy(case: &str) {
    let mut model = load(case);
    let chunk = model.chunk_size;
    assert_greedy_matches(&mut model, case, chunk);
}

#[test]
fn large_tiny_parallel_logits_and_state() {
    check_parallel_and_state("large_tiny");
}
#[test]
fn large_tiny_step_logits() {
    check_step("large_tiny");
}
#[test]
fn large_tiny_greedy() {
    check_greedy("large_tiny");
}
#[test]
fn large_tiny_bf16_sharded_parallel_logits_and_state() {
    check_parallel_and_state("large_tiny_bf16_sharded");
}
#[test]
fn large_tiny_bf16_sharded_step_logits() {
    check_step("large_tiny_bf16_sharded");
}
#[test]
fn large_tiny_bf16_sharded_greedy() {
    check_greedy("large_tiny_bf16_sharded");
}

/// Weights kept in bf16 (the CPU backend's 16-bit path) stay close to the f32 reference.
#[test]
fn large_tiny_bf16_compute_dtype_close() {
    let mut model = Model::load(CpuBackend::new(), &case_dir("large_tiny"), DType::BF16).unwrap();
    let (_, err, _) = golden_prefill(&mut model, "large_tiny", MlstmKernel::Chunkwise { chunk: 16 });
    assert!(err < 3e-2, "bf16 weights: rel err {err:e} (a bf16 model should land within a few 1e-2)");
}

/// The sequence kernel (a loop of steps) agrees with the reference too.
#[test]
fn large_tiny_sequence_kernel() {
    let mut model = load("large_tiny");
    let (_, err, _) = golden_prefill(&mut model, "large_tiny", MlstmKernel::Sequence);
    assert!(err < TOL, "sequence kernel rel err {err:e}");
}

/// Short prefill segments (the prompt fed in several passes, state carried) give the reference's
/// logits and state too; a segment is rounded to whole chunks.
#[test]
fn large_tiny_short_prefill_segments() {
    for segment in [1usize, 16, 40] {
        let mut model = load("large_tiny");
        model.prefill_segment = segment;
        let (_, err, _) = golden_prefill(&mut model, "large_tiny", MlstmKernel::Chunkwise { chunk: 8 });
        assert!(err < TOL, "segment {segment}: logits rel err {err:e}");
        assert!(model.segments.len() > 1, "segment {segment}: the prompt took {} passes", model.segments.len());
        assert!(model.segments.iter().all(|s| s.tokens <= segment.max(8)), "segment {segment}: {:?}", model.segments);
    }
}
