//! Processor benchmark (run by scripts/bench-processor against a fresh broker): fills a topic
//! with BENCH_EVENTS events (5% duplicates, 10% reordered within 2 s), then measures in one run
//! the raw consumer read rate of that topic, the raw sink rate (ingest-api, 1000-event batches,
//! one client per partition), and the processor draining the topic into a fresh ingest-api
//! (with its checkpoints: Kafka transactions on the changelog, the local cache). Then it times
//! the restore of one partition holding BENCH_RESTORE_KEYS (1,000,000; 0 skips it) dedup keys,
//! from the changelog alone and from the local cache.

use std::collections::VecDeque;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

/// The processor's allocator, so the raw consumer it is compared with is as cheap as it can be.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PARTITIONS: i32 = 6;
const DEVICES: usize = 200;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn event_json(device: usize, ts: i64) -> String {
    format!(
        r#"{{"deviceId":"bench-{device}","ts":{ts},"latitude":{:.6},"longitude":{:.6}}}"#,
        37.7 + (ts % 1000) as f64 * 1e-5,
        -122.4 - (ts % 777) as f64 * 1e-5
    )
}

/// (device, ts) in arrival order: distinct events with 10% reordered and 5% duplicated.
fn stream(n: usize) -> (Vec<(usize, i64)>, usize) {
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let distinct = n * 100 / 105;
    let mut arrivals: Vec<(i64, u64, usize, i64)> = Vec::with_capacity(n);
    for i in 0..distinct {
        let device = i % DEVICES;
        let ts = 1_700_000_000_000 + (i / DEVICES) as i64 * 10;
        let arrive = if next() % 10 == 0 {
            ts - (next() % 2000) as i64
        } else {
            ts
        };
        arrivals.push((arrive, next(), device, ts));
        if arrivals.len() < n && next() % 20 == 0 {
            arrivals.push((arrive + (next() % 1000) as i64, next(), device, ts));
        }
    }
    arrivals.sort_by_key(|a| (a.0, a.1));
    (arrivals.into_iter().map(|a| (a.2, a.3)).collect(), distinct)
}

async fn produce(brokers: &str, topic: &str, events: &[(usize, i64)]) -> f64 {
    let producer: FutureProducer = service_common::kafka::idempotent_producer(
        &service_common::kafka::connection_from_env(brokers).expect("Kafka settings"),
    )
    .set("linger.ms", "20")
    .set("batch.num.messages", "10000")
    .set("queue.buffering.max.messages", "200000")
    .create()
    .expect("producer");
    let start = Instant::now();
    let mut pending = VecDeque::new();
    for (device, ts) in events {
        let key = format!("bench-{device}");
        let payload = event_json(*device, *ts);
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&payload)) {
                Ok(f) => {
                    pending.push_back(f);
                    break;
                }
                Err(_) => {
                    if let Some(f) = pending.pop_front() {
                        f.await.expect("delivery").expect("delivered");
                    }
                }
            }
        }
        if pending.len() > 150_000 {
            pending
                .pop_front()
                .expect("a delivery is pending")
                .await
                .expect("delivery")
                .expect("delivered");
        }
    }
    for f in pending {
        f.await.expect("delivery").expect("delivered");
    }
    events.len() as f64 / start.elapsed().as_secs_f64()
}

fn raw_consume(brokers: &str, topic: &str, n: usize) -> f64 {
    let consumer: BaseConsumer = service_common::kafka::manual_consumer(
        &service_common::kafka::connection_from_env(brokers).expect("Kafka settings"),
        &format!("bench-raw-{}", std::process::id()),
    )
    .set("fetch.max.bytes", "16777216")
    .create()
    .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition added");
    }
    consumer.assign(&tpl).expect("partitions assigned");
    let start = Instant::now();
    let (mut got, mut bytes) = (0usize, 0usize);
    while got < n {
        if let Some(m) = consumer.poll(Duration::from_secs(5)) {
            let m = m.expect("message");
            // Parse like the processor does, so the comparison is about reading.
            let _: Value = serde_json::from_slice(m.payload().unwrap_or_default()).expect("json");
            bytes += m.payload_len();
            got += 1;
        }
    }
    let _ = bytes;
    n as f64 / start.elapsed().as_secs_f64()
}

fn spawn(bin: &str, envs: &[(&str, String)], log: &std::path::Path) -> Child {
    let f = std::fs::File::create(log).expect("log file created");
    let mut c = Command::new(bin);
    c.envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .env(
            "RUST_LOG",
            std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::from(f.try_clone().expect("log file handle cloned")))
        .stderr(Stdio::from(f));
    c.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"))
}

async fn wait_healthy(url: &str) {
    for _ in 0..300 {
        if reqwest::get(url)
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} not healthy");
}

async fn total(base: &str) -> u64 {
    let body: Value = reqwest::get(format!("{base}/events?size=1"))
        .await
        .expect("GET /events answered")
        .json()
        .await
        .expect("GET /events is JSON");
    body["total"].as_u64().expect("total is a count")
}

async fn raw_sink(base: &str, events: &[(usize, i64)]) -> f64 {
    let bodies: Vec<String> = events
        .chunks(1000)
        .map(|c| {
            format!(
                "[{}]",
                c.iter()
                    .map(|(d, t)| event_json(*d, *t))
                    .collect::<Vec<_>>()
                    .join(",")
            )
        })
        .collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client_id in 0..PARTITIONS as usize {
        let mine: Vec<(usize, String)> = bodies
            .iter()
            .enumerate()
            .filter(|(i, _)| i % PARTITIONS as usize == client_id)
            .map(|(i, b)| (i, b.clone()))
            .collect();
        let url = format!("{base}/events/batch");
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for (i, body) in mine {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", format!("raw-{i}"))
                    .body(body)
                    .send()
                    .await
                    .expect("batch sent");
                assert!(r.status().is_success());
            }
        }));
    }
    for t in tasks {
        t.await.expect("sink client finished");
    }
    events.len() as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let n: usize = env("BENCH_EVENTS", "1000000").parse().expect("BENCH_EVENTS");
    let brokers = env("KAFKA_BROKERS", "127.0.0.1:29092");
    let bin = env("BIN_DIR", "target/release");
    let dir = std::path::PathBuf::from(env("BENCH_DIR", ".local/bench/processor"));
    std::fs::create_dir_all(&dir).expect("bench directory created");
    let topic = format!("bench-{}", std::process::id());
    service_common::kafka::ensure_topic(
        &service_common::kafka::connection_from_env(&brokers).expect("Kafka settings"),
        &topic,
        PARTITIONS,
        1,
    )
    .await
    .expect("topic");

    let (events, distinct) = stream(n);
    println!(
        "bench-processor: {} events ({} distinct, {} duplicates), {DEVICES} devices, {PARTITIONS} partitions",
        events.len(),
        distinct,
        events.len() - distinct
    );
    let produce_rate = produce(&brokers, &topic, &events).await;
    println!("fill topic (idempotent producer)   {produce_rate:>10.0} events/s");

    let consume_rate = tokio::task::spawn_blocking({
        let (b, t, n) = (brokers.clone(), topic.clone(), events.len());
        move || raw_consume(&b, &t, n)
    })
    .await
    .expect("raw consume finished");
    println!("raw consumer read + parse          {consume_rate:>10.0} events/s");

    let raw_port = 25000;
    let mut raw_api = spawn(
        &format!("{bin}/ingest-api"),
        &[
            ("PORT", raw_port.to_string()),
            ("BIND_ADDR", "127.0.0.1".into()),
            ("DATABASE_PATH", dir.join("raw.db").display().to_string()),
        ],
        &dir.join("raw-api.log"),
    );
    let raw_base = format!("http://127.0.0.1:{raw_port}");
    wait_healthy(&format!("{raw_base}/healthz")).await;
    let mut uniq: Vec<(usize, i64)> = events.clone();
    uniq.sort();
    uniq.dedup();
    let sink_rate = raw_sink(&raw_base, &uniq).await;
    let _ = raw_api.kill();
    println!("raw sink (ingest-api, 1000/batch)  {sink_rate:>10.0} events/s");

    let api_port = 25001;
    let mut api = spawn(
        &format!("{bin}/ingest-api"),
        &[
            ("PORT", api_port.to_string()),
            ("BIND_ADDR", "127.0.0.1".into()),
            ("DATABASE_PATH", dir.join("sink.db").display().to_string()),
        ],
        &dir.join("api.log"),
    );
    let base = format!("http://127.0.0.1:{api_port}");
    wait_healthy(&format!("{base}/healthz")).await;
    let idle = env("BENCH_IDLE_TIMEOUT_MS", "1000");
    let start = Instant::now();
    let mut proc = spawn(
        &format!("{bin}/stream-processor"),
        &[
            ("KAFKA_BROKERS", brokers.clone()),
            ("KAFKA_TOPIC", topic.clone()),
            ("DLQ_TOPIC", format!("{topic}-dlq")),
            ("INGEST_URL", format!("{base}/events/batch")),
            ("GROUP_ID", format!("{topic}-group")),
            ("GROUP_INSTANCE_ID", format!("{topic}-member")),
            ("STATE_PATH", dir.join("state.db").display().to_string()),
            ("ADMIN_PORT", "25002".into()),
            ("ADMIN_BIND_ADDR", "127.0.0.1".into()),
            ("TOPIC_PARTITIONS", PARTITIONS.to_string()),
            ("IDLE_TIMEOUT_MS", idle.clone()),
        ],
        &dir.join("processor.log"),
    );
    // When the sink first held an event, and when it held 90% of them.
    let (mut first_stored, mut ninety) = (None, None);
    loop {
        let t = total(&base).await as usize;
        if t > 0 && first_stored.is_none() {
            first_stored = Some(start.elapsed().as_secs_f64());
        }
        if t * 10 >= distinct * 9 && ninety.is_none() {
            ninety = Some(start.elapsed().as_secs_f64());
        }
        if t >= distinct {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1800),
            "processor did not drain in 30 min ({t} of {distinct})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain = start.elapsed().as_secs_f64();
    let proc_rate = events.len() as f64 / drain;
    // Where the processor's time went, from its own metrics.
    if let Ok(text) = reqwest::get("http://127.0.0.1:25002/metrics")
        .await
        .and_then(|r| Ok(r.text()))
    {
        let text = text.await.unwrap_or_default();
        let value = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        println!(
            "processor: {:.0} checkpoints taking {:.2} s in all, {:.0} sink requests taking {:.2} s in all",
            value("stream_processor_checkpoint_duration_seconds_count"),
            value("stream_processor_checkpoint_duration_seconds_sum"),
            value("stream_processor_sink_request_duration_seconds_count"),
            value("stream_processor_sink_request_duration_seconds_sum"),
        );
    }
    let cpu = cpu_seconds(proc.id());
    let _ = proc.kill();
    let _ = api.kill();
    println!("processor drain into ingest-api    {proc_rate:>10.0} events/s  ({drain:.1} s, from process start, idle flush {idle} ms)");
    if let (Some(a), Some(b)) = (first_stored, ninety) {
        println!(
            "  of which: first event stored at {a:.1} s, 90% stored at {b:.1} s ({:.0} events/s between)",
            (distinct as f64 * 0.9) / (b - a).max(1e-3)
        );
    }
    if let Some(cpu) = cpu {
        println!(
            "processor CPU (user+sys)           {cpu:>10.2} s  ({:.1} us/event)",
            cpu * 1e6 / events.len() as f64
        );
    }
    let floor = consume_rate.min(sink_rate);
    println!(
        "ratio processor / min(raw consume, raw sink) = {:.2} (this round)",
        proc_rate / floor
    );
    let keys: usize = env("BENCH_RESTORE_KEYS", "1000000")
        .parse()
        .expect("BENCH_RESTORE_KEYS");
    if keys > 0 {
        tokio::task::spawn_blocking(move || restore_bench(&brokers, &topic, &dir, keys))
            .await
            .expect("restore bench");
    }
}

/// User plus system CPU time of a process so far (Linux `/proc`), in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Writes one partition's state with `keys` dedup keys (1,000 devices) as a committed snapshot
/// on a changelog, then restores it from the changelog and from the local cache.
fn restore_bench(brokers: &str, topic: &str, dir: &std::path::Path, keys: usize) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use stream_processor::changelog::{Commit, PartitionState, Record};
    use stream_processor::store::{Position, StateStore};
    let changelog = format!("{topic}-restore-changelog");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(service_common::kafka::ensure_topic(
        &service_common::kafka::connection_from_env(brokers).expect("Kafka settings"),
        &changelog,
        1,
        1,
    ))
    .expect("changelog topic");
    let devices = 1000usize;
    let per_device = keys.div_ceil(devices);
    let mut state = PartitionState {
        resume_offset: Some(keys as i64),
        decided_offset: keys as i64,
        next_seq: 1000,
        ..PartitionState::default()
    };
    for d in 0..devices {
        let id = format!("bench-device-{d}");
        let base = 1_700_000_000_000i64;
        state.marks.insert(
            id.clone(),
            telemetry_core::DeviceMark {
                max_ts: base + per_device as i64 * 10,
                released_max: base + per_device as i64 * 10 - 5000,
            },
        );
        let m = state.keys.entry(id).or_default();
        for i in 0..per_device {
            m.insert(base + i as i64 * 10, ((37.7f64).to_bits(), (-122.4f64).to_bits()));
        }
    }
    let mut records = state.to_records("bench-1");
    if let Some(Record::Commit(Commit { resume_offset, .. })) = records.last_mut() {
        *resume_offset = keys as i64;
    }
    let producer: ThreadedProducer<DefaultProducerContext> = service_common::kafka::transactional_producer(
        &service_common::kafka::connection_from_env(brokers).expect("Kafka settings"),
        &format!("{changelog}-writer"),
    )
    .set("message.max.bytes", "16777216")
    .create()
    .expect("producer");
    producer.init_transactions(Duration::from_secs(30)).expect("init");
    producer.begin_transaction().expect("begin");
    let mut bytes = 0;
    for r in &records {
        let payload = r.encode();
        bytes += payload.len();
        loop {
            match producer.send(
                BaseRecord::<(), [u8]>::to(&changelog)
                    .partition(0)
                    .payload(&payload),
            ) {
                Ok(()) => break,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
    producer
        .commit_transaction(Duration::from_secs(120))
        .expect("commit");
    let timeout = Duration::from_secs(600);
    let from_log = stream_processor::restore::restore(
        &service_common::kafka::connection_from_env(brokers).expect("Kafka settings"),
        &changelog,
        topic,
        0,
        None,
        timeout,
    )
    .expect("restore");
    assert_eq!(
        from_log.state.key_count(),
        state.key_count(),
        "every key restored"
    );
    println!(
        "restore of a partition with {} dedup keys ({} records, {:.1} MB) from the changelog: {:.2} s",
        from_log.state.key_count(),
        from_log.records,
        bytes as f64 / 1e6,
        from_log.seconds
    );
    let position: Position = from_log.position.clone().expect("a committed position");
    let cache = StateStore::open(&dir.join("restore-cache.db"), &changelog, topic).expect("cache");
    cache.replace(0, &from_log.state, &position);
    rt.block_on(cache.sync()).expect("cache written");
    let start = Instant::now();
    let cached = rt.block_on(cache.load(0)).expect("load");
    let from_cache = stream_processor::restore::restore(
        &service_common::kafka::connection_from_env(brokers).expect("Kafka settings"),
        &changelog,
        topic,
        0,
        cached,
        timeout,
    )
    .expect("restore");
    assert_eq!(from_cache.state.key_count(), state.key_count());
    println!(
        "restore of the same partition from the local cache (source {}): {:.2} s",
        from_cache.source.as_str(),
        start.elapsed().as_secs_f64()
    );
}
