//! Helpers for the golden-case tests of every backend: where the cases live, reading their expected
//! outputs, and the relative-error measure the bounds are stated in. Shipped in the library so the
//! CPU, CUDA and wgpu test suites share one copy.
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};

/// `tests/data/NAME` of this workspace; `XLSTM_TEST_DATA` points elsewhere (a test binary run away
/// from its checkout, e.g. on the GPU machine).
pub fn case_dir(name: &str) -> PathBuf {
    match std::env::var("XLSTM_TEST_DATA") {
        Ok(d) if !d.is_empty() => PathBuf::from(d).join(name),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(name),
    }
}

/// A case's `expected.safetensors`.
pub struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    /// Panics (these are test helpers) when the case is missing.
    pub fn load(case: &str) -> Self {
        let path = case_dir(case).join("expected.safetensors");
        Expected { bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("a valid expected.safetensors")
    }
    pub fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }
    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.st().tensor(name).unwrap_or_else(|_| panic!("missing {name}")).shape().to_vec()
    }
    /// Any float tensor as f64.
    pub fn f64(&self, name: &str) -> Vec<f64> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
        match t.dtype() {
            Dtype::F64 => t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect(),
            Dtype::F32 => t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64).collect(),
            d => panic!("{name}: unexpected dtype {d:?}"),
        }
    }
    /// An i64 id tensor as u32 token ids.
    pub fn ids(&self, name: &str) -> Vec<u32> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("missing {name}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name} holds token ids");
        t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as u32).collect()
    }
}

/// Relative Frobenius error ‖a − b‖ / ‖b‖ (the absolute error when b is all zeros); a result
/// with a non-finite value fails outright.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    assert!(a.iter().all(|v| v.is_finite()), "non-finite value in the result");
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

pub fn rel_err32(a: &[f32], b: &[f32]) -> f64 {
    rel_err(a, &b.iter().map(|&x| x as f64).collect::<Vec<_>>())
}

pub use crate::sampling::argmax;

/// `case`'s prompt (`input_ids`) prefilled from a fresh state with `kernel`: every position's
/// logits, their relative error against the reference's `logits_f64`, and the state after it.
pub fn golden_prefill<B: crate::Backend>(model: &mut crate::Model<B>, case: &str, kernel: crate::MlstmKernel) -> (Vec<f32>, f64, crate::State<B>) {
    let exp = Expected::load(case);
    let mut st = model.new_state(1).expect("state");
    let logits = model.prefill(&exp.ids("input_ids"), &mut st, kernel, crate::LogitRows::All).expect("prefill");
    let err = rel_err(&logits, &exp.f64("logits_f64"));
    (logits, err, st)
}

/// `case`'s prompt prefilled from a fresh state asking for the last row's logits only
/// (`LogitRows::Last`) or for none (`LogitRows::None`), where a model may skip its last block's work
/// for the other rows: the relative error of what came back against the reference's last row (none
/// asked: panics unless nothing came back, and gives 0), and the state after it.
pub fn golden_prefill_pruned<B: crate::Backend>(model: &mut crate::Model<B>, case: &str, kernel: crate::MlstmKernel, logits: crate::LogitRows) -> (f64, crate::State<B>) {
    let exp = Expected::load(case);
    let mut st = model.new_state(1).expect("state");
    let got = model.prefill(&exp.ids("input_ids"), &mut st, kernel, logits).expect("prefill");
    let err = match logits {
        crate::LogitRows::None => {
            assert!(got.is_empty(), "{case}: logits came back though none were asked");
            0.0
        }
        _ => {
            let want = exp.f64("logits_f64");
            rel_err(&got, &want[want.len() - model.vocab_size()..])
        }
    };
    (err, st)
}

/// `case`'s prompt run token by token with recurrent steps from a fresh state: every step's
/// logits and their relative error against the reference's `logits_f64`.
pub fn golden_steps<B: crate::Backend>(model: &mut crate::Model<B>, case: &str) -> (Vec<f32>, f64) {
    let exp = Expected::load(case);
    let mut st = model.new_state(1).expect("state");
    let mut logits = Vec::new();
    for t in exp.ids("input_ids") {
        logits.extend(model.step(&[t], &mut st).expect("step"));
    }
    let err = rel_err(&logits, &exp.f64("logits_f64"));
    (logits, err)
}

/// Checks a model against a case's `gen_greedy`: the prompt `gen_prompt` prefilled chunkwise with
/// `chunk`, then one argmax token per recurrent step. Panics with the case name on a difference.
pub fn assert_greedy_matches<B: crate::Backend>(model: &mut crate::Model<B>, case: &str, chunk: usize) {
    let exp = Expected::load(case);
    let prompt = exp.ids("gen_prompt");
    let want = exp.ids("gen_greedy");
    let mut st = model.new_state(1).expect("state");
    let kernel = crate::MlstmKernel::Chunkwise { chunk };
    let mut logits = model.prefill(&prompt, &mut st, kernel, crate::LogitRows::Last).expect("prefill");
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let t = argmax(&logits);
        got.push(t);
        logits = model.step(&[t], &mut st).expect("step");
    }
    assert_eq!(got, want, "{case}: greedy continuation differs from the reference");
}

/// Greedy decoding with the chosen token kept on the device (`Model::pipe_step`: each step recorded
/// before the previous token is read back) gives the case's reference continuation, and leaves the
/// same state as stepping every token but the last from the host.
pub fn assert_pipelined_greedy_matches<B: crate::Backend>(model: &mut crate::Model<B>, case: &str, chunk: usize) {
    let exp = Expected::load(case);
    let prompt = exp.ids("gen_prompt");
    let want = exp.ids("gen_greedy");
    assert!(want.len() >= 2, "{case}: too short a reference continuation");
    assert!(model.can_pipe_greedy(), "{case}: no greedy decoding on the device here");
    let kernel = crate::MlstmKernel::Chunkwise { chunk };
    let mut st = model.new_state(1).expect("state");
    let first = argmax(&model.prefill(&prompt, &mut st, kernel, crate::LogitRows::Last).expect("prefill"));
    let mut got = vec![first];
    let mut ticket = model.pipe_step(Some(first), &mut st).expect("pipe_step");
    loop {
        let ahead = if got.len() + 1 < want.len() { Some(model.pipe_step(None, &mut st).expect("pipe_step")) } else { None };
        got.push(model.pipe_token(ticket).expect("pipe_token"));
        match ahead {
            Some(a) => ticket = a,
            None => break,
        }
    }
    assert_eq!(got, want, "{case}: pipelined greedy continuation differs from the reference");
    let mut host = model.new_state(1).expect("state");
    model.prefill(&prompt, &mut host, kernel, crate::LogitRows::Last).expect("prefill");
    for &t in &want[..want.len() - 1] {
        model.step_top_k(&[t], &mut host, 1).expect("step");
    }
    assert_eq!(st.position, host.position, "{case}: steps run");
    // C alone (deferred updates folded in) on both sides
    st.settle(&model.backend).expect("settle");
    host.settle(&model.backend).expect("settle");
    for (li, (a, b)) in st.layers.iter().zip(&host.layers).enumerate() {
        for ((name, shape, x, dt), (_, _, y, _)) in a.tensors(1).into_iter().zip(b.tensors(1)) {
            let n = shape.iter().product();
            let get = |buf| crate::state::download_values(&model.backend, buf, n, dt).expect("download");
            let (x, y) = (get(x), get(y));
            let err = rel_err32(&x, &y);
            assert!(err < 1e-5, "{case}: layer {li} state {name} after pipelined greedy: rel err {err:e}");
        }
    }
}
