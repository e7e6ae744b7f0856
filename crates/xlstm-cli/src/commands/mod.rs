pub mod bench;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod config;
pub mod top;
pub mod tune;
