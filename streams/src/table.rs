//! Typed tables used from agents through [`Ctx`]: plain
//! [`Table`]s, and [`WindowedTable`]s that keep one value per key and time
//! window.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use strom_state::window::Windowing;
use strom_worker::{AgentError, KeyParser, ParsedKey};

/// Composite keys that begin with the parts `P`, for
/// [`Ctx::prefix`](crate::Ctx::prefix).
pub use strom_state::table::KeyPrefix;
pub use strom_state::window::Window;
/// The key types a table takes: how a key is stored, read back and parsed
/// from a URL or the command line. Name it to write code generic over keys:
///
/// ```
/// use strom::table::TableKey;
///
/// fn stored_len<K: TableKey>(key: &K) -> usize {
///     key.encode_key().len()
/// }
/// assert_eq!(stored_len(&"ada".to_string()), 3);
/// assert_eq!(stored_len(&7u64), 8);
/// ```
pub use strom_state::TableKey;

use crate::codec::{Codec, CodecError};
use crate::context::Ctx;
use crate::topic::Topic;

/// A table's declaration, shared by the app and the table's handles: how
/// it is windowed, if it is, and how the web reads its keys.
#[derive(Clone)]
pub(crate) struct Declared {
    pub windowing: Arc<Mutex<Option<Windowing>>>,
    pub parse: Arc<Mutex<KeyParser>>,
}

impl Declared {
    pub(crate) fn new<K: TableKey + 'static>(key: KeyBytes<K>) -> Declared {
        Declared {
            windowing: Arc::default(),
            parse: Arc::new(Mutex::new(key_parser(key))),
        }
    }

    /// How it is windowed, if it is.
    pub(crate) fn windowing(&self) -> Option<Windowing> {
        *self.windowing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How the web reads its keys.
    pub(crate) fn parse(&self) -> KeyParser {
        self.parse.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The bytes that decide which partition a table's key belongs to: what a
/// record of the key carries as its key (murmur2 of them picks it).
/// `None` for an operator's internal table whose keys are wherever the
/// events that write them are (a windowed join's): not checked.
pub(crate) struct KeyBytes<K>(Option<Arc<KeyBytesFn<K>>>);

type KeyBytesFn<K> = dyn Fn(&K) -> Result<Option<Bytes>, CodecError> + Send + Sync;

impl<K> Clone for KeyBytes<K> {
    fn clone(&self) -> Self {
        KeyBytes(self.0.clone())
    }
}

impl<K: 'static> KeyBytes<K> {
    /// What `codec` writes for the key.
    pub(crate) fn codec(codec: impl Codec<K> + 'static) -> KeyBytes<K> {
        KeyBytes(Some(Arc::new(move |key| codec.encode(key))))
    }

    /// What a shared `codec` writes for the key.
    pub(crate) fn shared(codec: Arc<dyn Codec<K>>) -> KeyBytes<K> {
        KeyBytes(Some(Arc::new(move |key| codec.encode(key))))
    }

    /// Keys of an operator's internal table: in the partition of the event
    /// that writes them, whatever partitioner placed it.
    pub(crate) fn local() -> KeyBytes<K> {
        KeyBytes(None)
    }

    /// What `codec` writes for the part `part` picks of the key.
    fn part<P>(
        part: impl Fn(&K) -> P + Send + Sync + 'static,
        codec: impl Codec<P> + 'static,
    ) -> KeyBytes<K> {
        KeyBytes(Some(Arc::new(move |key| codec.encode(&part(key)))))
    }
}

impl<K> KeyBytes<K> {
    /// The bytes of `key`; `None` if its codec writes no key (or the table
    /// is an operator's, [`KeyBytes::local`]).
    pub(crate) fn of(&self, key: &K) -> Result<Option<Bytes>, CodecError> {
        match &self.0 {
            Some(f) => f(key),
            None => Ok(None),
        }
    }

    /// Whether the keys are an operator's, in their events' partitions.
    pub(crate) fn is_local(&self) -> bool {
        self.0.is_none()
    }
}

/// Reads a key from its text ([`TableKey::parse_key`]), with the bytes
/// that decide its partition.
pub(crate) fn key_parser<K: TableKey + 'static>(key_bytes: KeyBytes<K>) -> KeyParser {
    Arc::new(move |text: &str| {
        if key_bytes.is_local() {
            return Err("an operator's table, whose keys do not say their partition".into());
        }
        let key = K::parse_key(text).map_err(|e| e.to_string())?;
        let written = key_bytes.of(&key).map_err(|e| e.to_string())?;
        let written = written.ok_or("the table's key codec writes no key")?;
        Ok(ParsedKey {
            stored: key.encode_key(),
            written: written.to_vec(),
        })
    })
}

/// A table of `K` to `V`: partitioned like the stream that writes it, stored in
/// strom-state with a Kafka changelog, read and written from agents through
/// [`Ctx`]. A missing key reads as the table's default.
///
/// # Which partition a key belongs to
///
/// One rule, as Kafka's producers place records: murmur2 of the bytes the
/// key's codec writes for it. A record sent to a topic lands by its topic's
/// key codec; a [`group_by`](crate::Stream::group_by) writes the new key as
/// JSON; a table's key belongs to the partition its
/// [key codec](Table::with_key_codec) (JSON by default, like every topic's)
/// picks, and an agent may read or write only its own partition's keys
/// ([`Error::CoPartition`](crate::Error::CoPartition) otherwise). With the
/// defaults, a table written by the stream of a topic keyed by the same
/// keys, or by a `group_by`, is right. A table fed from a topic with another
/// key codec takes that codec too.
pub struct Table<K, V> {
    /// One allocation, so a clone per event costs one reference count.
    pub(crate) spec: Arc<TableSpec<K, V>>,
}

/// What a [`Table`] handle holds.
pub(crate) struct TableSpec<K, V> {
    pub(crate) name: Arc<str>,
    pub(crate) default: Arc<dyn Fn() -> V + Send + Sync>,
    /// How its values are stored (JSON by default).
    pub(crate) value: Arc<dyn Codec<V>>,
    pub(crate) key: KeyBytes<K>,
    pub(crate) declared: Declared,
    pub(crate) types: PhantomData<fn() -> K>,
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        Table {
            spec: self.spec.clone(),
        }
    }
}

impl<K, V> Clone for TableSpec<K, V> {
    fn clone(&self) -> Self {
        TableSpec {
            name: self.name.clone(),
            default: self.default.clone(),
            value: self.value.clone(),
            key: self.key.clone(),
            declared: self.declared.clone(),
            types: PhantomData,
        }
    }
}

impl<K, V> std::fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.spec.name)
            .finish()
    }
}

impl<K, V> Table<K, V> {
    /// The table's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Partitions the table's keys by the bytes `codec` writes for them
    /// (default: JSON): give it the key codec of the topic whose stream
    /// writes it, so a key belongs to the partition its records are in.
    ///
    /// ```
    /// use strom::codec::Utf8;
    /// let mut app = strom::App::new("shop");
    /// // Keys written as plain text, as Java's StringSerializer does.
    /// let orders = app.topic::<String, u64>("orders").with_key_codec(Utf8);
    /// let totals = app.table::<String, u64>("totals", 0).with_key_codec(Utf8);
    /// # let _ = (orders, totals);
    /// ```
    pub fn with_key_codec<C: Codec<K> + 'static>(self, codec: C) -> Self
    where
        K: TableKey + 'static,
    {
        self.partitioned(KeyBytes::codec(codec))
    }

    /// Stores the table's values with `codec` (default: JSON): what its
    /// changelog carries and `/tables` answers. Declare it before cloning
    /// the handle: each handle keeps the codec it has.
    ///
    /// ```
    /// use strom::codec::Utf8;
    /// let mut app = strom::App::new("shop");
    /// // Names stored as plain UTF-8 text, not JSON strings.
    /// let names = app.table::<String, String>("names", String::new()).with_value_codec(Utf8);
    /// # let _ = names;
    /// ```
    pub fn with_value_codec<C: Codec<V> + 'static>(mut self, codec: C) -> Self {
        Arc::make_mut(&mut self.spec).value = Arc::new(codec);
        self
    }

    /// Partitions the table's keys by a part of them: the bytes `codec`
    /// writes for `part(key)`. For a composite key whose first part is the
    /// key of the stream that writes it, so all of one stream key's entries
    /// are in its partition and [`Ctx::prefix`](crate::Ctx::prefix) finds
    /// them.
    ///
    /// ```
    /// use strom::codec::Json;
    /// let mut app = strom::App::new("shop");
    /// // Orders per customer and day, in the customer's partition.
    /// let per_day = app
    ///     .table::<(String, u32), u64>("orders-per-day", 0)
    ///     .partitioned_by(|(customer, _day): &(String, u32)| customer.clone(), Json);
    /// # let _ = per_day;
    /// ```
    pub fn partitioned_by<P, C>(
        self,
        part: impl Fn(&K) -> P + Send + Sync + 'static,
        codec: C,
    ) -> Self
    where
        K: TableKey + 'static,
        C: Codec<P> + 'static,
    {
        self.partitioned(KeyBytes::part(part, codec))
    }

    fn partitioned(mut self, key: KeyBytes<K>) -> Self
    where
        K: TableKey + 'static,
    {
        let spec = Arc::make_mut(&mut self.spec);
        *(spec.declared.parse.lock()).unwrap_or_else(|e| e.into_inner()) = key_parser(key.clone());
        spec.key = key;
        self
    }

    /// Makes this a table of tumbling windows of `size`, aligned to the
    /// epoch: one value per key and window, updated through
    /// [`Ctx::update_windows`](crate::Ctx::update_windows). Windows close
    /// when the partition's stream time reaches their end (plus the
    /// [grace](WindowedTable::grace)), and are kept for an hour or size +
    /// grace, whichever is longer ([expires](WindowedTable::expires)).
    ///
    /// Panics if `size` is under a millisecond.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut app = strom::App::new("shop");
    /// let per_minute = app
    ///     .table::<String, u64>("orders-per-minute", 0)
    ///     .tumbling(Duration::from_secs(60))
    ///     .grace(Duration::from_secs(10));
    /// # let _ = per_minute;
    /// ```
    pub fn tumbling(self, size: Duration) -> WindowedTable<K, V> {
        self.windowed(Windowing::tumbling(size), None)
    }

    /// Makes this a table of hopping windows of `size` starting every
    /// `advance`, aligned to the epoch: an event falls in every window that
    /// holds its time (see [`Table::tumbling`]).
    ///
    /// Panics if `size` is under a millisecond or `advance` is not between a
    /// millisecond and `size`.
    pub fn hopping(self, size: Duration, advance: Duration) -> WindowedTable<K, V> {
        self.windowed(Windowing::hopping(size, advance), None)
    }

    /// Makes this a table of session windows (Kafka Streams'
    /// `SessionWindows`): a key's events no more than `gap` apart share a
    /// session, from its first event's time to its last's (as a window,
    /// `[first, last + 1 ms)`). An event that falls within the gap of two
    /// sessions joins them: their values are combined with `merge` (the
    /// earlier one first), and the update gets the result. A session closes
    /// once the stream time passes its last event's time plus the gap (plus
    /// the [grace](WindowedTable::grace)), as in Kafka Streams; once closed
    /// it is final: an event within it is late, and one only near it starts
    /// a session of its own.
    ///
    /// Panics if `gap` is under a millisecond.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut app = strom::App::new("shop");
    /// // Clicks per visit: a visit ends after 30 minutes without a click.
    /// let visits = app
    ///     .table::<String, u64>("clicks-per-visit", 0)
    ///     .session(Duration::from_secs(30 * 60), |a, b| a + b);
    /// # let _ = visits;
    /// ```
    pub fn session(
        self,
        gap: Duration,
        merge: impl Fn(V, V) -> V + Send + Sync + 'static,
    ) -> WindowedTable<K, V> {
        self.windowed(Windowing::session(gap), Some(Arc::new(merge)))
    }

    /// Makes this a table of sliding windows (Kafka Streams'
    /// `SlidingWindows`): a window is every span of `difference` (both ends
    /// included) that holds a distinct set of a key's events. An event at
    /// `t` updates every window that holds it and has the window
    /// `[t - difference, t]` of its own, so [`Ctx::current`](crate::Ctx::current)
    /// (and what the update returns) is the aggregate of the key's events
    /// in the `difference` up to it; [`Ctx::value_at`](crate::Ctx::value_at)
    /// gives it at any time. New windows take their value from existing
    /// ones, so the update function only ever adds an event, as for other
    /// windows. A window closes once the stream time passes its end by the
    /// [grace](WindowedTable::grace).
    ///
    /// Panics if `difference` is under a millisecond.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut app = strom::App::new("payments");
    /// // Payments per card in any 10 minutes.
    /// let recent = app
    ///     .table::<String, u64>("payments-per-card", 0)
    ///     .sliding(Duration::from_secs(10 * 60));
    /// # let _ = recent;
    /// ```
    pub fn sliding(self, difference: Duration) -> WindowedTable<K, V> {
        self.windowed(Windowing::sliding(difference), None)
    }

    fn windowed(self, windowing: Windowing, merge: Option<Merge<V>>) -> WindowedTable<K, V> {
        let spec = Arc::unwrap_or_clone(self.spec);
        let spec = WindowedSpec {
            name: spec.name,
            default: spec.default,
            value: spec.value,
            key: spec.key,
            declared: spec.declared,
            windowing,
            merge,
            late: None,
            on_close: Arc::default(),
        };
        let table = WindowedTable {
            spec: Arc::new(spec),
        };
        table.declare();
        table
    }
}

/// A table of sets (Faust's `SetTable`): for each key of `K`, a set of
/// members of `T`, changed through [`Ctx::add`](crate::Ctx::add) and
/// [`Ctx::discard`](crate::Ctx::discard), read through
/// [`Ctx::members`](crate::Ctx::members) and
/// [`Ctx::contains`](crate::Ctx::contains). Declared with
/// [`App::set_table`](crate::App::set_table).
///
/// Each member is an entry of its own (the composite key `(key, member)`),
/// so the changelog carries each add and discard as a record of its own —
/// deltas, not whole sets — and compaction keeps exactly the members that
/// are in. A key's members are in its partition, by the same rule as a
/// [`Table`]'s keys (JSON of the key by default; see
/// [`with_key_codec`](SetTable::with_key_codec)), and come back in the
/// members' order.
pub struct SetTable<K, T> {
    pub(crate) entries: Table<(K, T), ()>,
    /// How the keys (without their members) are partitioned.
    pub(crate) key: KeyBytes<K>,
}

impl<K, T> Clone for SetTable<K, T> {
    fn clone(&self) -> Self {
        SetTable {
            entries: self.entries.clone(),
            key: self.key.clone(),
        }
    }
}

impl<K, T> std::fmt::Debug for SetTable<K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetTable")
            .field("name", &self.entries.spec.name)
            .finish()
    }
}

impl<K, T> SetTable<K, T> {
    /// The table's name.
    pub fn name(&self) -> &str {
        &self.entries.spec.name
    }
}

impl<K, T> SetTable<K, T>
where
    K: TableKey + Clone + 'static,
    T: TableKey + 'static,
{
    pub(crate) fn new(entries: Table<(K, T), ()>, key: KeyBytes<K>) -> SetTable<K, T> {
        let by_key = key.clone();
        let entries = entries.partitioned(KeyBytes(Some(Arc::new(move |(k, _): &(K, T)| {
            by_key.of(k)
        }))));
        SetTable { entries, key }
    }

    /// Partitions the keys by the bytes `codec` writes for them (default:
    /// JSON), as [`Table::with_key_codec`] does.
    pub fn with_key_codec<C: Codec<K> + 'static>(self, codec: C) -> Self {
        SetTable::new(self.entries, KeyBytes::codec(codec))
    }
}

/// How a session table combines the values of two sessions that merge.
pub(crate) type Merge<V> = Arc<dyn Fn(V, V) -> V + Send + Sync>;

/// What a windowed table calls for each window that closes.
pub(crate) type OnClose<K, V> = Arc<
    dyn Fn(Ctx, K, Window, V) -> Pin<Box<dyn Future<Output = Result<(), AgentError>> + Send>>
        + Send
        + Sync,
>;

/// A table of `K` to `V` per time window (Faust's windowed tables, Kafka
/// Streams' windowed aggregations), declared with [`Table::tumbling`],
/// [`Table::hopping`], [`Table::session`] or [`Table::sliding`]; updated through
/// [`Ctx::update_windows`](crate::Ctx::update_windows) from the event's time,
/// read through [`Ctx::current`](crate::Ctx::current) and its kin.
///
/// Declare it in one chain (`app.table(..).tumbling(..).grace(..)`) and
/// clone the result: a handle cloned halfway keeps the settings it had.
pub struct WindowedTable<K, V> {
    /// One allocation, so a clone per event costs one reference count.
    pub(crate) spec: Arc<WindowedSpec<K, V>>,
}

/// What a [`WindowedTable`] handle holds.
pub(crate) struct WindowedSpec<K, V> {
    pub(crate) name: Arc<str>,
    pub(crate) default: Arc<dyn Fn() -> V + Send + Sync>,
    /// How its values are stored (see [`Table::with_value_codec`]).
    pub(crate) value: Arc<dyn Codec<V>>,
    /// How its keys are partitioned (see [`Table`]).
    pub(crate) key: KeyBytes<K>,
    declared: Declared,
    pub(crate) windowing: Windowing,
    /// Of a session table: how two sessions' values combine.
    pub(crate) merge: Option<Merge<V>>,
    /// Where late events' records go, if anywhere.
    pub(crate) late: Option<Arc<str>>,
    /// Shared by every handle made from the same declaration.
    on_close: Arc<Mutex<Option<OnClose<K, V>>>>,
}

impl<K, V> Clone for WindowedTable<K, V> {
    fn clone(&self) -> Self {
        WindowedTable {
            spec: self.spec.clone(),
        }
    }
}

impl<K, V> Clone for WindowedSpec<K, V> {
    fn clone(&self) -> Self {
        WindowedSpec {
            name: self.name.clone(),
            default: self.default.clone(),
            value: self.value.clone(),
            key: self.key.clone(),
            declared: self.declared.clone(),
            windowing: self.windowing,
            merge: self.merge.clone(),
            late: self.late.clone(),
            on_close: self.on_close.clone(),
        }
    }
}

impl<K, V> std::fmt::Debug for WindowedTable<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowedTable")
            .field("name", &self.spec.name)
            .field("windowing", &self.spec.windowing.describe())
            .field("emits_on_close", &self.on_close().is_some())
            .finish()
    }
}

impl<K, V> WindowedTable<K, V> {
    /// The table's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Its windows, grace and retention.
    pub fn windowing(&self) -> &Windowing {
        &self.spec.windowing
    }

    /// The `emit_on_close` callback, if one is set.
    pub(crate) fn on_close(&self) -> Option<OnClose<K, V>> {
        self.spec
            .on_close
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn declare(&self) {
        *(self.spec.declared.windowing.lock()).unwrap_or_else(|e| e.into_inner()) =
            Some(self.spec.windowing);
    }

    /// How long after its end a window still takes events (default 0): it
    /// closes when the partition's stream time reaches end + grace (a
    /// session: passes its last event + gap + grace). An event
    /// whose every window has closed is late: dropped, counted in
    /// `strom_late_events_total{table}` and logged at debug level.
    pub fn grace(mut self, grace: Duration) -> Self {
        let spec = Arc::make_mut(&mut self.spec);
        spec.windowing = spec.windowing.grace(grace);
        self.declare();
        self
    }

    /// How long windows are kept after their end (Faust's `expires`;
    /// default: an hour, or size + grace if longer; never so short that a
    /// window goes before it closes, so at least the grace, and for
    /// sessions the gap plus the grace): older ones are deleted from the
    /// store and tombstoned in the changelog, so the table stays bounded.
    pub fn expires(mut self, retention: Duration) -> Self {
        let spec = Arc::make_mut(&mut self.spec);
        spec.windowing = spec.windowing.expires(retention);
        self.declare();
        self
    }

    /// Sends the records of late events to `topic` (Flink's side output of
    /// late data), besides dropping and counting them: each as the agent
    /// read it (key, value, headers and timestamp, in the codecs of the
    /// topic it read: after a `group_by`, its repartition topic's), with
    /// the headers
    /// `strom.late.table`, `strom.late.topic`, `strom.late.partition`,
    /// `strom.late.offset` (where it was read) and `strom.late.stream_time`.
    /// A record whose several events (of a `flat_map`) are late is sent
    /// once. Its send commits with the event, like any other. Events handled
    /// in batches ([`Stream::take`](crate::Stream::take)) are not sent.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut app = strom::App::new("shop");
    /// let late = app.topic::<String, u64>("orders-late");
    /// let per_minute = app
    ///     .table::<String, u64>("orders-per-minute", 0)
    ///     .tumbling(Duration::from_secs(60))
    ///     .late_events(&late);
    /// # let _ = per_minute;
    /// ```
    pub fn late_events<K2, V2>(mut self, topic: &Topic<K2, V2>) -> Self {
        Arc::make_mut(&mut self.spec).late = Some(topic.spec.name.clone());
        self
    }

    /// Calls `f` once for each window that closes, with its key and final
    /// value, in window order per key (Kafka Streams'
    /// `suppress(untilWindowCloses)`, Quix's `.final()`). It runs in the
    /// context of the event whose update closed it, so what it sends commits
    /// with that event (in its transaction under exactly-once); records it
    /// sends carry the window's last millisecond as their time. Every handle
    /// of the table (clones included) gets it.
    ///
    /// A window is handed out once, so an error or panic of `f` is not left
    /// to the agent's error policy (skipping it would lose the window): it
    /// stops the worker without committing the event, and after a restart
    /// the window closes again.
    ///
    /// Windows close when an update of this table runs (a late event's
    /// included) and finds the stream time past them: events that do not
    /// update the table close nothing. With an agent's
    /// [`concurrency`](crate::Stream::concurrency) above 1, the callbacks
    /// of different events may interleave.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut app = strom::App::new("shop");
    /// let totals = app.topic::<String, u64>("orders-per-minute-final");
    /// let per_minute = app
    ///     .table::<String, u64>("orders-per-minute", 0)
    ///     .tumbling(Duration::from_secs(60))
    ///     .emit_on_close(move |ctx, customer, _window, count| {
    ///         let totals = totals.clone();
    ///         async move { Ok(ctx.send(&totals, &customer, &count).await?) }
    ///     });
    /// # let _ = per_minute;
    /// ```
    pub fn emit_on_close<F, Fut>(self, f: F) -> Self
    where
        F: Fn(Ctx, K, Window, V) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        let on_close: OnClose<K, V> =
            Arc::new(move |ctx, key, window, value| Box::pin(f(ctx, key, window, value)));
        *self.spec.on_close.lock().unwrap_or_else(|e| e.into_inner()) = Some(on_close);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Json, Utf8};

    fn parser<K: TableKey + 'static>(codec: impl Codec<K> + 'static) -> KeyParser {
        key_parser(KeyBytes::codec(codec))
    }

    /// The web reads a key as the table stores it, and partitions it by
    /// what the table's key codec writes.
    #[test]
    fn a_parsed_key_carries_the_bytes_its_codec_writes() {
        let json = parser::<String>(Json);
        let parsed = json("alice").unwrap();
        assert_eq!(parsed.stored, b"alice");
        assert_eq!(parsed.written, b"\"alice\"");
        let utf8 = parser::<String>(Utf8);
        assert_eq!(utf8("alice").unwrap(), ParsedKey::raw(b"alice".to_vec()));
        let number = parser::<u64>(Json);
        let parsed = number("7").unwrap();
        assert_eq!(
            (parsed.stored, parsed.written),
            (7u64.to_be_bytes().to_vec(), b"7".to_vec())
        );
        assert!(number("seven").is_err());
    }
}
