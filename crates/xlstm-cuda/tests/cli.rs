//! The `xlstm` binary with `--device cuda`: its logits match `--device cpu` (with a GPU), and without
//! a usable GPU it fails with a clear message instead of panicking or falling back to the CPU.
//! The binary is the workspace's `target/<profile>/xlstm` (built by `cargo test --workspace`) or
//! `$XLSTM_BIN`; without it the tests print SKIP.
use std::path::PathBuf;
use std::process::Command;

fn xlstm_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("XLSTM_BIN") {
        return Some(PathBuf::from(p));
    }
    // tests run from target/<profile>/deps/
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("xlstm");
    p.exists().then_some(p)
}

fn logits(bin: &PathBuf, device: &str, mode: &str, out: &std::path::Path) -> Vec<f32> {
    let data = std::env::var("XLSTM_TEST_DATA").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data"));
    let case = data.join("large_tiny");
    let o = Command::new(bin)
        .args(["logits", "--model", case.to_str().unwrap(), "--dtype", "f32", "--tokens", "0,5,17,42,7,99,3,1,64,12,250,31,8,77,5,5,19,101,44,2", "--mode", mode, "--device", device, "--out"])
        .arg(out)
        .output()
        .expect("runs xlstm");
    assert!(o.status.success(), "xlstm logits --device {device} failed: {}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("logits").unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn logits_cuda_match_cpu() {
    let Some(bin) = xlstm_bin() else {
        eprintln!("SKIP logits_cuda_match_cpu: no xlstm binary (set XLSTM_BIN)");
        return;
    };
    if let Err(e) = xlstm_cuda::probe() {
        eprintln!("SKIP logits_cuda_match_cpu: no usable CUDA device: {e}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for mode in ["parallel", "step"] {
        let cpu = logits(&bin, "cpu", mode, &dir.path().join("cpu.safetensors"));
        let gpu = logits(&bin, "cuda", mode, &dir.path().join("gpu.safetensors"));
        let num: f64 = cpu.iter().zip(&gpu).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        let den: f64 = cpu.iter().map(|a| (*a as f64).powi(2)).sum();
        let e = (num / den).sqrt();
        eprintln!("logits --mode {mode}: cuda vs cpu rel err {e:.2e}");
        assert!(e < 1e-4, "--mode {mode}: cuda vs cpu rel err {e:e}");
    }
}

#[test]
fn no_gpu_is_a_clear_error() {
    let Some(bin) = xlstm_bin() else {
        eprintln!("SKIP no_gpu_is_a_clear_error: no xlstm binary (set XLSTM_BIN)");
        return;
    };
    if xlstm_cuda::probe().is_ok() {
        eprintln!("SKIP no_gpu_is_a_clear_error: this machine has a usable GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(&bin).args(["logits", "--tokens", "1,2,3", "--device", "cuda", "--out"]).arg(dir.path().join("x.safetensors")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "exit code 1 expected, stderr: {err}");
    assert!(err.contains("CUDA is not usable here"), "stderr names the problem: {err}");
    assert!(!err.contains("panicked"), "no panic: {err}");
    // auto falls back to the CPU and says nothing about CUDA being used
    let o = Command::new(&bin).args(["logits", "--tokens", "1,2,3", "--device", "auto", "--out"]).arg(dir.path().join("y.safetensors")).output().unwrap();
    assert!(o.status.success(), "--device auto runs on the CPU: {}", String::from_utf8_lossy(&o.stderr));
}
