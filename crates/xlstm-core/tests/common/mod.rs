//! The golden-case helpers, shared with the other backends' tests (see `xlstm_core::testing`).
#![allow(unused_imports)]
pub use xlstm_core::testing::*;
