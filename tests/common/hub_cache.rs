//! A fake Hugging Face Hub cache in a temp dir, laid out as the Hub's clients lay it out:
//! `<cache>/models--<org>--<name>/refs/<revision>` holds a commit hash,
//! `snapshots/<hash>/<file>` is a symlink into `blobs/` (or a plain file).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_glu::HubOptions;

pub const REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";
pub const HASH_MAIN: &str = "12fd25f77366fa6b3b4b768ec3050bf629380bac";
pub const HASH_V1: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678";

pub const CONFIG: &str =
    r#"{"model_type": "llama", "hidden_size": 4, "intermediate_size": 8, "hidden_act": "silu"}"#;

pub struct FakeCache {
    dir: tempfile::TempDir,
}

impl FakeCache {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The cache directory (what `HF_HUB_CACHE` would name).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `models--HuggingFaceTB--SmolLM2-135M-Instruct`.
    pub fn repo_dir(&self) -> PathBuf {
        self.root()
            .join(format!("models--{}", REPO.replace('/', "--")))
    }

    pub fn snapshot(&self, hash: &str) -> PathBuf {
        self.repo_dir().join("snapshots").join(hash)
    }

    /// `refs/<revision>` → `hash` (no trailing newline, as the Hub's clients write it).
    pub fn set_ref(&self, revision: &str, hash: &str) -> &Self {
        let path = self.repo_dir().join("refs").join(revision);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, hash).unwrap();
        self
    }

    /// A plain file in the snapshot (what Windows caches hold).
    pub fn add_file(&self, hash: &str, name: &str, bytes: &[u8]) -> &Self {
        let path = self.snapshot(hash).join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
        self
    }

    /// The content in `blobs/<etag>` and a relative symlink to it from the snapshot, as on a
    /// real Unix cache. Plain file elsewhere.
    pub fn add_blob(&self, hash: &str, name: &str, bytes: &[u8]) -> &Self {
        let etag = etag(bytes);
        let blob = self.repo_dir().join("blobs").join(&etag);
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, bytes).unwrap();
        let link = self.snapshot(hash).join(name);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(format!("../../blobs/{etag}"), &link).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).unwrap();
        self
    }

    /// The cache's record that the Hub has no `name` at commit `hash` (`.no_exist/<hash>/<name>`,
    /// an empty file, as hf-hub and Python's `huggingface_hub` write it on a 404).
    pub fn add_no_exist(&self, hash: &str, name: &str) -> &Self {
        let path = self.repo_dir().join(".no_exist").join(hash).join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
        self
    }

    /// Offline options on this cache.
    pub fn opts(&self) -> HubOptions {
        HubOptions::new()
            .with_cache_dir(self.root())
            .with_offline(true)
    }

    /// `main` with a config and single-file weights, as symlinks into `blobs/`.
    pub fn with_main(self) -> Self {
        self.set_ref("main", HASH_MAIN)
            .add_blob(HASH_MAIN, "config.json", CONFIG.as_bytes())
            .add_blob(HASH_MAIN, "model.safetensors", &tiny_safetensors("w", 1.0));
        self
    }
}

/// A stand-in etag: 64 hex digits from the bytes (any name works; real ones are sha256).
fn etag(bytes: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut out = String::new();
    for seed in 0u64..4 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut h);
        bytes.hash(&mut h);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// A valid safetensors file with one f32 tensor `name` of shape [1].
pub fn tiny_safetensors(name: &str, value: f32) -> Vec<u8> {
    let mut header =
        format!(r#"{{"{name}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#).into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&value.to_le_bytes());
    out
}

/// A `model.safetensors.index.json` mapping tensors to shards.
pub fn index(weight_map: &[(&str, &str)]) -> Vec<u8> {
    let map: serde_json::Map<String, serde_json::Value> = weight_map
        .iter()
        .map(|(t, s)| (t.to_string(), serde_json::Value::String(s.to_string())))
        .collect();
    serde_json::json!({"metadata": {"total_size": 8}, "weight_map": map})
        .to_string()
        .into_bytes()
}
