//! Chat prompts: the GGUF's own `tokenizer.chat_template`, a Hugging Face Jinja template,
//! rendered with minijinja the way transformers' `apply_chat_template` renders it (blocks
//! trimmed, loop controls, `tojson`, `raise_exception`, `bos_token`/`eos_token`,
//! `add_generation_prompt`); checked against jinja2 on SmolLM2's template. Templates that call
//! Python string methods (`.strip()`, ...) need more than this.

use anyhow::{anyhow, Context};
use candle_core::quantized::gguf_file::Content;

use super::tokenizer::Tokenizer;

/// A model's chat template and the special tokens it may name.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template in the GGUF's `tokenizer.chat_template`.
    ///
    /// # Errors
    /// A GGUF without one (a base model's, or one converted without it).
    pub fn from_gguf(content: &Content, tokenizer: &Tokenizer) -> anyhow::Result<Self> {
        let source = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .context("--chat: the GGUF has no `tokenizer.chat_template` to render the chat with")?
            .clone();
        let token = |key: &str| -> String {
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokenizer.inner().id_to_token(id))
                .unwrap_or_default()
        };
        Ok(Self {
            source,
            bos_token: token("tokenizer.ggml.bos_token_id"),
            eos_token: token("tokenizer.ggml.eos_token_id"),
        })
    }

    /// A template from its source, for tests.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Self {
        Self {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        }
    }

    /// The prompt for one user message (after a system message, if any), ending where the
    /// assistant's answer begins.
    ///
    /// # Errors
    /// A template minijinja cannot parse or render, or one that raises an exception.
    pub fn render(&self, system: Option<&str>, user: &str) -> anyhow::Result<String> {
        let mut env = minijinja::Environment::new();
        // As transformers' ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(minijinja::context! { role => "system", content => system });
        }
        messages.push(minijinja::context! { role => "user", content => user });
        let one_line = |e: minijinja::Error| anyhow!("the GGUF's chat template: {e}");
        env.render_str(
            &self.source,
            minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            },
        )
        .map_err(one_line)
    }
}
