//! Partition assignors: how the group leader spreads partitions over members.
//!
//! An [`Assignor`] sees every member's subscription (topics, owned partitions,
//! user data) and the partition count of each topic, and returns each member's
//! partitions plus optional user data. Strom ships Kafka's three: [`Range`],
//! [`RoundRobin`] and [`CooperativeSticky`] (KIP-429: members keep what does not
//! move, and a partition that moves is first revoked by its owner, then assigned
//! in a follow-up rebalance). The worker plugs in its own, table-aware one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment as wire_assignment;
use kafka_protocol::messages::consumer_protocol_subscription as wire_subscription;
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, ConsumerProtocolSubscription, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};

use crate::error::{Error, Result};
use crate::types::TopicPartition;

/// How a group moves partitions between members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebalanceProtocol {
    /// Every member gives up all its partitions before each rebalance.
    Eager,
    /// Members keep partitions that stay theirs; only moving ones are revoked.
    Cooperative,
}

/// One member as the leader sees it during assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSubscription {
    /// The member id the coordinator gave it.
    pub member_id: String,
    /// Its static instance id, if any.
    pub instance_id: Option<String>,
    /// Topics it subscribes to.
    pub topics: Vec<String>,
    /// Partitions it owns now (cooperative protocol).
    pub owned: Vec<TopicPartition>,
    /// The generation in which it last had an assignment (-1 if unknown).
    pub generation: i32,
    /// Assignor-specific data.
    pub user_data: Option<Bytes>,
}

/// What one member is given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberAssignment {
    /// Its partitions.
    pub partitions: Vec<TopicPartition>,
    /// Assignor-specific data sent back to it.
    pub user_data: Option<Bytes>,
}

/// Computes the group's assignment; implemented by the built-in assignors and
/// by callers with their own placement rules.
pub trait Assignor: Send + Sync + Debug {
    /// The protocol name sent in JoinGroup (`range`, `roundrobin`, `cooperative-sticky`).
    fn name(&self) -> &str;

    /// Eager unless the assignor supports incremental rebalancing.
    fn protocol(&self) -> RebalanceProtocol {
        RebalanceProtocol::Eager
    }

    /// Data this member adds to its subscription.
    fn user_data(&self, _owned: &[TopicPartition]) -> Option<Bytes> {
        None
    }

    /// Called on every member with what the leader's assignment gave it
    /// (partitions and user data), before its listener hears of the change.
    fn on_assignment(&self, _assignment: &MemberAssignment, _generation: i32) {}

    /// The assignment for every member, keyed by member id. `partitions` gives
    /// the partition count of every topic some member subscribes to.
    fn assign(
        &self,
        members: &[MemberSubscription],
        partitions: &BTreeMap<String, i32>,
    ) -> Result<BTreeMap<String, MemberAssignment>>;
}

/// Kafka's `range`: for each topic, consecutive partition ranges to members in
/// member-id order; the first `n % members` get one more.
#[derive(Debug, Clone, Copy, Default)]
pub struct Range;

impl Assignor for Range {
    fn name(&self) -> &str {
        "range"
    }

    fn assign(
        &self,
        members: &[MemberSubscription],
        partitions: &BTreeMap<String, i32>,
    ) -> Result<BTreeMap<String, MemberAssignment>> {
        let mut out = empty(members);
        for (topic, &count) in partitions {
            let mut subscribers: Vec<&MemberSubscription> = members
                .iter()
                .filter(|m| m.topics.contains(topic))
                .collect();
            subscribers.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
            if subscribers.is_empty() {
                continue;
            }
            let per = count as usize / subscribers.len();
            let extra = count as usize % subscribers.len();
            let mut next = 0i32;
            for (i, m) in subscribers.iter().enumerate() {
                let n = per + usize::from(i < extra);
                let a = out.entry(m.member_id.clone()).or_default();
                for p in next..next + n as i32 {
                    a.partitions.push(TopicPartition::new(topic, p));
                }
                next += n as i32;
            }
        }
        Ok(out)
    }
}

/// Kafka's `roundrobin`: all partitions in topic-partition order, dealt to
/// members in member-id order, skipping members not subscribed to the topic.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundRobin;

impl Assignor for RoundRobin {
    fn name(&self) -> &str {
        "roundrobin"
    }

    fn assign(
        &self,
        members: &[MemberSubscription],
        partitions: &BTreeMap<String, i32>,
    ) -> Result<BTreeMap<String, MemberAssignment>> {
        let mut out = empty(members);
        let mut sorted: Vec<&MemberSubscription> = members.iter().collect();
        sorted.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
        if sorted.is_empty() {
            return Ok(out);
        }
        let mut turn = 0usize;
        for (topic, &count) in partitions {
            for p in 0..count {
                for _ in 0..sorted.len() {
                    let m = sorted[turn % sorted.len()];
                    turn += 1;
                    if m.topics.contains(topic) {
                        out.entry(m.member_id.clone())
                            .or_default()
                            .partitions
                            .push(TopicPartition::new(topic, p));
                        break;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Kafka's `cooperative-sticky`: a balanced assignment that keeps every
/// partition with its current owner where balance allows. A partition that must
/// move is left unassigned in this round; its owner revokes it and rejoins, and
/// the next round gives it to its new member (KIP-429).
#[derive(Debug, Clone, Copy, Default)]
pub struct CooperativeSticky;

impl Assignor for CooperativeSticky {
    fn name(&self) -> &str {
        "cooperative-sticky"
    }

    fn protocol(&self) -> RebalanceProtocol {
        RebalanceProtocol::Cooperative
    }

    fn assign(
        &self,
        members: &[MemberSubscription],
        partitions: &BTreeMap<String, i32>,
    ) -> Result<BTreeMap<String, MemberAssignment>> {
        let target = sticky_balance(members, partitions);
        // Current owners, resolving double claims in favour of the newer generation.
        let mut owner: HashMap<&TopicPartition, (&str, i32)> = HashMap::new();
        for m in members {
            for tp in &m.owned {
                let claim = (m.member_id.as_str(), m.generation);
                match owner.get(tp) {
                    Some(&(_, g)) if g >= m.generation => {}
                    _ => {
                        owner.insert(tp, claim);
                    }
                }
            }
        }
        let mut out = empty(members);
        for (member, tps) in target {
            let a = out.entry(member.clone()).or_default();
            for tp in tps {
                match owner.get(&tp) {
                    // Still owned by someone else: they revoke it first.
                    Some(&(o, _)) if o != member => {}
                    _ => a.partitions.push(tp),
                }
            }
        }
        Ok(out)
    }
}

/// A balanced assignment (every member within one partition of the others,
/// among members of equal subscriptions) that keeps owned partitions in place
/// where it can.
fn sticky_balance(
    members: &[MemberSubscription],
    partitions: &BTreeMap<String, i32>,
) -> BTreeMap<String, BTreeSet<TopicPartition>> {
    let mut sorted: Vec<&MemberSubscription> = members.iter().collect();
    sorted.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    let all: Vec<TopicPartition> = partitions
        .iter()
        .flat_map(|(t, &n)| (0..n).map(move |p| TopicPartition::new(t, p)))
        .collect();
    let subscribed =
        |m: &MemberSubscription, tp: &TopicPartition| m.topics.iter().any(|t| **t == *tp.topic);
    let mut out: BTreeMap<String, BTreeSet<TopicPartition>> = sorted
        .iter()
        .map(|m| (m.member_id.clone(), BTreeSet::new()))
        .collect();
    if sorted.is_empty() {
        return out;
    }
    let total = all.len();
    let quota = total / sorted.len();
    let mut extra = total % sorted.len();
    // 1. Keep owned partitions up to the quota (quota + 1 while extras last),
    //    newest generation first when two members claim the same partition.
    let mut by_generation = sorted.clone();
    by_generation.sort_by_key(|m| std::cmp::Reverse(m.generation));
    let mut taken: BTreeSet<TopicPartition> = BTreeSet::new();
    let valid: BTreeSet<&TopicPartition> = all.iter().collect();
    for m in &by_generation {
        let mut kept: Vec<&TopicPartition> = m
            .owned
            .iter()
            .filter(|tp| valid.contains(tp) && subscribed(m, tp) && !taken.contains(*tp))
            .collect();
        kept.sort();
        let mut limit = quota;
        if kept.len() > quota && extra > 0 {
            limit += 1;
            extra -= 1;
        }
        for tp in kept.into_iter().take(limit) {
            taken.insert(tp.clone());
            if let Some(set) = out.get_mut(&m.member_id) {
                set.insert(tp.clone());
            }
        }
    }
    // 2. Hand out the rest, each to the least-loaded subscribed member.
    for tp in all.iter().filter(|tp| !taken.contains(*tp)) {
        let best = sorted
            .iter()
            .filter(|m| subscribed(m, tp))
            .min_by_key(|m| out.get(&m.member_id).map_or(0, BTreeSet::len));
        if let Some(m) = best {
            if let Some(set) = out.get_mut(&m.member_id) {
                set.insert(tp.clone());
            }
        }
    }
    out
}

fn sort_key(m: &MemberSubscription) -> (&str, &str) {
    (m.instance_id.as_deref().unwrap_or(""), m.member_id.as_str())
}

fn empty(members: &[MemberSubscription]) -> BTreeMap<String, MemberAssignment> {
    members
        .iter()
        .map(|m| (m.member_id.clone(), MemberAssignment::default()))
        .collect()
}

/// The assignors a consumer offers when none are configured: Java's default
/// list, range first, so the group rebalances eagerly unless every member
/// offers cooperative-sticky alone.
pub fn default_assignors() -> Vec<Arc<dyn Assignor>> {
    vec![Arc::new(Range), Arc::new(CooperativeSticky)]
}

const SUBSCRIPTION_VERSION: i16 = 2;
const ASSIGNMENT_VERSION: i16 = 1;

fn corrupt(what: String) -> Error {
    Error::Protocol {
        broker: "group coordinator".into(),
        what,
    }
}

fn group_by_topic(tps: &[TopicPartition]) -> BTreeMap<&str, Vec<i32>> {
    let mut by: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for tp in tps {
        by.entry(&tp.topic).or_default().push(tp.partition);
    }
    by
}

/// JoinGroup metadata of this member: version-prefixed ConsumerProtocolSubscription.
pub(crate) fn encode_subscription(
    topics: &[String],
    owned: &[TopicPartition],
    generation: i32,
    user_data: Option<Bytes>,
) -> Result<Bytes> {
    let sub = ConsumerProtocolSubscription::default()
        .with_topics(
            topics
                .iter()
                .map(|t| StrBytes::from_string(t.clone()))
                .collect(),
        )
        .with_user_data(user_data)
        .with_owned_partitions(
            group_by_topic(owned)
                .into_iter()
                .map(|(t, ps)| {
                    wire_subscription::TopicPartition::default()
                        .with_topic(TopicName(StrBytes::from_string(t.to_owned())))
                        .with_partitions(ps)
                })
                .collect(),
        )
        .with_generation_id(generation);
    let mut buf = BytesMut::new();
    buf.put_i16(SUBSCRIPTION_VERSION);
    sub.encode(&mut buf, SUBSCRIPTION_VERSION)
        .map_err(|e| corrupt(format!("cannot encode subscription: {e}")))?;
    Ok(buf.freeze())
}

/// Decodes a member's JoinGroup metadata (any subscription version; fields
/// of versions after 3 are ignored, as Java does).
///
/// The bytes come from another member of the group, so they are read here with
/// every count checked against the bytes left (kafka-protocol's decoder
/// reserves memory for a declared count before reading it: one bad member
/// could make the leader abort).
pub(crate) fn decode_subscription(
    member_id: &str,
    instance_id: Option<&str>,
    data: Bytes,
) -> Result<MemberSubscription> {
    let what = |e: String| corrupt(format!("subscription of {member_id}: {e}"));
    let mut r = WireReader(data);
    let version = r.i16().map_err(what)?;
    let read = |r: &mut WireReader| -> std::result::Result<MemberSubscription, String> {
        let topics = r.array(|r| r.string())?;
        let user_data = r.nullable_bytes()?;
        let owned = if version >= 1 {
            r.topic_partitions()?
        } else {
            Vec::new()
        };
        let generation = if version >= 2 { r.i32()? } else { -1 };
        Ok(MemberSubscription {
            member_id: member_id.to_owned(),
            instance_id: instance_id.map(str::to_owned),
            topics,
            owned,
            generation,
            user_data,
        })
    };
    if version < 0 {
        return Err(what(format!("version {version}")));
    }
    read(&mut r).map_err(what)
}

/// Reads the consumer protocol's (non-flexible) wire types from bytes of
/// another member: every length and count is checked against what is left.
struct WireReader(Bytes);

impl WireReader {
    fn need(&self, n: usize) -> std::result::Result<(), String> {
        if self.0.remaining() < n {
            return Err(format!("{n} bytes wanted, {} left", self.0.remaining()));
        }
        Ok(())
    }

    fn i16(&mut self) -> std::result::Result<i16, String> {
        self.need(2)?;
        Ok(self.0.get_i16())
    }

    fn i32(&mut self) -> std::result::Result<i32, String> {
        self.need(4)?;
        Ok(self.0.get_i32())
    }

    /// An array: its count, then each element (of at least one byte).
    fn array<T>(
        &mut self,
        mut element: impl FnMut(&mut Self) -> std::result::Result<T, String>,
    ) -> std::result::Result<Vec<T>, String> {
        let n = self.i32()?;
        if n < 0 || n as usize > self.0.remaining() {
            return Err(format!(
                "array of {n} elements in {} bytes",
                self.0.remaining()
            ));
        }
        (0..n).map(|_| element(self)).collect()
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let n = self.i16()?;
        if n < 0 {
            return Err("null string".into());
        }
        self.need(n as usize)?;
        let bytes = self.0.split_to(n as usize);
        String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8".to_owned())
    }

    fn nullable_bytes(&mut self) -> std::result::Result<Option<Bytes>, String> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        self.need(n as usize)?;
        Ok(Some(self.0.split_to(n as usize)))
    }

    /// `[topic string, [partition i32]]`, flattened.
    fn topic_partitions(&mut self) -> std::result::Result<Vec<TopicPartition>, String> {
        let topics = self.array(|r| Ok((r.string()?, r.array(|r| r.i32())?)))?;
        Ok(topics
            .into_iter()
            .flat_map(|(t, ps)| {
                let t: Arc<str> = t.into();
                ps.into_iter().map(move |p| TopicPartition {
                    topic: t.clone(),
                    partition: p,
                })
            })
            .collect())
    }
}

/// SyncGroup assignment bytes for one member.
pub(crate) fn encode_assignment(a: &MemberAssignment) -> Result<Bytes> {
    let wire = ConsumerProtocolAssignment::default()
        .with_assigned_partitions(
            group_by_topic(&a.partitions)
                .into_iter()
                .map(|(t, ps)| {
                    wire_assignment::TopicPartition::default()
                        .with_topic(TopicName(StrBytes::from_string(t.to_owned())))
                        .with_partitions(ps)
                })
                .collect(),
        )
        .with_user_data(a.user_data.clone());
    let mut buf = BytesMut::new();
    buf.put_i16(ASSIGNMENT_VERSION);
    wire.encode(&mut buf, ASSIGNMENT_VERSION)
        .map_err(|e| corrupt(format!("cannot encode assignment: {e}")))?;
    Ok(buf.freeze())
}

/// Decodes this member's SyncGroup assignment (empty bytes: no partitions;
/// any version, as for subscriptions). The leader is another member, so the
/// bytes are read as carefully as a subscription's.
pub(crate) fn decode_assignment(data: Bytes) -> Result<MemberAssignment> {
    if data.is_empty() {
        return Ok(MemberAssignment::default());
    }
    let what = |e: String| corrupt(format!("cannot decode assignment: {e}"));
    let mut r = WireReader(data);
    let version = r.i16().map_err(what)?;
    if version < 0 {
        return Err(what(format!("version {version}")));
    }
    let partitions = r.topic_partitions().map_err(what)?;
    let user_data = r.nullable_bytes().map_err(what)?;
    Ok(MemberAssignment {
        partitions,
        user_data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, topics: &[&str], owned: &[(&str, i32)]) -> MemberSubscription {
        MemberSubscription {
            member_id: id.into(),
            instance_id: None,
            topics: topics.iter().map(|t| t.to_string()).collect(),
            owned: owned
                .iter()
                .map(|(t, p)| TopicPartition::new(t, *p))
                .collect(),
            generation: 1,
            user_data: None,
        }
    }

    fn topics(list: &[(&str, i32)]) -> BTreeMap<String, i32> {
        list.iter().map(|(t, n)| (t.to_string(), *n)).collect()
    }

    /// Every partition exactly once, and no member more than one partition
    /// ahead of another.
    fn assert_complete_and_balanced(a: &BTreeMap<String, MemberAssignment>, total: usize) {
        let mut seen = BTreeSet::new();
        for m in a.values() {
            for tp in &m.partitions {
                assert!(seen.insert(tp.clone()), "{tp} assigned twice");
            }
        }
        assert_eq!(seen.len(), total, "not every partition assigned: {a:?}");
        let sizes: Vec<usize> = a.values().map(|m| m.partitions.len()).collect();
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(max - min <= 1, "unbalanced: {sizes:?}");
    }

    /// Range gives consecutive ranges; the first members get the remainder.
    #[test]
    fn range_gives_consecutive_ranges() {
        let members = [member("b", &["t"], &[]), member("a", &["t"], &[])];
        let a = Range.assign(&members, &topics(&[("t", 5)])).unwrap();
        let parts = |id: &str| {
            a[id]
                .partitions
                .iter()
                .map(|tp| tp.partition)
                .collect::<Vec<_>>()
        };
        assert_eq!(parts("a"), vec![0, 1, 2]);
        assert_eq!(parts("b"), vec![3, 4]);
    }

    /// Round-robin deals partitions in turn and balances 12 over 3 and over 4.
    #[test]
    fn round_robin_balances() {
        for n in [3, 4] {
            let members: Vec<_> = (0..n)
                .map(|i| member(&format!("m{i}"), &["t"], &[]))
                .collect();
            let a = RoundRobin.assign(&members, &topics(&[("t", 12)])).unwrap();
            assert_complete_and_balanced(&a, 12);
        }
    }

    /// A new member joining: nobody keeps a partition someone else is given, and
    /// partitions that stay are not touched; after the owners revoke, the
    /// second round completes a balanced assignment.
    #[test]
    fn cooperative_sticky_moves_only_what_it_must() {
        let t = topics(&[("t", 12)]);
        let first: Vec<_> = (0..3)
            .map(|i| member(&format!("m{i}"), &["t"], &[]))
            .collect();
        let round1 = CooperativeSticky.assign(&first, &t).unwrap();
        assert_complete_and_balanced(&round1, 12);

        // m3 joins; the others report what they own.
        let owned = |id: &str, a: &BTreeMap<String, MemberAssignment>| -> Vec<(String, i32)> {
            a[id]
                .partitions
                .iter()
                .map(|tp| (tp.topic.to_string(), tp.partition))
                .collect()
        };
        let mut second: Vec<MemberSubscription> = (0..3)
            .map(|i| {
                let id = format!("m{i}");
                let o = owned(&id, &round1);
                let o: Vec<(&str, i32)> = o.iter().map(|(t, p)| (t.as_str(), *p)).collect();
                member(&id, &["t"], &o)
            })
            .collect();
        second.push(member("m3", &["t"], &[]));
        let round2 = CooperativeSticky.assign(&second, &t).unwrap();
        for i in 0..3 {
            let id = format!("m{i}");
            let before: BTreeSet<_> = round1[&id].partitions.iter().collect();
            let now: BTreeSet<_> = round2[&id].partitions.iter().collect();
            assert!(
                now.is_subset(&before),
                "{id} was given a partition another member still owns"
            );
            assert_eq!(now.len(), 3, "{id} keeps exactly its share");
        }
        assert!(
            round2["m3"].partitions.is_empty(),
            "m3 must wait for the revocation"
        );

        // Owners revoked what they lost; the follow-up round hands it to m3.
        let third: Vec<MemberSubscription> = (0..4)
            .map(|i| {
                let id = format!("m{i}");
                let o = owned(&id, &round2);
                let o: Vec<(&str, i32)> = o.iter().map(|(t, p)| (t.as_str(), *p)).collect();
                member(&id, &["t"], &o)
            })
            .collect();
        let round3 = CooperativeSticky.assign(&third, &t).unwrap();
        assert_complete_and_balanced(&round3, 12);
        for i in 0..3 {
            let id = format!("m{i}");
            assert_eq!(
                round3[&id].partitions, round2[&id].partitions,
                "{id} moved again"
            );
        }
    }

    /// Subscriptions and assignments survive their wire encodings.
    #[test]
    fn subscription_and_assignment_round_trip() {
        let owned = vec![TopicPartition::new("a", 1), TopicPartition::new("b", 0)];
        let bytes = encode_subscription(
            &["a".into(), "b".into()],
            &owned,
            7,
            Some(Bytes::from_static(b"u")),
        )
        .unwrap();
        let sub = decode_subscription("m", Some("i"), bytes).unwrap();
        assert_eq!(sub.topics, vec!["a", "b"]);
        assert_eq!(sub.owned, owned);
        assert_eq!(sub.generation, 7);
        assert_eq!(sub.user_data.as_deref(), Some(&b"u"[..]));
        let a = MemberAssignment {
            partitions: owned.clone(),
            user_data: None,
        };
        assert_eq!(
            decode_assignment(encode_assignment(&a).unwrap()).unwrap(),
            a
        );
        assert_eq!(
            decode_assignment(Bytes::new()).unwrap(),
            MemberAssignment::default()
        );
        assert!(decode_assignment(Bytes::from_static(&[0, 1, 0xff])).is_err());
    }

    /// Counts larger than the bytes left are errors, not reservations: a
    /// member claiming two billion topics cannot make the leader abort.
    #[test]
    fn impossible_counts_are_errors() {
        let mut sub = vec![0, 3];
        sub.extend(i32::MAX.to_be_bytes());
        sub.extend([0, 1, b'a']);
        let err = decode_subscription("m-1", None, Bytes::from(sub)).unwrap_err();
        assert!(err.to_string().contains("subscription of m-1"), "{err}");
        assert!(
            err.to_string().contains("array of 2147483647 elements"),
            "{err}"
        );
        let mut assignment = vec![0, 1];
        assignment.extend(0x7fff_0000i32.to_be_bytes());
        assert!(decode_assignment(Bytes::from(assignment)).is_err());
        // Versions after 3 are read as 3, their extra fields ignored.
        let mut v9 = encode_subscription(&["t".into()], &[], 4, None)
            .unwrap()
            .to_vec();
        v9[..2].copy_from_slice(&9i16.to_be_bytes());
        v9.extend([0xde, 0xad]);
        let read = decode_subscription("m", None, Bytes::from(v9)).unwrap();
        assert_eq!((read.topics, read.generation), (vec!["t".to_owned()], 4));
    }
}
