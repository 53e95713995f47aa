//! The test driver on the examples: outputs, tables, restart.

#[path = "../examples/wordcount.rs"]
mod wordcount;

use strom::testing::TestDriver;

#[tokio::test]
async fn wordcount_counts_and_sends_each_new_count() {
    let wc = wordcount::wordcount();
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
