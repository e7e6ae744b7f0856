//! Generation for embedders: the model runs on its own compute thread and hands out events through a
//! channel, consumed as a blocking iterator, as an async `Stream`, or by callbacks that run on a
//! separate thread, so slow host I/O never stalls the compute thread.
use std::pin::Pin;
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use futures::channel::mpsc::{unbounded, UnboundedReceiver};
use futures::StreamExt;

use crate::backend::Backend;
use crate::generate::{generate, GenerateParams, GenerationStats};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug)]
pub enum Event {
    /// A piece of text, as soon as it forms whole characters.
    Text(String),
    Finished(GenerationStats),
    Error(String),
}

/// The events of one generation. Dropping it early lets the generation finish in the background.
pub struct TokenStream<B: Backend> {
    rx: UnboundedReceiver<Event>,
    worker: Option<JoinHandle<(Model<B>, Tokenizer)>>,
}

/// Starts generating on a compute thread of its own; the model and tokenizer come back from
/// [`TokenStream::join`].
pub fn spawn<B: Backend>(mut model: Model<B>, tokenizer: Tokenizer, prompt: String, params: GenerateParams) -> TokenStream<B> {
    let (tx, rx) = unbounded();
    let worker = std::thread::Builder::new()
        .name("xlstm-compute".into())
        .spawn(move || {
            let text_tx = tx.clone();
            let result = generate(&mut model, &tokenizer, &prompt, &params, |piece| {
                let _ = text_tx.unbounded_send(Event::Text(piece.to_string()));
            });
            let _ = tx.unbounded_send(match result {
                Ok(g) => Event::Finished(g.stats),
                Err(e) => Event::Error(e.to_string()),
            });
            (model, tokenizer)
        })
        .expect("spawning the compute thread");
    TokenStream { rx, worker: Some(worker) }
}

impl<B: Backend> TokenStream<B> {
    /// Waits for the generation to end and returns the model and tokenizer for reuse.
    pub fn join(mut self) -> (Model<B>, Tokenizer) {
        self.worker.take().expect("joined once").join().expect("the compute thread does not panic")
    }

    /// Runs callbacks on a thread of their own (not the compute thread) until the generation ends;
    /// returns that thread's handle, which yields the model and tokenizer back.
    pub fn on_events(
        self,
        mut on_text: impl FnMut(&str) + Send + 'static,
        on_finish: impl FnOnce(&GenerationStats) + Send + 'static,
        on_error: impl FnOnce(&str) + Send + 'static,
    ) -> JoinHandle<(Model<B>, Tokenizer)> {
        std::thread::spawn(move || {
            let mut me = self;
            let (mut fin, mut err) = (Some(on_finish), Some(on_error));
            while let Some(ev) = Iterator::next(&mut me) {
                match ev {
                    Event::Text(t) => on_text(&t),
                    Event::Finished(s) => {
                        if let Some(f) = fin.take() {
                            f(&s)
                        }
                    }
                    Event::Error(e) => {
                        if let Some(f) = err.take() {
                            f(&e)
                        }
                    }
                }
            }
            me.join()
        })
    }
}

impl<B: Backend> Iterator for TokenStream<B> {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        futures::executor::block_on(self.rx.next())
    }
}

impl<B: Backend> futures::Stream for TokenStream<B> {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_next_unpin(cx)
    }
}

impl<B: Backend> Unpin for TokenStream<B> {}
