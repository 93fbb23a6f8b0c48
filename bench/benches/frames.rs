//! Encode/decode cost of one `deliver` frame as JSON (text frames) and protobuf (binary
//! frames), at a small and a large payload.

use chatify_proto::Message as _;
use chatify_proto::client::v1::ServerFrame;
use chatify_proto::json;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("deliver_frame");
    for content_bytes in [64_usize, 4096] {
        let frame = chatify_bench::sample_deliver(content_bytes);
        let protobuf_frame = ServerFrame {
            frame: Some(frame.clone()),
        };
        let json_bytes = json::encode_server_frame(&frame);
        let protobuf_bytes = protobuf_frame.encode_to_vec();

        group.throughput(Throughput::Bytes(json_bytes.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("json_encode", content_bytes),
            &frame,
            |b, f| b.iter(|| json::encode_server_frame(f)),
        );
        group.bench_with_input(
            BenchmarkId::new("json_decode", content_bytes),
            &json_bytes,
            |b, bytes| b.iter(|| json::decode_server_frame(bytes).expect("valid")),
        );
        group.throughput(Throughput::Bytes(protobuf_bytes.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("protobuf_encode", content_bytes),
            &protobuf_frame,
            |b, f| b.iter(|| f.encode_to_vec()),
        );
        group.bench_with_input(
            BenchmarkId::new("protobuf_decode", content_bytes),
            &protobuf_bytes,
            |b, bytes| b.iter(|| ServerFrame::decode(bytes.as_slice()).expect("valid")),
        );
    }
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
