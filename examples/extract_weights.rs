//! Extracts FFN weights from a llama.cpp GGUF file into a safetensors file with Hugging Face
//! names (`model.layers.{i}.mlp.{gate,up,down}_proj.weight`), dequantized with candle's GGUF
//! reader. This is what made `weights/model.safetensors`:
//!
//! ```text
//! scripts/fetch_smollm2.sh
//! cargo run --release --example extract_weights -- \
//!     --gguf ~/.cache/candle-glu/SmolLM2-135M-Instruct.Q4_1.gguf --layers 0,15 --dtype bf16 \
//!     --out weights/model.safetensors
//! ```

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_glu::loading::GgufStore;
use candle_glu::WeightLayout;
use clap::Parser;

#[path = "common/output.rs"]
mod output;

#[derive(Parser)]
#[command(about = "Extract FFN weights from a GGUF file into safetensors with Hugging Face names")]
struct Args {
    /// The GGUF file.
    #[arg(long)]
    gguf: PathBuf,
    /// Layers to extract, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,15")]
    layers: Vec<usize>,
    /// Stored dtype: f32, f16 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown dtype `{other}`, expected f32, f16 or bf16"),
    };
    // `--out` onto the GGUF itself would replace the source.
    if let (Ok(a), Ok(b)) = (
        std::fs::canonicalize(&args.out),
        std::fs::canonicalize(&args.gguf),
    ) {
        if a == b {
            bail!("--out {} is the GGUF being read", args.out.display());
        }
    }
    let gguf = GgufStore::open(&args.gguf)?;
    let (src, dst) = (WeightLayout::Gguf.names(), WeightLayout::Llama.names());
    let mut tensors = HashMap::new();
    for &layer in &args.layers {
        for (from, to) in src.all().into_iter().zip(dst.all()) {
            let name = format!("{}.{from}.weight", WeightLayout::Gguf.layer_prefix(layer));
            let tensor = gguf.dequantized(&name, dtype, &Device::Cpu)?;
            let hf = format!("{}.{to}.weight", WeightLayout::Llama.layer_prefix(layer));
            println!("{name} -> {hf} {:?} {dtype:?}", tensor.dims());
            tensors.insert(hf, tensor);
        }
    }
    // Through a temporary file beside the target, renamed into place once on disk: a failure or
    // an interruption leaves neither a partial target nor the temporary file.
    output::install_interrupt_handler();
    output::write_atomically_with(&args.out, "--out", |file| write_safetensors(file, &tensors))?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// `tensors` as a safetensors file, one tensor's bytes at a time (`safetensors::serialize` would
/// hold the whole file in memory beside them): the header, padded to 8 bytes, then the data in
/// the header's order.
fn write_safetensors(
    file: &mut std::fs::File,
    tensors: &HashMap<String, Tensor>,
) -> std::io::Result<()> {
    use safetensors::tensor::{Metadata, TensorInfo};
    use safetensors::View;
    use std::io::Write;
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut offset = 0;
    let infos = names
        .iter()
        .map(|name| {
            let t = &tensors[*name];
            let end = offset + View::data_len(t);
            let info = TensorInfo {
                dtype: View::dtype(t),
                shape: View::shape(t).to_vec(),
                data_offsets: (offset, end),
            };
            offset = end;
            (name.to_string(), info)
        })
        .collect();
    let metadata = Metadata::new(None, infos).map_err(|e| invalid(e.to_string()))?;
    let mut header = serde_json::to_string(&metadata).map_err(|e| invalid(e.to_string()))?;
    header.push_str(&" ".repeat((8 - header.len() % 8) % 8));
    let mut out = std::io::BufWriter::new(file);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    for name in names {
        out.write_all(&View::data(&tensors[name]))?;
    }
    out.flush()
}
