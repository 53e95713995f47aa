//! Consumer groups against a real broker: assignment, rebalancing, commits,
//! lost members, static membership.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strom_client::consumer::{AutoOffsetReset, TopicPartition};
use strom_client::group::assignor::{
    Assignor, CooperativeSticky, MemberAssignment, MemberSubscription, Range,
};
use strom_client::group::{
    GroupConfig, GroupConsumer, GroupHandle, ListenerFuture, RebalanceListener,
};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::{Client, Error, NewTopic};
use strom_it::{unique_topic, TestBroker};

/// Short timeouts: the test broker holds a second JoinGroup for about half the
/// session timeout.
fn config(group: &str, assignor: Arc<dyn Assignor>) -> GroupConfig {
    let mut c = GroupConfig::new(group);
    c.session_timeout = Duration::from_secs(6);
    c.heartbeat_interval = Duration::from_secs(1);
    c.rebalance_timeout = Duration::from_secs(10);
    c.assignors = vec![assignor];
    c.consumer.auto_offset_reset = AutoOffsetReset::Earliest;
    c
}

/// What a listener was told, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Revoked(Vec<TopicPartition>),
    Assigned(Vec<TopicPartition>),
    Lost(Vec<TopicPartition>),
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<Call>>,
}

impl Recorder {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    fn revoked_since(&self, from: usize) -> BTreeSet<TopicPartition> {
        self.calls()[from..]
            .iter()
            .filter_map(|c| match c {
                Call::Revoked(p) => Some(p.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }
}

impl RebalanceListener for Recorder {
    fn on_revoked<'a>(&'a self, _: &'a GroupHandle, p: &'a [TopicPartition]) -> ListenerFuture<'a> {
        self.calls.lock().unwrap().push(Call::Revoked(p.to_vec()));
        Box::pin(async {})
    }
    fn on_assigned<'a>(
        &'a self,
        _: &'a GroupHandle,
        p: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        self.calls.lock().unwrap().push(Call::Assigned(p.to_vec()));
        Box::pin(async {})
    }
    fn on_lost<'a>(&'a self, _: &'a GroupHandle, p: &'a [TopicPartition]) -> ListenerFuture<'a> {
        self.calls.lock().unwrap().push(Call::Lost(p.to_vec()));
        Box::pin(async {})
    }
}

async fn topic_with(client: &Client, prefix: &str, partitions: i32) -> String {
    let topic = unique_topic(prefix);
    client
        .create_topic(NewTopic::new(&topic, partitions, 1))
        .await
        .unwrap();
    topic
}

/// Waits until `check` holds, polling every 100 ms; panics with `what` after `secs`.
async fn wait_for(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The members' assignments are disjoint, cover all `n` partitions and differ
/// by at most one in size.
fn balanced(members: &[&GroupConsumer], n: usize) -> bool {
    let mut seen = BTreeSet::new();
    let mut sizes = vec![];
    for m in members {
        let a = m.group().assignment();
        sizes.push(a.len());
        for tp in a {
            if !seen.insert(tp) {
                return false;
            }
        }
    }
    let (min, max) = (
        sizes.iter().min().copied().unwrap_or(0),
        sizes.iter().max().copied().unwrap_or(0),
    );
    seen.len() == n && max - min <= 1
}

/// Three members split 12 partitions; a fourth joins and they spread over four;
/// one leaves and its partitions move to the others. With cooperative-sticky,
/// no member is ever asked to revoke a partition it keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_partitions_and_cooperative_sticky_revokes_only_what_moves() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = topic_with(&client, "coop", 12).await;
    let group = unique_topic("g-coop");
    let mut members = vec![];
    let mut recorders = vec![];
    for _ in 0..3 {
        let r = Arc::new(Recorder::default());
        members.push(
            GroupConsumer::new(
                client.clone(),
                config(&group, Arc::new(CooperativeSticky)),
                &[&topic],
                r.clone(),
            )
            .unwrap(),
        );
        recorders.push(r);
    }
    wait_for("3 members to split 12 partitions", 60, || {
        balanced(&members.iter().collect::<Vec<_>>(), 12)
    })
    .await;
    let before: Vec<BTreeSet<TopicPartition>> = members
        .iter()
        .map(|m| m.group().assignment().into_iter().collect())
        .collect();
    let marks: Vec<usize> = recorders.iter().map(|r| r.calls().len()).collect();

    let r = Arc::new(Recorder::default());
    members.push(
        GroupConsumer::new(
            client.clone(),
            config(&group, Arc::new(CooperativeSticky)),
            &[&topic],
            r.clone(),
        )
        .unwrap(),
    );
    recorders.push(r);
    wait_for("4 members to split 12 partitions", 60, || {
        balanced(&members.iter().collect::<Vec<_>>(), 12)
    })
    .await;
    for i in 0..3 {
        let now: BTreeSet<_> = members[i].group().assignment().into_iter().collect();
        let revoked = recorders[i].revoked_since(marks[i]);
        assert!(
            now.is_subset(&before[i]),
            "member {i} gained a partition while another joined"
        );
        assert!(
            revoked.is_disjoint(&now),
            "member {i} was made to revoke partitions it kept: {revoked:?}"
        );
        assert_eq!(
            revoked,
            before[i].difference(&now).cloned().collect(),
            "member {i} revoked other than what moved"
        );
    }

    // One leaves: its partitions go to the other three, who revoke nothing.
    let marks: Vec<usize> = recorders.iter().map(|r| r.calls().len()).collect();
    let leaving = members.remove(1);
    let leaving_had: BTreeSet<_> = leaving.group().assignment().into_iter().collect();
    leaving.close().await.unwrap();
    wait_for("3 remaining members to split 12 partitions", 60, || {
        balanced(&members.iter().collect::<Vec<_>>(), 12)
    })
    .await;
    for i in [0usize, 2, 3] {
        assert!(
            recorders[i].revoked_since(marks[i]).is_empty(),
            "member {i} revoked when another left"
        );
    }
    let picked_up: BTreeSet<_> = members
        .iter()
        .flat_map(|m| m.group().assignment())
        .filter(|tp| leaving_had.contains(tp))
        .collect();
    assert_eq!(picked_up, leaving_had);
    for m in members {
        m.close().await.unwrap();
    }
}

/// With the eager range assignor too, members split the partitions and take
/// over a leaving member's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eager_range_members_rebalance_on_join_and_leave() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = topic_with(&client, "range", 12).await;
    let group = unique_topic("g-range");
    let mut members: Vec<GroupConsumer> = (0..3)
        .map(|_| {
            GroupConsumer::new(
                client.clone(),
                config(&group, Arc::new(Range)),
                &[&topic],
                Arc::new(Recorder::default()),
            )
            .unwrap()
        })
        .collect();
    wait_for("3 members to split 12 partitions", 60, || {
        balanced(&members.iter().collect::<Vec<_>>(), 12)
    })
    .await;
    members.push(
        GroupConsumer::new(
            client.clone(),
            config(&group, Arc::new(Range)),
            &[&topic],
            Arc::new(Recorder::default()),
        )
        .unwrap(),
    );
    wait_for("4 members to split 12 partitions", 60, || {
        balanced(&members.iter().collect::<Vec<_>>(), 12)
    })
    .await;
    members.remove(0).close().await.unwrap();
    wait_for("3 members to split 12 partitions again", 60, || {
        balanced(&members.iter().collect::<Vec<_>>(), 12)
    })
    .await;
    for m in members {
        m.close().await.unwrap();
    }
}

/// Committed offsets outlive every member: a new member resumes exactly after
/// the last commit of each partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_a_restart_of_all_members() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = topic_with(&client, "resume", 3).await;
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for i in 0..900u32 {
        producer
            .send(
                ProducerRecord::to(&topic)
                    .partition((i % 3) as i32)
                    .value(i.to_string().as_bytes()),
            )
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let group = unique_topic("g-resume");

    let mut first = GroupConsumer::new(
        client.clone(),
        config(&group, Arc::new(Range)),
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();
    // Read up to offset 100 of each partition, commit, close.
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    while next.len() < 3 || next.values().any(|&o| o < 100) {
        let records = tokio::time::timeout(Duration::from_secs(60), first.poll())
            .await
            .expect("no records")
            .unwrap();
        for r in records.iter().filter(|r| r.offset < 100) {
            next.insert(r.partition, r.offset + 1);
        }
    }
    let offsets: Vec<_> = next
        .iter()
        .map(|(&p, &o)| (TopicPartition::new(&topic, p), o))
        .collect();
    first.group().commit(&offsets).await.unwrap();
    first.close().await.unwrap();

    let mut second = GroupConsumer::new(
        client.clone(),
        config(&group, Arc::new(Range)),
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();
    let mut first_seen: BTreeMap<i32, i64> = BTreeMap::new();
    while first_seen.len() < 3 {
        let records = tokio::time::timeout(Duration::from_secs(60), second.poll())
            .await
            .expect("no records")
            .unwrap();
        if let Some(r) = records.first() {
            first_seen.entry(r.partition).or_insert(r.offset);
        }
    }
    assert_eq!(
        first_seen, next,
        "the new member did not resume at the committed offsets"
    );
    second.close().await.unwrap();
}

/// Records consumed while members join and leave three times, each member
/// committing after processing: every record is processed at least once, and
/// every member starts a newly assigned partition exactly at the group's
/// committed offset, so nothing committed is delivered again and nothing after
/// it is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_loses_nothing_and_redelivers_nothing_committed() {
    const RECORDS: usize = 100_000;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = topic_with(&client, "churn", 6).await;
    let group = unique_topic("g-churn");

    // Produce continuously in the background.
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let produced = {
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut futures = Vec::with_capacity(RECORDS);
            for i in 0..RECORDS {
                let v = i.to_string();
                futures.push(
                    producer
                        .send(
                            ProducerRecord::to(&topic)
                                .key(v.as_bytes())
                                .value(v.as_bytes()),
                        )
                        .await
                        .unwrap(),
                );
                if i % 2_000 == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            producer.flush().await.unwrap();
            let mut ends: HashMap<i32, i64> = HashMap::new();
            for f in futures {
                let m = f.await.unwrap();
                let e = ends.entry(m.partition).or_default();
                *e = (*e).max(m.offset + 1);
            }
            ends
        })
    };

    let processed: Arc<Mutex<BTreeMap<i32, BTreeSet<i64>>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let spawn_member = |n: usize| {
        let client = client.clone();
        let (group, topic) = (group.clone(), topic.clone());
        let (processed, violations) = (processed.clone(), violations.clone());
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let listener = Arc::new(StartChecker::default());
            let mut member = GroupConsumer::new(
                client,
                config(&group, Arc::new(CooperativeSticky)),
                &[&topic],
                listener.clone(),
            )
            .unwrap();
            loop {
                let records = tokio::select! {
                    _ = &mut stop_rx => break,
                    r = member.poll() => r.unwrap(),
                };
                let tp = TopicPartition::new(&records[0].topic, records[0].partition);
                if let Some(expected) = listener.expect.lock().unwrap().remove(&tp) {
                    if records[0].offset != expected {
                        violations.lock().unwrap().push(format!(
                            "member {n} started {tp} at {} but the group had committed {expected}",
                            records[0].offset
                        ));
                    }
                }
                {
                    let mut p = processed.lock().unwrap();
                    let set = p.entry(tp.partition).or_default();
                    for r in &records {
                        set.insert(r.offset);
                    }
                }
                let next = records.last().unwrap().offset + 1;
                match member.group().commit(&[(tp, next)]).await {
                    Ok(()) | Err(Error::CommitFailed { .. }) => {}
                    Err(e) => panic!("member {n}: commit failed unexpectedly: {e}"),
                }
            }
            member.close().await.unwrap();
        });
        (stop_tx, task)
    };

    let mut live: Vec<_> = (0..2).map(spawn_member).collect();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        live.push(spawn_member(10 + round));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (stop, task) = live.remove(0);
        let _ = stop.send(());
        task.await.unwrap();
    }
    let ends = produced.await.unwrap();
    let total: i64 = ends.values().sum();
    // Waits for every record; a member that died (its task ended with a
    // panic) or a partition that stalls is reported as such.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done: BTreeMap<i32, usize> = {
            let p = processed.lock().unwrap();
            p.iter()
                .map(|(&partition, s)| (partition, s.len()))
                .collect()
        };
        if done.values().map(|&n| n as i64).sum::<i64>() >= total {
            break;
        }
        if let Some(i) = live.iter().position(|(_, task)| task.is_finished()) {
            let (_, task) = live.remove(i);
            match task.await {
                Err(e) => panic!("a member died while records were left: {e}"),
                Ok(()) => panic!("a member stopped while records were left"),
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after 120 s waiting for every record to be processed: \
             processed per partition {done:?}, produced {ends:?}, committed {:?}",
            strom_it::committed(&client, &group, &topic, 6).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (stop, task) in live {
        let _ = stop.send(());
        task.await.unwrap();
    }
    let p = processed.lock().unwrap();
    for (&partition, &end) in &ends {
        let got = p.get(&partition).cloned().unwrap_or_default();
        let missing: Vec<i64> = (0..end).filter(|o| !got.contains(o)).take(5).collect();
        assert!(
            missing.is_empty(),
            "partition {partition}: offsets {missing:?}… never processed"
        );
    }
    let v = violations.lock().unwrap();
    assert!(
        v.is_empty(),
        "{} start violations, first: {:?}",
        v.len(),
        v.first()
    );
}

/// On each assignment, notes the group's committed offset as the offset the
/// first record of that partition must have.
#[derive(Default)]
struct StartChecker {
    expect: Mutex<HashMap<TopicPartition, i64>>,
}

impl RebalanceListener for StartChecker {
    fn on_assigned<'a>(
        &'a self,
        group: &'a GroupHandle,
        p: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        Box::pin(async move {
            let committed = group.committed(p).await.expect("committed offsets");
            let mut e = self.expect.lock().unwrap();
            for (tp, o) in committed {
                e.insert(tp, o.unwrap_or(0));
            }
        })
    }
    fn on_revoked<'a>(&'a self, _: &'a GroupHandle, p: &'a [TopicPartition]) -> ListenerFuture<'a> {
        let mut e = self.expect.lock().unwrap();
        for tp in p {
            e.remove(tp);
        }
        Box::pin(async {})
    }
    fn on_lost<'a>(
        &'a self,
        group: &'a GroupHandle,
        p: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        self.on_revoked(group, p)
    }
}

/// A member whose process freezes past the session timeout is dropped and its
/// partitions go to the others; when it wakes, its commit (stamped with the old
/// generation) is refused with a clear error, it is told its partitions are
/// lost, and it rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_member_is_replaced_and_cannot_commit_into_the_new_generation() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = topic_with(&client, "frozen", 4).await;
    let group = unique_topic("g-frozen");
    let awake = GroupConsumer::new(
        client.clone(),
        config(&group, Arc::new(Range)),
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();

    // The member to freeze lives on its own single-threaded runtime: blocking
    // that thread stops its heartbeats the way a stopped process would.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let (freeze_tx, freeze_rx) = tokio::sync::oneshot::channel::<()>();
    let (frozen_config, client_config, frozen_topic) = (
        config(&group, Arc::new(Range)),
        broker.client_config(),
        topic.clone(),
    );
    let frozen = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = Client::connect(client_config).await.unwrap();
            let recorder = Arc::new(Recorder::default());
            let member =
                GroupConsumer::new(client, frozen_config, &[&frozen_topic], recorder.clone())
                    .unwrap();
            wait_for("the second member's share", 60, || {
                member.group().assignment().len() == 2
            })
            .await;
            let owned = member.group().assignment();
            let generation = member.group().metadata().generation_id;
            ready_tx.send(()).unwrap();
            freeze_rx.await.unwrap();
            std::thread::sleep(Duration::from_secs(10)); // past the 6 s session timeout
            let refused = member.group().commit(&[(owned[0].clone(), 999_999)]).await;
            wait_for("the woken member to rejoin", 60, || {
                member.group().metadata().generation_id > generation
                    && !member.group().assignment().is_empty()
            })
            .await;
            let calls = recorder.calls();
            member.close().await.unwrap();
            (refused, calls, owned)
        })
    });
    ready_rx.await.unwrap();
    wait_for("the first member's share", 60, || {
        awake.group().assignment().len() == 2
    })
    .await;
    freeze_tx.send(()).unwrap();
    wait_for("the awake member to take all 4 partitions", 30, || {
        awake.group().assignment().len() == 4
    })
    .await;

    let (refused, calls, owned) = tokio::task::spawn_blocking(move || frozen.join().unwrap())
        .await
        .unwrap();
    let err = refused.expect_err("a commit from the old generation was accepted");
    assert!(matches!(err, Error::CommitFailed { .. }), "{err}");
    assert!(
        calls
            .iter()
            .any(|c| matches!(c, Call::Lost(p) if !p.is_empty())),
        "no on_lost: {calls:?}"
    );
    let committed = awake.group().committed(&owned[..1]).await.unwrap();
    assert_ne!(
        committed[&owned[0]],
        Some(999_999),
        "the stale commit reached the group"
    );
    awake.close().await.unwrap();
}

/// The test settings for static member `id` of `group` (range assignor).
fn static_member(group: &str, id: &str, leave_on_close: bool) -> GroupConfig {
    let mut c = config(group, Arc::new(Range));
    c.group_instance_id = Some(id.to_owned());
    c.leave_on_close = leave_on_close;
    c
}

/// A static member that restarts within the session timeout gets its
/// partitions back, and the other member sees no rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_member_restarts_without_a_rebalance() {
    // tansu 0.6 gives a restarted static member a new member id, keeps the
    // departed one as leader, and answers SyncGroup with REBALANCE_IN_PROGRESS
    // for longer than the session timeout; nisshi implements KIP-345.
    let broker = TestBroker::start_nisshi().await;
    let client = broker.client().await;
    let topic = topic_with(&client, "static", 4).await;
    let group = unique_topic("g-static");
    let with_id = |id: &str| static_member(&group, id, false);
    let a = GroupConsumer::new(
        client.clone(),
        with_id("a"),
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();
    let b_calls = Arc::new(Recorder::default());
    let b = GroupConsumer::new(client.clone(), with_id("b"), &[&topic], b_calls.clone()).unwrap();
    wait_for("2 static members to split 4 partitions", 60, || {
        balanced(&[&a, &b], 4)
    })
    .await;
    let a_had = a.group().assignment();
    let (b_seen, b_generation) = (b_calls.calls().len(), b.group().metadata().generation_id);

    a.close().await.unwrap(); // a static member sends no LeaveGroup
    let a = GroupConsumer::new(
        client.clone(),
        with_id("a"),
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();
    wait_for("the restarted static member's partitions", 30, || {
        !a.group().assignment().is_empty()
    })
    .await;
    assert_eq!(
        a.group().assignment(),
        a_had,
        "the restarted member got other partitions"
    );
    tokio::time::sleep(Duration::from_secs(3)).await; // a few heartbeats
    assert_eq!(
        b_calls.calls().len(),
        b_seen,
        "the other member saw a rebalance: {:?}",
        &b_calls.calls()[b_seen..]
    );
    assert_eq!(b.group().metadata().generation_id, b_generation);
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A static member set to leave on close (as workers are) gives its
/// partitions up at once: the other member has them all long before the
/// departed member's session would have timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_member_leaving_on_close_hands_over_at_once() {
    let broker = TestBroker::start_nisshi().await;
    let client = broker.client().await;
    let topic = topic_with(&client, "static-leave", 4).await;
    let group = unique_topic("g-static-leave");
    let with_id = |id: &str| static_member(&group, id, true);
    let a = GroupConsumer::new(
        client.clone(),
        with_id("a"),
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();
    let b = GroupConsumer::new(
        client.clone(),
        with_id("b"),
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();
    wait_for("2 static members to split 4 partitions", 60, || {
        balanced(&[&a, &b], 4)
    })
    .await;
    let closed = tokio::time::Instant::now();
    a.close().await.unwrap();
    wait_for("the other member to hold all 4 partitions", 30, || {
        b.group().assignment().len() == 4
    })
    .await;
    let took = closed.elapsed();
    eprintln!("handed over {took:?} after close (session timeout 6 s)");
    assert!(
        took < Duration::from_secs(4),
        "the hand-over took {took:?}: the departed member's session ran out instead of it leaving"
    );
    b.close().await.unwrap();
}

/// Two live members must not share an instance id: the broker keeps the one
/// that joined last, and the other stops with FENCED_INSTANCE_ID instead of
/// reading the same partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_member_with_the_same_instance_id_fences_the_first() {
    let broker = TestBroker::start_nisshi().await;
    let client = broker.client().await;
    let topic = topic_with(&client, "static-twin", 2).await;
    let group = unique_topic("g-static-twin");
    let mut first = GroupConsumer::new(
        client.clone(),
        static_member(&group, "twin", true),
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();
    wait_for("the first member's partitions", 60, || {
        first.group().assignment().len() == 2
    })
    .await;
    let second = GroupConsumer::new(
        client.clone(),
        static_member(&group, "twin", true),
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();
    wait_for("the second member's partitions", 60, || {
        second.group().assignment().len() == 2
    })
    .await;
    let err = tokio::time::timeout(Duration::from_secs(30), first.recv())
        .await
        .expect("the fenced member still reads after 30 s")
        .expect_err("the fenced member read a record");
    assert!(
        err.to_string().contains("FENCED_INSTANCE_ID")
            || err.to_string().contains("FencedInstanceId"),
        "{err}"
    );
    second.close().await.unwrap();
}

/// A caller-supplied assignor: each member's user data reaches the leader, and
/// the leader's user data reaches each member through `on_assignment`.
#[derive(Debug)]
struct Greeting {
    me: String,
    heard: Mutex<Option<String>>,
}

impl Assignor for Greeting {
    fn name(&self) -> &str {
        "greeting"
    }
    fn user_data(&self, _owned: &[TopicPartition]) -> Option<bytes::Bytes> {
        Some(bytes::Bytes::from(self.me.clone()))
    }
    fn on_assignment(&self, assignment: &MemberAssignment, _generation: i32) {
        let text = assignment
            .user_data
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned());
        *self.heard.lock().unwrap() = text;
    }
    fn assign(
        &self,
        members: &[MemberSubscription],
        partitions: &BTreeMap<String, i32>,
    ) -> strom_client::Result<BTreeMap<String, MemberAssignment>> {
        let mut names: Vec<String> = members
            .iter()
            .map(|m| {
                String::from_utf8_lossy(m.user_data.as_deref().unwrap_or_default()).into_owned()
            })
            .collect();
        names.sort();
        let mut plan = Range.assign(members, partitions)?;
        for a in plan.values_mut() {
            a.user_data = Some(bytes::Bytes::from(names.join(",")));
        }
        Ok(plan)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_assignor_carries_user_data_both_ways() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = topic_with(&client, "userdata", 4).await;
    let group = unique_topic("g-userdata");
    let assignors: Vec<Arc<Greeting>> = ["ann", "bob"]
        .iter()
        .map(|n| {
            Arc::new(Greeting {
                me: n.to_string(),
                heard: Mutex::new(None),
            })
        })
        .collect();
    let members: Vec<GroupConsumer> = assignors
        .iter()
        .map(|a| {
            GroupConsumer::new(
                client.clone(),
                config(&group, a.clone()),
                &[&topic],
                Arc::new(Recorder::default()),
            )
            .unwrap()
        })
        .collect();
    wait_for("2 members to split 4 partitions", 60, || {
        balanced(&members.iter().collect::<Vec<_>>(), 4)
    })
    .await;
    for a in &assignors {
        assert_eq!(
            a.heard.lock().unwrap().as_deref(),
            Some("ann,bob"),
            "{} heard",
            a.me
        );
    }
    for m in members {
        m.close().await.unwrap();
    }
}

/// With auto-commit on, closing commits what was handed out, and the next
/// member starts right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_commit_commits_consumed_positions_on_close() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = topic_with(&client, "autocommit", 1).await;
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for i in 0..300u32 {
        producer
            .send(ProducerRecord::to(&topic).value(i.to_string().as_bytes()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let group = unique_topic("g-auto");
    let mut auto = config(&group, Arc::new(Range));
    auto.auto_commit_interval = Some(Duration::from_millis(500));
    let mut member = GroupConsumer::new(
        client.clone(),
        auto.clone(),
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();
    let mut last = -1;
    while last < 149 {
        last = tokio::time::timeout(Duration::from_secs(60), member.recv())
            .await
            .expect("no record")
            .unwrap()
            .offset;
    }
    let tp = TopicPartition::new(&topic, 0);
    let handed_out = member.position(&tp).unwrap();
    member.close().await.unwrap();
    let mut next = GroupConsumer::new(
        client.clone(),
        auto,
        &[&topic],
        Arc::new(Recorder::default()),
    )
    .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(60), next.recv())
        .await
        .expect("no record")
        .unwrap();
    assert_eq!(
        first.offset, handed_out,
        "the next member did not start after the auto-committed position"
    );
    next.close().await.unwrap();
}

/// Polls for `d`, counting each (partition, offset) received.
async fn poll_for(
    consumer: &mut GroupConsumer,
    received: &mut BTreeMap<(i32, i64), usize>,
    d: Duration,
) {
    let until = tokio::time::Instant::now() + d;
    while let Ok(batch) = tokio::time::timeout_at(until, consumer.poll()).await {
        for r in batch.unwrap() {
            *received.entry((r.partition, r.offset)).or_default() += 1;
        }
    }
}

/// Partitions added to a topic while a producer and a group consumer run:
/// the producer's partitioner uses them and the group's leader reassigns
/// them within the metadata refresh interval, and every record sent is
/// consumed once. Neither test broker implements CreatePartitions, so the
/// topic has 4 partitions from the start and the proxy in front of the
/// broker lists only 2 in Metadata answers until it reveals the others,
/// which is what clients see when partitions are added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_while_running_are_produced_to_and_consumed() {
    let Some((broker, proxy)) = TestBroker::start_behind_proxy().await else {
        println!("SKIPPED partitions_added_while_running: an external broker cannot be put behind the proxy");
        return;
    };
    let mut client_config = broker.client_config();
    client_config.metadata_max_age = Duration::from_secs(2);
    let client = Client::connect(client_config).await.unwrap();
    let topic = unique_topic("grow");
    proxy.show_partitions(Some((&topic, 2)));
    client
        .create_topic(NewTopic::new(&topic, 4, 1))
        .await
        .unwrap();
    assert_eq!(
        client
            .topic_metadata(&topic)
            .await
            .unwrap()
            .partitions
            .len(),
        2
    );

    let sent: Arc<Mutex<BTreeMap<i32, usize>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producing = {
        let (client, topic, sent, stop) =
            (client.clone(), topic.clone(), sent.clone(), stop.clone());
        tokio::spawn(async move {
            let producer = Producer::new(client, ProducerConfig::default()).unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("key-{i}");
                let meta = producer
                    .send(ProducerRecord::to(&topic).key(key.as_bytes()).value(b"v"))
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                *sent.lock().unwrap().entry(meta.partition).or_default() += 1;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            i
        })
    };
    let mut consumer = GroupConsumer::new(
        client.clone(),
        config(&unique_topic("grow-group"), Arc::new(CooperativeSticky)),
        &[topic.as_str()],
        Arc::new(strom_client::group::NoopListener),
    )
    .unwrap();
    let mut received: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    poll_for(&mut consumer, &mut received, Duration::from_secs(3)).await;
    assert!(
        sent.lock().unwrap().keys().all(|&p| p < 2) && received.keys().all(|&(p, _)| p < 2),
        "hidden partitions were used"
    );
    proxy.show_partitions(None);
    let grown = tokio::time::Instant::now();
    let mut used = Duration::ZERO;
    while grown.elapsed() < Duration::from_secs(30) {
        poll_for(&mut consumer, &mut received, Duration::from_millis(500)).await;
        let produced_new = sent.lock().unwrap().keys().any(|&p| p >= 2);
        let consumed_new = received.keys().any(|&(p, _)| p >= 2);
        if produced_new && consumed_new {
            used = grown.elapsed();
            break;
        }
    }
    assert!(
        used > Duration::ZERO,
        "new partitions unused 30 s after they appeared: sent {:?}, consumed from {:?}",
        sent.lock().unwrap(),
        received.keys().map(|&(p, _)| p).collect::<BTreeSet<_>>()
    );
    println!(
        "new partitions produced to and consumed {used:?} after they appeared (refresh every 2 s)"
    );
    assert!(
        used < Duration::from_secs(15),
        "took {used:?} with a 2 s refresh"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = producing.await.unwrap() as usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while received.len() < total && tokio::time::Instant::now() < deadline {
        poll_for(&mut consumer, &mut received, Duration::from_millis(500)).await;
    }
    assert_eq!(
        received.len(),
        total,
        "records lost; sent per partition {:?}",
        sent.lock().unwrap()
    );
    assert!(
        received.values().all(|&n| n == 1),
        "a record was consumed twice"
    );
    consumer.close().await.unwrap();
}
