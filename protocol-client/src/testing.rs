//! A scripted broker for unit tests: one node holding one topic. It answers
//! ApiVersions and Metadata itself and hands every other request to the test.

use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::connection::response_frame;

/// One request as the handler sees it: API, version, correlation id and body.
pub(crate) struct Incoming {
    pub api: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    pub body: Bytes,
}

/// Starts the broker; `apis` are the (API, max version) pairs it offers besides
/// ApiVersions and Metadata, `handle` answers those with a whole response frame
/// (see [`response_frame`]). Returns `host:port`.
pub(crate) async fn scripted_broker<F>(
    topic: &'static str,
    partitions: i32,
    apis: &[(ApiKey, i16)],
    handle: F,
) -> String
where
    F: Fn(Incoming) -> Vec<u8> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut offered: Vec<(i16, i16)> = apis.iter().map(|(a, v)| (*a as i16, *v)).collect();
    offered.extend([
        (ApiKey::ApiVersions as i16, 3),
        (ApiKey::Metadata as i16, 12),
    ]);
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (handle, offered) = (handle.clone(), offered.clone());
            tokio::spawn(async move {
                loop {
                    let Ok(len) = sock.read_i32().await else {
                        return;
                    };
                    let mut frame = vec![0u8; len as usize];
                    if sock.read_exact(&mut frame).await.is_err() {
                        return;
                    }
                    let mut body = Bytes::from(frame);
                    let api = ApiKey::try_from(i16::from_be_bytes([body[0], body[1]])).unwrap();
                    let version = i16::from_be_bytes([body[2], body[3]]);
                    let header =
                        RequestHeader::decode(&mut body, api.request_header_version(version))
                            .unwrap();
                    let cid = header.correlation_id;
                    let out = match api {
                        ApiKey::ApiVersions => response_frame(
                            cid,
                            version,
                            ApiVersionsResponse::default().with_api_keys(
                                offered
                                    .iter()
                                    .map(|&(k, max)| {
                                        ApiVersion::default().with_api_key(k).with_max_version(max)
                                    })
                                    .collect(),
                            ),
                        ),
                        ApiKey::Metadata => response_frame(
                            cid,
                            version,
                            MetadataResponse::default()
                                .with_brokers(vec![MetadataResponseBroker::default()
                                    .with_node_id(BrokerId(0))
                                    .with_host(StrBytes::from_string(addr.ip().to_string()))
                                    .with_port(addr.port() as i32)])
                                .with_topics(vec![MetadataResponseTopic::default()
                                    .with_name(Some(TopicName(StrBytes::from_static_str(topic))))
                                    .with_partitions(
                                        (0..partitions)
                                            .map(|p| {
                                                MetadataResponsePartition::default()
                                                    .with_partition_index(p)
                                                    .with_leader_id(BrokerId(0))
                                            })
                                            .collect(),
                                    )]),
                        ),
                        _ => handle(Incoming {
                            api,
                            version,
                            correlation_id: cid,
                            body,
                        }),
                    };
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr.to_string()
}
