//! Every runtime knob in one table: its key, environment variable, CLI flag, default and meaning,
//! resolved once with the precedence flag > environment > profile > default, remembering where each
//! value came from (`xlstm config` prints them). Nothing else in the engine reads the environment.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};

pub struct Knob {
    pub key: &'static str,
    pub env: &'static str,
    pub flag: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// The knobs. Empty default = unset (the engine decides).
pub const KNOBS: &[Knob] = &[
    Knob { key: "mem_watchdog", env: "XLSTM_MEM_WATCHDOG", flag: "--mem-watchdog", default: "1", help: "memory watchdog on (1) or off (0)" },
    Knob { key: "mem_poll_ms", env: "XLSTM_MEM_POLL_MS", flag: "--mem-poll-ms", default: "200", help: "watchdog sampling period, ms (minimum 50)" },
    Knob { key: "mem_soft_pct", env: "XLSTM_MEM_SOFT_PCT", flag: "--mem-soft-pct", default: "0.85", help: "soft limit: fraction of system (and device) memory in use" },
    Knob { key: "mem_hard_pct", env: "XLSTM_MEM_HARD_PCT", flag: "--mem-hard-pct", default: "0.92", help: "hard limit: fraction of system (and device) memory in use" },
    Knob { key: "mem_soft_mb", env: "XLSTM_MEM_SOFT_MB", flag: "--mem-soft-mb", default: "", help: "soft limit on this process's memory (RSS, device memory), MB; wins over the fraction" },
    Knob { key: "mem_hard_mb", env: "XLSTM_MEM_HARD_MB", flag: "--mem-hard-mb", default: "", help: "hard limit on this process's memory, MB; wins over the fraction" },
    Knob { key: "mem_action", env: "XLSTM_MEM_ACTION", flag: "--mem-action", default: "warn,empty_cache,shrink", help: "soft-limit actions: warn, empty_cache (release cached buffers), shrink (halve the prefill chunk)" },
    Knob { key: "shrink_on_soft", env: "XLSTM_SHRINK_ON_SOFT", flag: "--no-mem-shrink", default: "1", help: "allow `shrink` at the soft limit (0 disables; --no-mem-shrink)" },
    Knob { key: "min_chunk", env: "XLSTM_MIN_CHUNK", flag: "--min-chunk", default: "8", help: "smallest prefill chunk shrinking may reach" },
    Knob { key: "chunk_size", env: "XLSTM_CHUNK_SIZE", flag: "--chunk-size", default: "", help: "prefill chunk size (default: the model's, 64 for xLSTM-7B)" },
    Knob { key: "prefill_segment", env: "XLSTM_PREFILL_SEGMENT", flag: "--prefill-segment", default: "", help: "prompt tokens one prefill pass takes (a multiple of the chunk; default: the backend's, 512 on CPU, 2048 on CUDA)" },
    Knob { key: "keep_prompt_buffers", env: "XLSTM_KEEP_PROMPT_BUFFERS", flag: "--keep-prompt-buffers", default: "2048", help: "a prompt's activation buffers for up to this many tokens per prefill pass are kept for the next prompt; larger ones are freed when it is done (0: decode memory never holds a prompt's buffers)" },
    Knob { key: "heads_per_band", env: "XLSTM_HEADS_PER_BAND", flag: "--heads-per-band", default: "", help: "heads one kernel launch / CPU task takes (default 1: each head its own task)" },
    Knob { key: "workers", env: "XLSTM_WORKERS", flag: "--workers", default: "", help: "CPU worker threads (default: one per core)" },
    Knob { key: "streams", env: "XLSTM_STREAMS", flag: "--streams", default: "1", help: "GPU streams" },
    Knob { key: "warmup", env: "XLSTM_WARMUP", flag: "--warmup", default: "1", help: "untimed warm-up passes before serving / timing" },
    Knob { key: "autoscale", env: "XLSTM_AUTOSCALE", flag: "--autoscale", default: "0", help: "probe the knobs on this machine first and keep the best (like `xlstm tune`)" },
    Knob { key: "use_best", env: "XLSTM_USE_BEST", flag: "--use-best", default: "1", help: "apply the stored tuning for this device and shape (0 ignores it)" },
    Knob { key: "fast_head", env: "XLSTM_FAST_HEAD", flag: "--fast-head", default: "1", help: "fused LM head (matrix product + soft-cap + greedy/top-k) where sampling allows" },
    Knob { key: "gemm_tile", env: "XLSTM_GEMM_TILE", flag: "--gemm-tile", default: "", help: "matrix-product tile, ROWSxCOLS (e.g. 64x32): weight rows per task x input rows per pass" },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Default,
    Profile,
    Env,
    Flag,
    Tuned,
}

/// Named bundles of settings.
pub fn profile(name: &str) -> Result<Vec<(&'static str, &'static str)>> {
    match name {
        // Warn only near the cliff, never shrink, large chunks.
        "high-memory" => Ok(vec![("mem_soft_pct", "0.97"), ("mem_hard_pct", "0.99"), ("mem_action", "warn"), ("shrink_on_soft", "0"), ("chunk_size", "256"), ("keep_prompt_buffers", "65536")]),
        // Shrink early and keep chunks small.
        "low-memory" => Ok(vec![("mem_soft_pct", "0.70"), ("mem_hard_pct", "0.85"), ("chunk_size", "32"), ("keep_prompt_buffers", "0")]),
        "default" => Ok(vec![]),
        other => Err(Error::Input(format!("unknown profile `{other}`: use default, high-memory or low-memory"))),
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    values: BTreeMap<&'static str, (String, Source)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemAction {
    Warn,
    EmptyCache,
    Shrink,
}

impl Settings {
    /// Resolves every knob: `flags` (key → value, from the command line), then `env`, then the
    /// profile, then the default. Every value is validated here, naming its source on error.
    pub fn resolve(flags: &BTreeMap<&'static str, String>, profile_name: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let prof: BTreeMap<_, _> = profile(profile_name.unwrap_or("default"))?.into_iter().collect();
        let mut values = BTreeMap::new();
        for k in KNOBS {
            let v = if let Some(v) = flags.get(k.key) {
                (v.clone(), Source::Flag)
            } else if let Some(v) = env(k.env).filter(|v| !v.is_empty()) {
                (v, Source::Env)
            } else if let Some(v) = prof.get(k.key) {
                (v.to_string(), Source::Profile)
            } else {
                (k.default.to_string(), Source::Default)
            };
            values.insert(k.key, v);
        }
        for key in flags.keys() {
            if !KNOBS.iter().any(|k| k.key == *key) {
                return Err(Error::Input(format!("unknown setting `{key}`")));
            }
        }
        let s = Settings { values };
        s.validate()?;
        Ok(s)
    }

    /// From the process environment only (library use).
    pub fn from_env() -> Result<Self> {
        Self::resolve(&BTreeMap::new(), None, |k| std::env::var(k).ok())
    }

    /// Defaults only (tests).
    pub fn defaults() -> Self {
        Self::resolve(&BTreeMap::new(), None, |_| None).expect("defaults are valid")
    }

    fn raw(&self, key: &str) -> &str {
        &self.values.get(key).unwrap_or_else(|| panic!("knob `{key}` is in KNOBS")).0
    }

    pub fn source(&self, key: &str) -> Source {
        self.values[key].1
    }

    /// Overrides one value (e.g. from a stored tuning), keeping flags and env in charge.
    pub fn apply_tuned(&mut self, key: &'static str, value: String) {
        if let Some(v) = self.values.get_mut(key) {
            if matches!(v.1, Source::Default | Source::Profile) {
                *v = (value, Source::Tuned);
            }
        }
    }

    fn bad(&self, key: &str, want: &str) -> Error {
        let knob = KNOBS.iter().find(|k| k.key == key).expect("known knob");
        let (v, src) = &self.values[key];
        let from = match src {
            Source::Flag => knob.flag.to_string(),
            Source::Env => knob.env.to_string(),
            Source::Profile => "the profile".into(),
            Source::Tuned => "the stored tuning".into(),
            Source::Default => "the default".into(),
        };
        Error::Input(format!("{from} = `{v}`: expected {want}"))
    }

    fn bool(&self, key: &str) -> Result<bool> {
        match self.raw(key).to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(self.bad(key, "1 or 0")),
        }
    }
    fn num<T: std::str::FromStr>(&self, key: &str, want: &str) -> Result<Option<T>> {
        let r = self.raw(key);
        if r.is_empty() {
            return Ok(None);
        }
        r.parse().map(Some).map_err(|_| self.bad(key, want))
    }

    fn validate(&self) -> Result<()> {
        self.mem_watchdog()?;
        if self.mem_poll_ms()? < 50 {
            return Err(self.bad("mem_poll_ms", "at least 50 ms"));
        }
        let (s, h) = (self.num::<f64>("mem_soft_pct", "a fraction")?.unwrap_or(0.85), self.num::<f64>("mem_hard_pct", "a fraction")?.unwrap_or(0.92));
        if !(0.0 < s && s <= 1.0) {
            return Err(self.bad("mem_soft_pct", "a fraction in (0, 1]"));
        }
        if !(0.0 < h && h <= 1.0) {
            return Err(self.bad("mem_hard_pct", "a fraction in (0, 1]"));
        }
        self.num::<u64>("mem_soft_mb", "megabytes")?;
        self.num::<u64>("mem_hard_mb", "megabytes")?;
        self.mem_actions()?;
        self.bool("shrink_on_soft")?;
        if self.min_chunk()? == 0 {
            return Err(self.bad("min_chunk", "a positive chunk size"));
        }
        if self.chunk_size()? == Some(0) {
            return Err(self.bad("chunk_size", "a positive chunk size"));
        }
        if self.prefill_segment()? == Some(0) {
            return Err(self.bad("prefill_segment", "a positive number of tokens"));
        }
        self.keep_prompt_buffers()?;
        if self.heads_per_band()? == Some(0) {
            return Err(self.bad("heads_per_band", "a positive number of heads"));
        }
        if self.workers()? == Some(0) {
            return Err(self.bad("workers", "a positive number of threads"));
        }
        self.num::<usize>("streams", "a number of streams")?;
        self.num::<usize>("warmup", "a number of passes")?;
        self.bool("autoscale")?;
        self.bool("use_best")?;
        self.bool("fast_head")?;
        self.gemm_tile()?;
        Ok(())
    }

    pub fn mem_watchdog(&self) -> Result<bool> {
        self.bool("mem_watchdog")
    }
    pub fn mem_poll_ms(&self) -> Result<u64> {
        Ok(self.num("mem_poll_ms", "milliseconds")?.unwrap_or(200))
    }
    pub fn mem_soft_pct(&self) -> f64 {
        self.raw("mem_soft_pct").parse().unwrap_or(0.85)
    }
    pub fn mem_hard_pct(&self) -> f64 {
        self.raw("mem_hard_pct").parse().unwrap_or(0.92)
    }
    pub fn mem_soft_mb(&self) -> Option<u64> {
        self.raw("mem_soft_mb").parse().ok()
    }
    pub fn mem_hard_mb(&self) -> Option<u64> {
        self.raw("mem_hard_mb").parse().ok()
    }
    pub fn mem_actions(&self) -> Result<Vec<MemAction>> {
        self.raw("mem_action")
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| match a {
                "warn" => Ok(MemAction::Warn),
                "empty_cache" => Ok(MemAction::EmptyCache),
                "shrink" => Ok(MemAction::Shrink),
                _ => Err(self.bad("mem_action", "a list of warn, empty_cache, shrink")),
            })
            .collect()
    }
    /// `shrink` is listed and not disabled.
    pub fn shrink_allowed(&self) -> bool {
        self.bool("shrink_on_soft").unwrap_or(true) && self.mem_actions().map(|a| a.contains(&MemAction::Shrink)).unwrap_or(false)
    }
    pub fn min_chunk(&self) -> Result<usize> {
        Ok(self.num("min_chunk", "a chunk size")?.unwrap_or(8))
    }
    pub fn chunk_size(&self) -> Result<Option<usize>> {
        self.num("chunk_size", "a chunk size")
    }
    pub fn prefill_segment(&self) -> Result<Option<usize>> {
        self.num("prefill_segment", "a number of tokens")
    }
    pub fn keep_prompt_buffers(&self) -> Result<usize> {
        Ok(self.num("keep_prompt_buffers", "a number of tokens")?.unwrap_or(crate::model::KEEP_PROMPT_ROWS))
    }
    pub fn heads_per_band(&self) -> Result<Option<usize>> {
        self.num("heads_per_band", "a number of heads")
    }
    pub fn workers(&self) -> Result<Option<usize>> {
        self.num("workers", "a number of threads")
    }
    pub fn streams(&self) -> usize {
        self.raw("streams").parse().unwrap_or(1)
    }
    pub fn warmup(&self) -> usize {
        self.raw("warmup").parse().unwrap_or(1)
    }
    pub fn autoscale(&self) -> bool {
        self.bool("autoscale").unwrap_or(false)
    }
    pub fn use_best(&self) -> bool {
        self.bool("use_best").unwrap_or(true)
    }
    pub fn fast_head(&self) -> bool {
        self.bool("fast_head").unwrap_or(true)
    }
    /// (weight rows per task, input rows per pass).
    pub fn gemm_tile(&self) -> Result<Option<(usize, usize)>> {
        let r = self.raw("gemm_tile");
        if r.is_empty() {
            return Ok(None);
        }
        let parse = || -> Option<(usize, usize)> {
            let (a, b) = r.to_ascii_lowercase().split_once('x').map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))?;
            let (a, b) = (a.parse().ok()?, b.parse().ok()?);
            (a > 0 && b > 0).then_some((a, b))
        };
        parse().map(Some).ok_or_else(|| self.bad("gemm_tile", "ROWSxCOLS with positive numbers, e.g. 64x32"))
    }

    /// Every knob with its value and source, in table order.
    pub fn table(&self) -> Vec<(&'static Knob, String, Source)> {
        KNOBS.iter().map(|k| (k, self.values[k.key].0.clone(), self.values[k.key].1)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn precedence_is_flag_env_profile_default() {
        let mut flags = BTreeMap::new();
        flags.insert("mem_soft_mb", "100".to_string());
        let s = Settings::resolve(&flags, Some("high-memory"), env_of(&[("XLSTM_MEM_SOFT_MB", "50"), ("XLSTM_MEM_HARD_MB", "70"), ("XLSTM_MEM_SOFT_PCT", "0.5")])).unwrap();
        assert_eq!((s.mem_soft_mb(), s.source("mem_soft_mb")), (Some(100), Source::Flag));
        assert_eq!((s.mem_hard_mb(), s.source("mem_hard_mb")), (Some(70), Source::Env));
        assert_eq!((s.mem_soft_pct(), s.source("mem_soft_pct")), (0.5, Source::Env));
        assert_eq!((s.mem_hard_pct(), s.source("mem_hard_pct")), (0.99, Source::Profile));
        assert!(!s.shrink_allowed(), "high-memory never shrinks");
        assert_eq!((s.mem_poll_ms().unwrap(), s.source("mem_poll_ms")), (200, Source::Default));
    }

    #[test]
    fn bad_values_name_their_source() {
        let e = Settings::resolve(&BTreeMap::new(), None, env_of(&[("XLSTM_MEM_POLL_MS", "10")])).unwrap_err().to_string();
        assert!(e.contains("XLSTM_MEM_POLL_MS") && e.contains("50"), "{e}");
        let mut flags = BTreeMap::new();
        flags.insert("mem_action", "warn,explode".to_string());
        let e = Settings::resolve(&flags, None, |_| None).unwrap_err().to_string();
        assert!(e.contains("--mem-action"), "{e}");
        let e = Settings::resolve(&BTreeMap::new(), None, env_of(&[("XLSTM_GEMM_TILE", "64by32")])).unwrap_err().to_string();
        assert!(e.contains("XLSTM_GEMM_TILE"), "{e}");
        assert!(Settings::resolve(&BTreeMap::new(), Some("nope"), |_| None).is_err());
    }

    #[test]
    fn tuning_never_overrides_what_the_user_set() {
        let mut s = Settings::resolve(&BTreeMap::new(), None, env_of(&[("XLSTM_CHUNK_SIZE", "32")])).unwrap();
        s.apply_tuned("chunk_size", "128".into());
        s.apply_tuned("gemm_tile", "16x4".into());
        assert_eq!(s.chunk_size().unwrap(), Some(32));
        assert_eq!(s.gemm_tile().unwrap(), Some((16, 4)));
        assert_eq!(s.source("gemm_tile"), Source::Tuned);
    }
}
