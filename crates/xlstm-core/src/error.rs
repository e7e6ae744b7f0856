//! One error type for the library. Every variant reads as a sentence a user can act on.
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("config: {0}")]
    Config(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("input: {0}")]
    Input(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("device: {0}")]
    Device(String),
    #[error("state: {0}")]
    State(String),
    #[error("hub: {0}")]
    Hub(String),
    #[error("memory: {0}")]
    Memory(String),
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, what: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), what: what.to_string() }
    }
}
