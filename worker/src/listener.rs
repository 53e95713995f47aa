//! The group's rebalance listener: partition numbers come and go through the
//! task manager.

use std::collections::BTreeSet;
use std::sync::Arc;

use strom_client::consumer::TopicPartition;
use strom_client::group::{GroupHandle, ListenerFuture, RebalanceListener};

use crate::manager::TaskManager;
use crate::metrics::Metrics;

/// Starts and stops partition tasks as the group assigns, revokes and loses.
pub(crate) struct Listener(pub Arc<TaskManager>);

impl RebalanceListener for Listener {
    fn on_assigned<'a>(
        &'a self,
        _group: &'a GroupHandle,
        partitions: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        self.0.assign(&numbers(partitions));
        Box::pin(async {})
    }

    fn on_revoked<'a>(
        &'a self,
        group: &'a GroupHandle,
        partitions: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        Box::pin(async move {
            forget(&self.0.spec.metrics, partitions);
            self.0.revoke(group, &numbers(partitions)).await;
        })
    }

    fn on_lost<'a>(
        &'a self,
        group: &'a GroupHandle,
        partitions: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        Box::pin(async move {
            forget(&self.0.spec.metrics, partitions);
            // The membership itself is gone (else a revoke was cut off and
            // only these partitions went).
            let lost = (!group.session_alive()).then(|| group.metadata().generation_id);
            self.0.lose(lost, &numbers(partitions)).await;
        })
    }
}

/// The partition numbers among `partitions`, sorted, once each.
pub(crate) fn numbers(partitions: &[TopicPartition]) -> Vec<i32> {
    partitions
        .iter()
        .map(|tp| tp.partition)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Drops the per-partition metrics of partitions this worker gave up.
fn forget(metrics: &Metrics, partitions: &[TopicPartition]) {
    for tp in partitions {
        metrics.forget_lag(&tp.topic, tp.partition);
    }
    for n in numbers(partitions) {
        metrics.forget_partition(n);
    }
}
