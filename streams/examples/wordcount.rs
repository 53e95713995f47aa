//! Word count: reads UTF-8 text lines (no key) from `sentences`, splits them
//! into lowercase words, re-keys by word, counts in table `word-counts`, and
//! sends each new count to `word-counts-out` (key: the word, value: the count
//! as a JSON number).
//!
//! ```text
//! STROM_BROKERS=127.0.0.1:9092 cargo run -p strom --example wordcount -- worker
//! ```

use std::process::ExitCode;

use strom::codec::{NoKey, Utf8};
use strom::{App, Table, Topic};

/// The word-count app, with the topics and the table its tests use.
pub struct Wordcount {
    pub app: App,
    pub sentences: Topic<(), String>,
    pub counts_out: Topic<String, u64>,
    pub counts: Table<String, u64>,
}

/// Declares the word count on `app`, reading `input` and writing `output`.
pub fn wordcount(mut app: App, input: &str, output: &str) -> Wordcount {
    let sentences = app
        .topic::<(), String>(input)
        .with_key_codec(NoKey)
        .with_value_codec(Utf8);
    let counts_out = app.topic::<String, u64>(output).with_key_codec(Utf8);
    let counts = app.table::<String, u64>("word-counts", 0);
    let handles = (counts.clone(), counts_out.clone());
    app.agent(&sentences)
        .flat_map(|line: String| {
            line.split_whitespace()
                .map(str::to_lowercase)
                .collect::<Vec<_>>()
        })
        .group_by(|event| event.value.clone(), "words")
        .for_each_with(handles, |ctx, event, (counts, counts_out)| async move {
            let n = ctx.update(&counts, &event.key, |n| n + 1).await?;
            ctx.send(&counts_out, &event.key, &n).await?;
            Ok(())
        });
    Wordcount {
        app,
        sentences,
        counts_out,
        counts,
    }
}

#[allow(dead_code)]
fn main() -> ExitCode {
    wordcount(App::new("wordcount"), "sentences", "word-counts-out")
        .app
        .main()
}
