//! The test driver on the examples: outputs, tables, restart.

#[path = "../examples/wordcount.rs"]
mod wordcount;

use strom::testing::TestDriver;

#[tokio::test]
async fn wordcount_counts_and_sends_each_new_count() {
    let wc = wordcount::wordcount(strom::App::new("wordcount"), "sentences", "word-counts-out");
    let mut driver = TestDriver::new(wc.app).await.unwrap();
    driver
        .send(&wc.sentences, &(), &"the cat and The hat".to_string())
        .await
        .unwrap();
    let out = driver.read(&wc.counts_out).unwrap();
    let mut pairs: Vec<(String, u64)> = out.into_iter().map(|r| (r.key, r.value)).collect();
    pairs.sort();
    assert_eq!(
        pairs,
        [("and", 1), ("cat", 1), ("hat", 1), ("the", 1), ("the", 2)]
            .map(|(k, v)| (k.to_string(), v))
    );
    assert_eq!(driver.table(&wc.counts).get(&"the".into()).unwrap(), 2);
    driver.restart().await.unwrap();
    driver
        .send(&wc.sentences, &(), &"the end".to_string())
        .await
        .unwrap();
    assert_eq!(driver.table(&wc.counts).get(&"the".into()).unwrap(), 3);
    let out = driver.read(&wc.counts_out).unwrap();
    assert_eq!(out.len(), 2, "{out:?}");
    driver.close().await.unwrap();
}

#[path = "../examples/enrich.rs"]
mod enrich;

/// Page views are enriched with the profile their user had when the view
/// was processed; a user without one gets the default profile; the table
/// survives a restart.
#[tokio::test]
async fn enrich_joins_views_with_profiles() {
    let e = enrich::enrich(strom::App::new("enrich"), "");
    let mut driver = TestDriver::new(e.app).await.unwrap();
    let ada = enrich::Profile {
        name: "Ada".into(),
        country: "UK".into(),
    };
    driver.send(&e.users, &"u1".into(), &ada).await.unwrap();
    let view = |url: &str| enrich::PageView { url: url.into() };
    driver
        .send(&e.views, &"u1".into(), &view("/a"))
        .await
        .unwrap();
    driver
        .send(&e.views, &"u2".into(), &view("/b"))
        .await
        .unwrap();
    driver.restart().await.unwrap();
    driver
        .send(&e.views, &"u1".into(), &view("/c"))
        .await
        .unwrap();
    let got: Vec<(String, String, String)> = driver
        .read(&e.enriched)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value.name, r.value.url))
        .collect();
    assert_eq!(
        got,
        [("u1", "Ada", "/a"), ("u2", "", "/b"), ("u1", "Ada", "/c")].map(|(a, b, c)| (
            a.to_string(),
            b.to_string(),
            c.to_string()
        ))
    );
    assert_eq!(driver.table(&e.profiles).entries().unwrap().len(), 1);
    driver.close().await.unwrap();
}

/// The driver pauses tokio's clock, which only the current-thread runtime
/// allows: on another it says so instead of panicking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_needs_the_current_thread_runtime() {
    let wc = wordcount::wordcount(strom::App::new("wc-mt"), "in", "out");
    let e = TestDriver::new(wc.app).await.unwrap_err();
    assert!(e.to_string().contains("current-thread"), "{e}");
}

/// Input for a topic the app did not declare is refused with an error
/// naming it, and the driver goes on.
#[tokio::test]
async fn sending_to_an_undeclared_topic_is_an_error() {
    let wc = wordcount::wordcount(strom::App::new("wc-undeclared"), "in", "out");
    let mut driver = TestDriver::new(wc.app).await.unwrap();
    let e = driver
        .send_raw("nowhere", None, Some(b"x"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nowhere"), "{e}");
    let e = driver.read_raw("nowhere").unwrap_err();
    assert!(e.to_string().contains("nowhere"), "{e}");
    driver
        .send(&wc.sentences, &(), &"still here".to_string())
        .await
        .unwrap();
    assert_eq!(driver.table(&wc.counts).get(&"here".into()).unwrap(), 1);
}
