//! The worker's assignor: co-partitioning and sticky.
//!
//! A worker owns partition *numbers*: partition `p` of every topic the app
//! reads (sources, repartition topics) goes to the same worker, because the
//! tables of partition `p` (their changelog partition `p`) live there. Numbers
//! are spread with cooperative-sticky, so a number moves only when balance
//! needs it, and only after its old owner released it.

use std::collections::{BTreeMap, BTreeSet};

use strom_client::consumer::TopicPartition;
use strom_client::group::assignor::{
    Assignor, CooperativeSticky, MemberAssignment, MemberSubscription, RebalanceProtocol,
};
use strom_client::Result;

const UNITS: &str = "__partition_numbers";

/// Assigns partition numbers, each with every subscribed topic's partition of
/// that number, to the group's workers.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopartitionedAssignor;

impl Assignor for CopartitionedAssignor {
    fn name(&self) -> &str {
        "strom-copartitioned"
    }

    fn protocol(&self) -> RebalanceProtocol {
        RebalanceProtocol::Cooperative
    }

    fn assign(
        &self,
        members: &[MemberSubscription],
        partitions: &BTreeMap<String, i32>,
    ) -> Result<BTreeMap<String, MemberAssignment>> {
        let numbers = partitions.values().copied().max().unwrap_or(0);
        let units: Vec<MemberSubscription> = members
            .iter()
            .map(|m| MemberSubscription {
                topics: vec![UNITS.to_owned()],
                owned: m
                    .owned
                    .iter()
                    .map(|tp| tp.partition)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .map(|p| TopicPartition::new(UNITS, p))
                    .collect(),
                ..m.clone()
            })
            .collect();
        let plan =
            CooperativeSticky.assign(&units, &BTreeMap::from([(UNITS.to_owned(), numbers)]))?;
        Ok(members
            .iter()
            .map(|m| {
                let mut assignment = MemberAssignment::default();
                for unit in plan
                    .get(&m.member_id)
                    .map(|a| a.partitions.as_slice())
                    .unwrap_or_default()
                {
                    for topic in &m.topics {
                        if partitions.get(topic).is_some_and(|&n| unit.partition < n) {
                            assignment
                                .partitions
                                .push(TopicPartition::new(topic, unit.partition));
                        }
                    }
                }
                (m.member_id.clone(), assignment)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, owned: &[(&str, i32)]) -> MemberSubscription {
        MemberSubscription {
            member_id: id.into(),
            instance_id: None,
            topics: vec!["src".into(), "app-src-by-x-repartition".into()],
            owned: owned
                .iter()
                .map(|(t, p)| TopicPartition::new(t, *p))
                .collect(),
            generation: 1,
            user_data: None,
        }
    }

    /// Every partition number goes to one worker with all its topics, and
    /// numbers that stay are not moved when a worker joins.
    #[test]
    fn partition_numbers_stay_together_and_sticky() {
        let topics = BTreeMap::from([
            ("src".to_string(), 6),
            ("app-src-by-x-repartition".to_string(), 6),
        ]);
        let first = CopartitionedAssignor
            .assign(&[member("a", &[]), member("b", &[])], &topics)
            .unwrap();
        for a in first.values() {
            let numbers: BTreeSet<i32> = a.partitions.iter().map(|tp| tp.partition).collect();
            assert_eq!(
                a.partitions.len(),
                numbers.len() * 2,
                "a number without all its topics: {a:?}"
            );
            assert_eq!(numbers.len(), 3);
        }
        let owned = |id: &str| -> Vec<(String, i32)> {
            first[id]
                .partitions
                .iter()
                .map(|tp| (tp.topic.to_string(), tp.partition))
                .collect()
        };
        let (a, b) = (owned("a"), owned("b"));
        let a: Vec<(&str, i32)> = a.iter().map(|(t, p)| (t.as_str(), *p)).collect();
        let b: Vec<(&str, i32)> = b.iter().map(|(t, p)| (t.as_str(), *p)).collect();
        let second = CopartitionedAssignor
            .assign(
                &[member("a", &a), member("b", &b), member("c", &[])],
                &topics,
            )
            .unwrap();
        for id in ["a", "b"] {
            let before: BTreeSet<_> = first[id].partitions.iter().collect();
            assert!(
                second[id].partitions.iter().all(|tp| before.contains(tp)),
                "{id} gained a moving number"
            );
            assert_eq!(second[id].partitions.len(), 4, "{id} keeps two numbers");
        }
    }
}
