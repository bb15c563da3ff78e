//! CPU forward of a HuBERT-Base-sized encoder (random weights, HubertConfig defaults) on 10 s of
//! audio: every hidden state. PyTorch's figure for the same model and thread count comes from
//! tools/bench_upstream_torch.py; both go into RESULTS.md.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::collections::HashMap;
use std::time::Duration;
use strata::models::upstream::{Checkpoint, Upstream, UpstreamConfig};
use strata::rng::Rng;
use strata::Tensor;

/// Every tensor a HuBERT-Base checkpoint has, with random values of sensible scale.
fn random_hubert_base() -> Upstream {
    let cfg =
        UpstreamConfig::from_json(&serde_json::json!({"model_type": "hubert"}), "bench").unwrap();
    let mut rng = Rng::new(0);
    let mut t = HashMap::new();
    let mut add = |name: String, shape: &[usize], scale: f64| {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| rng.uniform(-scale, scale)).collect();
        t.insert(name, Tensor::from_vec(v, shape).unwrap());
    };
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let mut c_in = 1;
    for i in 0..7 {
        let (c, k) = (cfg.conv_dim[i], cfg.conv_kernel[i]);
        add(
            format!("feature_extractor.conv_layers.{i}.conv.weight"),
            &[c, c_in, k],
            1.0 / ((c_in * k) as f64).sqrt(),
        );
        c_in = c;
    }
    for n in [
        "feature_extractor.conv_layers.0.layer_norm",
        "feature_projection.layer_norm",
    ] {
        add(format!("{n}.weight"), &[512], 1.0);
        add(format!("{n}.bias"), &[512], 0.1);
    }
    add(
        "feature_projection.projection.weight".into(),
        &[d, 512],
        0.044,
    );
    add("feature_projection.projection.bias".into(), &[d], 0.01);
    add(
        "encoder.pos_conv_embed.conv.weight_g".into(),
        &[1, 1, 128],
        1.0,
    );
    add(
        "encoder.pos_conv_embed.conv.weight_v".into(),
        &[d, d / 16, 128],
        0.1,
    );
    add("encoder.pos_conv_embed.conv.bias".into(), &[d], 0.01);
    add("encoder.layer_norm.weight".into(), &[d], 1.0);
    add("encoder.layer_norm.bias".into(), &[d], 0.1);
    for l in 0..cfg.num_layers {
        let p = format!("encoder.layers.{l}");
        for m in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            add(format!("{p}.attention.{m}.weight"), &[d, d], 0.036);
            add(format!("{p}.attention.{m}.bias"), &[d], 0.01);
        }
        for n in ["layer_norm", "final_layer_norm"] {
            add(format!("{p}.{n}.weight"), &[d], 1.0);
            add(format!("{p}.{n}.bias"), &[d], 0.1);
        }
        add(
            format!("{p}.feed_forward.intermediate_dense.weight"),
            &[f, d],
            0.036,
        );
        add(
            format!("{p}.feed_forward.intermediate_dense.bias"),
            &[f],
            0.01,
        );
        add(
            format!("{p}.feed_forward.output_dense.weight"),
            &[d, f],
            0.018,
        );
        add(format!("{p}.feed_forward.output_dense.bias"), &[d], 0.01);
    }
    Upstream::from_checkpoint(cfg, &mut Checkpoint::from_tensors("random HuBERT-Base", t)).unwrap()
}

fn bench(c: &mut Criterion) {
    let model = random_hubert_base();
    let mut rng = Rng::new(1);
    let wave: Vec<f32> = (0..160_000).map(|_| 0.1 * rng.normal()).collect();
    let mut group = c.benchmark_group("upstream_forward");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(10)); // seconds of audio
    group.bench_function("hubert_base_10s_all_states", |b| {
        b.iter(|| model.forward(&[&wave], &["bench"]).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
