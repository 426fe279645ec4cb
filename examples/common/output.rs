//! Writing an output file so that it is never left half-written: the bytes go to a temporary
//! file beside the target (named after it and the process id), reach the disk, and are renamed
//! into place. A failure removes the temporary file, and so does Ctrl-C, SIGTERM or SIGHUP once
//! [`install_interrupt_handler`] has run.
// Each example uses what it needs of this module.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};

/// The temporary file being written, if any: the interrupt handler removes it.
static PARTIAL: Mutex<Option<PathBuf>> = Mutex::new(None);

fn partial() -> std::sync::MutexGuard<'static, Option<PathBuf>> {
    PARTIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT, SIGTERM or SIGHUP: remove the temporary output, say so on one line, exit 130.
pub fn install_interrupt_handler() {
    let installed = ctrlc::set_handler(|| {
        // Holding the lock also keeps `write_atomically` from renaming the file meanwhile.
        let partial = partial();
        if let Some(path) = partial.as_ref() {
            let _ = std::fs::remove_file(path);
        }
        eprintln!("error: interrupted");
        std::process::exit(130);
    });
    // Without the handler a signal still ends the run, and the target is still never partial.
    if let Err(e) = installed {
        eprintln!("warning: no interrupt handler ({e}): Ctrl-C may leave a temporary file");
    }
}

/// The directory a target is written into (its temporary file too).
pub fn output_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `bytes` to `path` through `.<name>.<pid>.partial` beside it; errors name `flag` and
/// the path.
pub fn write_atomically(path: &Path, flag: &str, bytes: &[u8]) -> Result<()> {
    write_atomically_with(path, flag, |file| file.write_all(bytes))
}

/// [`write_atomically`], the bytes written by `write` into the temporary file (for outputs
/// too large to hold whole in memory).
pub fn write_atomically_with(
    path: &Path,
    flag: &str,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{flag} {}: not a file name", path.display()))?;
    // The process id keeps two runs writing the same target from sharing a temporary file.
    let tmp = output_dir(path).join(format!(
        ".{}.{}.partial",
        name.to_string_lossy(),
        std::process::id()
    ));
    *partial() = Some(tmp.clone());
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        write(&mut file)?;
        file.sync_all()?; // the data is on disk before the name points at it
        let mut partial = partial();
        std::fs::rename(&tmp, path)?;
        *partial = None;
        Ok(())
    })()
    .with_context(|| format!("{flag} {}", path.display()));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        *partial() = None;
    }
    result
}
