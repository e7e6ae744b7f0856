//! `--model` resolution: a local directory, or a Hugging Face hub id (`NX-AI/xLSTM-7b`) found in the
//! local hub cache or downloaded into it through `hf-hub`. `HF_HUB_OFFLINE=1` forbids downloads.
use std::path::{Path, PathBuf};

use hf_hub::{Cache, Repo};

use crate::error::{Error, Result};

/// Where the hub cache lives: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    Cache::from_env().path().clone()
}

pub fn offline() -> bool {
    matches!(std::env::var("HF_HUB_OFFLINE").as_deref(), Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes") | Ok("ON") | Ok("on"))
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
}

/// A directory holding config.json and the weights for `spec`.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(spec) {
        return Err(Error::file(path, "no such model directory (and not a hub id of the form owner/name)"));
    }
    resolve_hub(spec, &cache_dir(), offline())
}

/// Resolves a hub id against `cache` (the hub cache root), downloading unless `offline`.
pub fn resolve_hub(id: &str, cache: &Path, offline: bool) -> Result<PathBuf> {
    let cached = Cache::new(cache.to_path_buf()).repo(Repo::model(id.to_string()));
    if let Some(config) = cached.get("config.json") {
        let dir = config.parent().expect("a cached file has a snapshot directory").to_path_buf();
        if has_weights(&dir) {
            return Ok(dir);
        }
        if offline {
            return Err(Error::Hub(format!(
                "{id}: config.json is cached in {} but the weights are not, and HF_HUB_OFFLINE is set: unset it to download them",
                dir.display()
            )));
        }
    } else if offline {
        return Err(Error::Hub(format!(
            "{id} is not in the hub cache {} and HF_HUB_OFFLINE is set: unset it to download, or pass a local directory",
            cache.display()
        )));
    }
    download(id, cache)
}

fn has_weights(dir: &Path) -> bool {
    if dir.join("model.safetensors").is_file() {
        return true;
    }
    // an index is complete when every shard it names is present
    let index = dir.join("model.safetensors.index.json");
    let Ok(text) = std::fs::read_to_string(&index) else { return false };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else { return false };
    v.get("weight_map")
        .and_then(|m| m.as_object())
        .is_some_and(|m| m.values().filter_map(|f| f.as_str()).all(|f| dir.join(f).is_file()))
}

fn download(id: &str, cache: &Path) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(true)
        .build()
        .map_err(|e| Error::Hub(format!("cannot start the hub client: {e}")))?;
    let repo = api.model(id.to_string());
    let fail = |file: &str, e: hf_hub::api::sync::ApiError| {
        Error::Hub(format!("{id}: downloading {file} failed ({e}); check the id, your network, or set HF_TOKEN for gated models"))
    };
    let config = repo.get("config.json").map_err(|e| fail("config.json", e))?;
    let dir = config.parent().expect("snapshot dir").to_path_buf();
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&index, e))?;
            let mut shards: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|f| f.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                repo.get(&s).map_err(|e| fail(&s, e))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors").map_err(|e| fail("model.safetensors", e))?;
        }
    }
    let _ = repo.get("tokenizer.json"); // optional
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lays out a hub cache the way huggingface_hub and hf-hub do: refs/main → snapshot hash.
    fn fake_cache(root: &Path, id: &str, files: &[&str]) -> PathBuf {
        let repo = root.join(format!("models--{}", id.replace('/', "--")));
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
        let snap = repo.join("snapshots/0123abcd");
        std::fs::create_dir_all(&snap).unwrap();
        for f in files {
            std::fs::write(snap.join(f), "{}").unwrap();
        }
        snap
    }

    #[test]
    fn cached_model_resolves_offline() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = fake_cache(tmp.path(), "NX-AI/xLSTM-tiny", &["config.json", "model.safetensors"]);
        assert_eq!(resolve_hub("NX-AI/xLSTM-tiny", tmp.path(), true).unwrap(), snap);
    }

    #[test]
    fn sharded_cache_needs_every_shard() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = fake_cache(tmp.path(), "o/m", &["config.json", "a.safetensors"]);
        std::fs::write(snap.join("model.safetensors.index.json"), r#"{"weight_map":{"x":"a.safetensors","y":"b.safetensors"}}"#).unwrap();
        let err = resolve_hub("o/m", tmp.path(), true).unwrap_err().to_string();
        assert!(err.contains("weights are not") && err.contains("HF_HUB_OFFLINE"), "{err}");
        std::fs::write(snap.join("b.safetensors"), "").unwrap();
        assert_eq!(resolve_hub("o/m", tmp.path(), true).unwrap(), snap);
    }

    #[test]
    fn missing_model_offline_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve_hub("NX-AI/xLSTM-7b", tmp.path(), true).unwrap_err().to_string();
        assert!(err.contains("not in the hub cache") && err.contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn hub_ids_and_paths_are_told_apart() {
        assert!(looks_like_hub_id("NX-AI/xLSTM-7b"));
        assert!(!looks_like_hub_id("/tmp/x"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(resolve("./definitely/not/here").is_err());
    }
}
