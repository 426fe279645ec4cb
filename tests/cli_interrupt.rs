//! An interrupted CLI run leaves nothing half-written: not at the `--output` path, and (for the
//! signals a handler can catch) no temporary file beside it either.
#![cfg(unix)]

#[path = "common/craft.rs"]
mod craft;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/examples/infer`, which `cargo test` builds.
fn infer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples")
        .join("infer")
}

/// A block with a wide hidden size and an intermediate size of 1: computing it is cheap, while
/// its output, `tokens × 4096` f32, takes long enough to write to be interrupted mid-way.
fn wide_block(dir: &Path) -> PathBuf {
    let weights = dir.join("weights");
    std::fs::create_dir(&weights).unwrap();
    let [g, u, d] = craft::llama_names("model.layers.0.mlp");
    let bytes = craft::safetensors_f32(&[(&g, &[1, 4096]), (&u, &[1, 4096]), (&d, &[4096, 1])]);
    craft::write(&weights, "model.safetensors", &bytes)
}

fn spawn(dir: &Path, out: &Path, tokens: &str) -> Child {
    let weights = wide_block(dir);
    Command::new(infer_bin())
        .args(["--weights", weights.to_str().unwrap(), "--tokens", tokens])
        .args(["--output", out.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Waits until the temporary output exists, i.e. the run is writing, and returns true; false if
/// the run ended first.
fn wait_for_partial(child: &mut Child, dir: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if files_in(dir).iter().any(|n| n.ends_with(".partial")) {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("the run neither wrote nor ended in 120 s");
}

fn kill(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Interrupts a run while it writes its output with `signal`, and returns its stderr.
fn interrupt_mid_write(signal: &str) -> (std::process::ExitStatus, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.safetensors");
    let mut child = spawn(dir.path(), &out, "8192"); // a 128 MiB output
    assert!(
        wait_for_partial(&mut child, dir.path()),
        "the run ended before it could be interrupted"
    );
    kill(&child, signal);
    let output = child.wait_with_output().unwrap();
    assert!(
        !out.exists(),
        "{signal}: a partial output is at the target path"
    );
    let left: Vec<String> = files_in(dir.path())
        .into_iter()
        .filter(|n| n != "weights")
        .collect();
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
        left,
    )
}

#[test]
fn sigint_while_writing_leaves_nothing() {
    let (status, stderr, left) = interrupt_mid_write("-INT");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert_eq!(stderr.trim_end(), "error: interrupted");
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn sigterm_while_writing_leaves_nothing() {
    let (status, stderr, left) = interrupt_mid_write("-TERM");
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn sigkill_while_writing_never_leaves_a_partial_target() {
    // SIGKILL cannot be caught: the temporary file may stay, but the target is never partial.
    let (status, _, left) = interrupt_mid_write("-KILL");
    assert!(!status.success());
    assert!(left.iter().all(|n| n.ends_with(".partial")), "{left:?}");
}

#[test]
fn sigint_before_writing_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.safetensors");
    let child = spawn(dir.path(), &out, "8192");
    std::thread::sleep(Duration::from_millis(50));
    kill(&child, "-INT");
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    assert_eq!(files_in(dir.path()), vec!["weights".to_string()]);
}
