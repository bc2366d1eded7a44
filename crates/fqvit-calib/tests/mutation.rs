//! The engine against damaged artifacts: seeded random mutations of a small artifact (header
//! JSON values and keys, the metadata's and the program's JSON, tensor bytes, shapes, dtypes,
//! offsets, truncation), each loaded and run on one image under `catch_unwind`. Each must give
//! an error or a run with finite logits of the right length, never a panic.
//!
//! `FQVIT_MUTATIONS=N` runs N mutations (default 10,000, a few seconds in a release-optimised
//! engine); `FQVIT_MUTATION_SEED=S` starts from another seed.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};

use common::tiny::{calibrated_heads, images, integer_twin};
use fqvit_engine::{Engine, Images};
use serde_json::Value;

/// SplitMix64: the mutation stream, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A safetensors file as its header and its data.
struct File {
    header: Value,
    data: Vec<u8>,
}

impl File {
    fn parse(bytes: &[u8]) -> File {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        File {
            header: serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
            data: bytes[8 + n..].to_vec(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).unwrap();
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header);
        out.extend(&self.data);
        out
    }
}

/// Paths to every leaf of a JSON value (object keys and array indices).
fn leaves(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                path.push(Value::String(k.clone()));
                leaves(v, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(Value::from(i));
                leaves(v, path, out);
                path.pop();
            }
        }
        _ => return out.push(path.clone()),
    }
    // A whole object or array is a node too.
    if !path.is_empty() {
        out.push(path.clone());
    }
}

fn at<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, key| match key {
        Value::String(k) => &mut v[k.as_str()],
        Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

/// Replaces a random node of `v` (a leaf or a whole subtree) by another value, or removes or
/// renames an object key; says what it did.
fn mutate_json(v: &mut Value, rng: &mut Rng) -> String {
    let mut paths = Vec::new();
    leaves(v, &mut Vec::new(), &mut paths);
    let path = paths[rng.below(paths.len())].clone();
    let (parent, last) = path.split_at(path.len() - 1);
    let choice = rng.below(12);
    if choice == 11 {
        // Remove or rename the key (or drop the array element).
        return match (at(v, parent), &last[0]) {
            (Value::Object(map), Value::String(k)) => {
                let old = map.remove(k).unwrap();
                if rng.below(2) == 0 {
                    map.insert(format!("{k}_"), old);
                    format!("renamed {path:?}")
                } else {
                    format!("removed {path:?}")
                }
            }
            (Value::Array(items), Value::Number(i)) => {
                items.remove(i.as_u64().unwrap() as usize);
                format!("removed {path:?}")
            }
            _ => "nothing".into(),
        };
    }
    let node = at(v, &path);
    let what = match choice {
        0 => Value::from(0),
        1 => Value::from(-1),
        2 => Value::from(1u64 << 40),
        3 => Value::from(3.5),
        4 => Value::from(1e30),
        5 => Value::from(""),
        6 => Value::from("relu"),
        7 => Value::Null,
        8 => Value::Bool(rng.below(2) == 1),
        9 => Value::Array(vec![]),
        _ => match &*node {
            Value::Number(n) => Value::from(n.as_i64().unwrap_or(0).wrapping_add(1)),
            other => Value::Array(vec![other.clone()]),
        },
    };
    let text = format!("{path:?} = {what}");
    *node = what;
    text
}

/// One mutation of `original`: the file's bytes and what was done.
fn mutate(original: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let mut file = File::parse(original);
    let kind = rng.below(8);
    let what = match kind {
        // Truncation anywhere.
        0 => {
            let cut = rng.below(original.len());
            return (original[..cut].to_vec(), format!("truncated at {cut}"));
        }
        // A few data bytes, random or extreme (NaN and infinite floats, ±128 codes).
        1 | 2 => {
            let n = 1 + rng.below(4);
            for _ in 0..n {
                let i = rng.below(file.data.len());
                file.data[i] = [0x00, 0xff, 0x7f, 0x80, rng.next() as u8][rng.below(5)];
            }
            format!("{n} data bytes")
        }
        // The header's tensor entries (dtype, shape, offsets).
        3 | 4 => {
            let names: Vec<String> = file
                .header
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| *k != "__metadata__")
                .cloned()
                .collect();
            let name = &names[rng.below(names.len())];
            let mut entry = file.header[name.as_str()].take();
            let what = mutate_json(&mut entry, rng);
            file.header[name.as_str()] = entry;
            format!("tensor {name}: {what}")
        }
        // The provenance's JSON or the program's JSON (strings in the metadata).
        _ => {
            let key = if kind == 7 { "fqvit-program" } else { "fqvit" };
            let text = file.header["__metadata__"][key].as_str().unwrap().to_owned();
            let mut v: Value = serde_json::from_str(&text).unwrap();
            let what = mutate_json(&mut v, rng);
            file.header["__metadata__"][key] = Value::String(v.to_string());
            format!("metadata {key}: {what}")
        }
    };
    (file.bytes(), what)
}

#[test]
fn damaged_artifacts_give_errors_or_runs_never_panics() {
    let count: usize =
        std::env::var("FQVIT_MUTATIONS").map_or(10_000, |v| v.parse().expect("FQVIT_MUTATIONS"));
    let seed: u64 =
        std::env::var("FQVIT_MUTATION_SEED").map_or(1, |v| v.parse().expect("FQVIT_MUTATION_SEED"));
    let dir = tempfile::tempdir().unwrap();
    let c = calibrated_heads(dir.path(), true, 2, integer_twin());
    let original = std::fs::read(&c.path).unwrap();
    let (pixels, _) = images(&c.cfg, 3, 1);
    let classes = c.cfg.num_classes as usize;
    assert!(Engine::load(&c.path).unwrap().run(Images::Pixels(&pixels)).is_ok());

    // Panic messages go to a buffer per thread, printed for the first few failures only.
    type Messages = Mutex<std::collections::HashMap<std::thread::ThreadId, String>>;
    let messages: Arc<Messages> = Arc::default();
    let sink = Arc::clone(&messages);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        sink.lock().unwrap().insert(std::thread::current().id(), info.to_string());
    }));
    // Workers take every `workers`-th mutation, each engine on a one-thread rayon pool: the
    // tiny model's ops are too small to share, and waking pool threads for each cost more than
    // the ops themselves. Mutation `i` draws from its own stream, so it reproduces alone.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let outcomes: Vec<(usize, usize, Vec<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (original, pixels, messages) = (&original, &pixels, &messages);
                let path = dir.path().join(format!("mutated-{w}.safetensors"));
                scope.spawn(move || {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
                    let (mut errors, mut runs, mut bad) = (0, 0, Vec::new());
                    for i in (w..count).step_by(workers) {
                        let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i as u64);
                        let (bytes, what) = mutate(original, &mut rng);
                        std::fs::write(&path, &bytes).unwrap();
                        let outcome = pool.install(|| {
                            catch_unwind(AssertUnwindSafe(|| {
                                Engine::load(&path).and_then(|e| e.run(Images::Pixels(pixels)))
                            }))
                        });
                        match outcome {
                            Ok(Ok(l)) if l.len() == classes && l.iter().all(|l| l.is_finite()) => {
                                runs += 1;
                            }
                            Ok(Ok(l)) => bad.push(format!(
                                "mutation {i} ({what}): {} logits, finite: {}",
                                l.len(),
                                l.iter().all(|l| l.is_finite())
                            )),
                            Ok(Err(_)) => errors += 1,
                            Err(_) => {
                                let id = std::thread::current().id();
                                let message = messages.lock().unwrap().remove(&id);
                                bad.push(format!("mutation {i} ({what}): {message:?}"));
                            }
                        }
                    }
                    (errors, runs, bad)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    std::panic::set_hook(previous);
    let errors: usize = outcomes.iter().map(|o| o.0).sum();
    let runs: usize = outcomes.iter().map(|o| o.1).sum();
    let panics: Vec<String> = outcomes.into_iter().flat_map(|o| o.2).collect();
    eprintln!(
        "{count} mutations from seed {seed}: {errors} refused, {runs} ran, {} panicked",
        panics.len()
    );
    assert!(
        panics.is_empty(),
        "{} panics or bad runs, the first:\n{}",
        panics.len(),
        panics[..panics.len().min(8)].join("\n")
    );
}
