//! What an agent sees while it handles one event: typed tables and sends.

use bytes::Bytes;
use serde::Serialize;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use strom_client::consumer::ConsumerRecord;
use strom_client::partitioner::partition_for_key;
use strom_client::producer::ProducerRecord;
use strom_client::Header;
use strom_state::table::{prefix_bounds, KeyPrefix};
use strom_state::TableKey;

use crate::codec::{Codec, CodecError};
use crate::error::{Error, Result};
use crate::stream::Event;
use std::time::Duration;

use strom_worker::{ClosedWindow, WindowUpdate};

use crate::global::GlobalTable;
use crate::table::{KeyBytes, OnClose, SetTable, Table, Window, WindowedTable};
use crate::topic::Topic;

/// The event's partition, its tables and a producer. Everything an agent sends
/// or writes through it is acknowledged before the event counts as done.
/// Records it sends carry the event's time (its timestamp), as Kafka Streams'
/// outputs do, not the time they were sent; an event without a time (a
/// negative timestamp, as records of old clients have) sends with the
/// current time.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub(crate) inner: strom_worker::Context,
    /// The time of the event being handled (of a batch: its latest event).
    pub(crate) event_time: Option<i64>,
    /// The record the event was read from, for a late event's
    /// [late-events topic](WindowedTable::late_events); `None` for batches
    /// and close callbacks.
    pub(crate) source: Option<Arc<Source>>,
}

/// The record an agent's events were read from, shared by the events its
/// `flat_map` makes (and made anew when the record is processed again).
#[derive(Debug)]
pub(crate) struct Source {
    record: ConsumerRecord,
    /// The late-events topics it went to.
    late_to: std::sync::Mutex<Vec<Arc<str>>>,
}

impl Source {
    pub(crate) fn new(record: ConsumerRecord) -> Arc<Source> {
        Arc::new(Source {
            record,
            late_to: std::sync::Mutex::default(),
        })
    }
}

fn value_error(table: &str, what: impl std::fmt::Display) -> Error {
    Error::Codec {
        topic: table.to_owned(),
        source: CodecError {
            what: what.to_string(),
        },
    }
}

/// `value` as table `table` stores it, in its value codec.
fn encode_value<V>(table: &str, codec: &dyn Codec<V>, value: &V) -> Result<Vec<u8>> {
    match codec.encode(value) {
        // No copy: the codec's fresh bytes give their buffer back.
        Ok(Some(bytes)) => Ok(Vec::from(bytes)),
        Ok(None) => Err(value_error(
            table,
            "the table's value codec writes no value for it (a table holds no nulls)",
        )),
        Err(e) => Err(value_error(table, e)),
    }
}

/// Why an update wrote nothing.
enum Refused {
    /// The stored value does not decode.
    Stored(CodecError),
    /// The new value does not encode.
    New(Error),
}

/// The new value `f` makes of the stored `old` (or the default), and its
/// bytes in `codec`.
fn encode_update<V>(
    table: &str,
    default: &dyn Fn() -> V,
    codec: &dyn Codec<V>,
    f: impl FnOnce(V) -> V,
    old: Option<&[u8]>,
) -> std::result::Result<(Vec<u8>, V), Refused> {
    let old = match old {
        Some(v) => codec.decode(Some(v)).map_err(Refused::Stored)?,
        None => default(),
    };
    let new = f(old);
    let encoded = encode_value(table, codec, &new).map_err(Refused::New)?;
    Ok((encoded, new))
}

impl Ctx {
    /// The context of a batch of events: sends carry its latest event's time.
    pub(crate) fn for_batch<K, V>(inner: strom_worker::Context, batch: &[Event<K, V>]) -> Ctx {
        Ctx {
            inner,
            event_time: batch.iter().map(|e| e.timestamp).max(),
            source: None,
        }
    }

    /// The context operators read tables through (a join): sends are not
    /// theirs, so it carries no event's time or record.
    pub(crate) fn for_lookups(inner: strom_worker::Context) -> Ctx {
        Ctx {
            inner,
            event_time: None,
            source: None,
        }
    }

    /// The time of the event being handled (ms since the epoch; of a batch,
    /// its latest event): what the records it sends carry.
    pub fn event_time(&self) -> Option<i64> {
        self.event_time
    }

    /// The partition's stream time (ms since the epoch): the latest event
    /// time its task has seen since it started, this event's included. It
    /// never goes back: a late event leaves it where it is.
    pub fn stream_time(&self) -> Option<i64> {
        self.inner.stream_time()
    }

    /// The partition the event came from.
    pub fn partition(&self) -> i32 {
        self.inner.partition()
    }

    /// The bytes `key` is stored under in `table`, once it is sure the key
    /// belongs to this event's partition: murmur2 of what the table's key
    /// codec writes for it (`key_bytes`), as a producer picks a record's
    /// partition.
    fn check_partition<K: TableKey>(
        &self,
        table: &str,
        key_bytes: &KeyBytes<K>,
        key: &K,
    ) -> Result<Vec<u8>> {
        if key_bytes.is_local() {
            return Ok(key.encode_key());
        }
        let written = key_bytes.of(key).map_err(|source| Error::Codec {
            topic: table.to_owned(),
            source,
        })?;
        let Some(written) = written else {
            return Err(Error::Config(format!(
                "table {table:?}: its key codec writes no key, so no key has a partition"
            )));
        };
        let key_partition = partition_for_key(&written, self.inner.partitions());
        let stored = key.encode_key();
        if key_partition != self.partition() {
            return Err(Error::CoPartition {
                table: table.to_owned(),
                key: key_text(&stored),
                key_partition,
                partition: self.partition(),
                partitions: self.inner.partitions(),
            });
        }
        Ok(stored)
    }

    /// The value of `key` in `table`, or the table's default. The key must
    /// belong to this event's partition (see [`Error::CoPartition`]): another
    /// partition's keys live in its own task, and reading one here would
    /// silently give the default.
    pub async fn get<K: TableKey, V>(&self, table: &Table<K, V>, key: &K) -> Result<V> {
        Ok(self
            .find(table, key)
            .await?
            .unwrap_or_else(|| (table.spec.default)()))
    }

    /// The value of `key` in `table`, or `None` when the table holds none
    /// (where [`Ctx::get`] gives the default). The key must belong to this
    /// event's partition, as for [`Ctx::get`].
    pub async fn find<K: TableKey, V>(&self, table: &Table<K, V>, key: &K) -> Result<Option<V>> {
        let bytes = self.check_partition(&table.spec.name, &table.spec.key, key)?;
        let stored = self.inner.get(&table.spec.name, &bytes).await?;
        match stored {
            Some(v) => match table.spec.value.decode(Some(&v)) {
                Ok(v) => Ok(Some(v)),
                Err(e) => Err(self.damaged(&table.spec.name, &bytes, e).await),
            },
            None => Ok(None),
        }
    }

    /// The value of `key` in global table `table`, or `None`: read from this
    /// worker's copy of the whole table, so any key can be read from any
    /// event (see [`GlobalTable`] for when an update is seen).
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize, serde::Deserialize, Default)] struct Profile { name: String }
    /// let mut app = strom::App::new("enrich");
    /// let users = app.topic::<String, Profile>("users");
    /// let profiles = app.global_table("profiles", &users);
    /// let views = app.topic::<String, String>("page-views");
    /// app.agent(&views).for_each(move |ctx, view| {
    ///     let profiles = profiles.clone();
    ///     async move {
    ///         let name = ctx.get_global(&profiles, &view.key)?.unwrap_or_default().name;
    ///         println!("{name} viewed {}", view.value);
    ///         Ok(())
    ///     }
    /// });
    /// ```
    pub fn get_global<K, V>(&self, table: &GlobalTable<K, V>, key: &K) -> Result<Option<V>> {
        let Some(key) = table.key_bytes(key)? else {
            // The app's declaration is wrong, not the event: stop.
            return Err(self
                .inner
                .fail("look up a global table", table.keyless())
                .into());
        };
        match self.inner.global(&table.name, &key)? {
            Some(bytes) => table.decode(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// A stored value that does not decode is damaged state, not the
    /// agent's error (see [`strom_worker::Context::damaged`]).
    async fn damaged(&self, table: &str, key: &[u8], e: impl std::fmt::Display) -> Error {
        self.inner.damaged(table, key, &e.to_string()).await.into()
    }

    /// Sets `key` in `table` to `value`. The key must belong to this event's
    /// partition (see [`Error::CoPartition`]).
    pub async fn set<K: TableKey, V>(&self, table: &Table<K, V>, key: &K, value: &V) -> Result<()> {
        let bytes = self.check_partition(&table.spec.name, &table.spec.key, key)?;
        let value = encode_value(&table.spec.name, &*table.spec.value, value)?;
        self.inner.put(&table.spec.name, bytes, value).await?;
        Ok(())
    }

    /// [`Ctx::set`] of any value whose JSON the table's values read (an
    /// operator's JSON table of `Option<V>` written from a `V`).
    pub(crate) async fn put<K: TableKey, V, T: Serialize + ?Sized>(
        &self,
        table: &Table<K, V>,
        key: &K,
        value: &T,
    ) -> Result<()> {
        let bytes = self.check_partition(&table.spec.name, &table.spec.key, key)?;
        let value = serde_json::to_vec(value).map_err(|e| value_error(&table.spec.name, e))?;
        self.inner.put(&table.spec.name, bytes, value).await?;
        Ok(())
    }

    /// Replaces the value of `key` with `f(old or default)` and returns it.
    /// Atomic: no other event of this partition reads or writes `table` in
    /// between, so agents with [`concurrency`](crate::Stream::concurrency)
    /// lose no update.
    pub async fn update<K, V, F>(&self, table: &Table<K, V>, key: &K, f: F) -> Result<V>
    where
        K: TableKey,
        F: FnOnce(V) -> V,
    {
        let bytes = self.check_partition(&table.spec.name, &table.spec.key, key)?;
        let updated = self
            .inner
            .update(&table.spec.name, bytes, |old| {
                encode_update(
                    &table.spec.name,
                    &*table.spec.default,
                    &*table.spec.value,
                    f,
                    old.as_deref(),
                )
            })
            .await?;
        match updated {
            Ok(v) => Ok(v),
            // The key went into the update; encode it again only here.
            Err(Refused::Stored(e)) => {
                Err(self.damaged(&table.spec.name, &key.encode_key(), e).await)
            }
            Err(Refused::New(e)) => Err(e),
        }
    }

    /// The entries of this partition of `table` with keys in `range`, in
    /// key order. Only this partition's: a table is partitioned like the
    /// stream that writes it. Read at once, so for bounded scans.
    ///
    /// ```no_run
    /// # async fn f(ctx: strom::Ctx, scores: strom::Table<u64, String>) -> strom::Result<()> {
    /// for (id, name) in ctx.range(&scores, 100..200).await? {
    ///     println!("{id}: {name}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn range<K, V>(
        &self,
        table: &Table<K, V>,
        range: impl RangeBounds<K>,
    ) -> Result<Vec<(K, V)>>
    where
        K: TableKey,
    {
        let bound = |b: Bound<&K>| b.map(TableKey::encode_key);
        let (from, to) = (bound(range.start_bound()), bound(range.end_bound()));
        self.scan(table, from, to).await
    }

    /// Every entry of this partition of `table`, in key order (see
    /// [`Ctx::range`]).
    pub async fn entries<K, V>(&self, table: &Table<K, V>) -> Result<Vec<(K, V)>>
    where
        K: TableKey,
    {
        self.scan(table, Bound::Unbounded, Bound::Unbounded).await
    }

    /// The entries of this partition of `table` whose composite keys begin
    /// with `prefix` (its first part, or first parts as a tuple), in key
    /// order. All of a prefix's keys are in one partition when the table
    /// is [partitioned by it](Table::partitioned_by) and the stream is
    /// keyed by it; otherwise this finds only this partition's.
    ///
    /// ```no_run
    /// # async fn f(ctx: strom::Ctx, per_day: strom::Table<(String, u32), u64>) -> strom::Result<()> {
    /// let days = ctx.prefix(&per_day, &"ada".to_string()).await?;
    /// let total: u64 = days.iter().map(|(_, n)| n).sum();
    /// # Ok(()) }
    /// ```
    pub async fn prefix<K, P, V>(&self, table: &Table<K, V>, prefix: &P) -> Result<Vec<(K, V)>>
    where
        K: KeyPrefix<P>,
        P: TableKey,
    {
        let (from, to) = prefix_bounds(prefix);
        self.scan(table, from, to).await
    }

    pub(crate) async fn scan<K, V>(
        &self,
        table: &Table<K, V>,
        from: Bound<Vec<u8>>,
        to: Bound<Vec<u8>>,
    ) -> Result<Vec<(K, V)>>
    where
        K: TableKey,
    {
        let entries = (self.inner)
            .range(
                &table.spec.name,
                from.as_ref().map(Vec::as_slice),
                to.as_ref().map(Vec::as_slice),
            )
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            let key = match K::decode_key(&k) {
                Ok(key) => key,
                Err(e) => return Err(self.damaged_key(&table.spec.name, &k, e).await),
            };
            match table.spec.value.decode(Some(&v)) {
                Ok(value) => out.push((key, value)),
                Err(e) => return Err(self.damaged(&table.spec.name, &k, e).await),
            }
        }
        Ok(out)
    }

    /// A stored key that does not decode: damaged state, as a value that
    /// does not (see [`Ctx::damaged`]).
    async fn damaged_key(&self, table: &str, key: &[u8], e: strom_state::StateError) -> Error {
        self.inner.damaged(table, key, &e.to_string()).await.into()
    }

    /// Adds `member` to the set of `key` in `set` (no change if it is in).
    /// The key must belong to this event's partition (see
    /// [`Error::CoPartition`]).
    ///
    /// ```no_run
    /// # async fn f(ctx: strom::Ctx, viewed: strom::SetTable<String, String>) -> strom::Result<()> {
    /// let customer = "ada".to_string();
    /// ctx.add(&viewed, &customer, &"lamp".to_string()).await?;
    /// assert!(ctx.contains(&viewed, &customer, &"lamp".to_string()).await?);
    /// let products: Vec<String> = ctx.members(&viewed, &customer).await?;
    /// # Ok(()) }
    /// ```
    pub async fn add<K, T>(&self, set: &SetTable<K, T>, key: &K, member: &T) -> Result<()>
    where
        K: TableKey + Clone,
        T: TableKey + Clone,
    {
        self.set(&set.entries, &(key.clone(), member.clone()), &())
            .await
    }

    /// Takes `member` out of the set of `key` in `set` (no change if it is
    /// not in).
    pub async fn discard<K, T>(&self, set: &SetTable<K, T>, key: &K, member: &T) -> Result<()>
    where
        K: TableKey + Clone,
        T: TableKey + Clone,
    {
        self.delete(&set.entries, &(key.clone(), member.clone()))
            .await
    }

    /// Whether `member` is in the set of `key` in `set`.
    pub async fn contains<K, T>(&self, set: &SetTable<K, T>, key: &K, member: &T) -> Result<bool>
    where
        K: TableKey + Clone,
        T: TableKey + Clone,
    {
        let entry = (key.clone(), member.clone());
        let bytes = self.check_partition(&set.entries.spec.name, &set.entries.spec.key, &entry)?;
        Ok(self
            .inner
            .get(&set.entries.spec.name, &bytes)
            .await?
            .is_some())
    }

    /// The members of the set of `key` in `set`, in their order (empty if
    /// it has none).
    pub async fn members<K, T>(&self, set: &SetTable<K, T>, key: &K) -> Result<Vec<T>>
    where
        K: TableKey,
        T: TableKey,
    {
        self.check_partition(&set.entries.spec.name, &set.key, key)?;
        let (from, to) = prefix_bounds(key);
        let entries = self.scan(&set.entries, from, to).await?;
        Ok(entries
            .into_iter()
            .map(|((_, member), ())| member)
            .collect())
    }

    /// Deletes `key` from `table`.
    pub async fn delete<K: TableKey, V>(&self, table: &Table<K, V>, key: &K) -> Result<()> {
        let bytes = self.check_partition(&table.spec.name, &table.spec.key, key)?;
        self.inner.delete(&table.spec.name, bytes).await?;
        Ok(())
    }

    /// Sends `key` → `value` to `topic` (partitioned by the key, as Java does).
    pub async fn send<K, V>(&self, topic: &Topic<K, V>, key: &K, value: &V) -> Result<()> {
        self.send_with_headers(topic, key, value, &[]).await
    }

    /// Sends `event` on to `topic` as it is: its key, value and headers
    /// (Faust's `forward`).
    pub async fn forward<K, V>(&self, topic: &Topic<K, V>, event: &Event<K, V>) -> Result<()> {
        self.send_with_headers(topic, &event.key, &event.value, &event.headers)
            .await
    }

    async fn send_with_headers<K, V>(
        &self,
        topic: &Topic<K, V>,
        key: &K,
        value: &V,
        headers: &[Header],
    ) -> Result<()> {
        if topic.spec.pattern {
            // The app's declaration is wrong, not the event: stop.
            let what = format!(
                "{:?} is a pattern of topic names, read only",
                topic.spec.name
            );
            return Err(self.inner.fail("send", what).into());
        }
        let (key, value) = encode(topic, key, value)?;
        let mut record = ProducerRecord::to(&topic.spec.name);
        record.key = key.as_deref();
        record.value = value.as_deref();
        record.headers = headers;
        record.timestamp = self.event_time.filter(|&t| t >= 0);
        self.inner.send(record).await?;
        Ok(())
    }
}

/// Windowed tables ([`WindowedTable`]).
impl Ctx {
    /// Adds this event to `key`'s windows in `table`: each window holding
    /// the event's time that has not closed gets `f(its value or the
    /// default)` (a hopping window's event updates several), atomically as
    /// [`Ctx::update`] does. Returns the value of the latest of them (the
    /// window [`Ctx::current`] reads; of sessions, the event's session), or
    /// `None` when every window of the
    /// event had closed: a late event, dropped and counted in
    /// `strom_late_events_total{table}`.
    ///
    /// Of a [session](crate::Table::session) table, the event's session
    /// takes in the open sessions of `key` within the gap of it: `f` gets
    /// their values combined by the table's merge function (or the default
    /// when there are none), and the result is the session's value.
    ///
    /// Of a [sliding](crate::Table::sliding) table, every open window that
    /// holds the event gets `f`, and the result is that of the window ending
    /// at the event: the aggregate of the key's events in the time
    /// difference up to it (if that window had closed, of the earliest open
    /// window holding the event).
    ///
    /// The windows of any key that close as this event moves the
    /// partition's stream time on are handed to the table's
    /// [`emit_on_close`](WindowedTable::emit_on_close) callback, before this
    /// returns. The event must have a time (not a negative timestamp; see
    /// [`Topic::with_timestamp`](crate::Topic::with_timestamp)); a batch's
    /// context uses its latest event's.
    ///
    /// ```no_run
    /// # async fn f(ctx: strom::Ctx, views: strom::WindowedTable<String, u64>) -> strom::Result<()> {
    /// let page = "/home".to_string();
    /// if let Some(n) = ctx.update_windows(&views, &page, |n| n + 1).await? {
    ///     println!("{page}: {n} views this minute so far");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn update_windows<K, V, F>(
        &self,
        table: &WindowedTable<K, V>,
        key: &K,
        mut f: F,
    ) -> Result<Option<V>>
    where
        K: TableKey,

        F: FnMut(V) -> V,
    {
        let bytes = self.check_partition(&table.spec.name, &table.spec.key, key)?;
        let time = self
            .event_time
            .filter(|&t| t >= 0)
            .ok_or_else(|| Error::NoEventTime {
                table: table.spec.name.to_string(),
            })?;
        let updated = self
            .inner
            .update_windows(
                &table.spec.name,
                &bytes,
                time,
                |old| {
                    encode_update(
                        &table.spec.name,
                        &*table.spec.default,
                        &*table.spec.value,
                        &mut f,
                        old,
                    )
                },
                |a, b| merge_sessions(table, a, b),
            )
            .await?;
        let WindowUpdate {
            current,
            closed,
            emitting,
        } = match updated {
            Ok(u) => u,
            Err(Refused::Stored(e)) => return Err(self.damaged(&table.spec.name, &bytes, e).await),
            Err(Refused::New(e)) => return Err(e),
        };
        let on_close = table.on_close();
        for closed in closed {
            if let Some(on_close) = &on_close {
                self.emit(table, on_close, closed).await?;
            }
        }
        drop(emitting);
        if current.is_none() {
            let source = self.source.as_ref().map(|s| &s.record);
            tracing::debug!(
                table = %table.spec.name,
                topic = source.map(|r| &*r.topic),
                partition = source.map(|r| r.partition),
                offset = source.map(|r| r.offset),
                event_time = time,
                stream_time = self.stream_time(),
                "late event dropped: its every window had closed"
            );
            self.send_late(table).await?;
        }
        Ok(current)
    }

    /// Sends the record of a late event to `table`'s late-events topic, if
    /// it has one: as read, with headers saying where from and why; once
    /// per processing of the record (the events a record's `flat_map` makes
    /// share it). Should the send fail, the record is not committed, and
    /// is processed again as a new [`Source`].
    async fn send_late<K, V>(&self, table: &WindowedTable<K, V>) -> Result<()> {
        let (Some(to), Some(source)) = (&table.spec.late, &self.source) else {
            return Ok(());
        };
        {
            let mut sent = source.late_to.lock().unwrap_or_else(|e| e.into_inner());
            if sent.contains(to) {
                return Ok(());
            }
            sent.push(to.clone());
        }
        let record = &source.record;
        let mut headers = record.headers.clone();
        headers.extend([
            Header::new("strom.late.table", table.spec.name.to_string()),
            Header::new("strom.late.topic", record.topic.to_string()),
            Header::new("strom.late.partition", record.partition.to_string()),
            Header::new("strom.late.offset", record.offset.to_string()),
            Header::new(
                "strom.late.stream_time",
                self.stream_time().unwrap_or(-1).to_string(),
            ),
        ]);
        let mut late = ProducerRecord::to(to);
        late.key = record.key.as_deref();
        late.value = record.value.as_deref();
        late.headers = &headers;
        late.timestamp = (record.timestamp >= 0).then_some(record.timestamp);
        self.inner.send(late).await?;
        Ok(())
    }

    /// Hands a closed window to `table`'s callback. A window is handed out
    /// once, so a failure here (the callback's error or panic, a value that
    /// does not decode) stops the worker without committing the event:
    /// skipping it would lose the window, and after the restart it closes
    /// again.
    async fn emit<K, V>(
        &self,
        table: &WindowedTable<K, V>,
        on_close: &OnClose<K, V>,
        closed: ClosedWindow,
    ) -> Result<()>
    where
        K: TableKey,
    {
        let key = match K::decode_key(&closed.key) {
            Ok(k) => k,
            Err(e) => {
                let e = self
                    .inner
                    .damaged(&table.spec.name, &closed.key, &e.to_string())
                    .await;
                return Err(e.into());
            }
        };
        let value = match table.spec.value.decode(Some(&closed.value)) {
            Ok(v) => v,
            Err(e) => return Err(self.damaged(&table.spec.name, &closed.key, e).await),
        };
        let ctx = Ctx {
            inner: self.inner.clone(),
            event_time: Some(closed.window.end.saturating_sub(1)),
            source: None,
        };
        let window = closed.window;
        // Spawned so that a panic comes back as an error, not through the
        // agent's error policy.
        let failure = match tokio::spawn(on_close(ctx, key, window, value)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        let what = format!(
            "emitting closed window [{}, {}) of table {:?}",
            window.start, window.end, table.spec.name
        );
        Err(self.inner.fail(&what, failure).into())
    }

    /// The value of `key` in the window of `table` holding `time` (the
    /// latest such window of a hopping table; the session holding it; of a
    /// sliding table, the aggregate of the events within the time
    /// difference up to `time`), or the default when that window has no
    /// value (or is gone after the retention).
    pub async fn value_at<K, V>(&self, table: &WindowedTable<K, V>, key: &K, time: i64) -> Result<V>
    where
        K: TableKey,
    {
        let bytes = self.check_partition(&table.spec.name, &table.spec.key, key)?;
        match self.inner.value_at(&table.spec.name, &bytes, time).await? {
            Some(v) => match table.spec.value.decode(Some(&v)) {
                Ok(v) => Ok(v),
                Err(e) => Err(self.damaged(&table.spec.name, &bytes, e).await),
            },
            None => Ok((table.spec.default)()),
        }
    }

    /// The value of `key` in the window of the event's time (Faust's
    /// `current()`, relative to the stream).
    pub async fn current<K, V>(&self, table: &WindowedTable<K, V>, key: &K) -> Result<V>
    where
        K: TableKey,
    {
        let time = self
            .event_time
            .or(self.stream_time())
            .unwrap_or_else(wall_ms);
        self.value_at(table, key, time).await
    }

    /// The value of `key` in the window of the wall-clock time (Faust's
    /// `now()`).
    pub async fn now<K, V>(&self, table: &WindowedTable<K, V>, key: &K) -> Result<V>
    where
        K: TableKey,
    {
        self.value_at(table, key, wall_ms()).await
    }

    /// The value of `key` in the window `d` before the event's (Faust's
    /// `delta(d)`): with one-minute windows, `delta(60s)` is the previous
    /// minute.
    pub async fn delta<K, V>(&self, table: &WindowedTable<K, V>, key: &K, d: Duration) -> Result<V>
    where
        K: TableKey,
    {
        let time = self
            .event_time
            .or(self.stream_time())
            .unwrap_or_else(wall_ms);
        let d = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.value_at(table, key, time.saturating_sub(d)).await
    }

    /// Every live window of `key` in `table` with its value, in time order
    /// (Faust's `items()` of a windowed key): the open ones and the closed
    /// ones not yet past the retention.
    pub async fn windows<K, V>(
        &self,
        table: &WindowedTable<K, V>,
        key: &K,
    ) -> Result<Vec<(Window, V)>>
    where
        K: TableKey,
    {
        let bytes = self.check_partition(&table.spec.name, &table.spec.key, key)?;
        let stored = self
            .inner
            .windows(&table.spec.name, &bytes)
            .await?
            .unwrap_or_default();
        let mut windows = Vec::with_capacity(stored.len());
        for (window, v) in stored {
            match table.spec.value.decode(Some(&v)) {
                Ok(v) => windows.push((window, v)),
                Err(e) => return Err(self.damaged(&table.spec.name, &bytes, e).await),
            }
        }
        Ok(windows)
    }
}

/// Milliseconds since the epoch, now.
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `key` and `value` in `topic`'s codecs.
pub(crate) fn encode<K, V>(
    topic: &Topic<K, V>,
    key: &K,
    value: &V,
) -> Result<(Option<Bytes>, Option<Bytes>)> {
    let codec = |e| Error::Codec {
        topic: topic.spec.name.to_string(),
        source: e,
    };
    Ok((
        topic.spec.key.encode(key).map_err(codec)?,
        topic.spec.value.encode(value).map_err(codec)?,
    ))
}

/// The bytes of the value session table `table` makes of two sessions'
/// values `a` and `b` (the earlier first).
fn merge_sessions<K, V>(
    table: &WindowedTable<K, V>,
    a: &[u8],
    b: &[u8],
) -> std::result::Result<Vec<u8>, Refused> {
    let (Some(merge), a, b) = (
        &table.spec.merge,
        table.spec.value.decode(Some(a)).map_err(Refused::Stored)?,
        table.spec.value.decode(Some(b)).map_err(Refused::Stored)?,
    ) else {
        return Err(Refused::New(value_error(
            &table.spec.name,
            "sessions to merge in a table that is not a session table",
        )));
    };
    encode_value(&table.spec.name, &*table.spec.value, &merge(a, b)).map_err(Refused::New)
}

/// What a timer sees: typed sends, each acknowledged before it returns.
#[derive(Debug, Clone)]
pub struct TimerCtx {
    pub(crate) inner: strom_worker::TimerContext,
}

impl TimerCtx {
    /// Sends `key` → `value` to `topic` and waits for the acknowledgement.
    pub async fn send<K, V>(&self, topic: &Topic<K, V>, key: &K, value: &V) -> Result<()> {
        let (key, value) = encode(topic, key, value)?;
        let mut record = ProducerRecord::to(&topic.spec.name);
        record.key = key.as_deref();
        record.value = value.as_deref();
        self.inner.send(record).await?;
        Ok(())
    }

    /// Whether this worker leads the group (processes partition number 0).
    pub fn is_leader(&self) -> bool {
        self.inner.is_leader()
    }
}

/// A key for an error message: UTF-8 as a quoted string, anything else as
/// bytes.
pub(crate) fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => format!("{text:?}"),
        Err(_) => format!("{key:?}"),
    }
}
