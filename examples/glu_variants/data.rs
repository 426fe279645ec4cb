//! The text: byte-level tokens from a folder of plain-text files (Shakespeare's works, one file
//! per play or poem, as `scripts/fetch_shakespeare.sh` lays them out), split by whole files into
//! training and held-out text.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::rng::Rng;

/// The plays held out by default: a tragedy, a comedy, a late romance and a Scottish play, about
/// a tenth of the text.
pub const DEFAULT_HELD_OUT: &str = "hamlet_gut,macbeth_gut,tempest_gut,twelfth_night_gut";

/// Training and held-out bytes.
pub struct Corpus {
    pub train: Vec<u8>,
    pub held_out: Vec<u8>,
    /// The files read, training ones first, for the record.
    pub train_files: Vec<String>,
    pub held_out_files: Vec<String>,
}

impl Corpus {
    /// Reads every `*.txt` in `dir` (in name order); the files whose stem is in `held_out` are
    /// the held-out text, the others the training text. `by_default`: `held_out` is the
    /// default, not the user's `--held-out` (which an error then says).
    pub fn load(dir: &Path, held_out: &[String], by_default: bool) -> Result<Self> {
        let entries = std::fs::read_dir(dir).with_context(|| {
            format!(
                "no text at {}: run scripts/fetch_shakespeare.sh (or pass --data DIR)",
                dir.display()
            )
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!(
                "no .txt files in {}: run scripts/fetch_shakespeare.sh (or pass --data DIR)",
                dir.display()
            );
        }
        let stem = |p: &Path| {
            p.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let stems: Vec<String> = files.iter().map(|p| stem(p)).collect();
        if let Some(missing) = held_out.iter().find(|h| !stems.contains(h)) {
            // The default names Shakespeare's plays: another corpus needs its own.
            bail!(
                "--held-out {}names {missing}, which is not in {} (it holds {}){}",
                if by_default { "(by default) " } else { "" },
                dir.display(),
                stems.join(", "),
                if by_default {
                    ": pass --held-out with files of this folder"
                } else {
                    ""
                }
            );
        }
        let mut corpus = Corpus {
            train: Vec::new(),
            held_out: Vec::new(),
            train_files: Vec::new(),
            held_out_files: Vec::new(),
        };
        for (path, name) in files.iter().zip(stems) {
            // A FIFO or device would block or never end: regular files only.
            if !path.is_file() {
                bail!("{} is not a regular file", path.display());
            }
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            if held_out.contains(&name) {
                corpus.held_out.extend_from_slice(&bytes);
                corpus.held_out_files.push(name);
            } else {
                corpus.train.extend_from_slice(&bytes);
                corpus.train_files.push(name);
            }
        }
        if corpus.train.is_empty() {
            bail!(
                "every file in {} is held out: no training text",
                dir.display()
            );
        }
        if corpus.held_out.is_empty() {
            bail!(
                "no held-out text: --held-out names no file of {}",
                dir.display()
            );
        }
        Ok(corpus)
    }

    /// Checks that both texts hold at least one window of `context + 1` bytes.
    pub fn check_context(&self, context: usize) -> Result<()> {
        last_start(&self.train, context, "training")?;
        last_start(&self.held_out, context, "held-out")?;
        Ok(())
    }

    /// A batch of `batch` training windows at offsets drawn from `rng`: inputs and next-byte
    /// targets, `u32 [batch, context]` each.
    pub fn train_batch(
        &self,
        rng: &mut Rng,
        batch: usize,
        context: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let last = last_start(&self.train, context, "training")?;
        let starts: Vec<usize> = (0..batch)
            .map(|_| (rng.next_u64() % (last as u64 + 1)) as usize)
            .collect();
        windows(&self.train, &starts, context, device)
    }

    /// `count` held-out windows spread evenly over the held-out text (the same every call).
    pub fn held_out_windows(
        &self,
        count: usize,
        context: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let last = last_start(&self.held_out, context, "held-out")?;
        let starts: Vec<usize> = (0..count)
            .map(|k| (k as u128 * last as u128 / count as u128) as usize)
            .collect();
        windows(&self.held_out, &starts, context, device)
    }
}

/// The last offset at which a window of `context` bytes and its next-byte targets fit in
/// `text`, or the error that the text is too short.
fn last_start(text: &[u8], context: usize, name: &str) -> Result<usize> {
    match text
        .len()
        .checked_sub(context)
        .and_then(|n| n.checked_sub(1))
    {
        Some(last) => Ok(last),
        None => bail!(
            "the {name} text ({} bytes) is shorter than --context {context} plus one",
            text.len()
        ),
    }
}

fn windows(
    text: &[u8],
    starts: &[usize],
    context: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let take = |offset: usize| -> Vec<u32> {
        starts
            .iter()
            .flat_map(|&s| {
                text[s + offset..s + offset + context]
                    .iter()
                    .map(|&b| u32::from(b))
            })
            .collect()
    };
    let shape = (starts.len(), context);
    Ok((
        Tensor::from_vec(take(0), shape, device)?,
        Tensor::from_vec(take(1), shape, device)?,
    ))
}
