//! Global tables: every worker holds all of a topic, restored before any
//! agent starts and kept current while it runs.
//!
//! A global table is fed by its source topic and by nothing else: the topic
//! is its changelog (no other topic is written), and its records are
//! applied as they are — key bytes as the topic's records carry them, a
//! null value deleting the key. Each worker keeps one store per table (see
//! [`strom_state::global`]) with the offset of every partition, so a restart
//! replays only what it has not applied.
//!
//! The worker restores every global table to the end of its topic before it
//! joins its group, then tails every partition (a standby per partition):
//! an agent on any worker sees an update once that worker has read it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use strom_state::global::GlobalStore;
use strom_state::{RedbStore, Standby, Store};
use tracing::info;

use crate::config::StoreKind;
use crate::error::WorkerError;
use crate::metrics::Counter;
use crate::task::Spec;

/// A global table as the worker is given it: its name and source topic.
#[derive(Debug, Clone)]
pub(crate) struct GlobalSpec {
    pub name: String,
    pub topic: String,
}

/// The global tables of a running worker.
#[derive(Debug, Default)]
pub(crate) struct GlobalTables {
    tables: HashMap<String, Global>,
}

#[derive(Debug)]
struct Global {
    topic: String,
    store: GlobalStore,
    reads: Counter,
    /// Per partition of the source topic, the standby tailing it (taken
    /// out when it stops).
    tailing: Mutex<Vec<(i32, Option<Standby>)>>,
}

impl GlobalTables {
    /// Opens, restores and starts tailing every table of `globals`.
    pub async fn restore(
        spec: &Arc<Spec>,
        globals: &[GlobalSpec],
    ) -> Result<GlobalTables, WorkerError> {
        let mut tables = HashMap::new();
        for g in globals {
            let started = std::time::Instant::now();
            let store = GlobalStore::new(open(spec, &g.name).await?);
            let partitions = spec.client.topic_metadata(&g.topic).await?.partitions.len() as i32;
            let mut restoring = tokio::task::JoinSet::new();
            for p in 0..partitions {
                let (spec, part) = (spec.clone(), store.partition(p));
                let (name, topic) = (g.name.clone(), g.topic.clone());
                restoring.spawn(async move {
                    let done = crate::task::recover_reporting(&spec, part, &name, &topic, p).await;
                    (p, done)
                });
            }
            let mut replayed = 0;
            while let Some(done) = restoring.join_next().await {
                let (p, done) = done.map_err(|e| {
                    WorkerError::Config(format!("restoring global table {:?} failed: {e}", g.name))
                })?;
                let done = done?;
                replayed += done.replayed;
                spec.metrics.global_applied(&g.name, p).set(done.to);
            }
            let seconds = started.elapsed().as_secs_f64();
            info!(
                table = %g.name, topic = %g.topic, partitions, replayed, seconds,
                records_per_second = (replayed as f64 / seconds.max(1e-3)) as u64,
                "global table restored"
            );
            let tailing = (0..partitions)
                .map(|p| (p, Some(tail(spec, &g.name, &g.topic, &store, p))))
                .collect();
            let (reads, _) = spec.metrics.table_counters(&g.name);
            let table = Global {
                topic: g.topic.clone(),
                store,
                reads,
                tailing: Mutex::new(tailing),
            };
            tables.insert(g.name.clone(), table);
        }
        Ok(GlobalTables { tables })
    }

    /// The value of `key` (as the source topic's records carry it) in
    /// global table `name`; `None` for a table that is not global.
    pub fn get(&self, name: &str, key: &[u8]) -> Option<Result<Option<Vec<u8>>, WorkerError>> {
        let table = self.tables.get(name)?;
        table.reads.inc();
        Some(table.store.get(key).map_err(WorkerError::from))
    }

    /// The error of a partition that stopped being tailed, if one did: the
    /// table would fall behind its topic without a word. Partitions the
    /// topic gained (as the client's metadata knows it) are read from their
    /// start.
    pub async fn check(&self, spec: &Spec) -> Result<(), WorkerError> {
        for (name, table) in &self.tables {
            let now = spec.client.cached_topic(&table.topic);
            let stopped = {
                let mut tailing = table.tailing.lock().unwrap_or_else(|e| e.into_inner());
                let known = tailing.len() as i32;
                let gained = now.map_or(0, |t| t.partitions.len() as i32);
                for p in known..gained {
                    info!(table = %name, topic = %table.topic, partition = p, "the global table's topic gained a partition; reading it");
                    tailing.push((p, Some(tail(spec, name, &table.topic, &table.store, p))));
                }
                tailing
                    .iter_mut()
                    .find(|(_, s)| s.as_ref().is_some_and(Standby::is_finished))
                    .and_then(|(p, s)| s.take().map(|s| (*p, s)))
            };
            if let Some((p, standby)) = stopped {
                let why = match standby.stop().await {
                    Err(e) => e.to_string(),
                    Ok(_) => "it stopped".to_owned(),
                };
                return Err(WorkerError::GlobalTable {
                    table: name.clone(),
                    partition: p,
                    error: why,
                });
            }
        }
        Ok(())
    }

    /// Stops tailing (at shutdown); the stores keep what they applied.
    pub async fn stop(&self) {
        for (name, table) in &self.tables {
            let standbys: Vec<(i32, Standby)> = {
                let mut tailing = table.tailing.lock().unwrap_or_else(|e| e.into_inner());
                tailing
                    .iter_mut()
                    .filter_map(|(p, s)| s.take().map(|s| (*p, s)))
                    .collect()
            };
            for (p, standby) in standbys {
                if let Err(e) = standby.stop().await {
                    tracing::warn!(table = %name, partition = p, error = %e, "global table stopped with an error");
                }
            }
        }
    }
}

/// Starts reading partition `p` of `topic` into `store`.
fn tail(spec: &Spec, name: &str, topic: &str, store: &GlobalStore, p: i32) -> Standby {
    let applied = spec.metrics.global_applied(name, p);
    Standby::start_observed(
        &spec.client,
        store.partition(p),
        topic,
        p,
        spec.isolation(),
        move |offset| {
            applied.set(offset);
        },
    )
}

/// The store of global table `name`: `<state_dir>/<name>/global.redb`. An
/// earlier run of this process may still be closing it: retried for a few
/// seconds.
async fn open(spec: &Spec, name: &str) -> Result<Arc<dyn Store>, WorkerError> {
    if spec.store == StoreKind::Memory {
        return Ok(Arc::new(strom_state::MemoryStore::new()));
    }
    let path = spec.state_dir.join(name).join("global.redb");
    let mut attempts = 0;
    loop {
        match RedbStore::open_with_cache(path.clone(), spec.store_cache) {
            Ok(store) => return Ok(Arc::new(store)),
            Err(e) if attempts < 50 => {
                attempts += 1;
                tracing::debug!(table = name, error = %e, "global table's store not openable yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
