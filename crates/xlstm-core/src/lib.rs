//! xLSTM inference engine core: configs, checkpoint loading, the backend interface and the CPU backend,
//! the model families, recurrent state, tokenizers, sampling and generation.
//!
//! Layout: `backend/` (interface + one folder per backend), `model/` (one file per family),
//! `state.rs`, `generate.rs` + `sampling.rs` + `tokenizer.rs`, `weights.rs` + `hub.rs` (loading).
pub mod backend;
pub mod config;
pub mod error;
pub mod model;
pub mod state;
pub mod tensor;
pub mod weights;

pub use backend::cpu::CpuBackend;
pub use backend::{Backend, MlstmDims, MlstmKernel};
pub use config::{LargeConfig, ModelConfig};
pub use error::{Error, Result};
pub use model::{LogitRows, Model};
pub use state::State;
pub use tensor::DType;
pub mod generate;
pub mod hub;
pub mod sampling;
pub mod sys;
pub mod tokenizer;
pub mod bench;
pub mod settings;
pub mod watchdog;
pub mod live;
pub mod stream;
pub mod tune;
pub mod testing;
