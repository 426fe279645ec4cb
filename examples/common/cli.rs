//! What the examples' command lines share: clap's errors as one line that keeps what clap knew
//! (the flag, the value, the suggestion), and value parsers whose range checks see negative
//! numbers rather than leaving clap to take `-1` for a flag.
// Each example uses what it needs of this module.
#![allow(dead_code)]

use std::error::Error as _;

use clap::error::{ContextKind, ErrorKind};

/// Parses the command line, or exits: `--help` and `--version` as clap prints them (exit 0),
/// any other error as one line on stderr (exit 2).
pub fn parse<P: clap::Parser>() -> P {
    match P::try_parse() {
        Ok(args) => args,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::exit(2);
        }
    }
}

/// A clap error as one line, from its kind and context: `missing --prompt <TEXT>`,
/// `unknown flag --weigths (did you mean --weights?)`, `invalid value 'x' for --ffn <FFN>:
/// expected one of quantized, f32, bf16`.
pub fn one_line(e: &clap::Error) -> String {
    let get = |kind| e.get(kind).map(|v| v.to_string()).filter(|v| !v.is_empty());
    let arg = get(ContextKind::InvalidArg).unwrap_or_default();
    // Empty both where the value is missing and for `--dtype ""`; only the second gets as far as
    // the value's parser (ValueValidation).
    let value = match e.kind() {
        ErrorKind::ValueValidation => e.get(ContextKind::InvalidValue).map(|v| v.to_string()),
        _ => get(ContextKind::InvalidValue),
    };
    match e.kind() {
        ErrorKind::MissingRequiredArgument => format!("missing {arg}"),
        ErrorKind::UnknownArgument => match get(ContextKind::SuggestedArg) {
            Some(suggested) => format!("unknown flag {arg} (did you mean {suggested}?)"),
            None => format!("unknown flag {arg}"),
        },
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let Some(value) = value else {
                return format!("{arg} needs a value");
            };
            let why = match (e.source(), get(ContextKind::ValidValue)) {
                (Some(source), _) => format!(": {source}"),
                (None, Some(valid)) => format!(": expected one of {valid}"),
                (None, None) => String::new(),
            };
            format!("invalid value '{value}' for {arg}{why}")
        }
        ErrorKind::ArgumentConflict => match get(ContextKind::PriorArg) {
            Some(prior) => format!("{arg} cannot be used with {prior}"),
            None => format!("{arg} cannot be used here"),
        },
        _ => {
            // Whatever else clap says, its first line without its own `error: `.
            let text = e.render().to_string();
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            line.trim().trim_start_matches("error: ").to_string()
        }
    }
}

/// An integer flag of at least `min`, read as a signed number so that `-1` gets this check
/// (with `allow_negative_numbers` on the command) rather than being taken for a flag.
pub fn at_least(min: i64) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s: &str| {
        let v: i128 = s
            .trim()
            .parse()
            .map_err(|_| "not a whole number".to_string())?;
        if v < i128::from(min) {
            return Err(format!("must be at least {min}"));
        }
        usize::try_from(v).map_err(|_| format!("too large (at most {})", usize::MAX))
    }
}

/// A float flag: finite and at least 0.
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| "not a number".to_string())?;
    if !v.is_finite() || v < 0.0 {
        return Err("must be a finite number of at least 0".into());
    }
    Ok(v)
}

/// A float flag: finite and above 0.
pub fn positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| "not a number".to_string())?;
    if !v.is_finite() || v <= 0.0 {
        return Err("must be a finite number above 0".into());
    }
    Ok(v)
}
