//! The inputs of a golden forward file (tests/data/GOLDEN.md): what `engram golden` and the
//! backends' golden checks feed every Engram layer.

use safetensors::Dtype;

use crate::checkpoint::Checkpoint;
use crate::config::{EngramConfig, Variant};
use crate::error::{EngramError, Result};

/// The inputs of sample `i` of a golden forward file (tests/data/GOLDEN.md): its token
/// ids, the hidden states fed to every Engram layer (`[1, t, hc_mult, hidden_size]`) and,
/// for V4.1, the dead-token mask.
#[derive(Clone, Debug)]
pub struct GoldenSample {
    pub ids: Vec<i64>,
    pub hidden: Vec<f32>,
    pub dead: Option<Vec<bool>>,
}

impl GoldenSample {
    /// Reads sample `i` of `ck`, checking every tensor's dtype and shape against `cfg`.
    pub fn read(ck: &Checkpoint, cfg: &EngramConfig, i: usize) -> Result<Self> {
        let name = |what: &str| format!("sample{i}.{what}");
        let t = ck
            .shape_of(&name("input_ids"))?
            .last()
            .copied()
            .unwrap_or(0);
        let ids = ck.i64_tensor(&name("input_ids"), &[1, t])?;
        // Token ids are u32 for a tokenizer (see `token_ids`): refuse any other here.
        if let Some((position, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| u32::try_from(id).is_err())
        {
            return Err(EngramError::Tensor {
                path: ck.path().to_path_buf(),
                tensor: name("input_ids"),
                message: format!("token id {id} at position {position} is not a u32"),
            });
        }
        let hidden_shape = [1, t, cfg.hc_mult, cfg.hidden_size];
        let hidden = ck.f32_tensor(&name("hidden_states"), &hidden_shape)?;
        let dead = match cfg.variant {
            Variant::Paper => None,
            Variant::V41 => {
                let mask = ck.expect(&name("dead_mask"), &[Dtype::U8, Dtype::BOOL], &[1, t])?;
                Some(mask.data().iter().map(|&b| b != 0).collect())
            }
        };
        Ok(Self { ids, hidden, dead })
    }

    /// Tokens in the sample.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The ids as the tokenizer's `u32`s (`read` checked that they fit).
    pub fn token_ids(&self) -> Vec<u32> {
        self.ids.iter().map(|&i| i as u32).collect()
    }
}

#[cfg(test)]
mod tests {
    use safetensors::tensor::TensorView;
    use serde_json::json;

    use super::*;

    fn paper_config() -> EngramConfig {
        EngramConfig::from_golden_meta(&json!({"engram": {"engram_vocab_size": [13, 17],
            "max_ngram_size": 3, "n_embed_per_ngram": 16, "n_head_per_ngram": 2,
            "layer_ids": [1], "pad_id": 2, "seed": 0, "kernel_size": 3},
            "backbone": {"hidden_size": 8, "hc_mult": 2}}))
        .unwrap()
    }

    /// A golden-like file holding `sample0` with these ids and `hidden_shape`.
    fn sample_file(ids: &[i64], hidden_shape: &[usize]) -> Vec<u8> {
        let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        let hidden: Vec<u8> = (0..hidden_shape.iter().product::<usize>())
            .flat_map(|k| (k as f32).to_le_bytes())
            .collect();
        let views = [
            (
                "sample0.input_ids",
                TensorView::new(Dtype::I64, vec![1, ids.len()], &id_bytes).unwrap(),
            ),
            (
                "sample0.hidden_states",
                TensorView::new(Dtype::F32, hidden_shape.to_vec(), &hidden).unwrap(),
            ),
        ];
        safetensors::serialize(views, None).unwrap()
    }

    #[test]
    fn reads_a_sample_and_refuses_bad_ones_by_name() {
        let cfg = paper_config();
        let good = sample_file(&[5, 0, 12], &[1, 3, 2, 8]);
        let ck = Checkpoint::parse("g.safetensors", &good).unwrap();
        let s = GoldenSample::read(&ck, &cfg, 0).unwrap();
        assert_eq!(s.token_ids(), [5, 0, 12]);
        assert_eq!(s.hidden.len(), 3 * 2 * 8);
        assert_eq!(s.hidden[47], 47.0);
        assert!(s.dead.is_none());

        for (ids, hidden_shape, names) in [
            (&[5, -1, 12][..], [1, 3, 2, 8], "input_ids"),
            (&[5, 1 << 40, 12][..], [1, 3, 2, 8], "input_ids"),
            (&[5, 0, 12][..], [1, 3, 2, 4], "hidden_states"),
        ] {
            let bytes = sample_file(ids, &hidden_shape);
            let ck = Checkpoint::parse("g.safetensors", &bytes).unwrap();
            let e = GoldenSample::read(&ck, &cfg, 0).unwrap_err().to_string();
            assert!(e.contains(&format!("sample0.{names}")), "{e}");
            assert!(e.contains("g.safetensors"), "{e}");
        }

        // V4.1 needs the dead-token mask.
        let mut v41 = cfg.clone();
        v41.variant = Variant::V41;
        let e = GoldenSample::read(&ck, &v41, 0).unwrap_err().to_string();
        assert!(e.contains("sample0.dead_mask"), "{e}");
    }
}
