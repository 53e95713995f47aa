//! Tables with a Kafka changelog: recovery, gap replay, standbys.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;
use strom_client::producer::{Producer, ProducerConfig};
use strom_client::{Client, IsolationLevel};
use strom_it::{unique_topic, TestBroker};

use strom_state::{
    changelog, recover, recover_with_progress, Durability, LoggedStore, RecoveryProgress,
    RedbStore, Standby, StateError, Store, Table,
};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique_topic(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn contents(store: &dyn Store) -> BTreeMap<Vec<u8>, Vec<u8>> {
    store
        .range(Bound::Unbounded, Bound::Unbounded, usize::MAX)
        .unwrap()
        .into_iter()
        .collect()
}

async fn table(client: &Client, topic: &str, path: &std::path::Path) -> Table<u64, String> {
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(path).unwrap());
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    Table::new(LoggedStore::new(store, producer, topic, 0))
}

/// 200,000 keys written through a table come back exactly from the changelog
/// into an empty store; a store that already holds most of the data replays
/// only the gap; a standby follows the active and takes over without replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_recovers_exactly_and_replays_only_the_gap() {
    const KEYS: u64 = 200_000;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = changelog::topic_name(&unique_topic("app"), "totals");
    changelog::ensure_topic(&client, &topic, 1, 1, None)
        .await
        .unwrap();
    let dir = temp_dir("state");

    let mut active = table(&client, &topic, &dir.join("active.redb")).await;
    for i in 0..KEYS {
        active.put(&i, &format!("value-{i}")).await.unwrap();
        if i % 20_000 == 19_999 {
            active.flush(Durability::Fast).await.unwrap();
        }
    }
    // Overwrites and deletes must replay too.
    for i in (0..KEYS).step_by(1000) {
        active.put(&i, &format!("changed-{i}")).await.unwrap();
        active.delete(&(i + 1)).await.unwrap();
    }
    let last = active.flush(Durability::Durable).await.unwrap().unwrap();
    assert_eq!(active.get(&1000).unwrap().as_deref(), Some("changed-1000"));
    assert_eq!(active.get(&1001).unwrap(), None);
    let expected = contents(active.logged().store().as_ref());
    assert_eq!(expected.len() as u64, KEYS - KEYS / 1000);

    // A standby starts tailing now.
    let standby_store: Arc<dyn Store> =
        Arc::new(RedbStore::open(dir.join("standby.redb")).unwrap());
    let standby = Standby::start(
        &client,
        standby_store,
        &topic,
        0,
        IsolationLevel::ReadUncommitted,
    );

    // Lose the local state completely: a fresh store recovers it all.
    let fresh: Arc<dyn Store> = Arc::new(RedbStore::open(dir.join("fresh.redb")).unwrap());
    let progress = RecoveryProgress::default();
    let full = recover_with_progress(
        &client,
        fresh.clone(),
        &topic,
        0,
        IsolationLevel::ReadUncommitted,
        &progress,
    )
    .await
    .unwrap();
    assert_eq!(progress.replayed.load(Ordering::Relaxed), full.replayed);
    assert!(progress.to_replay.load(Ordering::Relaxed) > 0);
    assert_eq!(full.to, last);
    assert_eq!(
        contents(fresh.as_ref()),
        expected,
        "recovered contents differ"
    );
    assert_eq!(
        full.replayed as i64,
        last + 1,
        "every changelog record replayed once"
    );

    // More writes; the recovered store now holds most of the data.
    for i in 0..5_000u64 {
        active.put(&(KEYS + i), &format!("late-{i}")).await.unwrap();
    }
    let last = active.flush(Durability::Durable).await.unwrap().unwrap();
    let written_at = Instant::now();
    let gap = recover(&client, fresh.clone(), &topic, 0).await.unwrap();
    assert_eq!(gap.replayed, 5_000, "only the gap is replayed");
    let expected = contents(active.logged().store().as_ref());
    assert_eq!(contents(fresh.as_ref()), expected);

    // The standby has caught up with the active.
    while standby.applied_offset() < last {
        assert!(
            written_at.elapsed() < Duration::from_secs(10),
            "standby stuck at {}",
            standby.applied_offset()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "standby caught up {:?} after the last flush",
        written_at.elapsed()
    );
    let (promoted, tail) = standby.promote(&client).await.unwrap();
    assert_eq!(
        tail.replayed, 0,
        "a caught-up standby has nothing to replay"
    );
    assert_eq!(contents(promoted.as_ref()), expected);

    // Closing (as on revoke) keeps everything: the reopened file has it all.
    active
        .put(&u64::MAX, &"at close".to_string())
        .await
        .unwrap();
    active.close().await.unwrap();
    let reopened = RedbStore::open(dir.join("active.redb")).unwrap();
    assert_eq!(reopened.len().unwrap() as usize, expected.len() + 1);
    assert_eq!(reopened.changelog_offset().unwrap(), Some(last + 1));
    std::fs::remove_dir_all(dir).ok();
}

/// A changelog whose partition count differs from the table's is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_with_other_partition_count_is_refused() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = changelog::topic_name(&unique_topic("app"), "t");
    changelog::ensure_topic(&client, &topic, 2, 1, None)
        .await
        .unwrap();
    changelog::ensure_topic(&client, &topic, 2, 1, None)
        .await
        .unwrap();
    let err = changelog::ensure_topic(&client, &topic, 3, 1, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StateError::ChangelogPartitions {
                expected: 3,
                found: 2,
                ..
            }
        ),
        "{err}"
    );
}
