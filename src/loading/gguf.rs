//! GGUF files (llama.cpp): metadata, and tensors kept quantized or dequantized.
//!
//! candle's reader turns GGUF's `[in, out]` dimension order into PyTorch's `[out, in]`, so FFN
//! weights need no transpose.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Shape, Tensor};

use crate::{Activation, Error, GluConfig, Result, WeightLayout};

/// An opened GGUF file: its metadata and tensor table; tensor data is read on demand.
#[derive(Debug)]
pub struct GgufStore {
    path: PathBuf,
    content: Content,
}

impl GgufStore {
    /// Reads and checks the header, metadata and tensor table.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = Content::read(&mut BufReader::new(file)).map_err(|e| Error::InvalidFile {
            path: path.to_path_buf(),
            message: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    /// Whether the file has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A tensor's shape, PyTorch order.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|t| t.shape.dims())
    }

    /// A metadata value.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata("general.architecture")?
            .to_string()
            .ok()
            .map(String::as_str)
    }

    fn arch_u64(&self, key: &str) -> Option<usize> {
        let arch = self.architecture()?;
        let v = self.metadata(&format!("{arch}.{key}"))?;
        v.to_u64()
            .ok()
            .or_else(|| v.to_u32().ok().map(u64::from))
            .and_then(|n| usize::try_from(n).ok())
    }

    /// The number of transformer blocks, `<arch>.block_count`.
    pub fn num_layers(&self) -> Option<usize> {
        self.arch_u64("block_count")
    }

    /// The FFN's config from the metadata: `<arch>.embedding_length`,
    /// `<arch>.feed_forward_length`, and the activation its architecture uses. `None` when the
    /// architecture is not one whose FFN is a known GLU.
    pub fn config(&self) -> Option<GluConfig> {
        let activation = match self.architecture()? {
            "llama" | "mistral" | "qwen2" | "qwen3" | "smollm3" | "granite" | "olmo2"
            | "cohere" => Activation::Silu,
            "gemma" | "gemma2" | "gemma3" => Activation::GeluTanh,
            _ => return None,
        };
        let hidden = self.arch_u64("embedding_length")?;
        let intermediate = self.arch_u64("feed_forward_length")?;
        Some(
            GluConfig::new(hidden, intermediate)
                .with_activation(activation)
                .with_layout(WeightLayout::Gguf),
        )
    }

    /// Reads one tensor as stored (quantized) onto `device`.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        if !self.contains(name) {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                found: super::closest_names(name, self.names()),
            });
        }
        let file = File::open(&self.path).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })?;
        self.content
            .tensor(&mut BufReader::new(file), name, device)
            .map_err(|e| Error::InvalidFile {
                path: self.path.clone(),
                message: format!("tensor `{name}`: {e}"),
            })
    }

    /// Reads one tensor dequantized to `dtype`.
    pub fn dequantized(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        Ok(self
            .qtensor(name, device)?
            .dequantize(device)?
            .to_dtype(dtype)?)
    }
}

/// A GGUF file as a `VarBuilder` backend, dequantizing every tensor it is asked for.
#[derive(Debug, Clone)]
pub(crate) struct DequantizingBackend(pub(crate) Arc<GgufStore>);

impl candle_nn::var_builder::SimpleBackend for DequantizingBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        super::check_stored_shape(name, self.0.shape(name), &shape)?;
        Ok(self.0.dequantized(name, dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Ok(self.0.dequantized(name, dtype, dev)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}
