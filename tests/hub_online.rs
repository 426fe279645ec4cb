//! `fetch_model` online and with the environment: downloads from a stand-in Hub on a loopback
//! port (`common/fake_hub.rs`) into an empty cache, tokens, `HF_HUB_OFFLINE`, and an endpoint
//! that refuses connections (fails quickly with a clear error, or falls back to the cache).
//!
//! The endpoint is set through `HF_ENDPOINT`. Environment variables are process-wide and the
//! tests of one binary run on parallel threads, so these live in their own test binary and each
//! holds `ENV` while it runs. Every endpoint is on 127.0.0.1: nothing leaves this machine.

#![cfg(feature = "hub")]

#[path = "common/fake_hub.rs"]
mod fake_hub;
#[path = "common/hub_cache.rs"]
mod hub_cache;

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Device;
use candle_glu::{fetch_model, DownloadProgress, HubOptions};
use fake_hub::FakeHub;
use hub_cache::{index, tiny_safetensors, FakeCache, CONFIG, HASH_MAIN, HASH_V1, REPO};

static ENV: Mutex<()> = Mutex::new(());

/// Holds the lock and sets the variables; puts back what was there on drop.
struct EnvGuard {
    saved: Vec<(&'static str, Option<String>)>,
    _lock: MutexGuard<'static, ()>,
}

impl EnvGuard {
    fn set(vars: &[(&'static str, Option<&str>)]) -> Self {
        let lock = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let mut saved = Vec::new();
        for (k, v) in vars {
            saved.push((*k, std::env::var(k).ok()));
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
        Self { saved, _lock: lock }
    }
}

impl EnvGuard {
    /// Sets more variables while the caller already holds the lock (through another guard).
    fn set_locked(vars: &[(&'static str, Option<&str>)]) -> EnvRestore {
        let saved = vars
            .iter()
            .map(|(k, _)| (*k, std::env::var(k).ok()))
            .collect();
        for (k, v) in vars {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
        EnvRestore(saved)
    }
}

/// Puts variables back on drop, without a lock of its own.
struct EnvRestore(Vec<(&'static str, Option<String>)>);

impl Drop for EnvRestore {
    fn drop(&mut self) {
        for (k, v) in self.0.drain(..).rev() {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
    }
}

impl Drop for EnvGuard {
    fn drop(&mut self) {
        for (k, v) in self.saved.drain(..).rev() {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
    }
}

/// `http://127.0.0.1:<port>` where nothing listens: bind an ephemeral port, then free it.
fn refusing_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// No token from the developer's environment is sent, even to loopback.
const NO_TOKEN: (&str, Option<&str>) = ("HF_HUB_DISABLE_IMPLICIT_TOKEN", Some("1"));

#[test]
fn hf_hub_offline_turns_offline_mode_on() {
    let endpoint = refusing_endpoint();
    for value in ["1", "true", "YES", "on"] {
        let _env = EnvGuard::set(&[
            ("HF_HUB_OFFLINE", Some(value)),
            ("HF_ENDPOINT", Some(&endpoint)),
            NO_TOKEN,
        ]);
        // Options say online; the variable wins. A miss says "offline", not "could not fetch".
        let empty = FakeCache::new();
        let opts = empty.opts().with_offline(false);
        let msg = fetch_model(REPO, &opts).unwrap_err().to_string();
        assert!(msg.contains("is not in the cache at"), "{value}: {msg}");
        assert!(msg.contains("offline mode is on"), "{value}: {msg}");
        assert!(!msg.contains(&endpoint), "{value}: {msg}");

        let cache = FakeCache::new().with_main();
        let dir = fetch_model(REPO, &cache.opts().with_offline(false)).unwrap();
        assert_eq!(dir, cache.snapshot(HASH_MAIN));
    }

    // A value that does not mean "on" leaves the options in charge: online, so the refusing
    // endpoint is asked and the error names it. (Other values: the unit test of
    // `offline_from_env`; each online try here costs hf-hub's retries, a few seconds.)
    {
        let value = "0";
        let _env = EnvGuard::set(&[
            ("HF_HUB_OFFLINE", Some(value)),
            ("HF_ENDPOINT", Some(&endpoint)),
            NO_TOKEN,
        ]);
        let empty = FakeCache::new();
        let msg = fetch_model(REPO, &empty.opts().with_offline(false))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("could not fetch `config.json`"),
            "{value:?}: {msg}"
        );
        assert!(msg.contains(&endpoint), "{value:?}: {msg}");
    }
}

#[test]
fn unreachable_endpoint_fails_fast_with_a_clear_error() {
    let endpoint = refusing_endpoint();
    let _env = EnvGuard::set(&[
        ("HF_HUB_OFFLINE", None),
        ("HF_ENDPOINT", Some(&endpoint)),
        NO_TOKEN,
    ]);
    let empty = FakeCache::new();
    let start = Instant::now();
    let progress = Progress::default();
    let opts = empty
        .opts()
        .with_offline(false)
        .with_progress(progress.clone());
    let err = fetch_model(REPO, &opts).unwrap_err();
    assert!(progress.events().is_empty(), "{:?}", progress.events());
    let took = start.elapsed();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "hub repo `{REPO}`: could not fetch `config.json` (revision `main`) from {endpoint}; "
        )),
        "{msg}"
    );
    assert!(msg.contains("HF_HUB_OFFLINE=1"), "says what to do: {msg}");
    // Why, in the error's sources: the client's own error.
    let mut why = String::new();
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        why.push_str(&format!("{e}: "));
        source = e.source();
    }
    assert!(why.to_lowercase().contains("connect"), "says why: {why}");
    // hf-hub retries connection errors 5 times with jittered backoff from 100 ms (at most
    // 6.2 s of sleep in all); far less than this bound.
    assert!(took < Duration::from_secs(30), "took {took:?}");
    eprintln!("unreachable endpoint failed after {took:?}");
}

#[test]
fn unreachable_endpoint_falls_back_to_the_cache() {
    let endpoint = refusing_endpoint();
    let _env = EnvGuard::set(&[
        ("HF_HUB_OFFLINE", None),
        ("HF_ENDPOINT", Some(&endpoint)),
        NO_TOKEN,
    ]);
    let cache = FakeCache::new().with_main();
    let start = Instant::now();
    let dir = fetch_model(REPO, &cache.opts().with_offline(false)).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_MAIN));
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
}

/// With the Hub out of reach, the cache stands in for it where it records that a file does not
/// exist, too: a repository without `config.json`, sharded weights (no `model.safetensors`).
/// (hf-hub's own fallback returned the network's error for those.)
#[test]
fn unreachable_endpoint_falls_back_to_what_the_cache_knows_is_absent() {
    let endpoint = refusing_endpoint();
    let _env = EnvGuard::set(&[
        ("HF_HUB_OFFLINE", None),
        ("HF_ENDPOINT", Some(&endpoint)),
        NO_TOKEN,
    ]);
    let shard = "model-00001-of-00001.safetensors";
    let cache = FakeCache::new();
    cache
        .set_ref("main", HASH_MAIN)
        .add_no_exist(HASH_MAIN, "config.json")
        .add_no_exist(HASH_MAIN, "model.safetensors")
        .add_blob(
            HASH_MAIN,
            "model.safetensors.index.json",
            &index(&[("w", shard)]),
        )
        .add_blob(HASH_MAIN, shard, &tiny_safetensors("w", 1.0));
    let dir = fetch_model(REPO, &online(&cache)).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_MAIN));
    // A file the cache records as absent is said so, not blamed on the hub it could not reach.
    let index_file = cache
        .snapshot(HASH_MAIN)
        .join("model.safetensors.index.json");
    std::fs::remove_file(&index_file).unwrap();
    cache.add_no_exist(HASH_MAIN, "model.safetensors.index.json");
    let msg = fetch_model(REPO, &online(&cache)).unwrap_err().to_string();
    assert!(
        msg.contains("the cache records that the hub has no such file; http://127.0.0.1:"),
        "{msg}"
    );
    assert!(msg.contains("could not be reached"), "{msg}");
    cache.add_blob(
        HASH_MAIN,
        "model.safetensors.index.json",
        &index(&[("w", shard)]),
    );
    std::fs::remove_file(
        cache
            .repo_dir()
            .join(".no_exist")
            .join(HASH_MAIN)
            .join("model.safetensors.index.json"),
    )
    .unwrap();
    // Without the cache's record, the network's error stands.
    std::fs::remove_dir_all(cache.repo_dir().join(".no_exist")).unwrap();
    let msg = fetch_model(REPO, &online(&cache)).unwrap_err().to_string();
    assert!(msg.contains("could not fetch `config.json`"), "{msg}");
    assert!(msg.contains("is the network up?"), "{msg}");
}

/// Online options on `cache`.
fn online(cache: &FakeCache) -> HubOptions {
    cache.opts().with_offline(false)
}

/// A [`DownloadProgress`] that records what it is told: `(file, done, total)` for updates and
/// `(file, u64::MAX, u64::MAX)` when a file is finished.
#[derive(Clone, Default)]
struct Progress(std::sync::Arc<Mutex<Vec<(String, u64, u64)>>>);

impl Progress {
    fn events(&self) -> Vec<(String, u64, u64)> {
        self.0.lock().unwrap().clone()
    }
}

impl DownloadProgress for Progress {
    fn update(&self, file: &str, done: u64, total: u64) {
        self.0.lock().unwrap().push((file.into(), done, total));
    }

    fn finish(&self, file: &str) {
        self.0
            .lock()
            .unwrap()
            .push((file.into(), u64::MAX, u64::MAX));
    }
}

fn hub_env(hub: &FakeHub) -> EnvGuard {
    EnvGuard::set(&[
        ("HF_HUB_OFFLINE", None),
        ("HF_ENDPOINT", Some(&hub.endpoint)),
        NO_TOKEN,
    ])
}

#[test]
fn downloads_into_an_empty_cache_at_one_commit() {
    let hub = FakeHub::start(REPO);
    hub.set_ref("main", HASH_MAIN)
        .add_file(HASH_MAIN, "config.json", CONFIG.as_bytes())
        .add_file(HASH_MAIN, "model.safetensors", &tiny_safetensors("w", 1.0))
        .set_ref("v1.0", HASH_V1)
        .add_file(HASH_V1, "model.safetensors", &tiny_safetensors("w", 2.0));
    let _env = hub_env(&hub);
    let cache = FakeCache::new();

    let progress = Progress::default();
    let dir = fetch_model(REPO, &online(&cache).with_progress(progress.clone())).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_MAIN));
    // Each download is reported, up to its whole size, then finished.
    let weights_len = tiny_safetensors("w", 1.0).len() as u64;
    let events = progress.events();
    assert!(
        events.contains(&("model.safetensors".into(), weights_len, weights_len)),
        "{events:?}"
    );
    assert_eq!(
        events.last(),
        Some(&("model.safetensors".into(), u64::MAX, u64::MAX)),
        "{events:?}"
    );
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(w["w"].to_vec1::<f32>().unwrap(), [1.0]);
    // The real cache layout: a ref, and snapshot entries that point into blobs/.
    let main_ref = std::fs::read_to_string(cache.repo_dir().join("refs/main")).unwrap();
    assert_eq!(main_ref.trim(), HASH_MAIN);
    #[cfg(unix)]
    for f in ["config.json", "model.safetensors"] {
        let target = std::fs::read_link(dir.join(f)).unwrap();
        assert!(
            target.starts_with("../../blobs"),
            "{f} -> {}",
            target.display()
        );
    }
    // `main` was resolved once; the weights were asked for at the commit it resolved to.
    let log = hub.log();
    let prefix = format!("/{REPO}/resolve");
    assert!(
        log.contains(&format!("HEAD {prefix}/main/config.json")),
        "{log:?}"
    );
    assert!(
        log.contains(&format!("GET {prefix}/{HASH_MAIN}/model.safetensors")),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l.contains("main/model.safetensors")),
        "{log:?}"
    );

    // Again: the blobs are cached, so nothing is downloaded (hf-hub still checks with HEAD).
    let count = |log: &[String], verb: &str| log.iter().filter(|l| l.starts_with(verb)).count();
    let (before, heads) = (count(&hub.log(), "GET"), count(&hub.log(), "HEAD"));
    let progress = Progress::default();
    let opts = online(&cache).with_progress(progress.clone());
    assert_eq!(fetch_model(REPO, &opts).unwrap(), dir);
    assert_eq!(count(&hub.log(), "GET"), before, "{:?}", hub.log());
    // Online, the hub was asked (a cache that answered alone could miss a moved `main`).
    assert!(count(&hub.log(), "HEAD") > heads, "{:?}", hub.log());
    assert!(progress.events().is_empty(), "cache hits report nothing");

    // And offline, the same cache answers without the hub.
    let n = hub.log().len();
    assert_eq!(fetch_model(REPO, &cache.opts()).unwrap(), dir);
    assert_eq!(hub.log().len(), n);

    // A tag, and a repository without config.json.
    let dir = fetch_model(REPO, &online(&cache).with_revision("v1.0")).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_V1));
    assert!(!dir.join("config.json").exists());

    // When `main` moves on the hub, an online fetch follows it; offline, the cache's ref does.
    hub.set_ref("main", HASH_V1);
    assert_eq!(
        fetch_model(REPO, &online(&cache)).unwrap(),
        cache.snapshot(HASH_V1)
    );
    assert_eq!(
        fetch_model(REPO, &cache.opts()).unwrap(),
        cache.snapshot(HASH_V1)
    );
}

#[test]
fn downloads_sharded_weights() {
    let (s1, s2) = (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    );
    let hub = FakeHub::start(REPO);
    hub.set_ref("main", HASH_MAIN)
        .add_file(
            HASH_MAIN,
            "model.safetensors.index.json",
            &index(&[("a", s1), ("b", s2)]),
        )
        .add_file(HASH_MAIN, s1, &tiny_safetensors("a", 1.0))
        .add_file(HASH_MAIN, s2, &tiny_safetensors("b", 2.0));
    let _env = hub_env(&hub);
    let cache = FakeCache::new();
    let dir = fetch_model(REPO, &online(&cache)).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_MAIN));
    for s in [s1, s2] {
        assert!(dir.join(s).is_file(), "{s}");
    }

    // A shard the index lists but the hub lacks.
    let hub = FakeHub::start(REPO);
    hub.set_ref("main", HASH_MAIN)
        .add_file(
            HASH_MAIN,
            "model.safetensors.index.json",
            &index(&[("a", s1), ("b", s2)]),
        )
        .add_file(HASH_MAIN, s1, &tiny_safetensors("a", 1.0));
    let _env2 = EnvGuard::set_locked(&[("HF_ENDPOINT", Some(&hub.endpoint))]);
    let cache = FakeCache::new();
    let msg = fetch_model(REPO, &online(&cache)).unwrap_err().to_string();
    assert!(
        msg.contains(&format!("`{s2}` does not exist at revision `main`")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("{} has no such file", hub.endpoint)),
        "{msg}"
    );
    assert!(msg.contains("lists it as a shard"), "{msg}");
}

#[test]
fn repository_without_weights() {
    let hub = FakeHub::start(REPO);
    hub.set_ref("main", HASH_MAIN)
        .add_file(HASH_MAIN, "config.json", CONFIG.as_bytes());
    let _env = hub_env(&hub);
    let cache = FakeCache::new();
    let msg = fetch_model(REPO, &online(&cache)).unwrap_err().to_string();
    assert!(
        msg.contains("`model.safetensors` does not exist at revision `main`"),
        "{msg}"
    );
    assert!(
        msg.contains("`model.safetensors.index.json` (sharded weights) does not exist either"),
        "{msg}"
    );
}

#[test]
fn gated_repositories_need_the_token() {
    let hub = FakeHub::start(REPO);
    hub.set_ref("main", HASH_MAIN)
        .add_file(HASH_MAIN, "model.safetensors", &tiny_safetensors("w", 1.0))
        .require_token("hf_test_token");
    let _env = hub_env(&hub);
    let cache = FakeCache::new();

    let msg = fetch_model(REPO, &online(&cache)).unwrap_err().to_string();
    assert!(
        msg.contains("could not fetch `config.json` (revision `main`)"),
        "{msg}"
    );
    assert!(msg.contains("gated or private"), "{msg}");
    assert!(msg.contains("HubOptions::with_token or HF_TOKEN"), "{msg}");

    let dir = fetch_model(REPO, &online(&cache).with_token("hf_test_token")).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_MAIN));

    // HF_TOKEN is checked and trimmed alike (hf-hub takes it as it is, and dropped this one, a
    // CRLF env file's, without a word); not with implicit tokens off.
    let cache = FakeCache::new();
    let _token = EnvGuard::set_locked(&[
        ("HF_TOKEN", Some("hf_test_token\r")),
        ("HF_HUB_DISABLE_IMPLICIT_TOKEN", None),
    ]);
    let dir = fetch_model(REPO, &online(&cache)).unwrap();
    assert_eq!(dir, cache.snapshot(HASH_MAIN));
    let _bad = EnvGuard::set_locked(&[("HF_TOKEN", Some("hf_te st"))]);
    let msg = fetch_model(REPO, &online(&cache)).unwrap_err().to_string();
    assert!(msg.contains("at position 6"), "{msg}");
    let _off = EnvGuard::set_locked(&[("HF_HUB_DISABLE_IMPLICIT_TOKEN", Some("1"))]);
    let msg = fetch_model(REPO, &online(&FakeCache::new()))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("gated or private"), "{msg}");
}

#[test]
fn unknown_repositories_are_named() {
    let hub = FakeHub::start("someone/else");
    let _env = hub_env(&hub);
    let cache = FakeCache::new();
    let msg = fetch_model(REPO, &online(&cache)).unwrap_err().to_string();
    assert!(
        msg.contains("the repository does not exist, or it is private"),
        "{msg}"
    );
}

/// A commit the hub names that is not a commit hash (`X-Repo-Commit: ../../evil`, from a hostile
/// mirror) is refused: hf-hub 1.0 builds the snapshot path from it as it is, outside the
/// cache's snapshots (here, inside the cache's root still), and the files there are not used.
#[test]
fn a_commit_that_is_not_a_hash_is_refused() {
    let hub = FakeHub::start(REPO);
    let evil = "../../evil";
    hub.set_ref("main", evil)
        .add_file(evil, "config.json", CONFIG.as_bytes())
        .add_file(evil, "model.safetensors", &tiny_safetensors("w", 1.0));
    let _env = hub_env(&hub);
    let cache = FakeCache::new();
    let msg = fetch_model(REPO, &online(&cache)).unwrap_err().to_string();
    assert!(
        msg.contains("not a snapshot named by a commit hash"),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1, "{msg}");
}
