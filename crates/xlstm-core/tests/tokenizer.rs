//! Tokenizers: a GPT-NeoX-style byte-level BPE `tokenizer.json` that the test builds and saves itself,
//! loaded back through our `Tokenizer`; the byte tokenizer; streaming detokenization of multi-byte text.
use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use xlstm_core::tokenizer::{StreamDecoder, Tokenizer};

/// Byte-level BPE over the 256 byte symbols plus a few merges, saved as tokenizer.json.
fn write_bpe(dir: &std::path::Path) -> std::path::PathBuf {
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut vocab: HashMap<String, u32> = alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
    let merges = vec![("h".to_string(), "e".to_string()), ("l".to_string(), "l".to_string()), ("he".to_string(), "ll".to_string()), ("Ġ".to_string(), "w".to_string())];
    for (a, b) in &merges {
        let id = vocab.len() as u32;
        vocab.insert(format!("{a}{b}"), id);
    }
    let bpe = BPE::builder().vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges).build().unwrap();
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let path = dir.join("tokenizer.json");
    tk.save(&path, false).unwrap();
    path
}

#[test]
fn hf_tokenizer_json_round_trips_and_merges() {
    let tmp = tempfile::tempdir().unwrap();
    write_bpe(tmp.path());
    let tok = Tokenizer::for_model_dir(tmp.path()).unwrap();
    assert_eq!(tok.name(), "tokenizer.json");
    let text = "hello world — naïve ✓";
    let ids = tok.encode(text).unwrap();
    assert!(ids.len() < text.len(), "merges apply: {} ids for {} bytes", ids.len(), text.len());
    assert!(ids.contains(&258), "`hell` merge (id 258) used: {ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

#[test]
fn streaming_decode_emits_whole_characters_only() {
    let tmp = tempfile::tempdir().unwrap();
    write_bpe(tmp.path());
    for tok in [Tokenizer::for_model_dir(tmp.path()).unwrap(), Tokenizer::Bytes] {
        let text = "héllo ✓ wörld 日本";
        let ids = tok.encode(text).unwrap();
        let mut dec = StreamDecoder::default();
        let mut out = String::new();
        for &id in &ids {
            if let Some(p) = dec.push(&tok, id).unwrap() {
                assert!(!p.contains('\u{FFFD}'), "a piece with a broken character: {p:?}");
                out.push_str(&p);
            }
        }
        if let Some(p) = dec.flush(&tok).unwrap() {
            out.push_str(&p);
        }
        assert_eq!(out, text, "{}", tok.name());
    }
}

#[test]
fn byte_tokenizer_is_the_default_without_tokenizer_json() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::for_model_dir(tmp.path()).unwrap();
    assert_eq!(tok.name(), "bytes");
    assert_eq!(tok.encode("Hi").unwrap(), vec![72, 105]);
}

#[test]
fn corrupt_tokenizer_json_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::for_model_dir(tmp.path()).err().expect("must fail").to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}
