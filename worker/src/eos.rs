//! Exactly-once: the worker's transactional producer and how its transactions
//! end (Kafka Streams' `exactly_once_v2`, KIP-447).
//!
//! One transactional producer per worker. Everything the worker's tasks cause
//! between two commits — outputs, repartition records, changelog records, dead
//! letters, timers' records — goes into its open transaction, and so do the
//! input offsets (TxnOffsetCommit with the consumer's group metadata). Then
//! the transaction commits, or aborts and the tasks read again from the last
//! committed offsets.
//!
//! Fencing:
//! - The transactional id is `<app-id>-<instance id>`: stable across restarts
//!   of one worker, so a restarted worker's InitProducerId fences its previous
//!   incarnation and aborts the transaction that one left open (on brokers
//!   that never time transactions out, such as tansu, nothing else would).
//!   Two live workers with one id fence each other: the loser stops with
//!   [`WorkerError::Fenced`].
//! - A zombie — a worker whose group session ended while it was frozen — must
//!   not commit. Kafka refuses its TxnOffsetCommit (an old generation); on
//!   brokers that do not check, the member's own check that its session is
//!   alive ([`GroupHandle::session_alive`]), made before the offsets go out and
//!   again before EndTxn, aborts the transaction instead.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strom_client::group::GroupHandle;
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::{Client, Error};
use tokio::sync::{watch, RwLock};
use tracing::{info, warn};

use crate::config::WorkerConfig;
use crate::error::WorkerError;
use crate::task::Offsets;

/// How long a commit waits for the broker to show its offsets.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// Why a commit did not happen.
#[derive(Debug)]
pub(crate) enum CommitError {
    /// The transaction was aborted: the tasks read again from the last
    /// committed offsets. The worker goes on.
    Aborted(String),
    /// The worker must stop (fenced, or the transaction's outcome is unknown).
    Fatal(WorkerError),
}

/// The worker's transactional producer.
pub(crate) struct Transactions {
    producer: Producer,
    id: String,
    /// Shared by whatever may add to the open transaction from outside a
    /// commit round (timers' sends, a task starting to run); exclusive for a
    /// whole commit round, so nothing joins a transaction while it ends.
    gate: Arc<RwLock<()>>,
    /// Number of the open transaction.
    open: AtomicU64,
    /// How many transactions have ended.
    ended: watch::Sender<u64>,
    /// Numbers of the last transactions that aborted.
    aborted: Mutex<VecDeque<u64>>,
    /// Why the last transaction aborted (`None` after a commit).
    last_reason: Mutex<Option<String>>,
}

impl std::fmt::Debug for Transactions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transactions")
            .field("id", &self.id)
            .finish()
    }
}

fn fenced(id: &str, e: &Error) -> WorkerError {
    WorkerError::Fenced {
        transactional_id: id.to_owned(),
        reason: e.to_string(),
    }
}

impl Transactions {
    /// Registers the transactional id `<app-id>-<instance>` (fencing any older
    /// producer with it and aborting what it left open) and opens the first
    /// transaction.
    pub async fn start(
        client: Client,
        config: &WorkerConfig,
        instance: &str,
    ) -> Result<Transactions, WorkerError> {
        let id = format!("{}-{instance}", config.app_id);
        let producer = Producer::new(
            client,
            ProducerConfig {
                transactional_id: Some(id.clone()),
                transaction_timeout: config.transaction_timeout,
                compression: config.compression,
                linger: config.linger,
                buffer_memory: crate::budget::Shares::producer(config),
                ..ProducerConfig::default()
            },
        )?;
        producer.init_transactions().await.map_err(|e| match e {
            Error::ProducerFenced { .. } => fenced(&id, &e),
            e => e.into(),
        })?;
        producer.begin_transaction()?;
        info!(transactional_id = %id, "exactly-once: transactional producer ready");
        Ok(Transactions {
            producer,
            id,
            gate: Arc::new(RwLock::new(())),
            open: AtomicU64::new(0),
            ended: watch::channel(0).0,
            aborted: Mutex::new(VecDeque::new()),
            last_reason: Mutex::new(None),
        })
    }

    /// The transactional producer the tasks send through.
    pub fn producer(&self) -> &Producer {
        &self.producer
    }

    /// The round gate (see the field): a commit round holds it exclusively
    /// from before it asks the tasks to prepare until the next transaction
    /// has begun.
    pub fn gate(&self) -> &Arc<RwLock<()>> {
        &self.gate
    }

    /// Commits the open transaction with `offsets` as the group's committed
    /// offsets (skipped when empty), then opens the next one. The caller holds
    /// the [gate](Transactions::gate) exclusively. Any failure
    /// before EndTxn aborts the transaction instead; a failure of EndTxn
    /// itself leaves its outcome unknown and is fatal (a restart's
    /// InitProducerId completes it either way).
    pub async fn commit(&self, offsets: &Offsets, group: &GroupHandle) -> Result<(), CommitError> {
        if offsets.is_empty() && self.producer.transaction_is_empty() {
            return Ok(());
        }
        let not_alive = || {
            CommitError::Aborted(
                "this worker's group session is not current (frozen past its session timeout, or its membership was lost)".into(),
            )
        };
        let prepared = async {
            if !group.session_alive() {
                return Err(not_alive());
            }
            if !offsets.is_empty() {
                self.producer
                    .send_offsets_to_transaction(offsets, &group.metadata())
                    .await
                    .map_err(|e| self.before_end(e))?;
            }
            if !group.session_alive() {
                return Err(not_alive());
            }
            Ok(())
        }
        .await;
        if let Err(e) = prepared {
            return Err(self.abort_after(e).await);
        }
        match self.producer.commit_transaction().await {
            Ok(()) => {
                self.until_applied(offsets, group).await;
                self.next(true).map_err(CommitError::Fatal)?;
                *self.last_reason.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(())
            }
            // Refused before EndTxn went out (a record of it failed): abort.
            Err(e @ Error::Transaction { .. }) => {
                Err(self.abort_after(CommitError::Aborted(e.to_string())).await)
            }
            Err(e @ Error::ProducerFenced { .. }) => Err(CommitError::Fatal(fenced(&self.id, &e))),
            Err(e) => Err(CommitError::Fatal(WorkerError::Framework {
                partition: -1,
                what: format!("committing transaction of {:?}", self.id),
                attempts: 1,
                error: format!(
                    "{e}; its outcome is unknown, so the worker stops (a restart completes it)"
                ),
            })),
        }
    }

    /// Waits until the group's committed offsets show what the transaction
    /// just committed, before the next transaction begins.
    ///
    /// On Kafka they do once EndTxn's markers are written (OffsetFetch with
    /// `require_stable` waits for that), so this costs one round trip. It
    /// matters on brokers whose EndTxn answers before the offsets are applied:
    /// tansu 0.6 defers them while another producer's transaction on a
    /// partition this one wrote is still open, applies them when a later
    /// EndTxn finds every overlapping transaction prepared, and drops them
    /// for good if this producer's next transaction aborts first (read in its
    /// `dynostore::txn_end`). Not beginning the next transaction until they
    /// show keeps a crash from losing committed offsets there, which would
    /// make the next owner process the same events again.
    async fn until_applied(&self, offsets: &Offsets, group: &GroupHandle) {
        if offsets.is_empty() {
            return;
        }
        let partitions: Vec<_> = offsets.iter().map(|(tp, _)| tp.clone()).collect();
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            match group.committed(&partitions).await {
                Ok(now) => {
                    let applied = offsets
                        .iter()
                        .all(|(tp, o)| now.get(tp).copied().flatten().is_some_and(|c| c >= *o));
                    if applied {
                        return;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "reading committed offsets back failed"),
            }
            if started.elapsed() > APPLY_WAIT {
                warn!(
                    transactional_id = %self.id, waited = ?APPLY_WAIT,
                    "the broker has not applied the committed transaction's offsets yet; going on"
                );
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// An error before EndTxn: the transaction can still be aborted unless
    /// the producer was fenced.
    fn before_end(&self, e: Error) -> CommitError {
        match e {
            Error::ProducerFenced { .. } => CommitError::Fatal(fenced(&self.id, &e)),
            e => CommitError::Aborted(e.to_string()),
        }
    }

    /// Aborts after `why`; returns what the caller reports.
    async fn abort_after(&self, why: CommitError) -> CommitError {
        let CommitError::Aborted(reason) = why else {
            return why;
        };
        // Once per incident at WARN: a member out of its group aborts every
        // round until it has rejoined.
        let repeated = self
            .last_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(reason.clone())
            == Some(reason.clone());
        if repeated {
            tracing::debug!(transactional_id = %self.id, %reason, "transaction aborted");
        } else {
            warn!(transactional_id = %self.id, %reason, "transaction aborted");
        }
        match self.abort_open().await {
            Ok(()) => CommitError::Aborted(reason),
            Err(e) => CommitError::Fatal(e),
        }
    }

    /// Aborts the open transaction (its records never become visible to
    /// read-committed readers) and opens the next one. True when it held
    /// something. The caller holds the [gate](Transactions::gate)
    /// exclusively.
    pub async fn abort(&self) -> Result<bool, WorkerError> {
        let held = !self.producer.transaction_is_empty();
        self.abort_open().await?;
        Ok(held)
    }

    async fn abort_open(&self) -> Result<(), WorkerError> {
        self.producer
            .abort_transaction()
            .await
            .map_err(|e| match e {
                Error::ProducerFenced { .. } => fenced(&self.id, &e),
                e => WorkerError::Framework {
                    partition: -1,
                    what: format!("aborting transaction of {:?}", self.id),
                    attempts: 1,
                    error: e.to_string(),
                },
            })?;
        self.next(false)
    }

    /// Books the end of the open transaction and opens the next.
    fn next(&self, committed: bool) -> Result<(), WorkerError> {
        let number = self.open.fetch_add(1, Ordering::AcqRel);
        if !committed {
            let mut aborted = self.aborted.lock().unwrap_or_else(|e| e.into_inner());
            aborted.push_back(number);
            if aborted.len() > 64 {
                aborted.pop_front();
            }
        }
        self.ended.send_replace(number + 1);
        Ok(self.producer.begin_transaction()?)
    }

    /// Sends a timer's record in the open transaction and waits until that
    /// transaction has ended: `Ok` once it committed.
    pub async fn send_and_commit(&self, record: ProducerRecord<'_>) -> Result<(), WorkerError> {
        let number = {
            let _adding = self.gate.read().await;
            self.producer.send(record).await?;
            self.open.load(Ordering::Acquire)
        };
        let mut ended = self.ended.subscribe();
        ended
            .wait_for(|&n| n > number)
            .await
            .map_err(|_| WorkerError::Framework {
                partition: -1,
                what: "a timer's send".into(),
                attempts: 1,
                error: "the worker stopped before its transaction ended".into(),
            })?;
        let aborted = self
            .aborted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&number);
        if aborted {
            return Err(WorkerError::Framework {
                partition: -1,
                what: "a timer's send".into(),
                attempts: 1,
                error: "its transaction was aborted".into(),
            });
        }
        Ok(())
    }
}
