//! Crash safety of `RedbStore`: a child process writes batches and is killed
//! with SIGKILL at pseudo-random moments, many times over; after every restart
//! the store's changelog offset and its data agree exactly.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use strom_state::{Durability, RedbStore, Store, WriteBatch};

const KEYS: i64 = 50;
const CHILD_ENV: &str = "STROM_CRASH_CHILD_STORE";

/// Batch `n` — what the changelog record at offset `n` says — sets key
/// `k{n % 50}` to `n` and `last` to `n`.
fn batch(n: i64) -> WriteBatch {
    let mut b = WriteBatch::default();
    b.put(
        format!("k{}", n % KEYS).into_bytes(),
        n.to_string().into_bytes(),
    );
    b.put(b"last".to_vec(), n.to_string().into_bytes());
    b
}

/// The child: continue from the store's offset, forever; every seventh commit
/// is durable, the rest are not forced to disk.
fn write_until_killed(path: &Path) -> ! {
    let store = RedbStore::open(path).expect("child opens the store");
    let mut n = store
        .changelog_offset()
        .expect("offset")
        .map_or(0, |o| o + 1);
    loop {
        let durability = if n % 7 == 0 {
            Durability::Durable
        } else {
            Durability::Fast
        };
        store
            .apply(&batch(n), Some(n), durability)
            .expect("child writes");
        n += 1;
    }
}

/// The store holds exactly what batches 0..=offset leave behind.
fn assert_consistent(store: &RedbStore) -> i64 {
    let Some(offset) = store.changelog_offset().unwrap() else {
        assert!(store.is_empty().unwrap(), "data without an offset");
        return -1;
    };
    let value = |k: &str| {
        store
            .get(k.as_bytes())
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    };
    assert_eq!(
        value("last"),
        Some(offset.to_string()),
        "last key disagrees with offset {offset}"
    );
    for j in 0..KEYS {
        let latest = (0..=offset).rev().find(|n| n % KEYS == j);
        assert_eq!(
            value(&format!("k{j}")),
            latest.map(|n| n.to_string()),
            "key k{j} at offset {offset}"
        );
    }
    assert_eq!(store.len().unwrap() as i64, (offset + 1).min(KEYS) + 1);
    offset
}

#[test]
fn killed_writer_leaves_data_and_offset_in_agreement() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        write_until_killed(Path::new(&path));
    }
    let dir = std::env::temp_dir().join(format!("strom-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("table-0.redb");
    let exe = std::env::current_exe().unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut offsets = vec![];
    for round in 0..25 {
        let mut child = Command::new(&exe)
            .args([
                "killed_writer_leaves_data_and_offset_in_agreement",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD_ENV, &path)
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(30 + seed % 170));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let store = RedbStore::open(&path).unwrap_or_else(|e| panic!("round {round}: {e}"));
        offsets.push(assert_consistent(&store));
    }
    assert!(
        offsets.last().copied().unwrap_or(-1) > 100,
        "the writer hardly ran: {offsets:?}"
    );
    assert!(
        offsets.windows(2).all(|w| w[1] >= w[0] - 7),
        "more than the non-durable tail was lost: {offsets:?}"
    );
    std::fs::remove_dir_all(dir).ok();
}

const DURABLE_CHILD: &str = "STROM_DURABLE_CHILD_STORE";

/// Fast commits followed by an empty durable commit survive a SIGKILL: a
/// durable flush with nothing pending still makes earlier commits durable.
#[test]
fn empty_durable_commit_persists_earlier_fast_commits() {
    if let Ok(path) = std::env::var(DURABLE_CHILD) {
        let store = RedbStore::open(&path).unwrap();
        for n in 0..10 {
            store.apply(&batch(n), Some(n), Durability::Fast).unwrap();
        }
        store
            .apply(&WriteBatch::default(), None, Durability::Durable)
            .unwrap();
        println!("durable");
        std::thread::sleep(Duration::from_secs(60)); // killed before exiting cleanly
        std::process::exit(0);
    }
    let dir = std::env::temp_dir().join(format!("strom-durable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "empty_durable_commit_persists_earlier_fast_commits",
            "--exact",
            "--nocapture",
        ])
        .env(DURABLE_CHILD, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("durable") {
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(!line.is_empty(), "child ended early");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.changelog_offset().unwrap(), Some(9));
    assert_consistent(&store);
    std::fs::remove_dir_all(dir).ok();
}
