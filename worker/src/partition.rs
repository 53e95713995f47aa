//! One task per partition number: recover its tables, then process its events
//! in order, and take checkpoints on request.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use strom_client::consumer::{ConsumerRecord, TopicPartition};
use strom_client::producer::Producer;
use strom_client::Client;
use strom_state::{recover, Durability, LoggedStore, MemoryStore, RedbStore, Store};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::error::WorkerError;
use crate::processor::{Context, PartitionState, Processor};
use crate::StoreKind;

/// Next offsets to commit: everything before them is processed and acknowledged.
pub(crate) type Offsets = Vec<(TopicPartition, i64)>;

pub(crate) enum Msg {
    Records(Vec<ConsumerRecord>),
    /// Flush tables, await every send, report the offsets.
    Checkpoint(oneshot::Sender<Result<Offsets, WorkerError>>),
    /// Like a checkpoint with durable tables, then stop.
    Close(oneshot::Sender<Result<Offsets, WorkerError>>),
}

/// What a partition task needs to know about the app.
pub(crate) struct Spec {
    pub client: Client,
    pub producer: Producer,
    pub processors: HashMap<String, Arc<dyn Processor>>,
    /// (table name, changelog topic).
    pub tables: Vec<(String, String)>,
    pub state_dir: PathBuf,
    pub store: StoreKind,
    /// Partition count of the source topics.
    pub partitions: usize,
    /// The first error that must stop the worker (a partition that cannot
    /// recover or process stalls otherwise).
    pub fatal: std::sync::Mutex<Option<WorkerError>>,
}

impl Spec {
    pub fn fail(&self, e: WorkerError) {
        warn!(error = %e, "worker stops");
        self.fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }

    pub fn take_fatal(&self) -> Option<WorkerError> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

pub(crate) fn start(
    spec: Arc<Spec>,
    partition: i32,
    queue: usize,
) -> (mpsc::Sender<Msg>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue);
    let task = tokio::spawn(async move {
        if let Err(e) = run(spec.clone(), partition, rx).await {
            warn!(partition, error = %e, "partition task failed");
            spec.fail(e);
        }
    });
    (tx, task)
}

async fn run(
    spec: Arc<Spec>,
    partition: i32,
    mut rx: mpsc::Receiver<Msg>,
) -> Result<(), WorkerError> {
    let mut tables = BTreeMap::new();
    for (name, changelog) in &spec.tables {
        let store: Arc<dyn Store> = match spec.store {
            StoreKind::Redb => Arc::new(RedbStore::open(strom_state::store_path(
                &spec.state_dir,
                name,
                partition,
            ))?),
            StoreKind::Memory => Arc::new(MemoryStore::new()),
        };
        let recovery = recover(&spec.client, store.clone(), changelog, partition).await?;
        info!(partition, table = %name, replayed = recovery.replayed, "table ready");
        tables.insert(
            name.clone(),
            LoggedStore::new(store, spec.producer.clone(), changelog.clone(), partition),
        );
    }
    let ctx = Context {
        partition,
        partitions: spec.partitions,
        state: Arc::new(tokio::sync::Mutex::new(PartitionState {
            tables,
            deliveries: Vec::new(),
        })),
        producer: spec.producer.clone(),
    };
    let mut processed: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Records(records) => {
                for record in records {
                    let tp = TopicPartition::new(&record.topic, record.partition);
                    let offset = record.offset;
                    match spec.processors.get(&*record.topic) {
                        Some(p) => {
                            if let Err(e) = p.process(ctx.clone(), record).await {
                                warn!(topic = %tp.topic, partition = tp.partition, offset, error = %e, "agent failed on an event; skipped");
                            }
                        }
                        None => warn!(topic = %tp.topic, "no agent for this topic; event skipped"),
                    }
                    processed.insert(tp, offset + 1);
                }
            }
            Msg::Checkpoint(reply) => {
                let _ = reply.send(checkpoint(&ctx, &processed, Durability::Fast).await);
            }
            Msg::Close(reply) => {
                let _ = reply.send(checkpoint(&ctx, &processed, Durability::Durable).await);
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Flushes the tables (waiting for their changelog records), waits for every
/// other record sent, and returns the offsets that may now be committed.
async fn checkpoint(
    ctx: &Context,
    processed: &BTreeMap<TopicPartition, i64>,
    durability: Durability,
) -> Result<Offsets, WorkerError> {
    let mut state = ctx.state.lock().await;
    for table in state.tables.values_mut() {
        table.flush(durability).await?;
    }
    if !state.deliveries.is_empty() {
        ctx.producer.flush().await?;
        for d in state.deliveries.drain(..) {
            if let Some(Err(source)) = d.try_result() {
                return Err(WorkerError::Delivery {
                    partition: ctx.partition,
                    source,
                });
            }
        }
    }
    Ok(processed.iter().map(|(tp, o)| (tp.clone(), *o)).collect())
}
