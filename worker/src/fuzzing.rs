//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`). A panic
//! is a finding. Not part of the API.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use strom_client::fuzzing::member_subscription;
use strom_client::group::assignor::{Assignor, CooperativeSticky, MemberAssignment};

use crate::assignor::{CopartitionedAssignor, Placement};

/// The group leader's view of a rebalance, from bytes as they come from the
/// other members: `data[0]` and `data[1]` are the partition counts of the
/// topics `a` and `b`, `data[2]` the standby replicas; the rest, split at
/// `0xff` bytes, is each member's JoinGroup metadata (subscription, owned
/// partitions, the worker's user data). Both the client's sticky assignor and
/// the worker's co-partitioned one must give no partition twice and none that
/// does not exist, whatever members claim to own; the sticky one must give
/// every partition of a subscribed topic that no member claims (a claimed one
/// may wait for its owner to revoke it). Each member must read its own
/// placement from its assignment, and assignment user data that is not a
/// placement must not break a member.
pub fn group_assignment(data: &[u8]) {
    let [a, b, standby, rest @ ..] = data else {
        return;
    };
    let partitions = BTreeMap::from([
        ("a".to_owned(), i32::from(*a % 64)),
        ("b".to_owned(), i32::from(*b % 64)),
    ]);
    let members: Vec<_> = rest
        .split(|&byte| byte == 0xff)
        .take(16)
        .enumerate()
        .filter_map(|(i, chunk)| member_subscription(&format!("member-{i:02}"), chunk))
        .collect();
    if members.is_empty() {
        return;
    }
    if let Ok(plan) = CooperativeSticky.assign(&members, &partitions) {
        let subscribed: BTreeSet<&str> = members
            .iter()
            .flat_map(|m| m.topics.iter().map(String::as_str))
            .collect();
        let given = distinct(&plan, &partitions);
        let claimed: BTreeSet<(String, i32)> = members
            .iter()
            .flat_map(|m| {
                m.owned
                    .iter()
                    .map(|tp| (tp.topic.to_string(), tp.partition))
            })
            .collect();
        for (topic, &count) in &partitions {
            if subscribed.contains(topic.as_str()) {
                for p in 0..count {
                    // A partition moving between members is given in the
                    // rebalance after its owner revoked it.
                    let tp = (topic.clone(), p);
                    assert!(
                        given.contains(&tp) || claimed.contains(&tp),
                        "{topic}-{p} is subscribed, owned by nobody and given to nobody"
                    );
                }
            }
        }
    }
    let assignor = CopartitionedAssignor::new(None, usize::from(*standby % 3));
    if let Ok(plan) = assignor.assign(&members, &partitions) {
        distinct(&plan, &partitions);
        for (member, assignment) in &plan {
            let worker = CopartitionedAssignor::new(None, 0);
            worker.on_assignment(assignment, 7);
            let placement: Placement = worker.placement().borrow().clone();
            assert_eq!(&placement.me, member);
            assert_eq!(placement.generation, 7);
        }
    }
    let worker = CopartitionedAssignor::new(None, 0);
    worker.on_assignment(
        &MemberAssignment {
            partitions: Vec::new(),
            user_data: Some(Bytes::copy_from_slice(rest)),
        },
        1,
    );
}

/// Every partition given, checked to be given once and to exist.
fn distinct(
    plan: &BTreeMap<String, MemberAssignment>,
    partitions: &BTreeMap<String, i32>,
) -> BTreeSet<(String, i32)> {
    let mut given = BTreeSet::new();
    for (member, assignment) in plan {
        for tp in &assignment.partitions {
            let count = partitions.get(tp.topic.as_ref()).copied().unwrap_or(0);
            assert!(
                (0..count).contains(&tp.partition),
                "{member} was given {tp}, which does not exist"
            );
            assert!(
                given.insert((tp.topic.to_string(), tp.partition)),
                "{tp} given twice"
            );
        }
    }
    given
}

#[cfg(test)]
mod tests {
    use strom_client::consumer::TopicPartition;
    use strom_client::fuzzing::{smoke, subscription_bytes};

    use super::*;

    /// Three workers of an app reading `a` and `b`, owning what they had, two
    /// of them keeping standbys, one claiming a partition another owns.
    fn seed() -> Vec<u8> {
        let tp = TopicPartition::new;
        let members = [
            subscription_bytes(
                &["a", "b"],
                &[tp("a", 0), tp("b", 0)],
                3,
                br#"{"url":"http://w1:1","standby":[1]}"#,
            ),
            subscription_bytes(
                &["a", "b"],
                &[tp("a", 1), tp("b", 1), tp("a", 0)],
                3,
                br#"{"url":null,"standby":[]}"#,
            ),
            subscription_bytes(&["a"], &[], 2, br#"{"url":"http://w3:1","standby":[0,2]}"#),
        ];
        let mut out = vec![4, 4, 1];
        for (i, m) in members.iter().enumerate() {
            assert!(!m.contains(&0xff), "seed member data holds the separator");
            if i > 0 {
                out.push(0xff);
            }
            out.extend_from_slice(m);
        }
        out
    }

    /// The CI's short smoke run of the worker's fuzz target.
    #[test]
    fn fuzz_target_smoke() {
        let kept = smoke("group_assignment", &[seed()], group_assignment, usize::MAX);
        println!("{kept} kept inputs");
    }
}
