//! What the runtime runs: processors (the streams crate's agents, compiled down
//! to bytes) and the context they run in.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use strom_client::consumer::ConsumerRecord;
use strom_client::producer::{DeliveryFuture, Producer, ProducerRecord};
use strom_state::LoggedStore;

use crate::error::WorkerError;

/// What an agent's failure looks like to the runtime.
pub type AgentError = Box<dyn std::error::Error + Send + Sync>;

/// The future of processing one event.
pub type ProcessFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AgentError>> + Send + 'a>>;

/// Processes the events of one source topic, one at a time per partition.
///
/// An error is logged with the event's topic, partition and offset, and the
/// partition goes on with the next event (the event counts as processed).
pub trait Processor: Send + Sync {
    /// The topic whose events this processor takes.
    fn topic(&self) -> &str;

    /// Processes one event.
    fn process<'a>(&'a self, ctx: &'a mut Context, record: ConsumerRecord) -> ProcessFuture<'a>;
}

/// What a processor sees while it handles an event of one partition: that
/// partition's tables and a producer. Everything sent or written through it
/// is acknowledged before the event's offset is committed.
#[derive(Debug)]
pub struct Context {
    pub(crate) partition: i32,
    pub(crate) tables: BTreeMap<String, LoggedStore>,
    pub(crate) producer: Producer,
    pub(crate) deliveries: Vec<DeliveryFuture>,
}

impl Context {
    /// The partition being processed.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// This partition of table `name`.
    pub fn table(&mut self, name: &str) -> Result<&mut LoggedStore, WorkerError> {
        self.tables
            .get_mut(name)
            .ok_or_else(|| WorkerError::Config(format!("no table named {name:?} is declared")))
    }

    /// Sends a record; its acknowledgement is awaited before the current
    /// event's offset is committed.
    pub async fn send(&mut self, record: ProducerRecord<'_>) -> Result<(), WorkerError> {
        let delivery = self.producer.send(record).await?;
        self.deliveries.push(delivery);
        Ok(())
    }
}
