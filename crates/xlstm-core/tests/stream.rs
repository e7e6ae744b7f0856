//! The embedder API: iterator, async stream and callbacks all see the same text as the plain call,
//! and callbacks run off the compute thread.
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use xlstm_core::config::{LargeConfig, ModelConfig};
use xlstm_core::generate::{generate, GenerateParams};
use xlstm_core::stream::{spawn, Event};
use xlstm_core::tokenizer::Tokenizer;
use xlstm_core::{CpuBackend, DType, Model};

fn model() -> Model<CpuBackend> {
    Model::random(CpuBackend::new(), ModelConfig::Large(LargeConfig::with_shape(2, 128, 2, 256)), DType::F32, 3).unwrap()
}

fn params() -> GenerateParams {
    GenerateParams { max_new_tokens: 20, ..Default::default() }
}

fn collect(events: impl Iterator<Item = Event>) -> (String, usize) {
    let mut text = String::new();
    let mut generated = 0;
    for e in events {
        match e {
            Event::Text(t) => text.push_str(&t),
            Event::Finished(s) => generated = s.generated_tokens,
            Event::Error(e) => panic!("{e}"),
        }
    }
    (text, generated)
}

#[test]
fn iterator_async_and_callbacks_agree_with_the_plain_call() {
    let mut m = model();
    let plain = generate(&mut m, &Tokenizer::Bytes, "Hello", &params(), |_| {}).unwrap();

    let (text, n) = collect(spawn(model(), Tokenizer::Bytes, "Hello".into(), params()));
    assert_eq!((text.as_str(), n), (plain.text.as_str(), 20));

    let events: Vec<Event> = futures::executor::block_on(StreamExt::collect(spawn(model(), Tokenizer::Bytes, "Hello".into(), params())));
    assert_eq!(collect(events.into_iter()).0, plain.text);

    let got = Arc::new(Mutex::new(String::new()));
    let threads = Arc::new(Mutex::new(Vec::new()));
    let finished = Arc::new(Mutex::new(0usize));
    let (g, t, f) = (got.clone(), threads.clone(), finished.clone());
    let compute_thread_name = "xlstm-compute";
    let h = spawn(model(), Tokenizer::Bytes, "Hello".into(), params()).on_events(
        move |piece| {
            g.lock().unwrap().push_str(piece);
            t.lock().unwrap().push(std::thread::current().name().map(str::to_string));
        },
        move |s| *f.lock().unwrap() = s.generated_tokens,
        |e| panic!("{e}"),
    );
    let (_model, _tok) = h.join().unwrap();
    assert_eq!(*got.lock().unwrap(), plain.text);
    assert_eq!(*finished.lock().unwrap(), 20);
    assert!(threads.lock().unwrap().iter().all(|n| n.as_deref() != Some(compute_thread_name)), "callbacks ran on the compute thread");
}

#[test]
fn errors_arrive_as_events() {
    let events: Vec<Event> = Iterator::collect(spawn(model(), Tokenizer::Bytes, String::new(), params()));
    assert!(matches!(events.last(), Some(Event::Error(e)) if e.contains("empty")), "{events:?}");
}

/// A stop string that spans several tokens never reaches the stream, even in part.
#[test]
fn stop_strings_are_never_streamed() {
    let mut m = model();
    let free = generate(&mut m, &Tokenizer::Bytes, "Hello", &GenerateParams { max_new_tokens: 40, ..Default::default() }, |_| {}).unwrap();
    // pick a 3-byte stop string from the middle of the free-running output (bytes tokenizer: 3 tokens)
    let bytes = free.text.as_bytes();
    let Some(start) = (5..bytes.len().saturating_sub(3)).find(|&i| free.text.is_char_boundary(i) && free.text.is_char_boundary(i + 3)) else { return };
    let stop = free.text[start..start + 3].to_string();
    let first = free.text.find(&stop).unwrap();
    let mut streamed = String::new();
    let mut m = model();
    let p = GenerateParams { max_new_tokens: 40, stop_strings: vec![stop.clone()], ..Default::default() };
    let g = generate(&mut m, &Tokenizer::Bytes, "Hello", &p, |t| streamed.push_str(t)).unwrap();
    assert_eq!(g.text, free.text[..first], "output is cut at the stop string");
    assert_eq!(streamed, g.text, "the stream is exactly the output, without any of the stop string");
}
