//! `fetch_model` against a fake Hugging Face cache in a temp dir, offline: revisions, symlinked
//! and plain snapshots, sharded weights, hostile shard names, cache misses and bad repo ids.
//!
//! Nothing here reads or writes environment variables (see `hub_online.rs` for those), and every
//! call is offline, so the tests run in parallel and never touch the network.

#![cfg(feature = "hub")]

#[path = "common/hub_cache.rs"]
mod hub_cache;

use candle_core::Device;
use candle_glu::{fetch_model, Error, GluConfig, HubOptions};
use hub_cache::{index, tiny_safetensors, FakeCache, CONFIG, HASH_MAIN, HASH_V1, REPO};

fn err_msg(opts: HubOptions) -> String {
    let err = fetch_model(REPO, &opts).expect_err("expected an error");
    assert!(
        matches!(&err, Error::Hub { repo, .. } if repo == REPO),
        "expected Error::Hub for {REPO}, got {err:?}"
    );
    err.to_string()
}

#[test]
fn offline_main_resolves_to_the_snapshot_and_follows_blob_symlinks() {
    let cache = FakeCache::new().with_main();
    let dir = fetch_model(REPO, &cache.opts()).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_MAIN));

    #[cfg(unix)]
    assert!(
        dir.join("model.safetensors")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink(),
        "the fixture should be a symlink into blobs/, like a real cache"
    );
    // What a directory loader does with it.
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(tensors["w"].to_vec1::<f32>().unwrap(), [1.0]);
    let cfg = GluConfig::from_hf_config_file(dir.join("config.json")).unwrap();
    assert_eq!(cfg.hidden_size, 4);
}

#[test]
fn named_revision_uses_its_ref() {
    let cache = FakeCache::new().with_main();
    cache
        .set_ref("v1.0", HASH_V1)
        .add_file(HASH_V1, "config.json", CONFIG.as_bytes())
        .add_file(HASH_V1, "model.safetensors", &tiny_safetensors("w", 2.0));
    let dir = fetch_model(REPO, &cache.opts().with_revision("v1.0")).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_V1));

    // A ref with a slash, like a pull request, lives in a subfolder of refs/.
    cache.set_ref("refs/pr/1", HASH_V1);
    let dir = fetch_model(REPO, &cache.opts().with_revision("refs/pr/1")).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_V1));
}

#[test]
fn commit_hash_revision_maps_directly_to_its_snapshot() {
    // No ref points at HASH_V1: a hash needs none.
    let cache = FakeCache::new().with_main();
    cache
        .add_file(HASH_V1, "model.safetensors", &tiny_safetensors("w", 3.0))
        .add_file(HASH_V1, "config.json", CONFIG.as_bytes());
    let dir = fetch_model(REPO, &cache.opts().with_revision(HASH_V1)).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_V1));

    let absent = "0000000000000000000000000000000000000000";
    let msg = err_msg(cache.opts().with_revision(absent));
    assert!(
        msg.contains(&format!("commit {absent} has no snapshot directory")),
        "{msg}"
    );
}

#[test]
fn config_is_optional() {
    let cache = FakeCache::new();
    cache
        .set_ref("main", HASH_MAIN)
        .add_blob(HASH_MAIN, "model.safetensors", &tiny_safetensors("w", 1.0))
        .add_no_exist(HASH_MAIN, "config.json");
    let dir = fetch_model(REPO, &cache.opts()).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_MAIN));
    assert!(!dir.join("config.json").exists());

    // Only where the cache records that the repository has none: a cache that merely lacks it
    // (a partial copy) is an error, not a block of the default activation.
    std::fs::remove_dir_all(cache.repo_dir().join(".no_exist")).unwrap();
    let msg = err_msg(cache.opts());
    assert!(
        msg.contains("`config.json` (revision `main`) is not in the cache"),
        "{msg}"
    );
    assert!(
        msg.contains("the block's activation and sizes come from it"),
        "{msg}"
    );
}

#[test]
fn sharded_weights_need_the_index_and_every_shard() {
    let s1 = "model-00001-of-00002.safetensors";
    let s2 = "model-00002-of-00002.safetensors";
    let cache = FakeCache::new();
    cache
        .set_ref("main", HASH_MAIN)
        .add_blob(HASH_MAIN, "config.json", CONFIG.as_bytes())
        .add_blob(
            HASH_MAIN,
            "model.safetensors.index.json",
            &index(&[("a", s1), ("b", s2), ("c", s1)]),
        )
        .add_blob(HASH_MAIN, s1, &tiny_safetensors("a", 1.0))
        .add_file(HASH_MAIN, s2, &tiny_safetensors("b", 2.0));
    let dir = fetch_model(REPO, &cache.opts()).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_MAIN));
    assert!(dir.join(s1).exists() && dir.join(s2).exists());

    // Take one shard away: the error names it and says why it was wanted.
    std::fs::remove_file(dir.join(s2)).unwrap();
    let msg = err_msg(cache.opts());
    assert!(msg.contains(&format!("`{s2}`")), "{msg}");
    assert!(msg.contains("not in the cache"), "{msg}");
    assert!(msg.contains("lists it as a shard"), "{msg}");
}

#[test]
fn shards_outside_the_snapshot_are_refused() {
    let evil_abs = std::env::temp_dir().join("evil.safetensors");
    let evil_abs = evil_abs.to_str().unwrap().to_string();
    for evil in [
        "../evil.safetensors",
        evil_abs.as_str(),
        "sub/evil.safetensors",
        "..",
        "..\\evil.safetensors",
    ] {
        let cache = FakeCache::new();
        cache
            .set_ref("main", HASH_MAIN)
            .add_file(
                HASH_MAIN,
                "model.safetensors.index.json",
                &index(&[("ok", "model-00001-of-00002.safetensors"), ("bad", evil)]),
            )
            .add_file(
                HASH_MAIN,
                "model-00001-of-00002.safetensors",
                &tiny_safetensors("ok", 1.0),
            );
        // The file `../evil.safetensors` would reach exists, so only the check can stop it.
        std::fs::write(
            cache.repo_dir().join("snapshots").join("evil.safetensors"),
            tiny_safetensors("bad", 6.0),
        )
        .unwrap();
        let msg = err_msg(cache.opts());
        assert!(
            msg.contains(&format!("names shard `{}`", evil.escape_debug()))
                || msg.contains(&format!("names shard `{evil}`")),
            "{evil}: {msg}"
        );
        assert!(msg.contains("not a plain file name"), "{evil}: {msg}");
        assert!(msg.contains("refusing"), "{evil}: {msg}");
    }
}

#[test]
fn broken_indexes_are_reported() {
    let cache = FakeCache::new();
    cache.set_ref("main", HASH_MAIN).add_file(
        HASH_MAIN,
        "model.safetensors.index.json",
        b"{\"weight_map\": ",
    );
    let err = fetch_model(REPO, &cache.opts()).unwrap_err();
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
    assert!(
        err.to_string().contains("model.safetensors.index.json"),
        "{err}"
    );

    cache.add_file(
        HASH_MAIN,
        "model.safetensors.index.json",
        b"{\"metadata\": {}}",
    );
    let msg = err_msg(cache.opts());
    assert!(msg.contains("has no `weight_map`"), "{msg}");

    cache.add_file(
        HASH_MAIN,
        "model.safetensors.index.json",
        b"{\"weight_map\": {\"a\": 3}}",
    );
    let msg = err_msg(cache.opts());
    assert!(msg.contains("maps tensor `a` to 3"), "{msg}");
}

#[test]
fn offline_misses_say_what_is_missing_and_where() {
    // The repository was never downloaded.
    let cache = FakeCache::new();
    let msg = err_msg(cache.opts());
    let repo_dir = cache.repo_dir();
    assert!(
        msg.starts_with(&format!(
            "hub repo `{REPO}`: `model.safetensors` (revision `main`) is not in the cache at {}",
            repo_dir.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("never downloaded"), "{msg}");
    assert!(msg.contains("offline mode is on"), "{msg}");
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");

    // The repository is there, the revision is not.
    let cache = FakeCache::new().with_main();
    let msg = err_msg(cache.opts().with_revision("v2.0"));
    assert!(
        msg.contains("(revision `v2.0`) is not in the cache"),
        "{msg}"
    );
    assert!(msg.contains("no ref file"), "{msg}");

    // The snapshot is there without weights.
    let cache = FakeCache::new();
    cache
        .set_ref("main", HASH_MAIN)
        .add_blob(HASH_MAIN, "config.json", CONFIG.as_bytes());
    let msg = err_msg(cache.opts());
    assert!(
        msg.contains(&format!("snapshot {HASH_MAIN} lacks the file")),
        "{msg}"
    );
    assert!(
        msg.contains("`model.safetensors.index.json` (sharded weights) is not in the cache either"),
        "{msg}"
    );

    // Each file described as the cache has it: the weights not cached, the index known absent.
    cache.add_no_exist(HASH_MAIN, "model.safetensors.index.json");
    let msg = err_msg(cache.opts());
    assert!(
        msg.contains("`model.safetensors` (revision `main`) is not in the cache"),
        "{msg}"
    );
    assert!(
        msg.contains("`model.safetensors.index.json` (sharded weights) does not exist either"),
        "{msg}"
    );
}

#[test]
fn bad_repo_ids_are_refused_before_anything_else() {
    let cache = FakeCache::new().with_main();
    for bad in [
        "",
        "/",
        "org/",
        "/name",
        "a/b/c",
        "..",
        "../etc",
        "org/..",
        "org/na..me",
        "org--x/name",
        "org/name with space",
        "org/ünï",
        "-org/name",
    ] {
        let err = fetch_model(bad, &cache.opts()).expect_err(bad);
        let msg = err.to_string();
        assert!(
            matches!(&err, Error::Hub { repo, .. } if repo == bad),
            "{bad}: {err:?}"
        );
        assert!(msg.contains("invalid repo id"), "{bad}: {msg}");
        assert!(
            msg.contains("expected `org/name` or `name`"),
            "{bad}: {msg}"
        );
    }
    // A bare name is a valid id; it just is not cached.
    let msg = fetch_model("gpt2", &cache.opts()).unwrap_err().to_string();
    assert!(msg.contains("models--gpt2"), "{msg}");
    // A line break in the id stays on the message's one line, escaped.
    let msg = fetch_model("org/na\nme", &cache.opts())
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("hub repo `org/na\\nme`: invalid repo id"),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

#[test]
fn tokens_are_trimmed_and_checked() {
    let cache = FakeCache::new().with_main();
    // A token read from a file with its newline works (offline, it is not sent anyway).
    fetch_model(REPO, &cache.opts().with_token("hf_abc\n")).unwrap();
    for (bad, want) in [
        (" \n", "the token is empty"),
        ("hf_a b", "at position 5"),
        ("hf_\u{1}x", "at position 4"),
        ("hf_é", "at position 4"),
    ] {
        let msg = err_msg(cache.opts().with_token(bad));
        assert!(msg.contains(want), "{bad:?}: {msg}");
        assert!(!msg.contains("hf_"), "the token is shown: {msg}");
    }
}

#[test]
fn bad_revisions_are_refused() {
    let cache = FakeCache::new().with_main();
    for bad in ["", "../../../etc/passwd", "refs/../../x", "/abs", "a\\b"] {
        let msg = err_msg(cache.opts().with_revision(bad));
        assert!(msg.contains("invalid revision"), "{bad:?}: {msg}");
    }
}

/// A progress callback that ignores what it is told.
struct Quiet;

impl candle_glu::DownloadProgress for Quiet {
    fn update(&self, _: &str, _: u64, _: u64) {}
}

#[test]
fn options_builders_and_debug() {
    let opts = HubOptions::new()
        .with_revision("v1")
        .with_token("hf_secret")
        .with_cache_dir("/c")
        .with_offline(true)
        .with_progress(Quiet);
    assert_eq!(opts.revision.as_deref(), Some("v1"));
    assert_eq!(opts.token.as_deref(), Some("hf_secret"));
    assert_eq!(opts.cache_dir.as_deref(), Some(std::path::Path::new("/c")));
    assert!(opts.offline && opts.progress.is_some());
    let debug = format!("{opts:?}");
    assert!(!debug.contains("hf_secret"), "{debug}");
    assert!(debug.contains("<redacted>"), "{debug}");
    assert!(debug.contains("<callback>"), "{debug}");

    let d = HubOptions::default();
    assert!(d.revision.is_none() && d.token.is_none() && d.cache_dir.is_none());
    assert!(!d.offline && d.progress.is_none());
}
