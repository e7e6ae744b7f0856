//! The `xlstm` binary as a user runs it: real commands, real files, and bad input that must end in a
//! one-line error and a non-zero exit, never a panic.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn xlstm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xlstm")).args(args).env_remove("XLSTM_MODEL").env_remove("XLSTM_DEVICE").output().expect("runs")
}

fn data(case: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data").join(case).to_string_lossy().into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails the way a user sees it: non-zero, one `error:` line naming the problem, no panic.
fn assert_clean_error(o: &Output, needle: &str) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {e}");
    assert!(!e.contains("panicked") && !e.contains("RUST_BACKTRACE"), "panic instead of an error: {e}");
    assert!(e.contains(needle), "error should mention `{needle}`: {e}");
    assert_eq!(e.lines().filter(|l| l.starts_with("error:")).count(), 1, "one error line: {e}");
}

fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
}

fn expected_f64(case: &str, name: &str) -> Vec<f64> {
    let bytes = std::fs::read(Path::new(&data(case)).join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::F64 => t.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
        safetensors::Dtype::I64 => t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
        d => panic!("{d:?}"),
    }
}

fn rel(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    (num / b.iter().map(|y| y * y).sum::<f64>()).sqrt()
}

#[test]
fn logits_command_matches_the_reference_in_both_modes() {
    let tmp = tempfile::tempdir().unwrap();
    for case in ["large_tiny", "large_tiny_bf16_sharded", "lm_tiny"] {
        let ids: Vec<String> = expected_f64(case, "input_ids").iter().map(|&x| (x as i64).to_string()).collect();
        let want = expected_f64(case, "logits_f64");
        for mode in ["parallel", "step"] {
            let out = tmp.path().join(format!("{case}-{mode}.safetensors"));
            let o = xlstm(&["logits", "--model", &data(case), "--tokens", &ids.join(","), "--mode", mode, "--out", out.to_str().unwrap()]);
            assert!(o.status.success(), "{}", stderr(&o));
            let (shape, logits) = read_logits(&out);
            assert_eq!(shape, vec![ids.len(), 512]);
            let e = rel(&logits, &want);
            assert!(e < 1e-4, "{case} {mode}: rel err {e:e}");
        }
    }
}

#[test]
fn generate_runs_the_builtin_default_model() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = tmp.path().join("stats.json");
    let o = xlstm(&["generate", "--prompt", "Hello", "--max-new-tokens", "12", "--layers", "2", "--model-dim", "128", "--heads", "2", "--stats-json", stats.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("RANDOM weights"), "must say the weights are random: {e}");
    assert!(e.contains("prefill") && e.contains("decode") && e.contains("ttft"), "stats line: {e}");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(s["prompt_tokens"], 5);
    assert_eq!(s["generated_tokens"], 12);
    assert!(s["decode_tok_s"].as_f64().unwrap() > 0.0);
    // the state: 2 layers × 2 heads × (C 32×64, n 32, m 1) f32 values
    assert_eq!(s["state_dtype"], "f32");
    let want_mb = (2 * 2 * (32 * 64 + 32 + 1) * 4) as f64 / 1e6;
    assert!((s["state_mb"].as_f64().unwrap() - want_mb).abs() < 1e-9, "state_mb {} against {want_mb}", s["state_mb"]);
    assert!(e.contains("state 0.0 MB (f32)"), "stats line names the state: {e}");
}

#[test]
fn builtin_default_with_slstm_blocks_is_an_xlstm_lm_model() {
    let o = xlstm(&["generate", "--prompt", "Hi", "--max-new-tokens", "6", "--layers", "4", "--model-dim", "128", "--heads", "4", "--slstm-at", "1,3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("xlstm-lm"), "{}", stderr(&o));
    let o = xlstm(&["generate", "--prompt", "Hi", "--layers", "2", "--model-dim", "128", "--heads", "2", "--slstm-at", "5"]);
    assert_clean_error(&o, "--slstm-at");
}

#[test]
fn generate_is_reproducible_with_a_seed_and_greedy_matches_reference() {
    let args = ["generate", "--prompt", "abc", "--max-new-tokens", "8", "--layers", "2", "--model-dim", "128", "--heads", "2", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "5"];
    let a = xlstm(&args);
    let b = xlstm(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout, "same seed, same text");
}

#[test]
fn bench_prints_json_with_floor_and_ratio() {
    let o = xlstm(&["bench", "--config", "tiny", "--prompt-len", "40", "--gen-len", "4", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for key in ["prefill", "decode", "bandwidth", "decode_floor_ms_per_step", "decode_ratio_to_floor", "decode_read_floor_ms_per_step", "decode_ratio_to_read_floor", "decode_floor_with_state_ms_per_step", "decode_ratio_to_floor_with_state"] {
        assert!(!v[key].is_null(), "missing {key} in {v}");
    }
    assert!(v["decode"]["tok_s"].as_f64().unwrap() > 0.0);
    assert!(v["bandwidth"]["copy_gb_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_read_floor_ms_per_step"].as_f64().unwrap() > 0.0);
    // the tiny shape's state (2 layers, 2 heads of DK 32 × DV 64: C, n, m per head), f32, read and
    // written once per step
    assert_eq!(v["decode"]["state_bytes_per_step"].as_u64().unwrap(), 2 * 4 * 2 * 2 * (32 * 64 + 32 + 1));
    assert_eq!(v["state_dtype"], "f32");
    assert!(v["decode_floor_with_state_ms_per_step"].as_f64().unwrap() > v["decode_floor_ms_per_step"].as_f64().unwrap());
}

#[test]
fn bench_rests_before_each_timed_prefill_when_asked() {
    let args = ["bench", "--config", "tiny", "--prompt-len", "16", "--gen-len", "2", "--prefill-reps", "2", "--json"];
    let t = std::time::Instant::now();
    let o = xlstm(&args);
    let plain = t.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["prefill"]["rest_ms"], 0, "back to back by default");
    let t = std::time::Instant::now();
    let o = xlstm(&[&args[..], &["--prefill-rest-ms", "1500"]].concat());
    let rested = t.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    // two timed prefills, each after 1.5 s idle (the warm-up one without): 3 s more in all
    assert!(rested >= plain + std::time::Duration::from_secs(2), "{rested:?} with the rests against {plain:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["prefill"]["rest_ms"], 1500);
    assert!(v["prefill"]["ms"].as_f64().unwrap() < 1500.0, "the rest is not timed: {}", v["prefill"]);
}

#[test]
fn inspect_reports_parameters_and_dtypes() {
    let o = xlstm(&["inspect", "--model", &data("large_tiny_bf16_sharded"), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["family"], "xlstm-large");
    assert_eq!(v["shards"], 2);
    assert!(v["stored_dtypes"]["BF16"].as_u64().unwrap() > 0);
    let cfg: xlstm_core::config::LargeConfig = serde_json::from_value(v["config"].clone()).unwrap();
    assert_eq!(v["parameters"].as_u64().unwrap() as usize, cfg.num_params());
}

/// Copies a golden case so a test can damage it.
fn scratch_case(case: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(data(case)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

#[test]
fn bad_input_is_a_clear_error() {
    let tiny = data("large_tiny");
    let o = xlstm(&["logits", "--model", "/no/such/dir", "--tokens", "1", "--out", "/tmp/x"]);
    assert_clean_error(&o, "no such model directory");
    let o = xlstm(&["logits", "--model", &tiny, "--tokens", "1,99999", "--out", "/tmp/x"]);
    assert_clean_error(&o, "out of range");
    let o = xlstm(&["logits", "--model", &tiny, "--tokens", "1,x", "--out", "/tmp/x"]);
    assert_clean_error(&o, "not a token id");
    let o = xlstm(&["generate", "--model", &tiny, "--prompt", ""]);
    assert_clean_error(&o, "empty");
    let o = xlstm(&["generate", "--model", &tiny, "--prompt", "hello", "--device", "cuda"]);
    assert_clean_error(&o, "cuda");
    let o = xlstm(&["generate", "--model", &tiny, "--prompt", "hello there", "--max-prompt-tokens", "3"]);
    assert_clean_error(&o, "longer than");
    let o = xlstm(&["generate", "--model", &tiny, "--prompt", "hi", "--top-p", "0"]);
    assert_clean_error(&o, "top-p");
    // a bf16 state where the device keeps f32 only, and a state dtype that does not exist
    let o = xlstm(&["generate", "--model", &tiny, "--prompt", "hi", "--state-dtype", "bf16"]);
    assert_clean_error(&o, "state dtype bf16 is not available on cpu");
    let o = xlstm(&["bench", "--config", "tiny", "--state-dtype", "f8"]);
    assert_clean_error(&o, "unknown --state-dtype `f8`");

    // truncated weights
    let d = scratch_case("large_tiny");
    let w = d.path().join("model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&w).unwrap().set_len(len / 2).unwrap();
    let o = xlstm(&["logits", "--model", d.path().to_str().unwrap(), "--tokens", "1", "--out", "/tmp/x"]);
    assert_clean_error(&o, "model.safetensors");

    // garbage weights
    std::fs::write(&w, b"not a safetensors file at all").unwrap();
    let o = xlstm(&["inspect", "--model", d.path().to_str().unwrap()]);
    assert_clean_error(&o, "not a valid safetensors");

    // missing weights file
    std::fs::remove_file(&w).unwrap();
    let o = xlstm(&["logits", "--model", d.path().to_str().unwrap(), "--tokens", "1", "--out", "/tmp/x"]);
    assert_clean_error(&o, "neither model.safetensors");

    // config that does not match the weights (shape mismatch)
    let d = scratch_case("large_tiny");
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap().replace("\"vocab_size\": 512", "\"vocab_size\": 500");
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    let o = xlstm(&["logits", "--model", d.path().to_str().unwrap(), "--tokens", "1", "--out", "/tmp/x"]);
    assert_clean_error(&o, "shape");

    // unknown model type / unknown config field
    let d = scratch_case("large_tiny");
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(d.path().join("config.json"), cfg.replace("\"model_type\": \"xlstm\"", "\"model_type\": \"llama\"")).unwrap();
    let o = xlstm(&["logits", "--model", d.path().to_str().unwrap(), "--tokens", "1", "--out", "/tmp/x"]);
    assert_clean_error(&o, "unknown model_type");
    std::fs::write(d.path().join("config.json"), cfg.replace("\"use_bias\": false", "\"use_bias\": false, \"frobnicate\": 3")).unwrap();
    let o = xlstm(&["logits", "--model", d.path().to_str().unwrap(), "--tokens", "1", "--out", "/tmp/x"]);
    assert_clean_error(&o, "frobnicate");

    // missing shard of a sharded checkpoint
    let d = scratch_case("large_tiny_bf16_sharded");
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    let o = xlstm(&["logits", "--model", d.path().to_str().unwrap(), "--tokens", "1", "--out", "/tmp/x"]);
    assert_clean_error(&o, "missing");
}

fn xlstm_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xlstm"));
    c.args(args).env_remove("XLSTM_MODEL").env_remove("XLSTM_DEVICE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("runs")
}

/// Soft limit: warns, halves the chunk down to the minimum, and the logits stay equal.
#[test]
fn soft_memory_limit_warns_and_shrinks_without_changing_results() {
    let tmp = tempfile::tempdir().unwrap();
    let ids: Vec<String> = expected_f64("large_tiny", "input_ids").iter().map(|&x| (x as i64).to_string()).collect();
    let plain = tmp.path().join("plain.safetensors");
    let shrunk = tmp.path().join("shrunk.safetensors");
    let o = xlstm(&["logits", "--model", &data("large_tiny"), "--tokens", &ids.join(","), "--out", plain.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = xlstm_env(&["logits", "--model", &data("large_tiny"), "--tokens", &ids.join(","), "--out", shrunk.to_str().unwrap(), "--min-chunk", "4"], &[("XLSTM_MEM_SOFT_MB", "1")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: soft memory limit reached"), "{}", stderr(&o));
    let (_, a) = read_logits(&plain);
    let (_, b) = read_logits(&shrunk);
    let e = rel(&b, &a.iter().map(|&x| x as f64).collect::<Vec<_>>());
    assert!(e < 1e-5, "shrinking changed the logits: {e:e}");

    // generate reports each halving, 64 → 32 → 16 → 8 (the minimum), in its stats
    let stats = tmp.path().join("stats.json");
    let long = "abcd ".repeat(80);
    let o = xlstm_env(&["generate", "--prompt", &long, "--max-new-tokens", "2", "--layers", "2", "--model-dim", "128", "--heads", "2", "--stats-json", stats.to_str().unwrap()], &[("XLSTM_MEM_SOFT_MB", "1")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let ev: Vec<String> = s["memory_events"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_string()).collect();
    assert!(ev.iter().any(|e| e.starts_with("prefill chunk 64 -> 32")), "{ev:?}");
    assert!(ev.iter().any(|e| e.starts_with("prefill chunk 16 -> 8")), "{ev:?}");
    assert!(!ev.iter().any(|e| e.starts_with("prefill chunk 8 ->")), "never below the minimum: {ev:?}");

    assert!(ev.iter().any(|e| e.starts_with("released cached buffers")), "empty_cache ran: {ev:?}");

    // only empty_cache: buffers released, chunk untouched
    let o = xlstm_env(&["generate", "--prompt", &long, "--max-new-tokens", "2", "--layers", "2", "--model-dim", "128", "--heads", "2", "--mem-action", "empty_cache", "--stats-json", stats.to_str().unwrap()], &[("XLSTM_MEM_SOFT_MB", "1")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning:"), "warn not listed: {}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let ev: Vec<&str> = s["memory_events"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert!(ev.len() == 1 && ev[0].starts_with("released cached buffers"), "{ev:?}");

    // shrinking disabled: warning only
    let o = xlstm_env(&["generate", "--prompt", &long, "--max-new-tokens", "2", "--layers", "2", "--model-dim", "128", "--heads", "2", "--no-mem-shrink", "--stats-json", stats.to_str().unwrap()], &[("XLSTM_MEM_SOFT_MB", "1")]);
    assert!(o.status.success() && stderr(&o).contains("warning: soft memory limit"), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert!(s["memory_events"].as_array().unwrap().iter().all(|e| !e.as_str().unwrap().starts_with("prefill chunk")), "{s}");
}

#[test]
fn hard_memory_limit_stops_cleanly() {
    let o = xlstm_env(&["generate", "--prompt", "hello", "--layers", "2", "--model-dim", "128", "--heads", "2"], &[("XLSTM_MEM_HARD_MB", "2")]);
    assert_clean_error(&o, "hard memory limit reached");
    assert!(stderr(&o).contains("XLSTM_MEM_HARD_MB"), "names the knob: {}", stderr(&o));
    // flag beats environment
    let o = xlstm_env(&["generate", "--prompt", "hello", "--max-new-tokens", "2", "--layers", "2", "--model-dim", "128", "--heads", "2", "--mem-hard-mb", "100000"], &[("XLSTM_MEM_HARD_MB", "2")]);
    assert!(o.status.success(), "{}", stderr(&o));
    // watchdog off
    let o = xlstm_env(&["generate", "--prompt", "hello", "--max-new-tokens", "2", "--layers", "2", "--model-dim", "128", "--heads", "2"], &[("XLSTM_MEM_HARD_MB", "2"), ("XLSTM_MEM_WATCHDOG", "0")]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn config_prints_effective_settings_and_sources() {
    let o = xlstm_env(&["config", "--json", "--mem-soft-mb", "500", "--profile", "high-memory"], &[("XLSTM_MEM_SOFT_MB", "100"), ("XLSTM_MEM_POLL_MS", "75")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let get = |k: &str| rows.iter().find(|r| r["key"] == k).unwrap().clone();
    assert_eq!((get("mem_soft_mb")["value"].as_str().unwrap(), get("mem_soft_mb")["source"].as_str().unwrap()), ("500", "flag"));
    assert_eq!((get("mem_poll_ms")["value"].as_str().unwrap(), get("mem_poll_ms")["source"].as_str().unwrap()), ("75", "env"));
    assert_eq!((get("shrink_on_soft")["value"].as_str().unwrap(), get("shrink_on_soft")["source"].as_str().unwrap()), ("0", "profile"));
    assert_eq!(get("min_chunk")["source"], "default");
    let o = xlstm_env(&["config"], &[("XLSTM_MEM_POLL_MS", "5")]);
    assert_clean_error(&o, "XLSTM_MEM_POLL_MS");
}

#[test]
fn stats_log_has_a_row_per_segment_and_token() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log.csv");
    let o = xlstm(&["generate", "--prompt", &"x".repeat(300), "--max-new-tokens", "7", "--layers", "2", "--model-dim", "128", "--heads", "2", "--stats-log", log.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "elapsed_s,kind,tokens,seconds,tok_s,rss_mb,chunk");
    let prefill: Vec<&&str> = lines.iter().filter(|l| l.contains(",prefill,")).collect();
    let decode = lines.iter().filter(|l| l.contains(",decode,")).count();
    assert_eq!(prefill.len(), 1, "300 tokens = one 512-token segment: {text}");
    assert!(prefill[0].contains(",300,"), "{text}");
    assert_eq!(decode, 6, "7 tokens = 6 decode steps after the prefill's token: {text}");
}

/// `--prefill-segment` feeds the prompt in passes of that many tokens (rounded to whole chunks), with
/// the same continuation as one pass; 0 is a clear error.
#[test]
fn prefill_segment_splits_the_prompt_without_changing_the_result() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log.csv");
    let prompt = "y".repeat(100);
    let shape = ["--layers", "2", "--model-dim", "128", "--heads", "2", "--chunk-size", "16"];
    let run = |extra: &[&str]| {
        let mut a = vec!["generate", "--prompt", &prompt, "--max-new-tokens", "6", "--stats-log", log.to_str().unwrap()];
        a.extend(shape);
        a.extend(extra);
        let o = xlstm(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = std::fs::read_to_string(&log).unwrap();
        let segments: Vec<String> = text.lines().filter(|l| l.contains(",prefill,")).map(String::from).collect();
        (String::from_utf8_lossy(&o.stdout).to_string(), segments)
    };
    let (whole, one) = run(&[]);
    assert_eq!(one.len(), 1, "{one:?}");
    let (split, passes) = run(&["--prefill-segment", "40"]);
    assert_eq!(passes.len(), 4, "100 tokens in passes of 32 (40 rounded down to chunks of 16): {passes:?}");
    assert_eq!(whole, split, "the same continuation");
    let o = xlstm(&["generate", "--prompt", "hi", "--max-new-tokens", "1", "--prefill-segment", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--prefill-segment") && stderr(&o).contains("positive"), "{}", stderr(&o));
}

/// `xlstm top` in a real terminal (tmux) watching a real generation; q quits.
#[test]
fn top_monitors_a_running_generation_in_a_terminal() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED: tmux is not installed (.ci/run installs it)");
        return;
    }
    let live = tempfile::tempdir().unwrap();
    let live_dir = live.path().to_str().unwrap().to_string();
    let mut gen = Command::new(env!("CARGO_BIN_EXE_xlstm"))
        .args(["generate", "--prompt", "hello", "--max-new-tokens", "100000", "--layers", "2", "--model-dim", "256", "--heads", "2", "--ignore-eos"])
        .env("XLSTM_LIVE_DIR", &live_dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // the JSON stream sees the process first (no terminal needed)
    let mut seen = false;
    for _ in 0..50 {
        let o = xlstm_env(&["top", "--json-stream", "--count", "1"], &[("XLSTM_LIVE_DIR", &live_dir)]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if v["pid"].as_u64() == Some(gen.id() as u64) && v["generated_tokens"].as_u64().unwrap_or(0) > 0 {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(seen, "the running generation never showed up in `xlstm top --json-stream`");

    let session = format!("xlstm-top-test-{}", std::process::id());
    let cmd = format!("XLSTM_LIVE_DIR={live_dir} {} top --interval-ms 100", env!("CARGO_BIN_EXE_xlstm"));
    let st = Command::new("tmux").args(["new-session", "-d", "-s", &session, "-x", "120", "-y", "32", &cmd]).status().unwrap();
    assert!(st.success());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let screen = String::from_utf8_lossy(&Command::new("tmux").args(["capture-pane", "-p", "-t", &session]).output().unwrap().stdout).into_owned();
    let _ = Command::new("tmux").args(["send-keys", "-t", &session, "p"]).status();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let paused = String::from_utf8_lossy(&Command::new("tmux").args(["capture-pane", "-p", "-t", &session]).output().unwrap().stdout).into_owned();
    let _ = Command::new("tmux").args(["send-keys", "-t", &session, "q"]).status();
    std::thread::sleep(std::time::Duration::from_millis(600));
    let alive = Command::new("tmux").args(["has-session", "-t", &session]).status().map(|s| s.success()).unwrap_or(false);
    if alive {
        let _ = Command::new("tmux").args(["kill-session", "-t", &session]).status();
    }
    let _ = gen.kill();
    let _ = gen.wait();
    assert!(screen.contains("xlstm top") && screen.contains(&format!("pid {}", gen.id())), "{screen}");
    assert!(screen.contains("decode") && screen.contains("tok/s") && screen.contains("process memory") && screen.contains("top processes by memory"), "{screen}");
    assert!(paused.contains("[paused]"), "p pauses: {paused}");
    assert!(!alive, "q quits");
}

/// `xlstm tune` stores the best knobs per device and shape; later runs use them unless told not to.
#[test]
fn tune_stores_settings_that_later_runs_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tuning.json");
    let f = file.to_str().unwrap();
    let shape = ["--layers", "2", "--model-dim", "128", "--heads", "2"];
    let mut args = vec!["tune", "--prompt-len", "64", "--steps", "2"];
    args.extend(shape);
    let o = xlstm_env(&args, &[("XLSTM_TUNING_FILE", f)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let chunk = out["best"]["chunk_size"].as_u64().unwrap();
    let stored: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(stored[out["key"].as_str().unwrap()]["chunk_size"].as_u64(), Some(chunk));

    let chunk_used = |env: &[(&str, &str)]| -> u64 {
        let log = tmp.path().join("log.csv");
        let mut a = vec!["generate", "--prompt", "hello world", "--max-new-tokens", "2", "--stats-log", log.to_str().unwrap()];
        a.extend(shape);
        let mut e = vec![("XLSTM_TUNING_FILE", f)];
        e.extend_from_slice(env);
        let o = xlstm_env(&a, &e);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = std::fs::read_to_string(&log).unwrap();
        text.lines().find(|l| l.contains(",prefill,")).unwrap().rsplit(',').next().unwrap().parse().unwrap()
    };
    assert_eq!(chunk_used(&[]), chunk, "stored tuning applied");
    assert_eq!(chunk_used(&[("XLSTM_USE_BEST", "0")]), 64, "XLSTM_USE_BEST=0 ignores it");
    assert_eq!(chunk_used(&[("XLSTM_CHUNK_SIZE", "8")]), 8, "the environment beats the tuning");
}

/// The side-by-side scripts run only on a GPU machine; here they must at least parse, so that a
/// syntax error cannot land unseen (skipped where python3 or bash is missing).
#[test]
fn peer_bench_scripts_parse() {
    let bench = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench");
    let run = |prog: &str, args: &[&str]| std::process::Command::new(prog).args(args).current_dir(&bench).output();
    match run("python3", &["-c", "import ast, sys; ast.parse(open(sys.argv[1]).read(), sys.argv[1])", "peer.py"]) {
        Ok(o) => assert!(o.status.success(), "bench/peer.py: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("skipped: python3 not found ({e})"),
    }
    match run("bash", &["-n", "side_by_side.sh"]) {
        Ok(o) => assert!(o.status.success(), "bench/side_by_side.sh: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("skipped: bash not found ({e})"),
    }
}
