//! Joins: a stream with a table of its partition ([`Stream::join_table`]),
//! with a global table ([`Stream::join_global`]), and two tables with each
//! other ([`App::join_tables`]).

use std::sync::Arc;

use serde::de::DeserializeOwned;
use strom_client::consumer::ConsumerRecord;
use strom_state::{changelog, TableKey};
use strom_worker::{AgentError, Context};

use crate::app::App;
use crate::codec::CodecError;
use crate::context::Ctx;
use crate::global::GlobalTable;
use crate::stream::{Event, Events, Input, Stage, Step, Stream};
use crate::table::Table;

impl<'a, K, V> Stream<'a, K, V>
where
    K: Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    /// Joins each event with the value its key has in `table` (Kafka
    /// Streams' stream–table join); `joiner` makes the event's new value of
    /// its value and the table's. The table must be co-partitioned with the
    /// stream: its keys in the partitions the stream's events are in (see
    /// [`Table`](crate::Table)'s partitioning rule; `group_by` the stream by
    /// the table's key first if it is keyed otherwise). An event whose key
    /// belongs to another partition fails
    /// ([`Error::CoPartition`](crate::Error::CoPartition), under its agent's
    /// error policy). An event whose key the table does not hold is dropped
    /// ([`left_join_table`](Stream::left_join_table) keeps it). The table is
    /// as this partition's task has it when the record is processed: with
    /// the writes of the partition's earlier records (at concurrency 1; a
    /// record's own events are all joined before any is handled). The
    /// events of one record are held together while they are joined.
    ///
    /// ```no_run
    /// let mut app = strom::App::new("shop");
    /// // Customer id -> credit limit, kept by another agent.
    /// let limits = app.table::<String, u64>("limits", 0);
    /// let orders = app.topic::<String, u64>("orders"); // customer id -> amount
    /// let checked = app.topic::<String, (u64, bool)>("checked-orders");
    /// app.agent(&orders)
    ///     .join_table(&limits, |amount, limit| (amount, amount <= limit))
    ///     .sink(&checked);
    /// ```
    pub fn join_table<T, V2>(
        self,
        table: &Table<K, T>,
        joiner: impl Fn(V, T) -> V2 + Send + Sync + 'static,
    ) -> Stream<'a, K, V2>
    where
        K: TableKey,
        T: DeserializeOwned + Send + 'static,
        V2: Send + Sync + 'static,
    {
        self.lookup_table(table, move |v, found| found.map(|t| joiner(v, t)))
    }

    /// [`join_table`](Stream::join_table) keeping every event: `joiner`
    /// gets `None` for a key the table does not hold (Kafka Streams'
    /// `leftJoin`; the table's default is not used).
    pub fn left_join_table<T, V2>(
        self,
        table: &Table<K, T>,
        joiner: impl Fn(V, Option<T>) -> V2 + Send + Sync + 'static,
    ) -> Stream<'a, K, V2>
    where
        K: TableKey,
        T: DeserializeOwned + Send + 'static,
        V2: Send + Sync + 'static,
    {
        self.lookup_table(table, move |v, found| Some(joiner(v, found)))
    }

    /// Looks each event's key up in this partition of `table`; `f` makes
    /// its new value, or drops it.
    fn lookup_table<T, V2>(
        self,
        table: &Table<K, T>,
        f: impl Fn(V, Option<T>) -> Option<V2> + Send + Sync + 'static,
    ) -> Stream<'a, K, V2>
    where
        K: TableKey,
        T: DeserializeOwned + Send + 'static,
        V2: Send + Sync + 'static,
    {
        let topics: Vec<String> = self.inputs.iter().map(|i| i.topic.to_string()).collect();
        self.app.not_patterns(
            &topics,
            &format!("join_table of table {:?}", table.spec.name),
        );
        self.app.copartitioned.extend(topics);
        let join = Arc::new((table.clone(), f));
        self.then_later(move |ctx, events| {
            let join = join.clone();
            Box::pin(async move {
                let (table, f) = &*join;
                let ctx = Ctx::for_lookups(ctx);
                let mut joined = Vec::new();
                for e in events {
                    let found = match &e {
                        Ok(e) => ctx.find(table, &e.key).await,
                        Err(_) => Ok(None),
                    };
                    match (e, found) {
                        (Ok(e), Ok(found)) => {
                            let (meta, key, value) = e.split();
                            joined.extend(f(value, found).map(|v| Ok(meta.join(key, v))));
                        }
                        (Err(e), _) => {
                            joined.push(Err(e));
                            break;
                        }
                        (_, Err(error)) => {
                            joined.push(Err(Box::new(error) as AgentError));
                            break;
                        }
                    }
                }
                Ok(Box::new(joined.into_iter()) as Events<K, V2>)
            })
        })
    }

    /// Joins each event with the value of its key in global table `table`
    /// (Kafka Streams' stream–GlobalKTable `join`): `key` picks the table's
    /// key from the event, so the stream and the table need no common key
    /// or partitioning; `joiner` makes the event's new value of its value
    /// and the table's. An event whose key is not in the table is dropped
    /// ([`left_join_global`](Stream::left_join_global) keeps it). The table
    /// is as this worker has read it when the event is processed (see
    /// [`GlobalTable`]). A table value that does not decode fails the event
    /// (its agent's error policy decides).
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Order { customer: String, cents: u64 }
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Customer { name: String }
    /// let mut app = strom::App::new("shop");
    /// let customers = app.topic::<String, Customer>("customers");
    /// let customers = app.global_table("customers", &customers);
    /// let orders = app.topic::<String, Order>("orders");
    /// let named = app.topic::<String, (String, u64)>("named-orders");
    /// app.agent(&orders)
    ///     .join_global(&customers, |o| o.value.customer.clone(), |o, c| (c.name, o.cents))
    ///     .sink(&named);
    /// ```
    pub fn join_global<GK, GV, V2>(
        self,
        table: &GlobalTable<GK, GV>,
        key: impl Fn(&Event<K, V>) -> GK + Send + Sync + 'static,
        joiner: impl Fn(V, GV) -> V2 + Send + Sync + 'static,
    ) -> Stream<'a, K, V2>
    where
        GK: 'static,
        GV: 'static,
        V2: Send + Sync + 'static,
    {
        self.lookup_global(table, key, move |v, found| found.map(|g| joiner(v, g)))
    }

    /// [`join_global`](Stream::join_global) keeping every event: `joiner`
    /// gets `None` for a key the table does not hold (Kafka Streams'
    /// `leftJoin`).
    ///
    /// ```no_run
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Customer { name: String }
    /// let mut app = strom::App::new("shop");
    /// let customers = app.topic::<String, Customer>("customers");
    /// let customers = app.global_table("customers", &customers);
    /// let orders = app.topic::<String, String>("orders"); // order id -> customer id
    /// let named = app.topic::<String, String>("named-orders");
    /// app.agent(&orders)
    ///     .left_join_global(&customers, |o| o.value.clone(), |id, c| {
    ///         c.map_or(format!("unknown customer {id}"), |c| c.name)
    ///     })
    ///     .sink(&named);
    /// ```
    pub fn left_join_global<GK, GV, V2>(
        self,
        table: &GlobalTable<GK, GV>,
        key: impl Fn(&Event<K, V>) -> GK + Send + Sync + 'static,
        joiner: impl Fn(V, Option<GV>) -> V2 + Send + Sync + 'static,
    ) -> Stream<'a, K, V2>
    where
        GK: 'static,
        GV: 'static,
        V2: Send + Sync + 'static,
    {
        self.lookup_global(table, key, move |v, found| Some(joiner(v, found)))
    }

    /// Looks each event's key up in `table`; `f` makes its new value, or
    /// drops it.
    fn lookup_global<GK, GV, V2>(
        self,
        table: &GlobalTable<GK, GV>,
        key: impl Fn(&Event<K, V>) -> GK + Send + Sync + 'static,
        f: impl Fn(V, Option<GV>) -> Option<V2> + Send + Sync + 'static,
    ) -> Stream<'a, K, V2>
    where
        GK: 'static,
        GV: 'static,
        V2: Send + Sync + 'static,
    {
        let join = Arc::new((table.clone(), key, f));
        self.then(move |ctx, events| {
            let ctx = Ctx::for_lookups(ctx.clone());
            let join = join.clone();
            Box::new(events.filter_map(move |e| {
                let (table, key, f) = &*join;
                let e = match e {
                    Ok(e) => e,
                    Err(e) => return Some(Err(e)),
                };
                let found = match ctx.get_global(table, &key(&e)) {
                    Ok(found) => found,
                    Err(error) => return Some(Err(Box::new(error) as AgentError)),
                };
                let (meta, k, value) = e.split();
                f(value, found).map(|v| Ok(meta.join(k, v)))
            }))
        })
    }
}

impl App {
    /// Joins two co-partitioned tables by key (Kafka Streams' KTable–KTable
    /// join): every update of either table, as its changelog records it,
    /// gives the key's result: `joiner` of both tables' values of the key
    /// as the partition's task holds them when the update is read (each
    /// `None` where its table holds no value), or `None` for no result. The
    /// stream's events carry those results per key in order, so the last
    /// one is the key's current result; updates in quick succession may
    /// give one result twice and skip a pair in between (the tables have
    /// moved on when the first update is read), as eventually consistent
    /// results do. A `None` is an event like any other: with the JSON codec
    /// a record of value `null`, not a tombstone.
    ///
    /// Both tables need the key type and the partitioning of one stream:
    /// the app's partition count, and keys placed by the same key codec
    /// (see [`Table`]'s partitioning rule). They must be plain tables (not
    /// windowed: refused when the app starts). Their keys are read back
    /// from the changelogs ([`TableKey`]'s stored form), so the results are
    /// keyed like the tables. The updates are read once in the changelog
    /// (under exactly-once, once their transaction commits), the first
    /// time from the start of it; a handler of the results that writes
    /// either table would make updates without end.
    ///
    /// ```no_run
    /// let mut app = strom::App::new("shop");
    /// let spent = app.table::<String, u64>("spent", 0);
    /// let limits = app.table::<String, u64>("limits", 0);
    /// let over = app.topic::<String, Option<bool>>("over-limit");
    /// // Inner join: a result only while both tables hold the customer.
    /// app.join_tables(&spent, &limits, |spent, limit| Some(spent? > limit?))
    ///     .sink(&over);
    /// ```
    pub fn join_tables<K, A, B, V2>(
        &mut self,
        left: &Table<K, A>,
        right: &Table<K, B>,
        joiner: impl Fn(Option<A>, Option<B>) -> Option<V2> + Send + Sync + 'static,
    ) -> Stream<'_, K, Option<V2>>
    where
        K: TableKey + Clone + Send + Sync + 'static,
        A: DeserializeOwned + Send + Sync + 'static,
        B: DeserializeOwned + Send + Sync + 'static,
        V2: Send + Sync + 'static,
    {
        let inputs = vec![
            updates(self.id(), &left.spec.name),
            updates(self.id(), &right.spec.name),
        ];
        for table in [&left.spec.name, &right.spec.name] {
            if !self.changelog_sources.iter().any(|t| **t == **table) {
                self.changelog_sources.push(table.to_string());
            }
        }
        let stream = Stream {
            app: self,
            inputs,
            stage: Stage::default(),
        };
        let join = Arc::new((left.clone(), right.clone(), joiner));
        stream.then_later(move |ctx, events| {
            let join = join.clone();
            Box::pin(async move {
                let (left, right, joiner) = &*join;
                let ctx = Ctx::for_lookups(ctx);
                let mut joined = Vec::new();
                for e in events {
                    let e = match e {
                        Ok(e) => e,
                        Err(e) => {
                            joined.push(Err(e));
                            break;
                        }
                    };
                    let (meta, key, ()) = e.split();
                    let pair = match ctx.find(left, &key).await {
                        Ok(a) => ctx.find(right, &key).await.map(|b| (a, b)),
                        Err(e) => Err(e),
                    };
                    match pair {
                        Ok((a, b)) => joined.push(Ok(meta.join(key, joiner(a, b)))),
                        Err(error) => {
                            joined.push(Err(Box::new(error) as AgentError));
                            break;
                        }
                    }
                }
                Ok(Box::new(joined.into_iter()) as Events<K, Option<V2>>)
            })
        })
    }
}

/// The keys table `table` of app `app` updates, read from its changelog.
fn updates<K>(app: &str, table: &str) -> Input<K, ()>
where
    K: TableKey + Send + 'static,
{
    let topic: Arc<str> = Arc::from(changelog::topic_name(app, table));
    let what = format!("table {table:?}");
    let step: Step<K, ()> = Step::Now(Arc::new(move |_: &Context, r: ConsumerRecord| {
        let bad = |e: String| CodecError {
            what: format!("{what}: {e}"),
        };
        let key =
            (r.key.as_deref()).ok_or_else(|| bad("a changelog record without a key".into()))?;
        let key = K::decode_key(key).map_err(|e| bad(e.to_string()))?;
        let event = Event {
            key,
            value: (),
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            timestamp: r.timestamp,
            headers: r.headers,
        };
        Ok(Box::new(std::iter::once(Ok(event))) as Events<K, ()>)
    }));
    Input { topic, step }
}
