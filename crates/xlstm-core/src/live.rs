//! Live statistics: a per-token CSV log (`--stats-log`), and a snapshot of the running process that
//! a publisher thread writes to `$XLSTM_LIVE_DIR` (default `/tmp/xlstm-live`) as `<pid>.json`, where
//! `xlstm top` reads it. Writing happens off the compute thread.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The directory snapshots are published in.
pub fn live_dir() -> PathBuf {
    std::env::var_os("XLSTM_LIVE_DIR").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("xlstm-live"))
}

/// What `xlstm top` shows of one process.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub pid: u32,
    pub model: String,
    pub device: String,
    /// loading, prefill, decode, done
    pub phase: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_tok_s: f64,
    pub decode_tok_s_instant: f64,
    pub decode_tok_s_avg: f64,
    /// Recent instant decode rates, oldest first (for a sparkline).
    pub decode_history: Vec<f64>,
    pub rss_bytes: u64,
    pub sys_used_bytes: u64,
    pub sys_total_bytes: u64,
    pub dev_used_bytes: u64,
    pub dev_total_bytes: u64,
    pub watchdog: String,
    pub chunk: usize,
    pub updated_unix_ms: u128,
}

const HISTORY: usize = 120;

/// Shared, cheaply updated by the compute thread; published by a background thread.
#[derive(Clone, Default)]
pub struct Live {
    inner: Arc<Mutex<Snapshot>>,
    decode_start: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl Live {
    pub fn new(model: &str, device: &str) -> Self {
        let live = Live::default();
        {
            let mut s = live.inner.lock().expect("live lock");
            s.pid = std::process::id();
            s.model = model.into();
            s.device = device.into();
            s.phase = "loading".into();
        }
        live
    }

    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        if let Ok(mut s) = self.inner.lock() {
            f(&mut s);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.inner.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Records one decoded token that took `seconds`.
    pub fn token(&self, seconds: f64) {
        let start = *self.decode_start.lock().expect("live lock").get_or_insert_with(Instant::now);
        self.update(|s| {
            s.phase = "decode".into();
            s.generated_tokens += 1;
            s.decode_tok_s_instant = 1.0 / seconds.max(1e-9);
            let el = start.elapsed().as_secs_f64();
            if el > 0.0 {
                s.decode_tok_s_avg = s.generated_tokens as f64 / el;
            }
            s.decode_history.push(s.decode_tok_s_instant);
            if s.decode_history.len() > HISTORY {
                s.decode_history.remove(0);
            }
        });
    }

    /// Writes `<pid>.json` into `dir` every `period` until the returned guard is dropped (then
    /// removes it). Memory figures are refreshed at each write.
    pub fn publish(&self, dir: &Path, period: Duration, memory: impl Fn() -> crate::watchdog::Usage + Send + 'static) -> Result<PublishGuard> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let path = dir.join(format!("{}.json", std::process::id()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (live, p, st) = (self.clone(), path.clone(), stop.clone());
        std::thread::Builder::new()
            .name("xlstm-live".into())
            .spawn(move || loop {
                let u = memory();
                live.update(|s| {
                    s.rss_bytes = u.rss_bytes;
                    s.sys_used_bytes = u.sys_used_bytes;
                    s.sys_total_bytes = u.sys_total_bytes;
                    s.dev_used_bytes = u.dev_used_bytes;
                    s.dev_total_bytes = u.dev_total_bytes;
                    s.updated_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
                });
                let tmp = p.with_extension("json.tmp");
                if let Ok(text) = serde_json::to_vec(&live.snapshot()) {
                    if std::fs::write(&tmp, text).is_ok() {
                        let _ = std::fs::rename(&tmp, &p);
                    }
                }
                if st.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(period);
            })
            .map_err(|e| Error::Device(format!("cannot start the stats publisher: {e}")))?;
        Ok(PublishGuard { path, stop })
    }
}

pub struct PublishGuard {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl PublishGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PublishGuard {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads every published snapshot whose process is still alive.
pub fn read_all(dir: &Path) -> Vec<Snapshot> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        if let Ok(s) = std::fs::read(&p).map_err(|_| ()).and_then(|b| serde_json::from_slice::<Snapshot>(&b).map_err(|_| ())) {
            if Path::new(&format!("/proc/{}", s.pid)).exists() {
                out.push(s);
            }
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.updated_unix_ms));
    out
}

/// `--stats-log FILE.csv`: one row per prefill segment and per generated token.
pub struct StatsLog {
    file: std::io::BufWriter<std::fs::File>,
    start: Instant,
}

impl StatsLog {
    pub const HEADER: &'static str = "elapsed_s,kind,tokens,seconds,tok_s,rss_mb,chunk";

    pub fn create(path: &Path) -> Result<Self> {
        let f = std::fs::File::create(path).map_err(|e| Error::file(path, format!("cannot create the stats log ({e})")))?;
        let mut file = std::io::BufWriter::new(f);
        writeln!(file, "{}", Self::HEADER).map_err(|e| Error::file(path, e))?;
        Ok(StatsLog { file, start: Instant::now() })
    }

    pub fn row(&mut self, kind: &str, tokens: usize, seconds: f64, chunk: usize) {
        let _ = writeln!(
            self.file,
            "{:.6},{kind},{tokens},{seconds:.6},{:.3},{:.1},{chunk}",
            self.start.elapsed().as_secs_f64(),
            tokens as f64 / seconds.max(1e-9),
            crate::sys::rss_bytes() as f64 / 1e6
        );
    }

    pub fn flush(&mut self) {
        let _ = self.file.flush();
    }
}
