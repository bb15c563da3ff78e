//! Checkpoints: a run stopped, saved and resumed gives bit-for-bit the losses of an uninterrupted
//! run; damaged or mismatched checkpoints are errors that say so.

use strata::models::interface::InterfaceConfig;
use strata::optim::AdamConfig;
use strata::train::checkpoint;
use strata::train::side_by_side::{HeadKind, Pair};
use strata::train::synthetic::{pack, SyntheticWorld};
use strata::PackedBatch;

fn batches() -> Vec<(strata::Tensor, PackedBatch, Vec<Vec<usize>>)> {
    let world = SyntheticWorld::new(5, 7, 16, 6);
    let corpus = world.corpus(6, 24);
    corpus
        .utterances
        .chunks(4)
        .map(|c| {
            let refs: Vec<_> = c.iter().collect();
            let (stack, lengths) = pack(&refs);
            (
                stack,
                PackedBatch::from_lengths(&lengths).unwrap(),
                c.iter().map(|u| u.phones.clone()).collect(),
            )
        })
        .collect()
}

fn pair(seed: u64) -> Pair {
    Pair::new(
        "hconv",
        &InterfaceConfig::hconv(7, 16),
        HeadKind::Ctc { vocab: 7 },
        AdamConfig::adamw(3e-3),
        Some(1.0),
        seed,
    )
    .unwrap()
}

#[test]
fn resume_is_bit_for_bit_and_damage_is_detected() {
    let data = batches();
    let step = |p: &mut Pair, i: usize| {
        let (s, b, t) = &data[i % data.len()];
        p.train_step(s, b, t).unwrap()
    };
    let mut straight = pair(1);
    let want: Vec<f32> = (0..12).map(|i| step(&mut straight, i)).collect();

    let dir = std::env::temp_dir().join(format!("strata-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut first = pair(1);
    for (i, want_loss) in want.iter().enumerate().take(6) {
        assert_eq!(step(&mut first, i), *want_loss);
    }
    checkpoint::save(
        &dir,
        &first.store,
        &first.optimizer,
        &serde_json::json!({"next_batch": 6}),
    )
    .unwrap();
    drop(first);

    let mut resumed = pair(99); // different init: everything must come from the checkpoint
    let extra = checkpoint::load(&dir, &mut resumed.store, &mut resumed.optimizer).unwrap();
    assert_eq!(extra["next_batch"], 6);
    assert_eq!(resumed.optimizer.step, 6);
    for (i, want_loss) in want.iter().enumerate().skip(6) {
        let got = step(&mut resumed, i);
        assert_eq!(
            got.to_bits(),
            want_loss.to_bits(),
            "step {}: {got} vs uninterrupted {want_loss}",
            i + 1
        );
    }

    // A later save replaces the step files; only the newest remain.
    checkpoint::save(
        &dir,
        &resumed.store,
        &resumed.optimizer,
        &serde_json::Value::Null,
    )
    .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            "optim-12.safetensors",
            "params-12.safetensors",
            "state.json"
        ]
    );

    // A model of another shape: the mismatch is named.
    let mut other = Pair::new(
        "ws",
        &InterfaceConfig::weighted_sum(7, 16),
        HeadKind::Ctc { vocab: 7 },
        AdamConfig::adamw(3e-3),
        None,
        1,
    )
    .unwrap();
    let err = checkpoint::load(&dir, &mut other.store, &mut other.optimizer)
        .unwrap_err()
        .to_string();
    assert!(err.contains("interface.weights"), "{err}");
    // A truncated parameter file.
    let p = dir.join("params-12.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let err = checkpoint::load(&dir, &mut resumed.store, &mut resumed.optimizer)
        .unwrap_err()
        .to_string();
    assert!(err.contains("damaged"), "{err}");
    std::fs::remove_file(dir.join("state.json")).unwrap();
    assert!(
        checkpoint::load(&dir, &mut resumed.store, &mut resumed.optimizer)
            .unwrap_err()
            .to_string()
            .contains("state.json")
    );
    std::fs::remove_dir_all(&dir).ok();
}
