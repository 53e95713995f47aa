//! Standby replicas: warm copies of the tables of partition numbers other
//! workers process, kept current by tailing their changelogs, so a failover
//! replays only the last few records.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use strom_state::Standby;
use tracing::{info, warn};

use crate::assignor::Placement;
use crate::task::{open_store, Spec, TableSpec};

/// The standbys of this worker: per partition number, one per table.
#[derive(Debug, Default)]
pub(crate) struct Standbys {
    by_number: Mutex<HashMap<i32, Vec<(String, Standby)>>>,
}

type Stale = Vec<(i32, Vec<(String, Standby)>)>;

impl Standbys {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Vec<(String, Standby)>>> {
        self.by_number.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands the standby stores of number `n` to the task taking it over.
    pub fn take(&self, n: i32) -> Vec<(String, Standby)> {
        self.lock().remove(&n).unwrap_or_default()
    }

    /// Removes the standbys the placement no longer wants here. A number about
    /// to be processed here keeps its standby for its task to take over.
    pub fn stale(&self, placement: &Placement) -> Stale {
        let (wanted, active_soon) = numbers(placement);
        let mut standbys = self.lock();
        let stale: Vec<i32> = standbys
            .keys()
            .filter(|n| !wanted.contains(n) && !active_soon.contains(n))
            .copied()
            .collect();
        stale
            .into_iter()
            .filter_map(|n| standbys.remove(&n).map(|s| (n, s)))
            .collect()
    }

    /// Stops standbys removed by [`Standbys::stale`].
    pub async fn stop(stale: Stale) {
        for (n, tables) in stale {
            for (table, standby) in tables {
                if let Err(e) = standby.stop().await {
                    warn!(partition = n, %table, error = %e, "standby stopped with an error");
                }
            }
            info!(partition = n, "standby stopped");
        }
    }

    /// Starts the standbys the placement wants here and that are missing,
    /// except for numbers in `active` (processed here).
    pub fn start_wanted(&self, spec: &Spec, placement: &Placement, active: &BTreeSet<i32>) {
        let (wanted, _) = numbers(placement);
        let mut standbys = self.lock();
        for &n in wanted.iter().filter(|n| !active.contains(n)) {
            for TableSpec {
                name: table,
                changelog,
                ..
            } in &spec.tables
            {
                let warm = standbys.entry(n).or_default();
                if warm.iter().any(|(t, _)| t == table) {
                    continue;
                }
                match open_store(spec, table, n) {
                    Ok(store) => {
                        info!(partition = n, %table, "standby started");
                        let standby =
                            Standby::start(&spec.client, store, changelog, n, spec.isolation());
                        warm.push((table.clone(), standby));
                    }
                    // Still open by a task closing: the next tick tries again.
                    Err(e) => warn!(partition = n, %table, error = %e, "standby not started yet"),
                }
            }
        }
    }
}

/// The numbers the placement gives this worker as standbys and as actives.
fn numbers(placement: &Placement) -> (BTreeSet<i32>, BTreeSet<i32>) {
    placement
        .mine()
        .map(|m| {
            (
                m.standby.iter().copied().collect(),
                m.active.iter().copied().collect(),
            )
        })
        .unwrap_or_default()
}
