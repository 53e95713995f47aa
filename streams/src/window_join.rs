//! Windowed stream–stream joins (Kafka Streams' `KStream#join` and
//! `leftJoin` with `JoinWindows`): [`Stream::join_stream`] and
//! [`Stream::left_join_stream`].
//!
//! Each side's events are kept in a table of the partition, keyed `(key,
//! time, offset, index)`, for as long as a pair can still be made with them.
//! An event pairs with the other side's events of its key no more than the
//! time difference apart whose windows are still open: an event's window
//! closes once the partition's stream time (the latest event time the join
//! has seen there) passes its time by the difference plus the grace. An
//! event that comes after its own window closed is late: dropped.
//!
//! A left join also keeps each left event that found no pair in a third
//! table, keyed `(time, key, offset, index)` so the closed ones come first;
//! a right event that pairs with it takes it out, and once its window closes
//! it is emitted without a pair. So an unpaired result is final: no pair of
//! that event follows it (Kafka Streams emits them the same way since 3.1).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;
use strom_state::TableKey;
use strom_worker::{AgentError, Context};
use tracing::debug;

use crate::codec::{Codec, CodecError, Json};
use crate::context::Ctx;
use crate::error::Result;
use crate::stream::{decode_step, then_step, Event, Events, Input, Stream};
use crate::table::{KeyBytes, Table, TableSpec};
use crate::topic::Topic;

/// How far apart in time two events of a windowed join may be, and how long
/// after that an event may still come (Kafka Streams' `JoinWindows`).
///
/// ```
/// use std::time::Duration;
/// use strom::JoinWindows;
/// // Pairs at most 5 minutes apart; events up to 30 s out of order.
/// let windows = JoinWindows::of(Duration::from_secs(300)).grace(Duration::from_secs(30));
/// assert_eq!(windows.difference(), Duration::from_secs(300));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinWindows {
    difference: i64,
    grace: i64,
}

impl JoinWindows {
    /// Events at most `difference` apart pair (either may come first), with
    /// no grace.
    pub fn of(difference: Duration) -> JoinWindows {
        JoinWindows {
            difference: millis(difference),
            grace: 0,
        }
    }

    /// How long after its window ends (the event's time plus the
    /// difference) an event still pairs and is still paired with: events
    /// that come out of order by up to this much are joined.
    pub fn grace(self, grace: Duration) -> JoinWindows {
        JoinWindows {
            grace: millis(grace),
            ..self
        }
    }

    /// The time difference.
    pub fn difference(&self) -> Duration {
        Duration::from_millis(self.difference.unsigned_abs())
    }

    /// How long an event's window stays open after its time, in ms.
    fn open_for(&self) -> i64 {
        self.difference.saturating_add(self.grace)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A kept event: its key, time, offset, and which input and event of its
/// record it was.
type Kept<K> = (K, i64, i64, u32);

/// A left event without a pair yet: its time first.
type Unpaired<K> = (i64, K, i64, u32);

/// An event of the join's input: of the stream (the left side, from input
/// `n`) or of the other topic (the right side).
enum Side<V, V2> {
    Left(u32, V),
    Right(V2),
}

/// Where one partition's join stands.
#[derive(Debug, Default)]
struct Progress {
    /// The latest event time seen.
    stream_time: Option<i64>,
    /// The stream time the kept events were last expired at.
    swept: Option<i64>,
    /// Times of unpaired left events (a lower bound: some may have paired
    /// since); `None` until read from the table.
    unpaired: Option<BinaryHeap<Reverse<i64>>>,
}

/// Which input and event of its record an event was, as one number.
fn index(input: u32, event: usize) -> u32 {
    (input << 24) | (event.min(0xFF_FFFF) as u32)
}

type Joiner<V, V2, R> = dyn Fn(&V, Option<&V2>) -> Option<R> + Send + Sync;

/// A kept value, as a one-element JSON array (so a value whose JSON is
/// `null` is still one); `None` is never stored.
type Held<V> = Option<(V,)>;

struct WindowJoin<K, V, V2, R> {
    left: Table<Kept<K>, Held<V>>,
    right: Table<Kept<K>, Held<V2>>,
    /// A left join's unpaired left events.
    unpaired: Option<Table<Unpaired<K>, Held<V>>>,
    windows: JoinWindows,
    joiner: Box<Joiner<V, V2, R>>,
    partitions: Mutex<HashMap<i32, Progress>>,
}

impl<'a, K, V> Stream<'a, K, V>
where
    K: TableKey + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Joins this stream with the events of `other` whose key is the same
    /// and whose time is at most `windows`' difference apart (Kafka Streams'
    /// windowed `KStream#join`): each pair gives one event, `joiner` of the
    /// two values, with the later of the two times, whichever side came
    /// second. Out-of-order events pair while their windows are open (the
    /// grace); an event that comes after its own window closed is late and
    /// dropped.
    ///
    /// Both sides' events are kept in tables of the partition named
    /// `<name>-left` and `<name>-right` (with changelogs, so a restarted
    /// worker pairs with what was seen before) until their windows close.
    /// The stream and `other` must be co-partitioned: keyed alike, with
    /// one partitioner (any: librdkafka's default CRC32 one too), and with
    /// one partition count between them (checked when the app starts; not
    /// over a [pattern](crate::App::topic_pattern)). Exact at
    /// [concurrency](Stream::concurrency) 1.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use strom::JoinWindows;
    /// let mut app = strom::App::new("shop");
    /// let orders = app.topic::<String, u64>("orders"); // order id -> cents
    /// let payments = app.topic::<String, u64>("payments"); // order id -> cents paid
    /// let paid = app.topic::<String, bool>("paid-orders");
    /// app.agent(&orders)
    ///     .join_stream(&payments, "order-payments", JoinWindows::of(Duration::from_secs(600)),
    ///         |cents, paid| paid >= cents)
    ///     .sink(&paid);
    /// ```
    pub fn join_stream<V2, R>(
        self,
        other: &Topic<K, V2>,
        name: &str,
        windows: JoinWindows,
        joiner: impl Fn(&V, &V2) -> R + Send + Sync + 'static,
    ) -> Stream<'a, K, R>
    where
        V2: Serialize + DeserializeOwned + Send + Sync + 'static,
        R: Send + Sync + 'static,
    {
        let joiner = move |v: &V, o: Option<&V2>| o.map(|o| joiner(v, o));
        self.window_join(other, name, windows, false, Box::new(joiner))
    }

    /// [`join_stream`](Stream::join_stream) keeping every event of this
    /// stream (Kafka Streams' windowed `leftJoin`): an event that found no
    /// pair by the time its window closes gives `joiner(value, None)` then,
    /// once; an event with pairs gives only those. Its unpaired events wait
    /// in a third table, `<name>-unpaired`. Their results come when a later
    /// event of the partition moves its stream time past their windows, as
    /// in Kafka Streams.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use strom::JoinWindows;
    /// let mut app = strom::App::new("shop");
    /// let orders = app.topic::<String, u64>("orders");
    /// let payments = app.topic::<String, u64>("payments");
    /// let unpaid = app.topic::<String, u64>("unpaid-orders");
    /// app.agent(&orders)
    ///     .left_join_stream(&payments, "order-payments", JoinWindows::of(Duration::from_secs(600)),
    ///         |cents, paid| (paid.is_none()).then_some(*cents))
    ///     .filter(|e| e.value.is_some())
    ///     .map(|cents| cents.unwrap_or_default())
    ///     .sink(&unpaid);
    /// ```
    pub fn left_join_stream<V2, R>(
        self,
        other: &Topic<K, V2>,
        name: &str,
        windows: JoinWindows,
        joiner: impl Fn(&V, Option<&V2>) -> R + Send + Sync + 'static,
    ) -> Stream<'a, K, R>
    where
        V2: Serialize + DeserializeOwned + Send + Sync + 'static,
        R: Send + Sync + 'static,
    {
        let joiner = move |v: &V, o: Option<&V2>| Some(joiner(v, o));
        self.window_join(other, name, windows, true, Box::new(joiner))
    }

    fn window_join<V2, R>(
        self,
        other: &Topic<K, V2>,
        name: &str,
        windows: JoinWindows,
        left_join: bool,
        joiner: Box<Joiner<V, V2, R>>,
    ) -> Stream<'a, K, R>
    where
        V2: Serialize + DeserializeOwned + Send + Sync + 'static,
        R: Send + Sync + 'static,
    {
        let Stream {
            app,
            inputs,
            mut stage,
        } = self;
        // Kept where the events are: the two topics need only one
        // partitioner, whichever (librdkafka's default is not murmur2).
        let join = Arc::new(WindowJoin {
            left: app.declare_table(
                &format!("{name}-left"),
                Arc::new(|| None),
                Arc::new(Json),
                KeyBytes::local(),
            ),
            right: app.declare_table(
                &format!("{name}-right"),
                Arc::new(|| None),
                Arc::new(Json),
                KeyBytes::local(),
            ),
            unpaired: left_join.then(|| {
                app.declare_table(
                    &format!("{name}-unpaired"),
                    Arc::new(|| None),
                    Arc::new(Json),
                    KeyBytes::local(),
                )
            }),
            windows,
            joiner,
            partitions: Mutex::default(),
        });
        app.window_joins.push(name.to_owned());
        let mut topics: Vec<String> = inputs.iter().map(|i| i.topic.to_string()).collect();
        topics.push(other.spec.name.to_string());
        app.joined(topics, &format!("windowed join {name:?}"));
        let mut sides: Vec<Input<K, Side<V, V2>>> = (inputs.into_iter().enumerate())
            .map(|(n, Input { topic, step })| {
                let tag = Arc::new(move |_: &Context, events: Events<K, V>| {
                    Box::new(events.map(move |e| {
                        e.map(|e| {
                            let (meta, key, value) = e.split();
                            meta.join(key, Side::Left(n as u32, value))
                        })
                    })) as Events<K, Side<V, V2>>
                });
                Input {
                    topic,
                    step: then_step(step, tag),
                }
            })
            .collect();
        let tag = Arc::new(|_: &Context, events: Events<K, V2>| {
            Box::new(events.map(|e| {
                e.map(|e| {
                    let (meta, key, value) = e.split();
                    meta.join(key, Side::Right(value))
                })
            })) as Events<K, Side<V, V2>>
        });
        sides.push(Input {
            topic: other.spec.name.clone(),
            step: then_step(decode_step(other), tag),
        });
        let forget = join.clone();
        stage.resets.push(Arc::new(move |p| forget.forget(p)));
        let stream = Stream {
            app,
            inputs: sides,
            stage,
        };
        stream.then_later(move |ctx, events| {
            let join = join.clone();
            Box::pin(async move { Ok(join.run(Ctx::for_lookups(ctx), events).await) })
        })
    }
}

/// The results an event of the join made, in order.
type Results<K, R> = Vec<std::result::Result<Event<K, R>, AgentError>>;

impl<K, V, V2, R> WindowJoin<K, V, V2, R>
where
    K: TableKey + Clone + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    V2: Serialize + DeserializeOwned + Send + Sync + 'static,
    R: Send + Sync + 'static,
{
    /// Joins a record's events, in order; the first that fails ends them.
    async fn run(&self, ctx: Ctx, events: Events<K, Side<V, V2>>) -> Events<K, R> {
        let mut out = Vec::new();
        for (n, e) in events.enumerate() {
            let e = match e {
                Ok(e) => e,
                Err(e) => {
                    out.push(Err(e));
                    break;
                }
            };
            if let Err(error) = self.event(&ctx, e, n, &mut out).await {
                out.push(Err(Box::new(error) as AgentError));
                break;
            }
        }
        Box::new(out.into_iter())
    }

    async fn event(
        &self,
        ctx: &Ctx,
        e: Event<K, Side<V, V2>>,
        n: usize,
        out: &mut Results<K, R>,
    ) -> Result<()> {
        let partition = ctx.partition();
        let t = e.timestamp;
        if self.stream_time(partition).is_none() {
            // A task starting on the partition: the stream time is the
            // latest time kept (every event that is not late is kept, and
            // the sweep keeps the latest), so closed windows stay closed.
            let kept = self.latest_kept(ctx).await?;
            self.advance(partition, kept.unwrap_or(t));
        }
        let stream_time = self.advance(partition, t);
        // The earliest time whose window is still open.
        let open = stream_time.saturating_sub(self.windows.open_for());
        let (meta, key, side) = e.split();
        if t < open {
            debug!(
                partition,
                t, stream_time, "late event dropped by a windowed join"
            );
            return Ok(());
        }
        let d = self.windows.difference;
        let (from, to) = (t.saturating_sub(d).max(open), t.saturating_add(d));
        let result = |value: R, time: i64| {
            let mut e = meta.clone().join(key.clone(), value);
            e.timestamp = time;
            Ok(e)
        };
        match side {
            Side::Left(input, v) => {
                let id = (key.clone(), t, meta.offset, index(input, n));
                ctx.put(&self.left, &id, &(&v,)).await?;
                let pairs = ctx.range(&self.right, span(&key, from, to)).await?;
                let paired = !pairs.is_empty();
                for ((_, time, _, _), r) in pairs {
                    let Some((r,)) = r else { continue };
                    if let Some(r) = (self.joiner)(&v, Some(&r)) {
                        out.push(result(r, t.max(time)));
                    }
                }
                if let (Some(unpaired), false) = (&self.unpaired, paired) {
                    let (key, _, offset, index) = id;
                    ctx.put(unpaired, &(t, key, offset, index), &(&v,)).await?;
                    self.waits(partition, t);
                }
            }
            Side::Right(v2) => {
                let id = (key.clone(), t, meta.offset, index(0, n));
                ctx.put(&self.right, &id, &(&v2,)).await?;
                for ((_, time, offset, index), l) in
                    ctx.range(&self.left, span(&key, from, to)).await?
                {
                    let Some((l,)) = l else { continue };
                    if let Some(r) = (self.joiner)(&l, Some(&v2)) {
                        out.push(result(r, t.max(time)));
                    }
                    if let Some(unpaired) = &self.unpaired {
                        let id = (time, key.clone(), offset, index);
                        if ctx.find(unpaired, &id).await?.is_some() {
                            ctx.delete(unpaired, &id).await?;
                        }
                    }
                }
            }
        }
        self.emit_closed(ctx, partition, open, &meta, out).await?;
        self.expire(ctx, partition, stream_time, open).await
    }

    /// The partition's stream time, if this task has one yet.
    fn stream_time(&self, partition: i32) -> Option<i64> {
        let partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        partitions.get(&partition).and_then(|p| p.stream_time)
    }

    /// The latest time of the events kept on either side.
    async fn latest_kept(&self, ctx: &Ctx) -> Result<Option<i64>> {
        let left = ctx.entries(&keys_of(&self.left)).await?;
        let right = ctx.entries(&keys_of(&self.right)).await?;
        let times = left
            .iter()
            .map(|(k, _)| k.1)
            .chain(right.iter().map(|(k, _)| k.1));
        Ok(times.max())
    }

    /// Moves the partition's stream time on to `t` (never back).
    fn advance(&self, partition: i32, t: i64) -> i64 {
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let progress = partitions.entry(partition).or_default();
        let now = progress.stream_time.map_or(t, |s| s.max(t));
        progress.stream_time = Some(now);
        now
    }

    /// Notes an unpaired left event at `t`.
    fn waits(&self, partition: i32, t: i64) {
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let progress = partitions.entry(partition).or_default();
        if let Some(heap) = &mut progress.unpaired {
            heap.push(Reverse(t));
        }
    }

    /// Forgets what it knows of `partition` (a task starts on it): read
    /// again from the tables.
    fn forget(&self, partition: i32) {
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        partitions.remove(&partition);
    }

    /// Emits the unpaired left events whose windows closed (times before
    /// `open`), in time order, and forgets them.
    async fn emit_closed(
        &self,
        ctx: &Ctx,
        partition: i32,
        open: i64,
        meta: &Event<(), ()>,
        out: &mut Results<K, R>,
    ) -> Result<()> {
        let Some(unpaired) = &self.unpaired else {
            return Ok(());
        };
        if !self.unpaired_due(ctx, unpaired, partition, open).await? {
            return Ok(());
        }
        let closed = Bound::Excluded(open.encode_key());
        for (id, l) in ctx.scan(unpaired, Bound::Unbounded, closed).await? {
            ctx.delete(unpaired, &id).await?;
            let (time, key, _, _) = id;
            let Some((l,)) = l else { continue };
            if let Some(r) = (self.joiner)(&l, None) {
                let mut e = meta.clone().join(key, r);
                e.timestamp = time;
                out.push(Ok(e));
            }
        }
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(heap) = partitions.entry(partition).or_default().unpaired.as_mut() {
            while heap.peek().is_some_and(|Reverse(t)| *t < open) {
                heap.pop();
            }
        }
        Ok(())
    }

    /// Whether an unpaired left event may have a window closed before
    /// `open`: from the times it knows, read from the table the first time.
    async fn unpaired_due(
        &self,
        ctx: &Ctx,
        unpaired: &Table<Unpaired<K>, Held<V>>,
        partition: i32,
        open: i64,
    ) -> Result<bool> {
        let known = {
            let partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            let heap = partitions.get(&partition).and_then(|p| p.unpaired.as_ref());
            heap.map(|h| h.peek().is_some_and(|Reverse(t)| *t < open))
        };
        if let Some(due) = known {
            return Ok(due);
        }
        let times: BinaryHeap<Reverse<i64>> = (ctx.entries(&keys_of(unpaired)).await?)
            .into_iter()
            .map(|((t, _, _, _), _)| Reverse(t))
            .collect();
        let due = times.peek().is_some_and(|Reverse(t)| *t < open);
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        partitions.entry(partition).or_default().unpaired = Some(times);
        Ok(due)
    }

    /// Deletes the kept events whose windows closed (times before `open`),
    /// once the stream time has moved on by a window's length (at least a
    /// second) since the last time: each kept event is read about twice.
    async fn expire(&self, ctx: &Ctx, partition: i32, stream_time: i64, open: i64) -> Result<()> {
        let due = {
            let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            let progress = partitions.entry(partition).or_default();
            let every = self.windows.open_for().max(1000);
            match progress.swept {
                Some(at) if stream_time.saturating_sub(at) < every => false,
                Some(_) => {
                    progress.swept = Some(stream_time);
                    true
                }
                None => {
                    progress.swept = Some(stream_time);
                    false
                }
            }
        };
        if due {
            expire_side(ctx, &self.left, open).await?;
            expire_side(ctx, &self.right, open).await?;
        }
        Ok(())
    }
}

/// The kept events of `key` with times from `from` to `to`.
fn span<K: Clone>(key: &K, from: i64, to: i64) -> std::ops::RangeInclusive<Kept<K>> {
    (key.clone(), from, i64::MIN, 0)..=(key.clone(), to, i64::MAX, u32::MAX)
}

/// Reads no value: for the keys of a table only.
struct KeysOnly;

impl Codec<IgnoredAny> for KeysOnly {
    fn encode(&self, _: &IgnoredAny) -> std::result::Result<Option<bytes::Bytes>, CodecError> {
        Ok(None)
    }
    fn decode(&self, _: Option<&[u8]>) -> std::result::Result<IgnoredAny, CodecError> {
        Ok(IgnoredAny)
    }
}

/// `table` read for its keys only.
fn keys_of<K2, V3>(table: &Table<K2, V3>) -> Table<K2, IgnoredAny> {
    Table {
        spec: Arc::new(TableSpec {
            name: table.spec.name.clone(),
            default: Arc::new(|| IgnoredAny),
            value: Arc::new(KeysOnly),
            key: table.spec.key.clone(),
            declared: table.spec.declared.clone(),
            types: std::marker::PhantomData,
        }),
    }
}

/// Deletes the events of one side kept from before `open`.
async fn expire_side<K, V3>(ctx: &Ctx, table: &Table<Kept<K>, V3>, open: i64) -> Result<()>
where
    K: TableKey,
{
    for (id, _) in ctx.entries(&keys_of(table)).await? {
        if id.1 < open {
            ctx.delete(table, &id).await?;
        }
    }
    Ok(())
}
