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

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_glu::loading::GgufStore;
use candle_glu::WeightLayout;
use clap::Parser;

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
    // Write beside the target and rename, so a failure leaves no half-written file (and the
    // temporary one is removed).
    let tmp = args.out.with_extension("safetensors.partial");
    let written = candle_core::safetensors::save(&tensors, &tmp)
        .context("writing safetensors")
        .and_then(|()| {
            std::fs::rename(&tmp, &args.out).with_context(|| format!("renaming to {:?}", args.out))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    println!("wrote {}", args.out.display());
    Ok(())
}
