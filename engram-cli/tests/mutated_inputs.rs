//! Corrupt inputs are errors, never panics or aborts: seeded random mutations of a
//! checkpoint, its config.json and tokenizer.json, and the golden files, each fed to
//! `inspect`, the runtime (open, then a step through every layer) and `golden`.
//!
//! The mutations aim at what a reader trusts: the header length, numbers and shapes in
//! the header, dtypes, truncation, and JSON values (zero, huge, negative, wrong type,
//! missing). A size that is only checked after it was used to allocate aborts the whole
//! test process, which fails it too. `ENGRAM_MUTATION_CASES` sets the number of rounds
//! (default 200; each round mutates every input once), `ENGRAM_MUTATION_SEED` the seed.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::{fake_model, write_small};
use engram_cli::golden::{run_golden, GoldenBackend};
use engram_cli::TokenizerContext;
use engram_core::testing::TestRng;
use engram_plugin::{EngramRuntime, OpenOptions, SequenceInput};
use serde_json::{json, Value};

const GOLDEN: [&str; 2] = [
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/forward_demo_small.safetensors"
    ),
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/forward_v41_small.safetensors"
    ),
];

/// A tokenizer of 300 words: loading it costs nothing, unlike the real one.
fn tiny_tokenizer() -> Value {
    let vocab: serde_json::Map<String, Value> =
        (0..300).map(|i| (format!("w{i}"), json!(i))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    })
}

fn pick<'a, T>(rng: &mut TestRng, items: &'a [T]) -> &'a T {
    &items[rng.next_u64() as usize % items.len()]
}

/// The header text and the data after it, or `None` if `file` has no readable header.
fn split_header(file: &[u8]) -> Option<(String, &[u8])> {
    let len = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    let header = std::str::from_utf8(file.get(8..8usize.checked_add(len)?)?).ok()?;
    Some((header.to_string(), &file[8 + len..]))
}

fn join_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// `header` with the text between `from` and the next `until` at a random match replaced.
fn replace_random(rng: &mut TestRng, header: &str, from: &str, until: char, by: &str) -> String {
    let starts: Vec<usize> = header.match_indices(from).map(|(i, _)| i).collect();
    if starts.is_empty() {
        return header.to_string();
    }
    let start = pick(rng, &starts) + from.len();
    let end = start + header[start..].find(until).unwrap_or(0);
    format!("{}{by}{}", &header[..start], &header[end..])
}

/// One random corruption of a safetensors file.
fn mutate_safetensors(rng: &mut TestRng, file: &[u8]) -> Vec<u8> {
    let (header, data) = split_header(file).expect("a valid file to start from");
    let header_end = 8 + header.len();
    let mut out = file.to_vec();
    match rng.next_u64() % 6 {
        0 => out.truncate(rng.next_u64() as usize % file.len()),
        1 => {
            for _ in 0..1 + rng.next_u64() % 4 {
                let at = rng.next_u64() as usize % header_end;
                out[at] = rng.next_u64() as u8;
            }
        }
        2 => {
            let len = header.len() as u64;
            let by = *pick(rng, &[0, 1, 7, len - 1, len + 1, 1 << 40, u64::MAX]);
            out[..8].copy_from_slice(&by.to_le_bytes());
        }
        3 => {
            let numbers = ["0", "1", "7", "65", "4294967296", "9223372036854775807"];
            let by = pick(rng, &numbers);
            let key = *pick(rng, &["\"data_offsets\":[", "\"data_offsets\":[0,"]);
            out = join_header(&replace_random(rng, &header, key, ']', by), data);
        }
        4 => {
            let dtypes = [
                "F32", "BF16", "F16", "F8_E4M3", "F8_E8M0", "I64", "U8", "BOOL",
            ];
            let by = pick(rng, &dtypes);
            out = join_header(&replace_random(rng, &header, "\"dtype\":\"", '"', by), data);
        }
        _ => {
            let shapes = [
                "",
                "0",
                "1,1",
                "0,16",
                "3,3,3",
                "18446744073709551615,16",
                "4611686018427387904,4",
            ];
            let by = pick(rng, &shapes);
            out = join_header(&replace_random(rng, &header, "\"shape\":[", ']', by), data);
        }
    }
    out
}

/// One random corruption somewhere inside a JSON value.
fn mutate_json(rng: &mut TestRng, v: &mut Value) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let key = pick(rng, &keys).clone();
            if rng.next_u64().is_multiple_of(5) {
                m.remove(&key);
            } else {
                mutate_json(rng, m.get_mut(&key).unwrap());
            }
        }
        Value::Array(a) if !a.is_empty() => match rng.next_u64() % 4 {
            0 => drop(a.pop()),
            1 => a.push(a[0].clone()),
            _ => {
                let i = rng.next_u64() as usize % a.len();
                mutate_json(rng, &mut a[i]);
            }
        },
        _ => {
            let values = [
                json!(0),
                json!(1),
                json!(-1),
                json!(3),
                json!(100000),
                json!(1u64 << 40),
                json!(u64::MAX),
                json!(1.5),
                json!("x"),
                json!(null),
                json!([]),
            ];
            *v = pick(rng, &values).clone();
        }
    }
}

/// Opens the model at `dir` and, if it opens, runs one step through every layer.
fn open_and_step(dir: &Path) {
    let Ok(Some(rt)) = EngramRuntime::open(dir, OpenOptions::default()) else {
        return;
    };
    let tokens: Vec<u32> = (0..12).map(|i| i * 37 % 300).collect();
    let input = SequenceInput::new(1, &tokens, 0);
    let Ok(mut step) = rt.begin_step(&[input], &[]) else {
        return;
    };
    let hidden = vec![0.5f32; tokens.len() * rt.config().branch_channels()];
    for layer in rt.config().hash.layer_ids.clone() {
        let _ = step.apply_packed(layer, &hidden);
    }
    step.finish();
}

/// Runs `f`; a panic is recorded under `what`.
fn guarded(what: &str, panics: &mut Vec<String>, f: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        panics.push(what.to_string());
    }
}

/// `inspect` and the runtime on the model at `dir`.
fn check_model(dir: &Path, what: &str, panics: &mut Vec<String>) {
    guarded(&format!("{what}: inspect"), panics, || {
        let _ = engram_cli::inspect::inspect(dir);
    });
    guarded(&format!("{what}: runtime"), panics, || open_and_step(dir));
}

#[test]
fn mutated_inputs_are_errors_not_panics() {
    let rounds: u64 = std::env::var("ENGRAM_MUTATION_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let tmp = tempfile::tempdir().unwrap();
    let model = fake_model(tmp.path());
    let tokenizer = tiny_tokenizer();
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let clean = tmp.path().join("clean");
    write_small(&model, &clean, &[]);
    let weights = std::fs::read(clean.join("engram.safetensors")).unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(clean.join("config.json")).unwrap()).unwrap();
    let golden: Vec<Vec<u8>> = GOLDEN.iter().map(|g| std::fs::read(g).unwrap()).collect();
    let golden_tokenizer = TokenizerContext::load(Path::new(common::TOKENIZER)).unwrap();

    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let write = |name: &str, bytes: &[u8]| std::fs::write(work.join(name), bytes).unwrap();
    let reset = || {
        write("engram.safetensors", &weights);
        write("config.json", config.to_string().as_bytes());
        write("tokenizer.json", tokenizer.to_string().as_bytes());
    };
    // The clean copy is consistent and opens: the mutations start from a working model.
    reset();
    assert!(engram_cli::inspect::inspect(&work).unwrap().consistent());
    EngramRuntime::open(&work, OpenOptions::default())
        .unwrap()
        .unwrap();

    let seed = std::env::var("ENGRAM_MUTATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261202);
    let mut rng = TestRng::new(seed);
    let mut panics = Vec::new();
    let golden_path = work.join("golden.safetensors");
    for round in 0..rounds {
        reset();
        write(
            "engram.safetensors",
            &mutate_safetensors(&mut rng, &weights),
        );
        check_model(&work, &format!("round {round}, weights"), &mut panics);

        reset();
        let mut c = config.clone();
        for _ in 0..1 + rng.next_u64() % 3 {
            // Half the time inside the `engram` object, where most sizes come from.
            match rng.next_u64() % 2 {
                0 => mutate_json(&mut rng, &mut c["engram"]),
                _ => mutate_json(&mut rng, &mut c),
            }
        }
        write("config.json", c.to_string().as_bytes());
        check_model(&work, &format!("round {round}, config {c}"), &mut panics);

        reset();
        let mut t = tokenizer.clone();
        for _ in 0..1 + rng.next_u64() % 3 {
            mutate_json(&mut rng, &mut t);
        }
        write("tokenizer.json", t.to_string().as_bytes());
        check_model(&work, &format!("round {round}, tokenizer"), &mut panics);

        let g = pick(&mut rng, &golden);
        std::fs::write(&golden_path, mutate_safetensors(&mut rng, g)).unwrap();
        guarded(
            &format!("round {round}, golden: inspect"),
            &mut panics,
            || {
                let _ = engram_cli::inspect::inspect(&golden_path);
            },
        );
        guarded(&format!("round {round}, golden: run"), &mut panics, || {
            let _ = run_golden(&golden_tokenizer, &golden_path, GoldenBackend::Cpu, None);
        });
    }
    assert!(panics.is_empty(), "panicked: {panics:#?}");
}
