//! CPU time of the link's zstd streams with one and with two worker threads, several
//! streams compressing at once (a gang's connections on the same cores).
//!
//!     cargo run --release -p migration --example stream_workers -- [FILE] [--level N] [--streams N] [--rounds N]
//!
//! Each stream compresses FILE (default: 192 MiB of made-up, half-compressible blocks) in
//! 1 MiB frames, each flushed, as the source's background stream does. Prints, per round and
//! worker count, the process's CPU seconds, the wall time, the compressed size (the same for
//! both counts: zstd's output does not depend on it) and what zstd holds per stream.

use std::time::Instant;

use migration::stream::{StreamEncoder, StreamId};

/// CPU seconds of this process so far (all threads: zstd's workers too).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("procfs");
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime, in clock ticks of 1/100 s (Linux's USER_HZ).
    (ticks(11) + ticks(12)) / 100.0
}

fn made_up(bytes: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(bytes);
    while out.len() < bytes {
        for i in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Half of each block random, half a repeating pattern.
            out.push(if i < 2048 { x as u8 } else { (i % 61) as u8 });
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default);
    let level = flag("--level", 4) as i32;
    let streams = flag("--streams", 3);
    let rounds = flag("--rounds", 2);
    let data = match args.first().filter(|a| !a.starts_with("--")) {
        Some(path) => std::fs::read(path).expect("read FILE"),
        None => made_up(192 << 20),
    };
    println!("{streams} streams at once, level {level}, {} MiB each", data.len() >> 20);
    for round in 1..=rounds {
        for workers in [1, 2] {
            let (cpu, wall) = (cpu_seconds(), Instant::now());
            let sizes: Vec<(usize, usize)> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..streams)
                    .map(|_| {
                        s.spawn(|| {
                            let mut enc = StreamEncoder::with_workers(StreamId::Background, level, workers).expect("zstd context");
                            let bytes = data.chunks(1 << 20).map(|frame| enc.encode(frame, level).expect("encode").len()).sum::<usize>();
                            (bytes, enc.memory())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("encoder thread")).collect()
            });
            println!(
                "round {round}, {workers} worker(s): {:.2} CPU s, {:.2} s wall, {:.1} MiB per stream, zstd holds {} MiB per stream",
                cpu_seconds() - cpu,
                wall.elapsed().as_secs_f64(),
                sizes[0].0 as f64 / 1048576.0,
                sizes[0].1 >> 20
            );
        }
    }
}
