//! Micro-benchmarks of the gateway's wire codecs: WebSocket decode + unmask of client frames,
//! server frame headers, and TCP length-prefix decoding. Figures go to docs/BENCHMARKS.md.

use std::hint::black_box;

use bytes::{BufMut, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use gateway_uring::conn::{tcp, ws};

const FRAME_BYTES_MAX: usize = 1 << 20;

/// A final, masked binary frame as a client sends it.
fn client_frame(out: &mut BytesMut, payload_bytes: usize) {
    let mask = [0x37, 0xFA, 0x21, 0x3D];
    out.put_u8(0x82);
    if payload_bytes < 126 {
        out.put_u8(0x80 | payload_bytes as u8);
    } else if payload_bytes <= 0xFFFF {
        out.put_u8(0x80 | 126);
        out.put_u16(payload_bytes as u16);
    } else {
        out.put_u8(0x80 | 127);
        out.put_u64(payload_bytes as u64);
    }
    out.put_slice(&mask);
    out.extend((0..payload_bytes).map(|i| (i as u8) ^ mask[i % 4]));
}

fn ws_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_decode");
    for payload_bytes in [64, 16 * 1024] {
        let mut wire = BytesMut::new();
        client_frame(&mut wire, payload_bytes);
        let wire = wire.freeze();
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(format!("binary_{payload_bytes}B"), |b| {
            let mut decoder = ws::FrameDecoder::new(FRAME_BYTES_MAX, FRAME_BYTES_MAX);
            // The copy into a fresh buffer is setup, outside the measurement.
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| black_box(decoder.decode(buf)),
                BatchSize::SmallInput,
            );
        });
    }

    // Many small frames in one read: the per-frame overhead.
    let frames = 1000;
    let mut wire = BytesMut::new();
    for _ in 0..frames {
        client_frame(&mut wire, 64);
    }
    let wire = wire.freeze();
    group.throughput(Throughput::Bytes(wire.len() as u64));
    group.bench_function(format!("{frames}x_binary_64B_one_buffer"), |b| {
        let mut decoder = ws::FrameDecoder::new(FRAME_BYTES_MAX, FRAME_BYTES_MAX);
        b.iter_batched_ref(
            || BytesMut::from(&wire[..]),
            |buf| {
                while let Ok(Some(message)) = decoder.decode(buf) {
                    black_box(message);
                }
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn ws_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_encode");
    let payload_bytes = 16 * 1024;
    // The header alone is what each recipient of a shared payload costs: counted per header,
    // as bytes of a payload it never touches would be a meaningless figure.
    group.throughput(Throughput::Elements(1));
    group.bench_function("frame_header_16KiB", |b| {
        b.iter(|| {
            black_box(ws::frame_header(
                ws::Opcode::Binary,
                black_box(payload_bytes),
            ))
        });
    });
    let payload = vec![7u8; 64];
    group.throughput(Throughput::Bytes(payload.len() as u64));
    group.bench_function("encode_frame_64B", |b| {
        let mut out = BytesMut::with_capacity(1024);
        b.iter(|| {
            out.clear();
            ws::encode_frame(ws::Opcode::Binary, black_box(&payload), &mut out);
            black_box(out.len())
        });
    });
    group.finish();
}

fn tcp_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("tcp_decode");
    for (frames, payload_bytes) in [(1, 16 * 1024), (1000, 64)] {
        let mut wire = BytesMut::new();
        for _ in 0..frames {
            wire.put_slice(&tcp::length_prefix(payload_bytes));
            wire.put_bytes(7, payload_bytes);
        }
        let wire = wire.freeze();
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(format!("{frames}x_{payload_bytes}B_one_buffer"), |b| {
            let mut decoder = tcp::LengthDecoder::new(FRAME_BYTES_MAX);
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| {
                    while let Ok(Some(frame)) = decoder.decode(buf) {
                        black_box(frame);
                    }
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, ws_decode, ws_encode, tcp_decode);
criterion_main!(benches);
