//! Tokenizers: byte-level (the default when a model ships none: token id = byte value) and Hugging
//! Face `tokenizer.json` through the `tokenizers` crate. Plus incremental detokenization for streaming.
use std::path::Path;

use crate::error::{Error, Result};

pub enum Tokenizer {
    /// One token per UTF-8 byte (ids 0..=255).
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let t = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::file(path, format!("not a valid Hugging Face tokenizer.json ({e})")))?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    /// `tokenizer.json` from the model directory when present, else bytes.
    pub fn for_model_dir(dir: &Path) -> Result<Self> {
        let p = dir.join("tokenizer.json");
        if p.is_file() { Self::from_file(&p) } else { Ok(Tokenizer::Bytes) }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Tokenizer::Bytes => "bytes",
            Tokenizer::Hf(_) => "tokenizer.json",
        }
    }

    /// Text to ids, without special tokens (BOS is the generator's business).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf(t) => Ok(t.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec()),
        }
    }

    /// Ids to text; invalid UTF-8 (a byte sequence cut mid-character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().map(|&i| u8::try_from(i).unwrap_or(b'?')).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Tokenizer::Hf(t) => t.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string())),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Bytes => None,
            Tokenizer::Hf(t) => t.token_to_id(token),
        }
    }
}

/// Turns a growing id sequence into text pieces, holding back output while the tail is an incomplete
/// character (decoding only a short window, so the cost per token stays constant).
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.is_char_boundary(before.len()) {
            let piece = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (e.g. an incomplete character at the end).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok((after.len() > before.len()).then(|| after.get(before.len()..).unwrap_or("").to_string()))
    }
}
