//! Checkpoint files written byte by byte, good and broken: safetensors headers and GGUF files,
//! so that every malformation is exactly the one meant, whatever any writer library allows.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// One safetensors header entry: name, dtype, shape, data offsets.
pub struct StEntry {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    pub offsets: [u64; 2],
}

/// A safetensors file from entries and a data section, header written as given.
pub fn safetensors_raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A safetensors file of f32 tensors laid out one after the other, each `(name, shape)` filled
/// with small distinct values.
pub fn safetensors_f32(tensors: &[(&str, &[u64])]) -> Vec<u8> {
    let entries: Vec<(&str, &str, &[u64])> = tensors.iter().map(|(n, s)| (*n, "F32", *s)).collect();
    safetensors_typed(&entries)
}

/// As [`safetensors_f32`], with a dtype per tensor (`F32`, `F16`, `BF16`, `I32`, `I64`, `U8`...).
pub fn safetensors_typed(tensors: &[(&str, &str, &[u64])]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape) in tensors {
        let size: u64 = match *dtype {
            "F64" | "I64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" => 2,
            _ => 1,
        };
        let n: u64 = shape.iter().product();
        let start = data.len() as u64;
        for k in 0..n * size {
            // A tiny positive float in every 4-byte lane: distinct, finite values.
            data.push(if k % 4 == 3 { 0x3c } else { (k % 251) as u8 });
        }
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    safetensors_raw(&serde_json::Value::Object(header).to_string(), &data)
}

/// The names of a Llama-layout block's weights under `prefix`.
pub fn llama_names(prefix: &str) -> [String; 3] {
    ["gate_proj", "up_proj", "down_proj"].map(|p| format!("{prefix}.{p}.weight"))
}

/// A Llama-layout block `model.layers.0.mlp` of hidden `h`, intermediate `i`, as safetensors.
pub fn llama_block(h: u64, i: u64) -> Vec<u8> {
    let [g, u, d] = llama_names("model.layers.0.mlp");
    safetensors_f32(&[(&g, &[i, h]), (&u, &[i, h]), (&d, &[h, i])])
}

/// A GGUF metadata value, written as the file stores it.
pub enum GgufValue {
    U32(u32),
    U64(u64),
    I32(i32),
    Str(String),
    /// An array's element type id, declared length and the elements' raw bytes.
    Array(u32, u64, Vec<u8>),
}

impl GgufValue {
    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::Str(_) => 8,
            GgufValue::Array(..) => 9,
            GgufValue::U64(_) => 10,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            GgufValue::U32(v) => v.to_le_bytes().to_vec(),
            GgufValue::I32(v) => v.to_le_bytes().to_vec(),
            GgufValue::U64(v) => v.to_le_bytes().to_vec(),
            GgufValue::Str(s) => gguf_string(s),
            GgufValue::Array(ty, n, raw) => {
                let mut out = ty.to_le_bytes().to_vec();
                out.extend(n.to_le_bytes());
                out.extend(raw);
                out
            }
        }
    }
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend(s.as_bytes());
    out
}

/// ggml type ids.
pub const F32: u32 = 0;
pub const Q4_0: u32 = 2;
pub const Q5_0: u32 = 6;
pub const Q8_K: u32 = 15;
pub const IQ2_XXS: u32 = 16;

/// A GGUF v3 file, built up and written by hand.
pub struct Gguf {
    pub version: u32,
    pub metadata: Vec<(String, GgufValue)>,
    /// Name, dimensions in PyTorch order `[out, in]`, type id, data.
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Gguf {
    /// A Llama FFN, layer 0 of 1, hidden `h`, intermediate `i`, weights of type `ty` (F32 or
    /// Q4_0), with the metadata llama.cpp writes.
    pub fn llama(h: u64, i: u64, ty: u32) -> Self {
        let mut g = Gguf {
            version: 3,
            metadata: vec![
                (
                    "general.architecture".into(),
                    GgufValue::Str("llama".into()),
                ),
                ("llama.embedding_length".into(), GgufValue::U32(h as u32)),
                ("llama.feed_forward_length".into(), GgufValue::U32(i as u32)),
                ("llama.block_count".into(), GgufValue::U32(1)),
            ],
            tensors: Vec::new(),
        };
        for (name, dims) in [
            ("blk.0.ffn_gate.weight", [i, h]),
            ("blk.0.ffn_up.weight", [i, h]),
            ("blk.0.ffn_down.weight", [h, i]),
        ] {
            g.tensors.push((
                name.into(),
                dims.to_vec(),
                ty,
                tensor_bytes(ty, dims[0] * dims[1]),
            ));
        }
        g
    }

    pub fn meta(mut self, key: &str, value: GgufValue) -> Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.into(), value));
        self
    }

    /// Changes one tensor's stored type id (its data stays as it was).
    pub fn retype(mut self, name: &str, ty: u32) -> Self {
        for t in &mut self.tensors {
            if t.0 == name {
                t.2 = ty;
            }
        }
        self
    }

    /// Changes one tensor's recorded dimensions (its data stays as it was).
    pub fn redim(mut self, name: &str, dims: &[u64]) -> Self {
        for t in &mut self.tensors {
            if t.0 == name {
                t.1 = dims.to_vec();
            }
        }
        self
    }

    /// The file, its data aligned to `general.alignment` where that is a u32 power of two,
    /// else to the spec's default, 32 bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let align = self
            .metadata
            .iter()
            .find_map(|(k, v)| match (k.as_str(), v) {
                ("general.alignment", GgufValue::U32(a)) if a.is_power_of_two() => {
                    Some(*a as usize)
                }
                _ => None,
            });
        let align = align.unwrap_or(32);
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            out.extend(gguf_string(k));
            out.extend(v.type_id().to_le_bytes());
            out.extend(v.bytes());
        }
        let mut data = Vec::new();
        for (name, dims, ty, raw) in &self.tensors {
            out.extend(gguf_string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims.iter().rev() {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend((data.len() as u64).to_le_bytes());
            data.extend(raw);
            data.resize(data.len().next_multiple_of(align), 0);
        }
        out.resize(out.len().next_multiple_of(align), 0);
        out.extend(data);
        out
    }
}

/// `n` values of ggml type `ty`: f32, or Q4_0 blocks (an f16 scale and 16 bytes of nibbles per
/// 32 values), or Q5_0 blocks.
pub fn tensor_bytes(ty: u32, n: u64) -> Vec<u8> {
    match ty {
        F32 => (0..n)
            .flat_map(|k| (((k % 13) as f32 - 6.0) * 0.01).to_le_bytes())
            .collect(),
        Q4_0 => (0..n / 32)
            .flat_map(|b| {
                let mut block = vec![0x1f, 0x21]; // f16 0.0101
                block.extend((0..16).map(|k| ((b * 37 + k) % 256) as u8));
                block
            })
            .collect(),
        // Q5_0: an f16 scale, 4 bytes of high bits and 16 bytes of nibbles per 32 values.
        Q5_0 => (0..n / 32)
            .flat_map(|b| {
                let mut block = vec![0x1f, 0x21];
                block.extend((0..20).map(|k| ((b * 53 + k * 7) % 256) as u8));
                block
            })
            .collect(),
        _ => panic!("no data writer for ggml type {ty}"),
    }
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}
