//! Fetching a model repository from the [Hugging Face Hub](https://huggingface.co).
//!
//! [`fetch_model`] downloads (or, offline, finds in the local cache) what a
//! [`GluFeedForward`](crate::GluFeedForward) needs from a model repository — `config.json` and the
//! safetensors weights, single-file or sharded — and returns the local snapshot directory that
//! holds them, ready for a directory loader.
//!
//! The cache is the one shared with Python's `huggingface_hub` and candle's examples
//! (`<cache>/models--<org>--<name>/{refs,snapshots,blobs}`), so a model downloaded by either is
//! found here without another download.
//!
//! ```no_run
//! use candle_glu::{fetch_model, HubOptions};
//! # fn main() -> candle_glu::Result<()> {
//! let dir = fetch_model("HuggingFaceTB/SmolLM2-135M-Instruct", &HubOptions::new())?;
//! assert!(dir.join("model.safetensors").exists());
//! # Ok(()) }
//! ```
//!
//! This module is behind the `hub` cargo feature (on by default).

#![forbid(unsafe_code)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hf_hub::progress::{DownloadEvent, FileStatus, Progress, ProgressEvent, ProgressHandler};
use hf_hub::repository::RepoTypeModel;
use hf_hub::{HFClient, HFClientSync, HFError, HFRepositorySync};

use crate::error::{Error, Result};

/// The environment variable that turns offline mode on, as in Python's `huggingface_hub`.
const OFFLINE_ENV: &str = "HF_HUB_OFFLINE";
/// The revision used when none is given.
const DEFAULT_REVISION: &str = "main";
/// The model config; optional.
const CONFIG_FILE: &str = "config.json";
/// Single-file weights.
const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of sharded weights.
const INDEX_FILE: &str = "model.safetensors.index.json";
/// The Hub's limit on the length of a repository name.
const MAX_REPO_NAME_LEN: usize = 96;

/// Where and how to fetch a repository from the Hugging Face Hub.
///
/// Built with [`HubOptions::new`] (or [`Default`]) and the `with_*` setters:
///
/// ```
/// use candle_glu::HubOptions;
///
/// let opts = HubOptions::new().with_revision("v1.0").with_offline(true);
/// assert_eq!(opts.revision.as_deref(), Some("v1.0"));
/// ```
///
/// `Debug` never prints the token, only whether one is set.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct HubOptions {
    /// Branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
    /// Access token; `None` means the usual sources (the `HF_TOKEN` environment variable, the
    /// file named by `HF_TOKEN_PATH`, the token file under `HF_HOME`).
    pub token: Option<String>,
    /// Cache directory; `None` means `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `~/.cache/huggingface/hub` (`$XDG_CACHE_HOME/huggingface/hub` where that is set).
    pub cache_dir: Option<PathBuf>,
    /// Resolve from the local cache only, never the network. Also on when the environment
    /// variable `HF_HUB_OFFLINE` is `1`, `true`, `yes` or `on` (any case).
    pub offline: bool,
    /// Told of each download's progress; files found in the cache report nothing. The library
    /// itself prints nothing.
    pub progress: Option<Arc<dyn DownloadProgress>>,
}

/// Receives the progress of [`fetch_model`]'s downloads, to show it as the application likes
/// (a progress bar, a log line). Files found in the cache report nothing.
///
/// ```
/// use candle_glu::{DownloadProgress, HubOptions};
///
/// struct Log;
/// impl DownloadProgress for Log {
///     fn update(&self, file: &str, done: u64, total: u64) {
///         eprintln!("{file}: {done} / {total} bytes");
///     }
/// }
/// let opts = HubOptions::new().with_progress(Log);
/// assert!(opts.progress.is_some());
/// ```
pub trait DownloadProgress: Send + Sync {
    /// `done` of `total` bytes of `file` have arrived (`total` is 0 while unknown). Called
    /// often: throttle the drawing.
    fn update(&self, file: &str, done: u64, total: u64);

    /// `file` has arrived whole.
    fn finish(&self, file: &str) {
        let _ = file;
    }
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("revision", &self.revision)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("progress", &self.progress.as_ref().map(|_| "<callback>"))
            .finish()
    }
}

impl HubOptions {
    /// Options for `main`, the usual token and cache, online, without progress output.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fetch this branch, tag or commit hash instead of `main`.
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = Some(revision.into());
        self
    }

    /// Authenticate with this token (for gated or private repositories) instead of the one
    /// found in `HF_TOKEN` or the token file.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Use this cache directory instead of the default one.
    pub fn with_cache_dir(mut self, cache_dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(cache_dir.into());
        self
    }

    /// Resolve from the local cache only (`true`), or allow the network (`false`, unless
    /// `HF_HUB_OFFLINE` is set).
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Report download progress to `progress`.
    pub fn with_progress(mut self, progress: impl DownloadProgress + 'static) -> Self {
        self.progress = Some(Arc::new(progress));
        self
    }

    /// Whether these options, with the process's `HF_HUB_OFFLINE`, mean offline mode.
    fn is_offline(&self) -> bool {
        self.offline || offline_from_env(std::env::var(OFFLINE_ENV).ok().as_deref())
    }
}

/// Fetches (or finds in the cache, offline) what a [`GluFeedForward`](crate::GluFeedForward)
/// needs from a model repository on the Hugging Face Hub, and returns the local snapshot
/// directory that holds it.
///
/// `repo_id` is `org/name` (e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`) or a bare `name`.
/// The files fetched are:
///
/// - `config.json`, if the repository has one (a repository without it is fine; offline, the
///   cache must record that it has none, as hf-hub and Python's `huggingface_hub` record the
///   Hub's answer, else it is an error: the block's activation comes from it);
/// - `model.safetensors`, or else `model.safetensors.index.json` and every shard its
///   `weight_map` lists.
///
/// All files come from one commit: the revision is resolved to a commit hash by the first file
/// fetched, and the rest are fetched at that hash, so a push to the branch in between cannot mix
/// two versions. Files already in the cache are not downloaded again.
///
/// Offline ([`HubOptions::offline`], or `HF_HUB_OFFLINE=1`) nothing is sent over the network:
/// the revision is looked up in the cache (`refs/<revision>`, or directly `snapshots/<hash>` for
/// a 40-hex-digit commit hash). Online, a Hub that cannot be reached (connection refused, time
/// out, 5xx) falls back to the cached copy when there is one.
///
/// # Errors
///
/// [`Error::Hub`] when:
/// - `repo_id` or the revision is malformed (empty parts, `..`, characters the Hub does not
///   allow);
/// - the repository has neither `model.safetensors` nor `model.safetensors.index.json`, or the
///   index is not valid JSON with a `weight_map`, or names a shard that is not a plain file name
///   (`../x`, an absolute path, a name with a path separator), or names a shard that is missing;
/// - offline, a file is not in the cache (the message gives the cache directory and says what is
///   missing: the repository, the ref, the snapshot or the file);
/// - online, the Hub refuses access (gated or private repository, bad token), cannot be reached
///   with nothing cached, or a download fails.
///
/// [`Error::Io`] when the index cannot be read, [`Error::Json`] when it does not parse.
///
/// # Blocking
///
/// The call blocks until every file is there. It may be made from inside an async runtime
/// (the downloads run on a runtime thread of their own), but it then blocks that runtime's
/// thread: wrap it in `tokio::task::spawn_blocking` there.
pub fn fetch_model(repo_id: &str, opts: &HubOptions) -> Result<PathBuf> {
    validate_repo_id(repo_id)?;
    let revision = opts.revision.as_deref().unwrap_or(DEFAULT_REVISION);
    validate_revision(repo_id, revision)?;
    let mut fetcher = Fetcher::new(repo_id, revision, opts)?;

    // config.json first: small, and it pins the commit for the weights.
    let config = fetcher.fetch(CONFIG_FILE)?;

    match fetcher.fetch(WEIGHTS_FILE)? {
        Lookup::Found(_) => {}
        Lookup::Missing {
            not_cached: weights_not_cached,
        } => match fetcher.fetch(INDEX_FILE)? {
            Lookup::Found(index) => {
                for shard in shard_names(repo_id, revision, &index)? {
                    if let Lookup::Missing { not_cached } = fetcher.fetch(&shard)? {
                        return Err(fetcher.missing(
                            &shard,
                            not_cached,
                            &format!("and `{INDEX_FILE}` lists it as a shard"),
                        ));
                    }
                }
            }
            Lookup::Missing { not_cached } => {
                let index = if not_cached {
                    "is not in the cache either"
                } else {
                    "does not exist either"
                };
                return Err(fetcher.missing(
                    WEIGHTS_FILE,
                    weights_not_cached,
                    &format!("and `{INDEX_FILE}` (sharded weights) {index}"),
                ));
            }
        },
    }

    // The config may be absent, but only where the Hub (or the cache's record of its answer)
    // says so: a cache that merely lacks it would give a block of the wrong activation, silently.
    if let Lookup::Missing { not_cached: true } = config {
        return Err(fetcher.missing(
            CONFIG_FILE,
            true,
            "and the block's activation and sizes come from it (to open the weights without \
             it, pass their directory to Checkpoint::open)",
        ));
    }
    fetcher.snapshot.ok_or_else(|| {
        // Unreachable: the weights were found, so a snapshot directory was recorded.
        hub_error(repo_id, "no snapshot directory was resolved".to_string())
    })
}

/// Whether a value of `HF_HUB_OFFLINE` turns offline mode on: `1`, `true`, `yes` or `on`, in any
/// case, as in Python's `huggingface_hub`.
pub(crate) fn offline_from_env(value: Option<&str>) -> bool {
    value.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// The result of looking for one file.
enum Lookup {
    /// The file's path in the snapshot directory.
    Found(PathBuf),
    /// The file is not there: offline and not cached (`not_cached`), or the Hub (or a cached
    /// "does not exist" marker) says the repository has no such file at this revision.
    Missing {
        /// Offline and not in the cache, rather than known not to exist.
        not_cached: bool,
    },
}

/// One `fetch_model` call: the client, and the commit and snapshot directory once known.
struct Fetcher<'a> {
    repo_id: &'a str,
    /// The revision asked for.
    revision: &'a str,
    /// The commit hash the first file resolved to; later files are fetched at it.
    pinned: Option<String>,
    /// The snapshot directory of the first file found.
    snapshot: Option<PathBuf>,
    repo: HFRepositorySync<RepoTypeModel>,
    cache_dir: PathBuf,
    endpoint: String,
    offline: bool,
    /// Online, the hub could not be reached and the cache answered for it.
    unreachable: bool,
    progress: Option<Arc<dyn DownloadProgress>>,
}

impl<'a> Fetcher<'a> {
    fn new(repo_id: &'a str, revision: &'a str, opts: &HubOptions) -> Result<Self> {
        let mut builder = HFClient::builder();
        if let Some(dir) = &opts.cache_dir {
            builder = builder.cache_dir(dir.clone());
        }
        // The token given, else `HF_TOKEN` as hf-hub would take it (unless implicit tokens are
        // off), checked alike: hf-hub takes the variable untrimmed, and drops a token that is
        // not a valid header without a word. (Token files it trims itself.)
        let implicit = || {
            let off =
                std::env::var_os("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_some_and(|v| !v.is_empty());
            let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
            token.filter(|_| !off)
        };
        if let Some(token) = opts.token.clone().or_else(implicit) {
            builder = builder.token(checked_token(repo_id, &token)?);
        }
        let client = builder
            .build()
            .map_err(|e| hub_error_from(repo_id, "cannot set up the hub client".into(), e))?;
        let cache_dir = client.cache_dir().to_path_buf();
        let endpoint = client.endpoint().to_string();
        let client = HFClientSync::from_inner(client)
            .map_err(|e| hub_error_from(repo_id, "cannot start the hub client".into(), e))?;
        let (owner, name) = hf_hub::split_id(repo_id);
        Ok(Self {
            repo_id,
            revision,
            pinned: None,
            snapshot: None,
            repo: client.model(owner, name),
            cache_dir,
            endpoint,
            offline: opts.is_offline(),
            unreachable: false,
            progress: opts.progress.clone(),
        })
    }

    /// The revision to ask for: the pinned commit once known, else the one asked for.
    fn effective_revision(&self) -> &str {
        self.pinned.as_deref().unwrap_or(self.revision)
    }

    /// Downloads `file`, or finds it in the cache; records the snapshot directory.
    fn fetch(&mut self, file: &str) -> Result<Lookup> {
        let progress = match &self.progress {
            Some(sink) if !self.offline => Some(Progress::new(Relay::new(file, sink.clone()))),
            _ => None,
        };
        let result = self.request(file, self.offline, progress);
        let path = match result {
            Ok(path) => path,
            Err(HFError::LocalEntryNotFound { .. }) => {
                return Ok(Lookup::Missing { not_cached: true })
            }
            Err(HFError::EntryNotFound { .. }) => return Ok(Lookup::Missing { not_cached: false }),
            // hf-hub falls back to the cache for a file it holds, but returns the network's
            // error where the cache records that the file does not exist (a repository without
            // `config.json`, sharded weights without `model.safetensors`): asked again, the
            // cache answers.
            Err(e) if is_transient(&e) => match self.request(file, true, None) {
                Ok(path) => {
                    self.unreachable = true;
                    path
                }
                Err(HFError::EntryNotFound { .. }) => {
                    self.unreachable = true;
                    return Ok(Lookup::Missing { not_cached: false });
                }
                Err(_) => return Err(self.download_error(file, e)),
            },
            Err(e) => return Err(self.download_error(file, e)),
        };
        self.record(file, &path)?;
        Ok(Lookup::Found(path))
    }

    /// `file` at the effective revision, from the cache alone if `local_only`.
    fn request(
        &self,
        file: &str,
        local_only: bool,
        progress: Option<Progress>,
    ) -> std::result::Result<PathBuf, HFError> {
        self.repo
            .download_file()
            .filename(file)
            .revision(self.effective_revision().to_string())
            .local_files_only(local_only)
            .maybe_progress(progress)
            .send()
    }

    /// Pins the commit and snapshot directory on the first file found, and checks later ones
    /// landed in the same directory.
    fn record(&mut self, file: &str, path: &Path) -> Result<()> {
        let Some(dir) = path.parent() else {
            return Err(hub_error(
                self.repo_id,
                format!(
                    "`{file}` resolved to {}, which has no parent directory",
                    path.display()
                ),
            ));
        };
        // `snapshots/<commit hash>` of this repository's cache folder, and nothing else: hf-hub
        // builds the path from the hub's `X-Repo-Commit` header as it is (`../../x` included).
        let snapshots = self
            .cache_dir
            .join(repo_folder(self.repo_id))
            .join("snapshots");
        let hash = dir
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| is_commit_hash(n));
        let Some(hash) = hash.filter(|_| dir.parent() == Some(snapshots.as_path())) else {
            return Err(hub_error(
                self.repo_id,
                format!(
                    "`{file}` resolved to {}, not a snapshot named by a commit hash in {} (the \
                     hub's commit header was not a commit hash); not used",
                    path.display(),
                    snapshots.display()
                ),
            ));
        };
        match &self.snapshot {
            None => {
                self.pinned = Some(hash.to_string());
                self.snapshot = Some(dir.to_path_buf());
            }
            Some(snapshot) if snapshot != dir => {
                return Err(hub_error(
                    self.repo_id,
                    format!(
                        "`{file}` resolved to {}, outside the snapshot {} of the other files",
                        path.display(),
                        snapshot.display()
                    ),
                ));
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The error for a file that must exist and does not: `context` says why it is needed.
    fn missing(&self, file: &str, not_cached: bool, context: &str) -> Error {
        let revision = self.revision;
        if not_cached {
            let where_ = self.cache_dir.join(repo_folder(self.repo_id));
            return hub_error(
                self.repo_id,
                format!(
                    "`{file}` (revision `{revision}`) is not in the cache at {} ({}), {context}; \
                     offline mode is on (HubOptions::offline or {OFFLINE_ENV}), so the hub was not asked",
                    where_.display(),
                    self.cache_miss_detail(),
                ),
            );
        }
        let source = if self.offline {
            "the cache records that the hub has no such file".to_string()
        } else if self.unreachable {
            format!(
                "the cache records that the hub has no such file; {} could not be reached",
                self.endpoint
            )
        } else {
            format!("{} has no such file", self.endpoint)
        };
        hub_error(
            self.repo_id,
            format!(
                "`{file}` does not exist at revision `{revision}` ({source}; check the repo id and \
                 revision), {context}"
            ),
        )
    }

    /// Says which part of the cache is missing: the repository, the ref, the snapshot or the
    /// file itself.
    fn cache_miss_detail(&self) -> String {
        let repo_dir = self.cache_dir.join(repo_folder(self.repo_id));
        if !repo_dir.is_dir() {
            return "the repository was never downloaded there".to_string();
        }
        let hash = match &self.pinned {
            Some(hash) => hash.clone(),
            None if is_commit_hash(self.revision) => self.revision.to_string(),
            None => {
                let ref_file = repo_dir.join("refs").join(self.revision);
                match std::fs::read_to_string(&ref_file) {
                    Ok(hash) => hash.trim().to_string(),
                    Err(_) => {
                        return format!(
                            "the revision was never downloaded: no ref file {}",
                            ref_file.display()
                        )
                    }
                }
            }
        };
        if !repo_dir.join("snapshots").join(&hash).is_dir() {
            return format!("commit {hash} has no snapshot directory");
        }
        format!("snapshot {hash} lacks the file")
    }

    /// The error for a failed download: says which file, revision and endpoint, and what to do
    /// for access errors; the client's error is its source.
    fn download_error(&self, file: &str, e: HFError) -> Error {
        let revision = self.revision;
        let hint = match &e {
            HFError::AuthRequired { context }
                if context.error_code.as_deref() == Some("RepoNotFound") =>
            {
                "; the repository does not exist, or it is private and no valid token was given \
                 (HubOptions::with_token or HF_TOKEN)"
            }
            HFError::AuthRequired { .. } | HFError::Forbidden { .. } => {
                "; the repository may be gated or private: accept its terms on the hub and pass a \
                 token (HubOptions::with_token or HF_TOKEN)"
            }
            HFError::RepoNotFound { .. } => "; check the repo id",
            HFError::RevisionNotFound { .. } => "; check the revision",
            HFError::Request { .. } => {
                "; is the network up? set HF_HUB_OFFLINE=1 to use the cache only"
            }
            _ => "",
        };
        hub_error_from(
            self.repo_id,
            format!(
                "could not fetch `{file}` (revision `{revision}`) from {}{hint}",
                self.endpoint,
            ),
            e,
        )
    }
}

/// The token without the white space around it (a line read from a file keeps its newline; Python's
/// `huggingface_hub` strips it too); refused, without being shown, if empty or if it holds a
/// character no token has (hf-hub would drop such a header silently, and a gated repository
/// would then ask for the token that was given).
fn checked_token(repo_id: &str, token: &str) -> Result<String> {
    let token = token.trim();
    if token.is_empty() {
        return Err(hub_error(repo_id, "the token is empty".into()));
    }
    if let Some(at) = token.chars().position(|c| !c.is_ascii_graphic()) {
        return Err(hub_error(
            repo_id,
            format!(
                "the token has a character no token has (a space, control or non-ASCII \
                 character) at position {}",
                at + 1
            ),
        ));
    }
    Ok(token.to_string())
}

/// Whether a failed request says the Hub could not be reached (a connection refused or timed
/// out, a 5xx answer), where the cache may stand in for it; as hf-hub's own fallback decides.
fn is_transient(e: &HFError) -> bool {
    match e {
        HFError::Request { source, .. } => source.is_timeout() || source.is_connect(),
        HFError::Http { context } => matches!(context.status.as_u16(), 500 | 502 | 503 | 504),
        _ => false,
    }
}

/// The shard names of a `model.safetensors.index.json`, read by the loaders' own parser; what
/// is wrong with the index is said as a hub error.
fn shard_names(repo_id: &str, revision: &str, index: &Path) -> Result<Vec<String>> {
    let weight_map = super::safetensors::read_index(index).map_err(|e| match e {
        Error::InvalidFile { message, .. } => hub_error(
            repo_id,
            format!("`{INDEX_FILE}` (revision `{revision}`): {message}"),
        ),
        e => e,
    })?;
    let shards = super::safetensors::shards(&weight_map);
    Ok(shards.into_iter().map(str::to_string).collect())
}

/// Checks a repository id: `org/name` or `name`, as the Hub allows them.
fn validate_repo_id(repo_id: &str) -> Result<()> {
    let fail = |why: &str| {
        Err(hub_error(
            repo_id,
            format!("invalid repo id: {why}; expected `org/name` or `name`, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`"),
        ))
    };
    let parts: Vec<&str> = repo_id.split('/').collect();
    if parts.len() > 2 {
        return fail("it has more than one `/`");
    }
    for part in &parts {
        if part.is_empty() {
            return fail("it has an empty part");
        }
        if part.len() > MAX_REPO_NAME_LEN {
            return fail(&format!(
                "a part is longer than {MAX_REPO_NAME_LEN} characters"
            ));
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return fail(&format!(
                "`{}` is not allowed (only letters, digits, `-`, `_` and `.`)",
                c.escape_default()
            ));
        }
        if part.contains("..") || part.contains("--") {
            return fail("`..` and `--` are not allowed");
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return fail("a part starts or ends with `-` or `.`");
        }
    }
    Ok(())
}

/// Checks a revision: a branch, tag or commit, which becomes a path under `refs/` in the cache,
/// so it must not climb out of it.
fn validate_revision(repo_id: &str, revision: &str) -> Result<()> {
    let bad = revision.is_empty()
        || revision.starts_with('/')
        || revision.ends_with('/')
        || revision.contains(['\\', '\0'])
        || revision.chars().any(char::is_control)
        || revision
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(hub_error(
            repo_id,
            format!(
                "invalid revision `{}`: expected a branch, tag or commit hash, without empty, \
                 `.` or `..` path parts",
                revision.escape_default()
            ),
        ));
    }
    Ok(())
}

/// A full 40-hex-digit commit hash, which the cache keeps snapshots under.
fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cache folder of a model repository: `models--<org>--<name>`.
fn repo_folder(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

fn hub_error(repo: &str, message: String) -> Error {
    Error::Hub {
        repo: repo.to_string(),
        message,
        source: None,
    }
}

/// [`hub_error`] caused by the hub client's error `source`.
fn hub_error_from(repo: &str, message: String, source: HFError) -> Error {
    Error::Hub {
        repo: repo.to_string(),
        message,
        source: Some(Box::new(source)),
    }
}

/// Relays hf-hub's progress events for one file to a [`DownloadProgress`]: only real transfers
/// (a cache hit reports `Complete` alone), and `finish` once after something was reported.
struct Relay {
    file: String,
    sink: Arc<dyn DownloadProgress>,
    /// `(total, reported)`: the size once known, and whether `update` was called.
    state: Mutex<(u64, bool)>,
}

impl Relay {
    fn new(file: &str, sink: Arc<dyn DownloadProgress>) -> Self {
        Self {
            file: file.to_string(),
            sink,
            state: Mutex::new((0, false)),
        }
    }
}

impl ProgressHandler for Relay {
    fn on_progress(&self, event: &ProgressEvent) {
        let ProgressEvent::Download(event) = event else {
            return;
        };
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let (total, reported) = &mut *state;
        match event {
            DownloadEvent::Start { total_bytes, .. } => *total = *total_bytes,
            DownloadEvent::Progress { files } => {
                for f in files {
                    if f.status != FileStatus::Complete || *reported {
                        *total = f.total_bytes.max(*total);
                        *reported = true;
                        self.sink.update(&self.file, f.bytes_completed, *total);
                    }
                }
            }
            DownloadEvent::AggregateProgress {
                bytes_completed,
                total_bytes,
                ..
            } => {
                *total = (*total_bytes).max(*total);
                *reported = true;
                self.sink.update(&self.file, *bytes_completed, *total);
            }
            DownloadEvent::Complete => {
                if *reported {
                    self.sink.finish(&self.file);
                }
                *reported = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_env_values() {
        for on in ["1", "true", "TRUE", "yes", "Yes", "on", " 1 "] {
            assert!(
                offline_from_env(Some(on)),
                "{on:?} should turn offline mode on"
            );
        }
        for off in ["", "0", "false", "no", "off", "2", "offline"] {
            assert!(
                !offline_from_env(Some(off)),
                "{off:?} should leave offline mode off"
            );
        }
        assert!(!offline_from_env(None));
    }

    #[test]
    fn plain_file_names() {
        for ok in ["model-00001-of-00002.safetensors", "a", ".hidden", "a..b"] {
            assert!(super::super::is_plain_file_name(ok), "{ok:?}");
        }
        for bad in [
            "", ".", "..", "../x", "/abs", "a/b", "a\\b", "C:x", "nul\0", "./x", "a\nb", "tab\t",
        ] {
            assert!(!super::super::is_plain_file_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn repo_ids() {
        for ok in [
            "gpt2",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "org/a.b_c-d",
            "a/b",
        ] {
            assert!(validate_repo_id(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "/",
            "a/",
            "/a",
            "a/b/c",
            "..",
            "a/..",
            "a/b..c",
            "a--b/c",
            "-a/b",
            "a/b.",
            "a b",
            "a/b?",
            "ünï/code",
        ] {
            assert!(validate_repo_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_repo_id(&"a".repeat(97)).is_err());
    }

    #[test]
    fn revisions() {
        for ok in ["main", "v1.0", "refs/pr/1", "feature/x", &"a".repeat(40)] {
            assert!(validate_revision("r", ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "..",
            "../main",
            "a/../../b",
            "/abs",
            "a/",
            "a//b",
            "a\\b",
            "a\nb",
            "./a",
        ] {
            assert!(validate_revision("r", bad).is_err(), "{bad:?}");
        }
    }
}
