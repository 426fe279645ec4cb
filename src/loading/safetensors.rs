//! Safetensors files read lazily: headers are parsed and checked up front, and a tensor's bytes
//! are read only when it is asked for. One FFN of a 7B checkpoint costs its own 270 MB, not the
//! file's 14 GB, and no memory map (hence no `unsafe`) is needed.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::{Error, Result};

/// The largest header accepted, as in the `safetensors` crate: 100 MB.
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The largest `model.safetensors.index.json` read, 64 MiB: a 671B model's is about 10 MB.
const MAX_INDEX_BYTES: u64 = 1 << 26;

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    /// The stored dtype, `Err(name)` where candle has no type for it (`BOOL`, `U16`, ...):
    /// such a tensor is an error only when it is read.
    dtype: std::result::Result<DType, String>,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: u64,
    end: u64,
}

/// One or more safetensors files (the shards of one checkpoint), by tensor name.
#[derive(Debug, Clone, Default)]
pub(crate) struct SafetensorsStore {
    files: Vec<PathBuf>,
    tensors: BTreeMap<String, Entry>,
}

impl SafetensorsStore {
    /// Reads and checks the header of one file.
    pub(crate) fn open_file(path: &Path) -> Result<Self> {
        let mut store = Self::default();
        store.add_file(path)?;
        Ok(store)
    }

    /// Reads the shards a `model.safetensors.index.json` lists, and only those. Shard names must
    /// be plain file names in the index's directory: `../x` and absolute paths are refused.
    pub(crate) fn open_index(index: &Path) -> Result<Self> {
        let fail = |message: String| invalid(index, message);
        let weight_map = read_index(index)?;
        // (A bare file name's parent is "": the current directory.)
        let dir = match index.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut store = Self::default();
        for shard in shards(&weight_map) {
            let path = dir.join(shard);
            if !path.exists() {
                return Err(fail(format!(
                    "the index names shard `{shard}`, which does not exist in {}",
                    dir.display()
                )));
            }
            store.add_file(&path)?;
        }
        // Every tensor the index names must be in the shard it names.
        for (tensor, shard) in &weight_map {
            let in_shard = store.tensors.get(tensor).is_some_and(|e| {
                store.files[e.file].file_name() == Some(std::ffi::OsStr::new(shard))
            });
            if !in_shard {
                return Err(fail(format!(
                    "the index puts `{}` in `{}`, which does not hold it",
                    tensor.escape_debug(),
                    shard.escape_debug()
                )));
            }
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let fail = |message: String| invalid(path, message);
        // Checked before opening: opening a FIFO would block.
        if !std::fs::metadata(path).map_err(io)?.is_file() {
            return Err(fail("not a regular file".into()));
        }
        let mut file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        if file_len < 8 {
            return Err(fail(format!(
                "the file is {file_len} bytes, too short for a safetensors header"
            )));
        }
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(io)?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
            return Err(fail(format!(
                "the header claims {header_len} bytes but the file has {file_len}: \
                 truncated, or not a safetensors file"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let header: Value = serde_json::from_slice(&header)
            .map_err(|e| fail(format!("invalid header JSON: {e}")))?;
        let Value::Object(header) = header else {
            return Err(fail("the header is not a JSON object".into()));
        };
        let data_start = 8 + header_len;
        let data_len = file_len - data_start;
        let file_index = self.files.len();
        let mut ranges = Vec::new();
        for (name, info) in &header {
            if name == "__metadata__" {
                continue;
            }
            let entry = parse_entry(name, info, data_len).map_err(&fail)?;
            ranges.push((entry.0, entry.1, name.as_str()));
            if let Some(first) = self.tensors.get(name) {
                return Err(fail(format!(
                    "tensor `{}` is also in shard `{}`",
                    name.escape_debug(),
                    self.files[first.file].display()
                )));
            }
            let (start, end, dtype, shape) = entry;
            self.tensors.insert(
                name.clone(),
                Entry {
                    file: file_index,
                    dtype,
                    shape,
                    start: data_start + start,
                    end: data_start + end,
                },
            );
        }
        ranges.sort();
        for pair in ranges.windows(2) {
            let ((_, end_a, a), (start_b, _, b)) = (pair[0], pair[1]);
            if start_b < end_a {
                return Err(fail(format!("tensors `{a}` and `{b}` overlap")));
            }
        }
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// Every tensor name, sorted.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A tensor's stored shape.
    pub(crate) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// Reads one tensor, in its stored dtype, onto `device`.
    pub(crate) fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let Some(entry) = self.tensors.get(name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                found: crate::layout::closest_names(name, self.names()),
            });
        };
        let path = &self.files[entry.file];
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let dtype = self.readable(name, entry)?;
        let mut file = File::open(path).map_err(io)?;
        file.seek(SeekFrom::Start(entry.start)).map_err(io)?;
        let mut bytes = vec![0u8; (entry.end - entry.start) as usize];
        file.read_exact(&mut bytes).map_err(io)?;
        Ok(Tensor::from_raw_buffer(
            &bytes,
            dtype,
            &entry.shape,
            device,
        )?)
    }

    /// The entry's dtype, or the error for one candle has no type for.
    fn readable(&self, name: &str, entry: &Entry) -> Result<DType> {
        entry.dtype.clone().map_err(|stored| {
            invalid(
                &self.files[entry.file],
                format!(
                    "tensor `{}`: unsupported dtype `{}`",
                    name.escape_debug(),
                    stored.escape_debug()
                ),
            )
        })
    }

    /// Reads a float tensor converted to `dtype`; an integer tensor is an error.
    pub(crate) fn float_tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        if let Some(entry) = self.tensors.get(name) {
            let stored = self.readable(name, entry)?;
            if !stored.is_float() {
                return Err(Error::TensorDtype {
                    name: name.to_string(),
                    dtype: stored,
                });
            }
            // FP8 checkpoints (DeepSeek-V3, Qwen3 FP8, compressed-tensors) store a scale beside
            // each weight: the values alone are not the weights.
            if stored == DType::F8E4M3 {
                let scales = [format!("{name}_scale_inv"), format!("{name}_scale")];
                if let Some(scale) = scales.iter().find(|s| self.tensors.contains_key(*s)) {
                    return Err(invalid(
                        &self.files[entry.file],
                        format!(
                            "tensor `{}` is FP8 (F8_E4M3) scaled by `{}`, which this crate does \
                             not apply; use a bf16 or f16 copy of the checkpoint",
                            name.escape_debug(),
                            scale.escape_debug()
                        ),
                    ));
                }
            }
        }
        Ok(self.tensor(name, device)?.to_dtype(dtype)?)
    }
}

/// `(start, end, dtype, shape)` of one header entry, checked against the data section's length;
/// the dtype is `Err(name)` where candle has no type for it.
#[allow(clippy::type_complexity)]
fn parse_entry(
    name: &str,
    info: &Value,
    data_len: u64,
) -> std::result::Result<(u64, u64, std::result::Result<DType, String>, Vec<usize>), String> {
    let bad = |what: &str| format!("tensor `{name}`: {what}");
    let dtype_name = info
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no `dtype`"))?;
    let dtype = match dtype_name {
        "F64" => Ok(DType::F64),
        "F32" => Ok(DType::F32),
        "F16" => Ok(DType::F16),
        "BF16" => Ok(DType::BF16),
        "I64" => Ok(DType::I64),
        "I32" => Ok(DType::I32),
        "I16" => Ok(DType::I16),
        "U32" => Ok(DType::U32),
        "U8" => Ok(DType::U8),
        "F8_E4M3" => Ok(DType::F8E4M3),
        other => Err(other.to_string()),
    };
    // The element size, where the format says it (sub-byte and unknown types: not checked).
    let size = match &dtype {
        Ok(d) => Some(d.size_in_bytes()),
        Err(other) => match other.as_str() {
            "BOOL" | "I8" | "F8_E5M2" | "F8_E8M0" => Some(1),
            "U16" => Some(2),
            "U64" => Some(8),
            _ => None,
        },
    };
    let shape: Vec<usize> = info
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `shape` list"))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("`shape` is not a list of sizes"))?;
    let offsets: Vec<u64> = info
        .get("data_offsets")
        .and_then(Value::as_array)
        .map(|v| v.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let [start, end] = offsets[..] else {
        return Err(bad("`data_offsets` is not two byte offsets"));
    };
    if start > end {
        return Err(bad(&format!(
            "data_offsets [{start}, {end}] end before they start"
        )));
    }
    if let Some(size) = size {
        let bytes = shape
            .iter()
            .try_fold(size, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(&format!("shape {shape:?} overflows")))?;
        if end - start != bytes as u64 {
            return Err(bad(&format!(
                "data_offsets [{start}, {end}] do not hold {bytes} bytes of {dtype_name} {shape:?}"
            )));
        }
    }
    if end > data_len {
        return Err(bad(&format!(
            "data ends at byte {end} but the file has only {data_len} bytes of data: truncated?"
        )));
    }
    Ok((start, end, dtype, shape))
}

fn invalid(path: &Path, message: String) -> Error {
    Error::InvalidFile {
        path: path.to_path_buf(),
        message,
    }
}

impl super::LazyStore for SafetensorsStore {
    fn stored_shape(&self, name: &str) -> Option<&[usize]> {
        self.shape(name)
    }

    fn read(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        self.float_tensor(name, dtype, device)
    }
}

/// A `model.safetensors.index.json`'s `weight_map`: `(tensor, shard)` pairs, every shard a
/// plain file name (one that stays in the index's directory). The one parser of indexes, for
/// local checkpoints and the hub alike.
///
/// # Errors
/// [`Error::Io`] / [`Error::Json`] for a file that cannot be read or parsed (it is read with a
/// bound of 64 MiB); [`Error::InvalidFile`] for an index without a `weight_map` object, with an
/// entry that is not a plain file name, or with no entries.
pub(crate) fn read_index(index: &Path) -> Result<Vec<(String, String)>> {
    let fail = |message: String| invalid(index, format!("the index {message}"));
    let text = crate::files::read_json_text(index, MAX_INDEX_BYTES)?;
    let json: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: index.to_path_buf(),
        source,
    })?;
    let Some(map) = json.get("weight_map").and_then(Value::as_object) else {
        return Err(fail("has no `weight_map` object".into()));
    };
    let mut weight_map = Vec::with_capacity(map.len());
    for (tensor, shard) in map {
        let Some(shard) = shard.as_str() else {
            return Err(fail(format!(
                "maps tensor `{}` to {shard}, expected a file name string",
                tensor.escape_debug()
            )));
        };
        if !super::is_plain_file_name(shard) {
            return Err(fail(format!(
                "names shard `{}` (for tensor `{}`), which is not a plain file name in its \
                 directory; refusing to read it",
                shard.escape_debug(),
                tensor.escape_debug()
            )));
        }
        weight_map.push((tensor.clone(), shard.to_string()));
    }
    if weight_map.is_empty() {
        return Err(fail("has an empty `weight_map`".into()));
    }
    Ok(weight_map)
}

/// The distinct shards of a `weight_map`, in the order they first appear (a set, not a scan of
/// those seen: a hostile index can name millions).
pub(crate) fn shards(weight_map: &[(String, String)]) -> Vec<&str> {
    let mut seen = std::collections::HashSet::new();
    weight_map
        .iter()
        .map(|(_, shard)| shard.as_str())
        .filter(|shard| seen.insert(*shard))
        .collect()
}
