//! The test driver running the wordcount example: 100,000 input events
//! (sentences of one to five words from a vocabulary of 1,000, about 290,000
//! words; and sentences of one word), sent in one go, counted through the repartition topic into the
//! table, each new count sent on: the time from starting the driver to the
//! app being idle again (checking the table and closing come after).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use strom::testing::TestDriver;
use strom::App;

#[path = "../../streams/examples/wordcount.rs"]
#[allow(dead_code)]
mod wordcount;

const EVENTS: usize = 100_000;

/// `EVENTS` sentences of one to `most` words.
fn sentences(most: usize) -> Vec<((), String)> {
    let mut seed = 7u64;
    (0..EVENTS)
        .map(|_| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let words = 1 + (seed >> 60) as usize % most;
            let line: Vec<String> = (0..words)
                .map(|i| format!("w{}", (seed >> (i * 10)) % 1_000))
                .collect();
            ((), line.join(" "))
        })
        .collect()
}

/// Runs the wordcount example over `input` on a fresh driver; returns how
/// long that took (starting the driver, sending, processing), then checks
/// the table against the words sent.
async fn wordcount(input: Vec<((), String)>) -> Duration {
    let words: u64 = input
        .iter()
        .map(|(_, l)| l.split_whitespace().count() as u64)
        .sum();
    let started = Instant::now();
    let app = App::new("wordcount-bench");
    let wc = wordcount::wordcount(app, "sentences", "word-counts-out");
    let mut driver = TestDriver::new(wc.app).await.expect("driver");
    driver.send_many(&wc.sentences, input).await.expect("send");
    let took = started.elapsed();
    let counted: u64 = driver
        .table(&wc.counts)
        .entries()
        .expect("table")
        .iter()
        .map(|(_, n)| n)
        .sum();
    assert_eq!(counted, words, "the table lost or doubled words");
    driver.close().await.expect("close");
    took
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("test_driver");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    for (name, most) in [
        ("wordcount_100k_events", 5),
        ("wordcount_100k_one_word_events", 1),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let input = sentences(most);
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("runtime")
                            .block_on(wordcount(input))
                    })
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
