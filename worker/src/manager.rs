//! The task manager: owns the partition tasks, routes fetched records to them,
//! and commits — as Kafka Streams' `TaskManager` does.
//!
//! - Tasks start when the group assigns their partition number and restore
//!   their tables on their own: a restoring task never delays the commits of
//!   the others (a commit covers running tasks only) nor the poll loop.
//! - Commits run on their own task, one per commit interval, never on the
//!   poll loop: at least once, every running task checkpoints (its own
//!   deliveries, its tables) concurrently and one OffsetCommit covers them all;
//!   exactly once, every running task stops at an event boundary, and the
//!   worker's transaction commits their outputs, changelogs and offsets
//!   together (or aborts, and the tasks read again from the last commit).
//! - A revoke closes the revoked tasks after a last commit; a revoke of a
//!   restoring task cancels its restoration at once. A lost partition's task
//!   is dropped without committing.
//! - `/ready` is derived from the task states.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;
use strom_client::consumer::TopicPartition;
use strom_client::group::{GroupConsumer, GroupHandle};
use strom_client::ConsumerRecord;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, warn};

use crate::assignor::Placement;
use crate::eos::{CommitError, Transactions};
use crate::error::WorkerError;
use crate::policy::Undecodable;
use crate::processor::Context;
use crate::standby::Standbys;
use crate::task::{self, Control, Offsets, Outcome, Spec, TaskHandle, TaskState};

/// A request to the poll loop, which owns the consumer: move these partitions
/// back to these offsets and start a new epoch for these tasks (records routed
/// before it are dropped by the tasks). Answers each task's new epoch.
pub(crate) struct Rewind {
    pub seeks: Vec<(TopicPartition, i64)>,
    pub numbers: Vec<i32>,
    pub reply: oneshot::Sender<HashMap<i32, u64>>,
}

/// The worker's tasks and how they commit.
pub(crate) struct TaskManager {
    pub spec: Arc<Spec>,
    /// Bytes of records waiting per partition number before its fetches pause.
    max_buffered: usize,
    /// Notified when a task's queue drains below half the bound.
    pub drained: Arc<Notify>,
    tasks: Mutex<HashMap<i32, TaskHandle>>,
    standbys: Standbys,
    /// One commit (or revoke, or loss) at a time.
    commits: tokio::sync::Mutex<()>,
    /// Exactly-once: the worker's transactions.
    txn: Option<Arc<Transactions>>,
    /// Exactly-once: the way to the poll loop, while it runs.
    rewinds: Mutex<Option<mpsc::UnboundedSender<Rewind>>>,
    /// The group generation whose membership was lost last (-1: none).
    lost_generation: AtomicI32,
    /// The offsets committed last, so a commit sends only what moved.
    committed: Mutex<HashMap<TopicPartition, i64>>,
}

/// How a commit round ends.
enum Decision<'a> {
    /// Commit, with the offsets, as a member of this group.
    Commit(&'a GroupHandle),
    /// Abort, for this reason.
    Abort(String),
}

/// Whether the worker serves: `Ok` or why not (for `/ready`).
pub(crate) type Readiness = Result<(), serde_json::Value>;

impl TaskManager {
    pub fn new(
        spec: Arc<Spec>,
        max_buffered: usize,
        txn: Option<Arc<Transactions>>,
    ) -> TaskManager {
        TaskManager {
            spec,
            max_buffered: max_buffered.max(1),
            drained: Arc::new(Notify::new()),
            tasks: Mutex::new(HashMap::new()),
            standbys: Standbys::default(),
            commits: tokio::sync::Mutex::new(()),
            txn,
            rewinds: Mutex::new(None),
            lost_generation: AtomicI32::new(-1),
            committed: Mutex::new(HashMap::new()),
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<i32, TaskHandle>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects the poll loop's rewind queue (exactly-once).
    pub fn set_rewinds(&self, tx: Option<mpsc::UnboundedSender<Rewind>>) {
        *self.rewinds.lock().unwrap_or_else(|e| e.into_inner()) = tx;
    }

    /// Starts the tasks of newly assigned partition numbers (each takes over
    /// its warm standby, if there is one, and restores its tables).
    pub fn assign(&self, numbers: &[i32]) {
        let mut tasks = self.tasks();
        for &n in numbers {
            // A task that has ended (closed, or failed: the worker stops) is
            // replaced, never kept as a dead end for the partition's records.
            let alive = tasks.get(&n).is_some_and(|t| {
                !t.join.is_finished()
                    && matches!(t.status.state(), TaskState::Restoring | TaskState::Running)
            });
            if alive {
                continue;
            }
            info!(partition = n, "partition assigned");
            self.spec.unfetched.forget(n);
            let task = task::spawn(
                self.spec.clone(),
                n,
                self.max_buffered / 2,
                self.drained.clone(),
                self.standbys.take(n),
            );
            tasks.insert(n, task);
        }
    }

    /// Gives up partition numbers cleanly: a last commit covering them, then
    /// their tasks close their stores. A task still restoring stops at once.
    ///
    /// The work runs on its own task: if the caller gives up waiting (the
    /// group cut `on_revoked` off at the rebalance timeout), it still
    /// finishes, and a commit round is never left half done.
    pub async fn revoke(self: &Arc<Self>, group: &GroupHandle, numbers: &[i32]) {
        let (manager, group, numbers) = (self.clone(), group.clone(), numbers.to_vec());
        let work = tokio::spawn(async move {
            let _one = manager.commits.lock().await;
            let result = match &manager.txn {
                None => manager.close_at_least_once(&group, &numbers).await,
                Some(txn) => manager.round(txn, Decision::Commit(&group), &numbers).await,
            };
            if let Err(e) = result {
                manager.spec.fail(e);
            }
            manager.remove(&numbers, false).await;
            info!(partitions = ?numbers, "partitions revoked");
        });
        let _ = work.await;
    }

    /// Partitions were lost (another worker may own them already): their
    /// tasks stop without committing. Under exactly-once the open transaction
    /// aborts, and the tasks that remain read again from their last commit.
    /// `lost_generation` is the group generation whose membership was lost,
    /// if it was (else only these partitions went, a revoke cut off).
    ///
    /// Runs on its own task, as [`TaskManager::revoke`] does.
    pub async fn lose(self: &Arc<Self>, lost_generation: Option<i32>, numbers: &[i32]) {
        let (manager, numbers) = (self.clone(), numbers.to_vec());
        let work = tokio::spawn(async move {
            let _one = manager.commits.lock().await;
            if let Some(generation) = lost_generation {
                manager
                    .lost_generation
                    .fetch_max(generation, Ordering::AcqRel);
            }
            manager.remove(&numbers, true).await;
            for n in &numbers {
                warn!(
                    partition = n,
                    "partition lost; its events since the last commit will be processed again"
                );
            }
            if let Some(txn) = &manager.txn {
                let why = "partitions of this worker were lost".to_owned();
                if let Err(e) = manager.round(txn, Decision::Abort(why), &[]).await {
                    manager.spec.fail(e);
                }
            }
        });
        let _ = work.await;
    }

    /// Takes the tasks of `numbers` out and waits for them to end (aborting
    /// them first with `abort`); forgets what was committed for them.
    async fn remove(&self, numbers: &[i32], abort: bool) {
        let gone: Vec<TaskHandle> = {
            let mut tasks = self.tasks();
            numbers.iter().filter_map(|n| tasks.remove(n)).collect()
        };
        for t in gone {
            if abort {
                t.join.abort();
            }
            let _ = t.join.await;
        }
        self.forget_committed(numbers);
    }

    /// The periodic commit.
    pub async fn commit(&self, group: &GroupHandle) -> Result<(), WorkerError> {
        let _one = self.commits.lock().await;
        match &self.txn {
            None => self.commit_at_least_once(group).await,
            Some(txn) => self.round(txn, Decision::Commit(group), &[]).await,
        }
    }

    /// The running tasks (those a commit covers).
    fn running(&self) -> Vec<i32> {
        self.tasks()
            .iter()
            .filter(|(_, t)| t.status.state() == TaskState::Running)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Sends `make(reply)` to each task of `numbers`; answers come back in
    /// the same order (a task that is gone answers nothing).
    fn ask(
        &self,
        numbers: &[i32],
        mut make: impl FnMut(i32, oneshot::Sender<Result<Offsets, WorkerError>>) -> Control,
    ) -> Vec<(i32, oneshot::Receiver<Result<Offsets, WorkerError>>)> {
        let tasks = self.tasks();
        let mut asked = Vec::new();
        for n in numbers {
            let Some(task) = tasks.get(n) else { continue };
            let (reply, rx) = oneshot::channel();
            if task.send(make(*n, reply)) {
                asked.push((*n, rx));
            } else {
                warn!(partition = n, "partition task is gone; its events since the last commit will be processed again");
            }
        }
        asked
    }

    /// Gathers the answers of [`TaskManager::ask`]: the offsets, or the first
    /// error. With `expected` (exactly once), a task that could not be asked
    /// or stopped before answering is an error too: whatever it sent since
    /// the last commit is in the transaction.
    async fn gather(
        asked: Vec<(i32, oneshot::Receiver<Result<Offsets, WorkerError>>)>,
        expected: Option<usize>,
    ) -> Result<Offsets, WorkerError> {
        let gone = |what: String| WorkerError::Framework {
            partition: -1,
            what: "a commit round".into(),
            attempts: 1,
            error: what,
        };
        if let Some(n) = expected.filter(|n| asked.len() < *n) {
            return Err(gone(format!(
                "{} of {n} partition tasks were gone",
                n - asked.len()
            )));
        }
        let mut offsets = Vec::new();
        let mut failed = None;
        for (n, rx) in asked {
            match rx.await {
                Ok(Ok(o)) => offsets.extend(o),
                Ok(Err(e)) => {
                    failed.get_or_insert(e);
                }
                Err(_) if expected.is_some() => {
                    failed.get_or_insert(gone(format!(
                        "the task of partition {n} stopped before answering"
                    )));
                }
                Err(_) => warn!(partition = n, "partition task stopped before answering"),
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(offsets),
        }
    }

    /// At least once: every running task checkpoints (concurrently), then one
    /// OffsetCommit.
    async fn commit_at_least_once(&self, group: &GroupHandle) -> Result<(), WorkerError> {
        let started = std::time::Instant::now();
        let asked = self.ask(&self.running(), |_, reply| Control::Checkpoint(reply));
        let (offsets, _) = self.moved(group, Self::gather(asked, None).await?);
        if commit_offsets(group, &offsets).await {
            self.booked(&offsets);
            self.spec.metrics.committed(started.elapsed());
        }
        Ok(())
    }

    /// At least once: the revoked tasks close (durable checkpoint), then their
    /// offsets are committed.
    async fn close_at_least_once(
        &self,
        group: &GroupHandle,
        numbers: &[i32],
    ) -> Result<(), WorkerError> {
        let asked = self.ask(numbers, |_, reply| Control::Close(reply));
        let (offsets, _) = self.moved(group, Self::gather(asked, None).await?);
        if commit_offsets(group, &offsets).await {
            self.booked(&offsets);
        }
        Ok(())
    }

    /// The offsets that moved since they were last committed, of partitions
    /// this member still owns; and the first partition among `offsets` it no
    /// longer owns, if any (at least once its events are processed again by
    /// the next owner; exactly once its outputs must not commit without it).
    fn moved(&self, group: &GroupHandle, offsets: Offsets) -> (Offsets, Option<TopicPartition>) {
        let owned: BTreeSet<TopicPartition> = group.assignment().into_iter().collect();
        let unowned = offsets
            .iter()
            .find(|(tp, _)| !owned.contains(tp))
            .map(|(tp, _)| tp.clone());
        let committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        let moved = offsets
            .into_iter()
            .filter(|(tp, o)| owned.contains(tp) && committed.get(tp) != Some(o))
            .collect();
        (moved, unowned)
    }

    /// Forgets what was committed for partitions given up: their next owner
    /// commits them from then on.
    fn forget_committed(&self, numbers: &[i32]) {
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        committed.retain(|tp, _| !numbers.contains(&tp.partition));
    }

    /// Books `offsets` as committed.
    fn booked(&self, offsets: &Offsets) {
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        for (tp, o) in offsets {
            committed.insert(tp.clone(), *o);
        }
    }

    /// Exactly once: one commit round. Every running task (and every task of
    /// `closing`) stops at an event boundary and reports its offsets; the
    /// transaction commits them with everything sent since the last round;
    /// the tasks then apply their table writes, or, if it aborted, read again
    /// from the last commit. The tasks of `closing` end after the round.
    async fn round(
        &self,
        txn: &Transactions,
        decision: Decision<'_>,
        closing: &[i32],
    ) -> Result<(), WorkerError> {
        let started = std::time::Instant::now();
        // Taken before the running tasks are listed: a task that starts
        // running from here on waits for the round to end (see task::run),
        // so nothing joins the transaction while it ends.
        let _round = txn.gate().write().await;
        let mut numbers = self.running();
        for &n in closing {
            if !numbers.contains(&n) {
                numbers.push(n);
            }
        }
        let mut outcomes = HashMap::new();
        let asked = self.ask(&numbers, |n, reply| {
            let (tx, outcome) = oneshot::channel();
            outcomes.insert(n, tx);
            Control::Prepare {
                close: closing.contains(&n),
                reply,
                outcome,
            }
        });
        let prepared = Self::gather(asked, Some(numbers.len())).await;
        // An abort of a transaction that held nothing changes nothing: the
        // tasks go on as after a commit.
        let abort = |why: String| async move {
            match txn.abort().await {
                Ok(true) => Err(CommitError::Aborted(why)),
                Ok(false) => Ok(()),
                Err(e) => Err(CommitError::Fatal(e)),
            }
        };
        let result = match (prepared, self.spec.fatal_message(), decision) {
            (Err(e), _, _) => {
                let _ = txn.abort().await;
                Err(CommitError::Fatal(e))
            }
            // A worker that stops commits nothing more.
            (Ok(_), Some(why), _) => abort(format!("the worker stops: {why}")).await,
            (Ok(_), None, Decision::Abort(why)) => abort(why).await,
            (Ok(offsets), None, Decision::Commit(group)) => match self.moved(group, offsets) {
                (offsets, None) => {
                    let done = txn.commit(&offsets, group).await;
                    if done.is_ok() {
                        debug!(?offsets, "transaction committed");
                        self.booked(&offsets);
                    }
                    done
                }
                (_, Some(tp)) => abort(format!("{tp} is no longer assigned to this worker")).await,
            },
        };
        match result {
            Ok(()) => {
                for tx in outcomes.into_values() {
                    let _ = tx.send(Outcome::Committed);
                }
                self.spec.metrics.committed(started.elapsed());
                Ok(())
            }
            Err(CommitError::Aborted(reason)) => {
                debug!(%reason, "commit round aborted");
                self.spec.metrics.aborted();
                let epochs = self.rewind(&numbers).await;
                for (n, tx) in outcomes {
                    let epoch = epochs.get(&n).copied().unwrap_or(task::DROP_ALL);
                    let _ = tx.send(Outcome::Aborted { epoch });
                }
                Ok(())
            }
            Err(CommitError::Fatal(e)) => {
                for tx in outcomes.into_values() {
                    let _ = tx.send(Outcome::Aborted {
                        epoch: task::DROP_ALL,
                    });
                }
                Err(e)
            }
        }
    }

    /// Moves the tasks of `numbers` back to where their last commit left them
    /// (through the poll loop); their new epochs. Without a poll loop (the
    /// worker is closing) nothing is read again, and the epochs drop
    /// everything queued.
    async fn rewind(&self, numbers: &[i32]) -> HashMap<i32, u64> {
        let seeks: Vec<(TopicPartition, i64)> = {
            let tasks = self.tasks();
            numbers
                .iter()
                .filter_map(|n| tasks.get(n))
                .flat_map(|t| t.restart_points())
                .collect()
        };
        let (reply, rx) = oneshot::channel();
        let sent = self
            .rewinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|tx| {
                tx.send(Rewind {
                    seeks,
                    numbers: numbers.to_vec(),
                    reply,
                })
                .is_ok()
            });
        if !sent {
            return HashMap::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The poll loop's side of a rewind: seek, then new epochs.
    pub fn apply_rewind(&self, rewind: Rewind, consumer: &mut GroupConsumer) {
        for (tp, offset) in &rewind.seeks {
            // A partition revoked meanwhile has nothing to rewind.
            if consumer.seek(tp, *offset).is_ok() {
                debug!(%tp, offset, "rewound after an aborted transaction");
            }
        }
        let tasks = self.tasks();
        let epochs = rewind
            .numbers
            .iter()
            .filter_map(|n| tasks.get(n).map(|t| (*n, t.bump_epoch())))
            .collect();
        let _ = rewind.reply.send(epochs);
    }

    /// Hands fetched records to their partition's task, and pauses fetching
    /// that partition while too many wait (backpressure; heartbeats and the
    /// other partitions go on). Records of a partition without a task (being
    /// revoked) are dropped: they come after the offset its revocation
    /// committed, so the next owner processes them.
    pub fn route(
        &self,
        records: Vec<ConsumerRecord>,
        consumer: &mut GroupConsumer,
        paused: &mut BTreeSet<TopicPartition>,
    ) {
        let Some(first) = records.first() else { return };
        let tp = TopicPartition::new(&first.topic, first.partition);
        let queued = match self.tasks().get(&tp.partition) {
            Some(task) => task.route(records),
            None => {
                debug!(
                    partition = tp.partition,
                    "records of a partition no longer owned dropped"
                );
                return;
            }
        };
        if queued > self.max_buffered && consumer.pause(&tp).is_ok() {
            debug!(topic = %tp.topic, partition = tp.partition, queued, "fetching paused");
            paused.insert(tp);
        }
    }

    /// Hands a batch that does not decode to its partition's task, which
    /// applies the agents' error policies to it in order, and reads on after
    /// it. Nothing happens for a partition without a task (being revoked).
    pub fn step_over(&self, batch: Undecodable, consumer: &mut GroupConsumer) {
        let tasks = self.tasks();
        let Some(task) = tasks.get(&batch.tp.partition) else {
            return;
        };
        if consumer.seek(&batch.tp, batch.to).is_ok() {
            task.route_undecodable(batch);
        }
    }

    /// Bytes of fetched records the tasks hold, not yet processed.
    pub fn queued_bytes(&self) -> usize {
        self.tasks().values().map(TaskHandle::queued).sum()
    }

    /// Resumes fetching the paused partitions whose tasks have caught up.
    pub fn resume(&self, consumer: &mut GroupConsumer, paused: &mut BTreeSet<TopicPartition>) {
        let low = self.max_buffered / 2;
        let tasks = self.tasks();
        paused.retain(|tp| {
            // A partition its task waits for is fetched whatever the task
            // holds of its other topics (see `unfetched`).
            let caught_up = tasks.get(&tp.partition).is_none_or(|t| t.queued() <= low)
                || self.spec.unfetched.is_waited_for(tp);
            if caught_up {
                // A partition moved away meanwhile has no pause left to lift.
                let _ = consumer.resume(tp);
                debug!(topic = %tp.topic, partition = tp.partition, "fetching resumed");
            }
            !caught_up
        });
    }

    /// The context of partition number `n`, once its task runs.
    pub fn context(&self, n: i32) -> Option<Context> {
        self.tasks()
            .get(&n)
            .and_then(|t| t.status.context().cloned())
    }

    /// Ready when the worker is in the group with its current assignment
    /// registered and every partition number it owns is running.
    pub fn readiness(&self, placement: &Placement) -> Readiness {
        if let Some(why) = self.spec.fatal_message() {
            return Err(json!({"ready": false, "stopping": why}));
        }
        if placement.generation < 0 {
            return Err(json!({"ready": false, "why": "not yet in the group"}));
        }
        if placement.generation <= self.lost_generation.load(Ordering::Acquire) {
            return Err(json!({"ready": false, "why": "group membership lost; rejoining"}));
        }
        let tasks = self.tasks();
        let mut recovering = Vec::new();
        let mut not_started = Vec::new();
        for &n in placement.mine().map_or(&[][..], |m| &m.active[..]) {
            match tasks.get(&n).map(|t| t.status.state()) {
                Some(TaskState::Running) => {}
                Some(TaskState::Restoring) => recovering.push(n),
                _ => not_started.push(n),
            }
        }
        if recovering.is_empty() && not_started.is_empty() {
            Ok(())
        } else {
            Err(json!({"ready": false, "recovering": recovering, "not_started": not_started}))
        }
    }

    /// Keeps standbys for the numbers the placement gives this worker to keep
    /// warm, and stops those it no longer does.
    pub async fn reconcile_standbys(&self, placement: &Placement) {
        let stale = self.standbys.stale(placement);
        Standbys::stop(stale).await;
        // Under the tasks lock: a task cannot start for a number while its
        // standby is being started.
        let tasks = self.tasks();
        let active: BTreeSet<i32> = tasks.keys().copied().collect();
        self.standbys.start_wanted(&self.spec, placement, &active);
    }

    /// Stops every standby (at shutdown).
    pub async fn stop_standbys(&self) {
        self.reconcile_standbys(&Placement::default()).await;
    }
}

/// Commits `offsets`; a refusal (the group moved on) only means those events
/// are processed again by their next owner.
async fn commit_offsets(group: &GroupHandle, offsets: &Offsets) -> bool {
    if offsets.is_empty() {
        return false;
    }
    match group.commit(offsets).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "commit failed; the events since the last commit will be processed again");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use strom_client::mock::MockCluster;
    use strom_client::producer::{Producer, ProducerConfig};

    use super::*;
    use crate::assignor::MemberPlacement;
    use crate::config::{ProcessingGuarantee, StoreKind};
    use crate::metrics::Metrics;
    use crate::processor::ErrorPolicy;

    fn placement(generation: i32, active: Vec<i32>) -> Placement {
        Placement {
            generation,
            me: "me".into(),
            members: vec![MemberPlacement {
                member_id: "me".into(),
                active,
                ..MemberPlacement::default()
            }],
        }
    }

    /// /ready follows the task states: not before the group's first
    /// assignment, not while an owned partition has no running task, not
    /// after the membership was lost until a newer generation.
    #[tokio::test]
    async fn readiness_follows_the_task_states() {
        let cluster = MockCluster::new();
        let client = strom_client::Client::connect(cluster.client_config())
            .await
            .unwrap();
        let spec = Arc::new(Spec {
            producer: Producer::new(client.clone(), ProducerConfig::default()).unwrap(),
            client,
            processors: Vec::new(),
            by_topic: Default::default(),
            tables: Vec::new(),
            state_dir: std::env::temp_dir(),
            store: StoreKind::Memory,
            store_cache: 1 << 20,
            guarantee: ProcessingGuarantee::AtLeastOnce,
            partitions: 1,
            counts: Default::default(),
            time_ordered: false,
            time_order_wait: std::time::Duration::from_secs(10),
            unfetched: Default::default(),
            metrics: Metrics::default(),
            on_error: ErrorPolicy::Skip,
            durable_interval: std::time::Duration::from_secs(5),
            durable_changes: 1,
            round_gate: None,
            globals: std::sync::OnceLock::new(),
            fatal: std::sync::Mutex::new(None),
            stopped: Notify::new(),
        });
        let manager = Arc::new(TaskManager::new(spec.clone(), 1 << 20, None));
        assert!(
            manager.readiness(&placement(-1, vec![])).is_err(),
            "ready before joining"
        );
        let joined = placement(3, vec![0]);
        let not_started = manager.readiness(&joined).unwrap_err();
        assert_eq!(not_started["not_started"], serde_json::json!([0]));
        manager.assign(&[0]);
        for _ in 0..100 {
            if manager.readiness(&joined).is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            manager.readiness(&joined).is_ok(),
            "not ready with its task running"
        );
        manager.lose(Some(3), &[0]).await;
        let lost = manager.readiness(&joined).unwrap_err();
        assert!(lost["why"].as_str().unwrap().contains("lost"), "{lost}");
        assert!(
            manager.readiness(&placement(4, vec![])).is_ok(),
            "not ready in a new generation"
        );
        spec.fail(WorkerError::Config("stop".into()));
        assert!(
            manager.readiness(&placement(4, vec![])).is_err(),
            "ready while stopping"
        );
    }
}
