//! SmolLM2's byte-level BPE tokenizer, built from the GGUF's own vocabulary and merges with the
//! `tokenizers` crate, and a decoder that streams text token by token.
//!
//! The GGUF says `tokenizer.ggml.model = gpt2` (byte-level BPE) and `tokenizer.ggml.pre =
//! smollm`: llama.cpp splits every digit on its own, then applies GPT-2's regex. Hugging Face's
//! `tokenizer.json` for SmolLM2 does the same with `Digits(individual_digits)` followed by
//! `ByteLevel(add_prefix_space = false)`, which is what is built here. No BOS and no space prefix
//! are added (`add_bos_token = false`, `add_space_prefix = false`).

use std::collections::HashMap;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper};

/// GGUF's `tokenizer.ggml.token_type` for control tokens (`<|im_end|>`, ...).
const CONTROL: i32 = 3;

/// Tokens that end a generation besides the metadata's, by their text, as llama.cpp's vocabulary
/// loader matches them into its `special_eog_ids` (the list of llama-cpp-python 0.3's
/// llama.cpp; later versions may add more).
const END_OF_GENERATION: [&str; 12] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<|return|>",
    "<|call|>",
    "<end_of_utterance>",
];

/// A byte-level BPE tokenizer from a GGUF, and each token's bytes.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The bytes each token stands for; empty for control tokens, which decode to nothing.
    token_bytes: Vec<Vec<u8>>,
    eos_token_id: u32,
    /// `eos`, and `eot`, `eom` and the FIM pad, rep and sep tokens where the metadata names them,
    /// and [`END_OF_GENERATION`]'s tokens.
    end_of_generation: Vec<u32>,
}

fn strings(content: &Content, key: &str) -> anyhow::Result<Vec<String>> {
    let value = content
        .metadata
        .get(key)
        .with_context(|| format!("the GGUF has no `{key}` metadata"))?;
    value
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.tokens`, `.merges`, `.token_type` and
    /// `.eos_token_id`.
    ///
    /// # Errors
    /// A GGUF that is not a byte-level BPE (`gpt2`) model, or whose tokenizer metadata is
    /// missing or inconsistent.
    pub fn from_gguf(content: &Content) -> anyhow::Result<Self> {
        let model = content
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        if model != Some("gpt2") {
            bail!("expected a byte-level BPE (`gpt2`) tokenizer, found {model:?}");
        }
        // What is built below is SmolLM2's splitting, and no BOS or space is added: another
        // model's GGUF (Llama 3's `llama-bpe`, a `true` flag) would be tokenized otherwise than
        // llama.cpp does, without a word.
        if let Some(pre) = content.metadata.get("tokenizer.ggml.pre") {
            let pre = pre.to_string().context("`tokenizer.ggml.pre`")?;
            if pre != "smollm" {
                bail!(
                    "the GGUF's pre-tokenizer is `{pre}`; this example builds SmolLM2's \
                     (`smollm`) only"
                );
            }
        }
        for flag in [
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_space_prefix",
        ] {
            if let Some(v) = content.metadata.get(flag) {
                if v.to_bool().with_context(|| format!("`{flag}`"))? {
                    bail!("the GGUF sets `{flag}`, which this example's tokenizer does not do");
                }
            }
        }
        let tokens = strings(content, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(Value::to_i32)
                .collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            bail!("{} token types for {} tokens", types.len(), tokens.len());
        }
        let merges = strings(content, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => bail!("merge `{m}` is not two tokens separated by a space"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let eos_token_id = content
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .context("the GGUF has no `tokenizer.ggml.eos_token_id`")?
            .to_u32()?;
        let mut end_of_generation = vec![eos_token_id];
        for key in [
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
            "tokenizer.ggml.fim_pad_token_id",
            "tokenizer.ggml.fim_rep_token_id",
            "tokenizer.ggml.fim_sep_token_id",
        ] {
            if let Some(v) = content.metadata.get(key) {
                end_of_generation.push(v.to_u32().with_context(|| format!("`{key}`"))?);
            }
        }
        end_of_generation.extend(
            (0u32..)
                .zip(&tokens)
                .filter(|(_, t)| END_OF_GENERATION.contains(&t.as_str()))
                .map(|(id, _)| id),
        );
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        if vocab.len() != tokens.len() {
            bail!("the GGUF vocabulary has duplicate tokens");
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow::anyhow!("building the BPE model: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre: Vec<PreTokenizerWrapper> = vec![
            Digits::new(true).into(),
            ByteLevel::new(false, false, true).into(),
        ];
        inner.with_pre_tokenizer(Some(Sequence::new(pre)));
        inner.with_decoder(Some(DecoderWrapper::from(ByteLevel::default())));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == CONTROL)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| anyhow::anyhow!("adding the control tokens: {e}"))?;

        let chars = char_to_byte();
        let token_bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| match ty {
                CONTROL => Vec::new(),
                // Every character of a byte-level token stands for one byte.
                _ => t
                    .chars()
                    .map(|c| chars.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| t.as_bytes().to_vec()),
            })
            .collect();
        Ok(Self {
            inner,
            token_bytes,
            eos_token_id,
            end_of_generation,
        })
    }

    /// Token ids of `text`, without special tokens added (SmolLM2 adds no BOS).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, control tokens left out.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    /// The bytes token `id` stands for (empty for control tokens and unknown ids).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// The end-of-sequence token (`<|im_end|>`, 2, for SmolLM2-Instruct).
    pub fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }

    /// Whether token `id` ends a generation: `eos`, the metadata's `eot`, `eom` and FIM pad, rep
    /// and sep, and the tokens llama.cpp ends on by their text (SmolLM2's `<|endoftext|>` as well as its
    /// `<|im_end|>`).
    pub fn ends_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// The number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// The `tokenizers` tokenizer underneath.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A decoder that turns tokens into text as they come.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tokenizer: self,
            pending: Vec::new(),
        }
    }
}

/// Turns tokens into text one at a time. A byte-level token can end inside a UTF-8 character
/// (an emoji is often 2–4 tokens): those bytes wait until the character is complete.
#[derive(Debug)]
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
}

impl TokenStream<'_> {
    /// The text that token `id` completes; empty while a character is still unfinished.
    pub fn push(&mut self, id: u32) -> String {
        self.pending
            .extend_from_slice(self.tokenizer.token_bytes(id));
        take_text(&mut self.pending, false)
    }

    /// What is left at the end: an unfinished character becomes U+FFFD.
    pub fn finish(mut self) -> String {
        take_text(&mut self.pending, true)
    }
}

/// The longest prefix of `pending` that no later byte can change, as text (invalid bytes become
/// U+FFFD); the rest (an incomplete character at the end) stays in `pending` unless `flush`.
fn take_text(pending: &mut Vec<u8>, flush: bool) -> String {
    let mut out = String::new();
    let mut rest: &[u8] = pending;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                out.push_str(&String::from_utf8_lossy(valid));
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[n..];
                    }
                    None if flush => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &[];
                        break;
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    *pending = rest.to_vec();
    out
}

/// GPT-2's byte-to-character table, inverted: printable Latin-1 bytes stand for themselves,
/// the other 68 bytes for U+0100 onwards, in byte order.
fn char_to_byte() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (c, b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_released_whole_characters_at_a_time() {
        let mut pending = vec![b'a', 0xC3];
        assert_eq!(take_text(&mut pending, false), "a");
        assert_eq!(pending, [0xC3]);
        pending.push(0xA9);
        assert_eq!(take_text(&mut pending, false), "é");
        assert!(pending.is_empty());
        // A byte that can never start a character is replaced at once.
        let mut pending = vec![0xFF, b'x', 0xF0, 0x9F];
        assert_eq!(take_text(&mut pending, false), "\u{FFFD}x");
        assert_eq!(pending, [0xF0, 0x9F]);
        assert_eq!(take_text(&mut pending, true), "\u{FFFD}");
        assert!(pending.is_empty());
    }

    #[test]
    fn gpt2_byte_table() {
        let table = char_to_byte();
        assert_eq!(table.len(), 256);
        assert_eq!(table[&'Ġ'], b' ');
        assert_eq!(table[&'Ċ'], b'\n');
        assert_eq!(table[&'ĉ'], b'\t');
        assert_eq!(table[&'A'], b'A');
        assert_eq!(table[&'ÿ'], 0xFF);
    }
}
