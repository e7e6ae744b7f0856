//! The memory watchdog: a background thread samples process RSS, system memory and (through the
//! backend) device memory every `mem_poll_ms`, and the work asks it between chunks and tokens what to
//! do. Soft limit: warn, release cached buffers, halve the prefill chunk (down to `min_chunk`). Hard
//! limit: stop with an error that says which limit, what was seen and what to change.
//!
//! Limits given in MB apply to this process (RSS; device memory on GPUs); limits given as fractions
//! apply to the whole system's memory in use (and the device's). MB limits win when set.
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::settings::{MemAction, Settings};

/// A device-memory probe: (bytes used, bytes total), or None where the backend has no device memory.
pub type DeviceProbe = Box<dyn Fn() -> Option<(u64, u64)> + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    Soft,
    Hard,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Usage {
    pub rss_bytes: u64,
    pub sys_used_bytes: u64,
    pub sys_total_bytes: u64,
    pub dev_used_bytes: u64,
    pub dev_total_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    pub soft_process_bytes: Option<u64>,
    pub hard_process_bytes: Option<u64>,
    pub soft_fraction: f64,
    pub hard_fraction: f64,
}

impl Limits {
    pub fn from_settings(s: &Settings) -> Self {
        Limits {
            soft_process_bytes: s.mem_soft_mb().map(|m| m * 1_000_000),
            hard_process_bytes: s.mem_hard_mb().map(|m| m * 1_000_000),
            soft_fraction: s.mem_soft_pct(),
            hard_fraction: s.mem_hard_pct(),
        }
    }

    /// The level `u` is at, and the sentence that explains it.
    pub fn judge(&self, u: &Usage) -> (Level, String) {
        let mb = |b: u64| b as f64 / 1e6;
        for (level, proc_limit, frac, name) in [
            (Level::Hard, self.hard_process_bytes, self.hard_fraction, "hard"),
            (Level::Soft, self.soft_process_bytes, self.soft_fraction, "soft"),
        ] {
            let (var_mb, var_pct) = if level == Level::Hard { ("XLSTM_MEM_HARD_MB / --mem-hard-mb", "XLSTM_MEM_HARD_PCT / --mem-hard-pct") } else { ("XLSTM_MEM_SOFT_MB / --mem-soft-mb", "XLSTM_MEM_SOFT_PCT / --mem-soft-pct") };
            if let Some(limit) = proc_limit {
                let used = u.rss_bytes.max(u.dev_used_bytes);
                if used > limit {
                    return (level, format!("{name} memory limit reached: this process uses {:.0} MB, the limit is {:.0} MB ({var_mb})", mb(used), mb(limit)));
                }
                continue;
            }
            if u.sys_total_bytes > 0 && u.sys_used_bytes as f64 > frac * u.sys_total_bytes as f64 {
                return (level, format!("{name} memory limit reached: system memory {:.0} of {:.0} MB in use, over {:.0}% ({var_pct})", mb(u.sys_used_bytes), mb(u.sys_total_bytes), frac * 100.0));
            }
            if u.dev_total_bytes > 0 && u.dev_used_bytes as f64 > frac * u.dev_total_bytes as f64 {
                return (level, format!("{name} memory limit reached: device memory {:.0} of {:.0} MB in use, over {:.0}% ({var_pct})", mb(u.dev_used_bytes), mb(u.dev_total_bytes), frac * 100.0));
            }
        }
        (Level::Ok, String::new())
    }
}

fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024
    };
    let total = field("MemTotal:");
    (total.saturating_sub(field("MemAvailable:")), total)
}

pub fn sample(device: Option<&DeviceProbe>) -> Usage {
    let (sys_used, sys_total) = meminfo();
    let (dev_used, dev_total) = device.and_then(|p| p()).unwrap_or((0, 0));
    Usage { rss_bytes: crate::sys::rss_bytes(), sys_used_bytes: sys_used, sys_total_bytes: sys_total, dev_used_bytes: dev_used, dev_total_bytes: dev_total }
}

struct Shared {
    limits: Limits,
    poll: Duration,
    level: AtomicU8,
    rss: AtomicU64,
    sys_used: AtomicU64,
    sys_total: AtomicU64,
    dev_used: AtomicU64,
    dev_total: AtomicU64,
    last: Mutex<(Instant, String)>,
    stop: AtomicBool,
    device: Option<DeviceProbe>,
}

impl Shared {
    fn refresh(&self) -> (Level, String) {
        let u = sample(self.device.as_ref());
        self.rss.store(u.rss_bytes, Ordering::Relaxed);
        self.sys_used.store(u.sys_used_bytes, Ordering::Relaxed);
        self.sys_total.store(u.sys_total_bytes, Ordering::Relaxed);
        self.dev_used.store(u.dev_used_bytes, Ordering::Relaxed);
        self.dev_total.store(u.dev_total_bytes, Ordering::Relaxed);
        let (level, why) = self.limits.judge(&u);
        self.level.store(level as u8, Ordering::Relaxed);
        *self.last.lock().expect("watchdog lock") = (Instant::now(), why.clone());
        (level, why)
    }
}

/// What the work should do now, from the watchdog's point of view.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Go,
    /// Soft limit: the actions to take and why.
    Ease { actions: Vec<MemAction>, why: String },
}

/// The watchdog. Cheap to clone (shared); the sampling thread stops when the last clone is dropped.
#[derive(Clone)]
pub struct Watchdog {
    shared: Arc<Shared>,
    actions: Vec<MemAction>,
    shrink: bool,
    pub min_chunk: usize,
    warned: Arc<AtomicBool>,
    _thread: Arc<ThreadGuard>,
}

struct ThreadGuard(Arc<Shared>);
impl Drop for ThreadGuard {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

impl Watchdog {
    /// Starts sampling, or returns None when the settings turn the watchdog off.
    pub fn start(settings: &Settings, device: Option<DeviceProbe>) -> Result<Option<Self>> {
        if !settings.mem_watchdog()? {
            return Ok(None);
        }
        let shared = Arc::new(Shared {
            limits: Limits::from_settings(settings),
            poll: Duration::from_millis(settings.mem_poll_ms()?),
            level: AtomicU8::new(0),
            rss: AtomicU64::new(0),
            sys_used: AtomicU64::new(0),
            sys_total: AtomicU64::new(0),
            dev_used: AtomicU64::new(0),
            dev_total: AtomicU64::new(0),
            last: Mutex::new((Instant::now(), String::new())),
            stop: AtomicBool::new(false),
            device,
        });
        shared.refresh();
        let bg = shared.clone();
        std::thread::Builder::new()
            .name("xlstm-watchdog".into())
            .spawn(move || {
                while !bg.stop.load(Ordering::Relaxed) {
                    std::thread::sleep(bg.poll);
                    bg.refresh();
                }
            })
            .map_err(|e| Error::Device(format!("cannot start the memory watchdog thread: {e}")))?;
        let mut actions = settings.mem_actions()?;
        let shrink = settings.shrink_allowed();
        if !shrink {
            actions.retain(|a| *a != MemAction::Shrink);
        }
        Ok(Some(Watchdog {
            _thread: Arc::new(ThreadGuard(shared.clone())),
            shared,
            actions,
            shrink,
            min_chunk: settings.min_chunk()?,
            warned: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// The last sample (refreshed now if older than the poll period). Hard limit → `Err`.
    pub fn check(&self) -> Result<Verdict> {
        let stale = self.shared.last.lock().expect("watchdog lock").0.elapsed() >= self.shared.poll;
        let (level, why) = if stale {
            self.shared.refresh()
        } else {
            (self.level(), self.shared.last.lock().expect("watchdog lock").1.clone())
        };
        match level {
            Level::Ok => Ok(Verdict::Go),
            Level::Soft => Ok(Verdict::Ease { actions: self.actions.clone(), why }),
            Level::Hard => Err(Error::Memory(format!("{why}. Stopped cleanly; raise the limit, use a smaller model, batch or --chunk-size, or --dtype bf16"))),
        }
    }

    /// Prints the soft-limit warning once per episode (and again after the level went back to ok).
    pub fn warn_once(&self, why: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            eprintln!("warning: {why}");
        }
    }

    pub fn level(&self) -> Level {
        match self.shared.level.load(Ordering::Relaxed) {
            0 => Level::Ok,
            1 => Level::Soft,
            _ => Level::Hard,
        }
    }

    pub fn usage(&self) -> Usage {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.shared;
        Usage { rss_bytes: l(&s.rss), sys_used_bytes: l(&s.sys_used), sys_total_bytes: l(&s.sys_total), dev_used_bytes: l(&s.dev_used), dev_total_bytes: l(&s.dev_total) }
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    pub fn shrink_enabled(&self) -> bool {
        self.shrink
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(rss_mb: u64, sys_used_mb: u64, sys_total_mb: u64) -> Usage {
        Usage { rss_bytes: rss_mb * 1_000_000, sys_used_bytes: sys_used_mb * 1_000_000, sys_total_bytes: sys_total_mb * 1_000_000, ..Default::default() }
    }

    #[test]
    fn process_limits_win_over_fractions() {
        let l = Limits { soft_process_bytes: Some(100_000_000), hard_process_bytes: Some(200_000_000), soft_fraction: 0.1, hard_fraction: 0.2 };
        assert_eq!(l.judge(&usage(50, 900, 1000)).0, Level::Ok, "system fraction ignored when MB limits are set");
        assert_eq!(l.judge(&usage(150, 0, 1000)).0, Level::Soft);
        let (lv, why) = l.judge(&usage(250, 0, 1000));
        assert_eq!(lv, Level::Hard);
        assert!(why.contains("250 MB") && why.contains("200 MB") && why.contains("XLSTM_MEM_HARD_MB"), "{why}");
    }

    #[test]
    fn fractions_apply_to_system_and_device() {
        let l = Limits { soft_process_bytes: None, hard_process_bytes: None, soft_fraction: 0.85, hard_fraction: 0.92 };
        assert_eq!(l.judge(&usage(10, 800, 1000)).0, Level::Ok);
        assert_eq!(l.judge(&usage(10, 900, 1000)).0, Level::Soft);
        assert_eq!(l.judge(&usage(10, 950, 1000)).0, Level::Hard);
        let dev = Usage { dev_used_bytes: 95, dev_total_bytes: 100, ..usage(10, 100, 1000) };
        let (lv, why) = l.judge(&dev);
        assert_eq!(lv, Level::Hard);
        assert!(why.contains("device"), "{why}");
    }

    #[test]
    fn tiny_hard_limit_stops_with_a_clear_error() {
        let mut flags = std::collections::BTreeMap::new();
        flags.insert("mem_hard_mb", "1".to_string());
        let s = Settings::resolve(&flags, None, |_| None).unwrap();
        let w = Watchdog::start(&s, None).unwrap().expect("on by default");
        let e = w.check().unwrap_err().to_string();
        assert!(e.contains("hard memory limit") && e.contains("--mem-hard-mb"), "{e}");
    }

    #[test]
    fn off_means_no_watchdog() {
        let s = Settings::resolve(&Default::default(), None, |k| (k == "XLSTM_MEM_WATCHDOG").then(|| "0".to_string())).unwrap();
        assert!(Watchdog::start(&s, None).unwrap().is_none());
    }
}
