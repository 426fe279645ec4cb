//! The small text files of a checkpoint (`config.json`, `model.safetensors.index.json`), read
//! with a bound: a hostile file must not exhaust memory or block the reader.

#![forbid(unsafe_code)]

use std::path::Path;

use crate::{Error, Result};

/// A JSON file's text, refusing files over `max` bytes (a hostile file must not exhaust memory)
/// and anything that is not a regular file (a FIFO would block forever).
pub(crate) fn read_json_text(path: &Path, max: u64) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(Error::InvalidFile {
            path: path.to_path_buf(),
            message: "not a regular file".into(),
        });
    }
    if meta.len() > max {
        return Err(Error::InvalidFile {
            path: path.to_path_buf(),
            message: format!(
                "the file is {} bytes, more than the {max} a JSON file of a checkpoint may be",
                meta.len()
            ),
        });
    }
    // Read at most one byte more than allowed: the file may have grown since it was measured.
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(max + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > max {
        return Err(Error::InvalidFile {
            path: path.to_path_buf(),
            message: format!(
                "the file grew past the {max} bytes a JSON file of a checkpoint may be"
            ),
        });
    }
    Ok(text)
}
