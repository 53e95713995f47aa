//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): each
//! takes arbitrary bytes as they could arrive from the network, runs them
//! through the client's real decoders and checks what must hold whatever the
//! bytes are. A panic is a finding. Not part of the API.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    AddOffsetsToTxnResponse, AddPartitionsToTxnResponse, ApiKey, ApiVersionsResponse,
    CreatePartitionsResponse, CreateTopicsResponse, DeleteTopicsResponse, EndTxnResponse,
    FetchResponse, FindCoordinatorResponse, HeartbeatResponse, InitProducerIdResponse,
    JoinGroupResponse, LeaveGroupResponse, ListOffsetsResponse, MetadataResponse,
    OffsetCommitResponse, OffsetFetchResponse, ProduceResponse, SaslAuthenticateResponse,
    SaslHandshakeResponse, SyncGroupResponse, TxnOffsetCommitResponse,
};
use kafka_protocol::protocol::{Decodable, HeaderVersion, Message};

use crate::compression::Compression;
use crate::connection::{decode_response, strip_header_rest};
use crate::consumer::read_fetched;
use crate::group::assignor::{
    decode_assignment, decode_subscription, encode_assignment, encode_subscription,
    MemberSubscription,
};
use crate::records::{BatchBuilder, BatchDecoder, ProducerIdentity, BATCH_HEADER_LEN};

const BROKER: &str = "fuzz:9092";

/// A whole response frame after its size prefix: `data[0]` picks the API,
/// `data[1]` its version, the rest is the response header and body. A Fetch
/// response's record data goes on through both of the consumer's read paths;
/// JoinGroup and SyncGroup carry the group protocol's member data, which is
/// decoded too.
pub fn response(data: &[u8]) {
    let [api, version, frame @ ..] = data else {
        return;
    };
    let frame = Bytes::copy_from_slice(frame);
    match api % 22 {
        0 => {
            decode::<ProduceResponse>(ApiKey::Produce, *version, frame);
        }
        1 => {
            if let Some(fetch) = decode::<FetchResponse>(ApiKey::Fetch, *version, frame) {
                fetched(fetch);
            }
        }
        2 => {
            decode::<ListOffsetsResponse>(ApiKey::ListOffsets, *version, frame);
        }
        3 => {
            decode::<MetadataResponse>(ApiKey::Metadata, *version, frame);
        }
        4 => {
            decode::<ApiVersionsResponse>(ApiKey::ApiVersions, *version, frame);
        }
        5 => {
            decode::<CreateTopicsResponse>(ApiKey::CreateTopics, *version, frame);
        }
        6 => {
            decode::<CreatePartitionsResponse>(ApiKey::CreatePartitions, *version, frame);
        }
        7 => {
            decode::<DeleteTopicsResponse>(ApiKey::DeleteTopics, *version, frame);
        }
        8 => {
            decode::<FindCoordinatorResponse>(ApiKey::FindCoordinator, *version, frame);
        }
        9 => {
            if let Some(join) = decode::<JoinGroupResponse>(ApiKey::JoinGroup, *version, frame) {
                for m in join.members {
                    let _ = decode_subscription(
                        m.member_id.as_str(),
                        m.group_instance_id.as_deref(),
                        m.metadata,
                    );
                }
            }
        }
        10 => {
            if let Some(sync) = decode::<SyncGroupResponse>(ApiKey::SyncGroup, *version, frame) {
                let _ = decode_assignment(sync.assignment);
            }
        }
        11 => {
            decode::<HeartbeatResponse>(ApiKey::Heartbeat, *version, frame);
        }
        12 => {
            decode::<LeaveGroupResponse>(ApiKey::LeaveGroup, *version, frame);
        }
        13 => {
            decode::<OffsetCommitResponse>(ApiKey::OffsetCommit, *version, frame);
        }
        14 => {
            decode::<OffsetFetchResponse>(ApiKey::OffsetFetch, *version, frame);
        }
        15 => {
            decode::<InitProducerIdResponse>(ApiKey::InitProducerId, *version, frame);
        }
        16 => {
            decode::<AddPartitionsToTxnResponse>(ApiKey::AddPartitionsToTxn, *version, frame);
        }
        17 => {
            decode::<AddOffsetsToTxnResponse>(ApiKey::AddOffsetsToTxn, *version, frame);
        }
        18 => {
            decode::<TxnOffsetCommitResponse>(ApiKey::TxnOffsetCommit, *version, frame);
        }
        19 => {
            decode::<EndTxnResponse>(ApiKey::EndTxn, *version, frame);
        }
        20 => {
            decode::<SaslHandshakeResponse>(ApiKey::SaslHandshake, *version, frame);
        }
        _ => {
            decode::<SaslAuthenticateResponse>(ApiKey::SaslAuthenticate, *version, frame);
        }
    }
}

/// Decodes `frame` (correlation id, rest of the header, body) as the connection
/// does, at one of the versions the message type knows.
fn decode<T: Decodable + HeaderVersion + Message>(
    api: ApiKey,
    version: u8,
    mut frame: Bytes,
) -> Option<T> {
    let span = (T::VERSIONS.max - T::VERSIONS.min + 1) as u8;
    let version = T::VERSIONS.min + (version % span) as i16;
    if frame.len() < 4 {
        return None;
    }
    let _correlation_id = frame.split_to(4);
    let body = strip_header_rest(frame, T::header_version(version)).ok()?;
    decode_response::<T>(BROKER, body, api, version).ok()
}

/// Every partition's record data of a decoded Fetch response, read as the
/// consumer reads it.
fn fetched(fetch: FetchResponse) {
    for topic in fetch.responses {
        for p in topic.partitions {
            let Some(records) = p.records else { continue };
            let aborted: Vec<(i64, i64)> = p
                .aborted_transactions
                .unwrap_or_default()
                .iter()
                .map(|a| (a.producer_id.0, a.first_offset))
                .collect();
            read_fetched(records.clone(), 0, true, &aborted, 1 << 20);
            read_fetched(records, p.log_start_offset.max(0), false, &aborted, 64);
        }
    }
}

/// One partition's fetched bytes: `data[0]` chooses whether CRCs are checked
/// and the read-committed filter's budget, `data[1]` the first offset wanted;
/// then an aborted-transaction list of `data[2] % 4` entries (16 bytes each);
/// the rest are the record batches. Read uncommitted and read committed, the
/// records handed out must ascend from the first offset wanted; what read
/// committed hands out, read uncommitted hands out too; every held byte is
/// given back. Each batch that decodes whole must also encode again to the
/// same records.
pub fn record_batches(data: &[u8]) {
    let [flags, start, entries, rest @ ..] = data else {
        return;
    };
    let mut rest = rest;
    let mut aborted = Vec::new();
    for _ in 0..entries % 4 {
        if rest.len() < 16 {
            return;
        }
        let (entry, tail) = rest.split_at(16);
        let pid = i64::from_be_bytes(entry[..8].try_into().unwrap_or_default());
        let first = i64::from_be_bytes(entry[8..].try_into().unwrap_or_default());
        aborted.push((pid, first));
        rest = tail;
    }
    let check_crc = flags & 1 == 1;
    let budget = if flags & 2 == 2 { 1 << 20 } else { 200 };
    let data = Bytes::copy_from_slice(rest);
    read_fetched(data.clone(), *start as i64, check_crc, &aborted, budget);
    reencode(data, check_crc);
}

/// Each batch of `data` whose records all decode, built again by the
/// producer's [`BatchBuilder`] with the same codec, must decode to the same
/// keys, values and headers.
fn reencode(data: Bytes, check_crc: bool) {
    for batch in BatchDecoder::new(data, check_crc) {
        let Ok(batch) = batch else { return };
        let Ok(records) = batch.records().collect::<crate::Result<Vec<_>>>() else {
            continue;
        };
        // A producer never seals an empty batch (compaction leaves them).
        if records.is_empty() {
            continue;
        }
        let mut builder = BatchBuilder::new(1024);
        for r in &records {
            builder.push(
                r.timestamp,
                r.key.as_deref(),
                r.value.as_deref(),
                &r.headers,
            );
        }
        let Some(codec) = Compression::from_id(batch.attributes & 7) else {
            panic!("a batch with an unknown codec decoded");
        };
        let sealed = match builder.seal(codec, ProducerIdentity::default()) {
            Ok(b) => b,
            Err(e) => panic!("records that decoded do not encode again with {codec:?}: {e}"),
        };
        let again: Vec<_> = BatchDecoder::new(sealed, true)
            .flat_map(|b| {
                b.expect("a batch just built decodes")
                    .records()
                    .collect::<Vec<_>>()
            })
            .map(|r| r.expect("a record just built decodes"))
            .collect();
        assert_eq!(again.len(), records.len(), "record count changed");
        for (a, b) in again.iter().zip(&records) {
            assert_eq!(
                (&a.key, &a.value, &a.headers),
                (&b.key, &b.value, &b.headers),
                "a record changed on the way through encode and decode"
            );
        }
    }
}

/// Compressed record data: `data[0]` picks the codec, `data[1]` the record
/// count the header declares; the rest is the batch's compressed records,
/// wrapped in a header with a correct CRC so decoding reaches the codec and
/// the records inside. Then the codec must give back what it compresses.
pub fn compressed_records(data: &[u8]) {
    let [codec, count, payload @ ..] = data else {
        return;
    };
    let codec = Compression::from_id((*codec % 5) as i16).unwrap_or(Compression::None);
    let mut batch = BytesMut::with_capacity(BATCH_HEADER_LEN + payload.len());
    batch.put_i64(0);
    batch.put_i32((BATCH_HEADER_LEN - 12 + payload.len()) as i32);
    batch.put_i32(0);
    batch.put_i8(2);
    batch.put_u32(0);
    batch.put_i16(codec.id());
    batch.put_i32(i32::from(*count).saturating_sub(1));
    batch.put_i64(0);
    batch.put_i64(0);
    batch.put_i64(-1);
    batch.put_i16(-1);
    batch.put_i32(-1);
    batch.put_i32(i32::from(*count));
    batch.put_slice(payload);
    let crc = crc32c::crc32c(&batch[21..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    read_fetched(batch.freeze(), 0, true, &[], 1 << 20);

    let mut packed = BytesMut::new();
    if let Err(e) = codec.compress(payload, &mut packed) {
        panic!("{codec:?} cannot compress {} bytes: {e}", payload.len());
    }
    match codec.decompress(&packed) {
        Ok(back) => assert!(back == payload, "{codec:?} changed the data"),
        Err(e) => panic!("{codec:?} cannot read what it wrote: {e}"),
    }
}

/// A raw snappy block, as librdkafka writes a batch's records: streamed a
/// chunk at a time, it decodes exactly as `snap` decodes it whole, or fails
/// where `snap` does.
pub fn raw_snappy(data: &[u8]) {
    let ours = crate::compression::stream_raw_snappy(data);
    match (ours, crate::compression::snap_decode(data)) {
        (Ok(ours), Some(Ok(snap))) => assert!(ours == snap, "the stream differs from snap"),
        (Err(_), Some(Err(_)) | None) => {}
        (ours, snap) => panic!(
            "stream: {:?}, snap: {:?}",
            ours.map(|v| v.len()),
            snap.map(|r| r.map(|v| v.len()))
        ),
    }
}

/// The consumer-protocol member data of JoinGroup (subscription) and
/// SyncGroup (assignment): whatever decodes must encode and decode again to
/// the same thing.
pub fn assignor_data(data: &[u8]) {
    let data = Bytes::copy_from_slice(data);
    if let Ok(sub) = decode_subscription("member", Some("instance"), data.clone()) {
        if let Ok(encoded) = encode_subscription(
            &sub.topics,
            &sub.owned,
            sub.generation,
            sub.user_data.clone(),
        ) {
            let again = decode_subscription("member", Some("instance"), encoded)
                .expect("a subscription just encoded decodes");
            assert_eq!(again.topics, sub.topics);
            assert_eq!(again.user_data, sub.user_data);
            assert_eq!(again.generation, sub.generation);
            let mut a = again.owned.clone();
            let mut b = sub.owned.clone();
            a.sort();
            b.sort();
            assert_eq!(a, b, "owned partitions changed");
        }
    }
    if let Ok(assignment) = decode_assignment(data) {
        let encoded = encode_assignment(&assignment).expect("an assignment that decoded encodes");
        let again = decode_assignment(encoded).expect("an assignment just encoded decodes");
        let mut a = again.partitions.clone();
        let mut b = assignment.partitions.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "assigned partitions changed");
        assert_eq!(again.user_data, assignment.user_data);
    }
}

/// A member's JoinGroup metadata as the group leader decodes it; `None` when
/// it does not decode (the leader then fails the rebalance with an error).
pub fn member_subscription(member_id: &str, data: &[u8]) -> Option<MemberSubscription> {
    decode_subscription(member_id, None, Bytes::copy_from_slice(data)).ok()
}

/// A short smoke run of fuzz target `name` (`run`), as the tests of each
/// crate do it in CI: every seed, each with every byte at or after
/// `changeable` changed three ways and cut at every length, then every input
/// kept in `fuzz/seeds/<name>` and `fuzz/regressions/<name>`. With
/// `STROM_FUZZ_SEEDS=dir` set the seeds are also written to `dir/<name>`, as
/// a starting corpus for `cargo fuzz`. Returns how many kept inputs ran.
pub fn smoke(name: &str, seeds: &[Vec<u8>], run: fn(&[u8]), changeable: usize) -> usize {
    let out = std::env::var_os("STROM_FUZZ_SEEDS").map(std::path::PathBuf::from);
    for (i, seed) in seeds.iter().enumerate() {
        if let Some(dir) = &out {
            let dir = dir.join(name);
            std::fs::create_dir_all(&dir).expect("the seed directory can be made");
            std::fs::write(dir.join(format!("seed-{i}")), seed).expect("a seed can be written");
        }
        run(seed);
        for at in 0..seed.len() {
            if at < changeable {
                for change in [0x01u8, 0x80, 0xff] {
                    let mut mutated = seed.clone();
                    mutated[at] ^= change;
                    run(&mutated);
                }
            }
            run(&seed[..at]);
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut kept = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
            continue;
        };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).expect("a kept fuzz input reads");
            run(&data);
            kept += 1;
        }
    }
    kept
}

/// The JoinGroup metadata of a member subscribing to `topics`, owning
/// `owned`, with `user_data`: seeds for targets that take member data.
pub fn subscription_bytes(
    topics: &[&str],
    owned: &[crate::TopicPartition],
    generation: i32,
    user_data: &[u8],
) -> Vec<u8> {
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    encode_subscription(
        &topics,
        owned,
        generation,
        Some(Bytes::copy_from_slice(user_data)),
    )
    .expect("a subscription encodes")
    .to_vec()
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::fetch_response::{
        AbortedTransaction, FetchableTopicResponse, PartitionData,
    };
    use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
    use kafka_protocol::messages::{ProducerId, TopicName};
    use kafka_protocol::protocol::StrBytes;

    use std::collections::BTreeMap;

    use super::*;
    use crate::connection::response_frame;
    use crate::group::assignor::MemberAssignment;
    use crate::records::Header;
    use crate::types::TopicPartition;

    /// A batch of `values` at `base` with `codec`; `pid` makes it
    /// transactional, `control` (0 abort, 1 commit) a marker.
    fn batch(
        base: i64,
        values: &[&str],
        codec: Compression,
        pid: i64,
        control: Option<i16>,
    ) -> Vec<u8> {
        let mut b = BatchBuilder::new(64);
        match control {
            Some(kind) => {
                let key = [0u8, 0, 0, kind as u8];
                b.push(5, Some(&key), Some(b"marker"), &[]);
            }
            None => {
                for (i, v) in values.iter().enumerate() {
                    let headers = [Header::new("h", format!("{i}"))];
                    b.push(
                        1000 + i as i64,
                        Some(v.as_bytes()),
                        Some(v.as_bytes()),
                        &headers,
                    );
                }
            }
        }
        let identity = ProducerIdentity {
            producer_id: pid,
            producer_epoch: 0,
            base_sequence: 0,
            transactional: pid >= 0,
        };
        let mut bytes = b
            .seal(codec, identity)
            .expect("a seed batch seals")
            .to_vec();
        bytes[..8].copy_from_slice(&base.to_be_bytes());
        if control.is_some() {
            bytes[22] |= 0x20;
        }
        let crc = crc32c::crc32c(&bytes[21..]);
        bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    /// A log slice: plain batches in every codec, a transaction of producer 7
    /// and its commit marker, an aborted one of producer 9 and its marker.
    fn log() -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(batch(0, &["a", "b"], Compression::None, -1, None));
        out.extend(batch(2, &["c"], Compression::Gzip, -1, None));
        out.extend(batch(3, &["d", "e"], Compression::Snappy, -1, None));
        out.extend(batch(5, &["f"], Compression::Lz4, -1, None));
        out.extend(batch(6, &["g", "h"], Compression::Zstd, -1, None));
        out.extend(batch(8, &["t1", "t2"], Compression::None, 7, None));
        out.extend(batch(10, &["x"], Compression::Lz4, 9, None));
        out.extend(batch(11, &[], Compression::None, 7, Some(1)));
        out.extend(batch(12, &[], Compression::None, 9, Some(0)));
        out
    }

    fn framed<T: kafka_protocol::protocol::Encodable + HeaderVersion + Message>(
        api_index: u8,
        version: i16,
        body: T,
    ) -> Vec<u8> {
        let frame = response_frame(1, version, body);
        let mut out = vec![api_index, (version - T::VERSIONS.min) as u8];
        out.extend_from_slice(&frame[4..]);
        out
    }

    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let owned = [TopicPartition::new("a", 0), TopicPartition::new("b", 1)];
        let subscription = encode_subscription(
            &["a".to_owned(), "b".to_owned()],
            &owned,
            3,
            Some(Bytes::from_static(br#"{"url":"http://w:1","standby":[1]}"#)),
        )
        .expect("a seed subscription encodes");
        let assignment = encode_assignment(&MemberAssignment {
            partitions: owned.to_vec(),
            user_data: Some(Bytes::from_static(b"{}")),
        })
        .expect("a seed assignment encodes");
        let fetch =
            FetchResponse::default().with_responses(vec![FetchableTopicResponse::default()
                .with_topic(TopicName(StrBytes::from_static_str("t")))
                .with_partitions(vec![PartitionData::default()
                    .with_high_watermark(13)
                    .with_aborted_transactions(Some(vec![AbortedTransaction::default()
                        .with_producer_id(ProducerId(9))
                        .with_first_offset(10)]))
                    .with_records(Some(Bytes::from(log())))])]);
        let join = JoinGroupResponse::default()
            .with_protocol_name(Some(StrBytes::from_static_str("cooperative-sticky")))
            .with_members(vec![JoinGroupResponseMember::default()
                .with_member_id(StrBytes::from_static_str("m-1"))
                .with_metadata(subscription.clone())]);
        let sync = SyncGroupResponse::default().with_assignment(assignment.clone());
        let mut seeds = vec![
            ("response", framed(1, 12, fetch.clone())),
            ("response", framed(1, 4, fetch)),
            ("response", framed(9, 7, join)),
            ("response", framed(10, 4, sync)),
            ("response", framed(3, 12, MetadataResponse::default())),
            ("assignor_data", subscription.to_vec()),
            ("assignor_data", assignment.to_vec()),
        ];
        let mut batches = vec![3, 0, 1];
        batches.extend(9i64.to_be_bytes());
        batches.extend(10i64.to_be_bytes());
        batches.extend(log());
        seeds.push(("record_batches", batches));
        for codec in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let plain = batch(0, &["k1", "k2", "k3"], Compression::None, -1, None);
            let mut packed = BytesMut::new();
            codec
                .compress(&plain[BATCH_HEADER_LEN..], &mut packed)
                .expect("seed records compress");
            let mut input = vec![codec.id() as u8, 3];
            input.extend_from_slice(&packed);
            seeds.push(("compressed_records", input));
        }
        // Over 64 KiB decompressed (chunk ends), in few bytes.
        let rows: Vec<u8> = (0..12_000)
            .flat_map(|i| format!("key-{}\n", i % 5).into_bytes())
            .collect();
        let block = snap::raw::Encoder::new().compress_vec(&rows);
        seeds.push(("raw_snappy", block.expect("seed rows compress")));
        seeds
    }

    fn target(name: &str) -> fn(&[u8]) {
        match name {
            "response" => response,
            "record_batches" => record_batches,
            "compressed_records" => compressed_records,
            "raw_snappy" => raw_snappy,
            _ => assignor_data,
        }
    }

    /// The CI's short smoke run of the client's fuzz targets.
    #[test]
    fn fuzz_targets_smoke() {
        let mut by_target: BTreeMap<&str, Vec<Vec<u8>>> = BTreeMap::new();
        for (name, seed) in seeds() {
            by_target.entry(name).or_default().push(seed);
        }
        for (name, seeds) in by_target {
            // Changed bytes inside a response body can make kafka-protocol
            // reserve memory for an array count no frame could hold, which
            // aborts the process (see fuzz/README.md); the smoke run changes
            // only the API and version bytes of responses.
            let changeable = match name {
                "response" => 2,
                // Its header and first elements: each run decodes 72 KB.
                "raw_snappy" => 64,
                _ => usize::MAX,
            };
            let kept = smoke(name, &seeds, target(name), changeable);
            println!("{name}: {} seeds, {kept} kept inputs", seeds.len());
        }
    }

    /// The seeds reach the deep paths: the fetch seed's records come out of
    /// both read paths, so a mutation has something to break.
    #[test]
    fn seeds_decode() {
        let data = Bytes::from(log());
        let records: Vec<_> = BatchDecoder::new(data, true)
            .map(|b| b.expect("seed batch decodes"))
            .filter(|b| !b.is_control())
            .flat_map(|b| {
                b.records()
                    .map(|r| r.expect("seed record"))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(records.len(), 11);
    }
}
