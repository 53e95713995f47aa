//! The worker's assignor: co-partitioning and sticky.
//!
//! A worker owns partition *numbers*: partition `p` of every topic the app
//! reads (sources, repartition topics) goes to the same worker, because the
//! tables of partition `p` (their changelog partition `p`) live there. Numbers
//! are spread with cooperative-sticky, so a number moves only when balance
//! needs it, and only after its old owner released it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use strom_client::consumer::TopicPartition;
use strom_client::group::assignor::{
    Assignor, CooperativeSticky, MemberAssignment, MemberSubscription, RebalanceProtocol,
};
use strom_client::Result;
use tokio::sync::watch;
use tracing::warn;

const UNITS: &str = "__partition_numbers";

/// Where every partition number of the app lives, as the group's last
/// assignment said: each worker's active and standby numbers and the URL it
/// advertises, so any worker can tell who owns a key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The group generation this placement belongs to (-1 before any).
    pub generation: i32,
    /// This worker's member id.
    pub me: String,
    /// Every worker of the group.
    pub members: Vec<MemberPlacement>,
}

/// One worker in a [`Placement`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberPlacement {
    /// Its member id.
    pub member_id: String,
    /// The URL it advertises (its web server), if any.
    pub url: Option<String>,
    /// Partition numbers it processes.
    pub active: Vec<i32>,
    /// Partition numbers whose tables it keeps warm.
    pub standby: Vec<i32>,
}

impl Placement {
    /// This worker's own entry.
    pub fn mine(&self) -> Option<&MemberPlacement> {
        self.members.iter().find(|m| m.member_id == self.me)
    }

    /// The worker that processes partition number `partition`.
    pub fn owner(&self, partition: i32) -> Option<&MemberPlacement> {
        self.members.iter().find(|m| m.active.contains(&partition))
    }
}

/// What a worker tells the leader when it joins.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Subscription {
    url: Option<String>,
    standby: Vec<i32>,
}

/// Assigns partition numbers, each with every subscribed topic's partition of
/// that number, to the group's workers; places `standby_replicas` standbys of
/// each number on other workers; and shares the whole [`Placement`] with
/// every worker through the assignment's user data.
///
/// Clones share the placement.
///
/// ```
/// use strom_worker::CopartitionedAssignor;
/// let assignor = CopartitionedAssignor::new(Some("http://10.0.0.7:6066".into()), 1);
/// assert_eq!(assignor.placement().borrow().generation, -1);
/// ```
#[derive(Debug, Clone)]
pub struct CopartitionedAssignor {
    url: Arc<std::sync::Mutex<Option<String>>>,
    standby_replicas: usize,
    placement: Arc<watch::Sender<Placement>>,
}

impl Default for CopartitionedAssignor {
    fn default() -> Self {
        Self::new(None, 0)
    }
}

impl CopartitionedAssignor {
    /// An assignor for a worker advertising `url`, asking (when it leads) for
    /// `standby_replicas` standbys of every partition number.
    pub fn new(url: Option<String>, standby_replicas: usize) -> Self {
        let placement = Placement {
            generation: -1,
            ..Placement::default()
        };
        CopartitionedAssignor {
            url: Arc::new(std::sync::Mutex::new(url)),
            standby_replicas,
            placement: Arc::new(watch::channel(placement).0),
        }
    }

    /// Sets the URL this worker advertises from its next join on (once its
    /// web server knows its port).
    pub fn set_url(&self, url: Option<String>) {
        *self.url.lock().unwrap_or_else(|e| e.into_inner()) = url;
    }

    /// The latest placement; `changed()` on it wakes after each rebalance.
    pub fn placement(&self) -> watch::Receiver<Placement> {
        self.placement.subscribe()
    }
}

impl Assignor for CopartitionedAssignor {
    fn name(&self) -> &str {
        "strom-copartitioned"
    }

    fn protocol(&self) -> RebalanceProtocol {
        RebalanceProtocol::Cooperative
    }

    fn user_data(&self, _owned: &[TopicPartition]) -> Option<Bytes> {
        let standby = self
            .placement
            .borrow()
            .mine()
            .map(|m| m.standby.clone())
            .unwrap_or_default();
        let subscription = Subscription {
            url: self.url.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            standby,
        };
        serde_json::to_vec(&subscription).ok().map(Bytes::from)
    }

    fn on_assignment(&self, assignment: &MemberAssignment, generation: i32) {
        let decoded = assignment
            .user_data
            .as_deref()
            .map(serde_json::from_slice::<Placement>);
        match decoded {
            Some(Ok(mut placement)) => {
                placement.generation = generation;
                self.placement.send_replace(placement);
            }
            Some(Err(e)) => {
                warn!(error = %e, "assignment user data is not a placement; standbys and owner lookups wait for the next rebalance")
            }
            None => warn!("assignment without placement (a leader of another version?)"),
        }
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
                owned: numbers_of(&m.owned)
                    .into_iter()
                    .map(|p| TopicPartition::new(UNITS, p))
                    .collect(),
                ..m.clone()
            })
            .collect();
        let plan =
            CooperativeSticky.assign(&units, &BTreeMap::from([(UNITS.to_owned(), numbers)]))?;
        let subscriptions: BTreeMap<&str, Subscription> = members
            .iter()
            .map(|m| {
                let s = m
                    .user_data
                    .as_deref()
                    .and_then(|d| serde_json::from_slice(d).ok())
                    .unwrap_or_default();
                (m.member_id.as_str(), s)
            })
            .collect();
        let mut placed: Vec<MemberPlacement> = members
            .iter()
            .map(|m| MemberPlacement {
                member_id: m.member_id.clone(),
                url: subscriptions
                    .get(m.member_id.as_str())
                    .and_then(|s| s.url.clone()),
                active: plan
                    .get(&m.member_id)
                    .map(|a| numbers_of(&a.partitions).into_iter().collect())
                    .unwrap_or_default(),
                standby: Vec::new(),
            })
            .collect();
        place_standbys(&mut placed, &subscriptions, numbers, self.standby_replicas);
        Ok(members
            .iter()
            .map(|m| {
                let mut assignment = MemberAssignment::default();
                let mine = placed.iter().find(|p| p.member_id == m.member_id);
                // A topic named twice in a subscription is still one topic.
                let topics: BTreeSet<&String> = m.topics.iter().collect();
                for &number in mine.map(|p| p.active.as_slice()).unwrap_or_default() {
                    for &topic in &topics {
                        if partitions.get(topic).is_some_and(|&n| number < n) {
                            assignment
                                .partitions
                                .push(TopicPartition::new(topic, number));
                        }
                    }
                }
                let placement = Placement {
                    generation: -1,
                    me: m.member_id.clone(),
                    members: placed.clone(),
                };
                assignment.user_data = serde_json::to_vec(&placement).ok().map(Bytes::from);
                (m.member_id.clone(), assignment)
            })
            .collect())
    }
}

fn numbers_of(partitions: &[TopicPartition]) -> BTreeSet<i32> {
    partitions.iter().map(|tp| tp.partition).collect()
}

/// Gives every number up to `replicas` standbys on workers that do not process
/// it: first those that already keep it warm, then the least loaded.
fn place_standbys(
    placed: &mut [MemberPlacement],
    subscriptions: &BTreeMap<&str, Subscription>,
    numbers: i32,
    replicas: usize,
) {
    if replicas == 0 {
        return;
    }
    for number in 0..numbers {
        let mut candidates: Vec<usize> = (0..placed.len())
            .filter(|&i| !placed[i].active.contains(&number))
            .collect();
        candidates.sort_by_key(|&i| {
            let warm = subscriptions
                .get(placed[i].member_id.as_str())
                .is_some_and(|s| s.standby.contains(&number));
            (!warm, placed[i].standby.len(), placed[i].member_id.clone())
        });
        for i in candidates.into_iter().take(replicas) {
            placed[i].standby.push(number);
        }
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
        let first = CopartitionedAssignor::default()
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
        let second = CopartitionedAssignor::default()
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

    fn with_data(mut m: MemberSubscription, url: &str, standby: &[i32]) -> MemberSubscription {
        let data = serde_json::to_vec(&Subscription {
            url: Some(url.into()),
            standby: standby.to_vec(),
        })
        .unwrap();
        m.user_data = Some(Bytes::from(data));
        m
    }

    fn placement_of(a: &MemberAssignment) -> Placement {
        serde_json::from_slice(a.user_data.as_deref().expect("no placement")).unwrap()
    }

    /// Standbys go to workers that do not process the number, stay where they
    /// were warm, and every worker learns the whole placement with URLs.
    #[test]
    fn standbys_avoid_owners_stay_warm_and_placement_is_shared() {
        let topics = BTreeMap::from([("src".to_string(), 6)]);
        let assignor = CopartitionedAssignor::new(None, 1);
        let members = [
            with_data(member("a", &[]), "http://a:1", &[]),
            with_data(member("b", &[]), "http://b:1", &[]),
            with_data(member("c", &[]), "http://c:1", &[]),
        ];
        let plan = assignor.assign(&members, &topics).unwrap();
        let placement = placement_of(&plan["a"]);
        assert_eq!(placement.me, "a");
        assert_eq!(placement_of(&plan["b"]).members, placement.members);
        for number in 0..6 {
            let owner = placement.owner(number).expect("a number without owner");
            let standbys: Vec<&MemberPlacement> = placement
                .members
                .iter()
                .filter(|m| m.standby.contains(&number))
                .collect();
            assert_eq!(standbys.len(), 1, "number {number}: {standbys:?}");
            assert_ne!(standbys[0].member_id, owner.member_id);
        }
        for m in &placement.members {
            assert_eq!(
                m.url.as_deref(),
                Some(format!("http://{}:1", m.member_id).as_str())
            );
            assert_eq!(m.active.len(), 2);
            assert_eq!(m.standby.len(), 2);
        }
        // Move the standby of 0 to the other non-owner, making it the busier
        // one: the next round keeps 0 where it is warm rather than balancing.
        let owner0 = placement.owner(0).unwrap().member_id.clone();
        let holder0 = placement
            .members
            .iter()
            .find(|m| m.standby.contains(&0))
            .unwrap()
            .member_id
            .clone();
        let warm = ["a", "b", "c"]
            .into_iter()
            .find(|id| *id != owner0 && *id != holder0)
            .unwrap();
        let again: Vec<MemberSubscription> = members
            .iter()
            .map(|m| {
                let mine = placement
                    .members
                    .iter()
                    .find(|p| p.member_id == m.member_id)
                    .unwrap();
                let owned: Vec<(&str, i32)> = mine.active.iter().map(|&n| ("src", n)).collect();
                let mut standby: Vec<i32> = mine.standby.clone();
                standby.retain(|&n| n != 0);
                if m.member_id == warm {
                    standby.push(0);
                }
                with_data(member(&m.member_id, &owned), "http://x:1", &standby)
            })
            .collect();
        let second = placement_of(&assignor.assign(&again, &topics).unwrap()["a"]);
        let holders: Vec<&str> = second
            .members
            .iter()
            .filter(|m| m.standby.contains(&0))
            .map(|m| m.member_id.as_str())
            .collect();
        assert_eq!(holders, [warm]);
    }
}
