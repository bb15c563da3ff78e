//! criterion benches of the CUDA kernels (WS forward / backward, HConv forward, the whole HConv +
//! PR-head step, log-softmax, CTC, cross-entropy, LayerNorm, dropout, mean pooling, the step's glue
//! (casts, GELU, residual add, the bf16 row norm), CLS pooling's attention, the packed
//! self-attention and the data movement of the ML-SUPERB head, the LSTM recurrence, AdamW flat and
//! multi-tensor) at HuBERT-Base / Large sizes, 32 x 500 frames. GPU only: without one it says so
//! and measures nothing (the emulator's speed means nothing). The device script's table
//! (examples/gpu_bench.rs + PyTorch) is the one recorded in RESULTS.md; this is for iterating on a
//! GPU machine with Rust.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use half::bf16;
use std::time::{Duration, Instant};
use strata::ops::device::{self, LayerSumShape, TensorCorePath};
use strata::optim::AdamConfig;
use strata::runtime::{Backend, Buf};

fn bench(c: &mut Criterion) {
    let be = match Backend::cuda() {
        Ok(be) => be,
        Err(why) => {
            println!("kernel benches skipped: no GPU ({why})");
            return;
        }
    };
    let mut group = c.benchmark_group("gpu_kernels");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    let timed = |be: &Backend, iters: u64, f: &mut dyn FnMut()| {
        be.synchronize().unwrap();
        let t0 = Instant::now();
        for _ in 0..iters {
            f();
        }
        be.synchronize().unwrap();
        t0.elapsed()
    };
    for (name, l, d) in [("base", 13usize, 768usize), ("large", 25, 1024)] {
        let n = 32 * 500;
        let x = be.upload(&vec![bf16::from_f32(0.5); n * l * d]).unwrap();
        let w = be.upload(&vec![0.1f32; l]).unwrap();
        let dout = be.upload(&vec![0.01f32; n * d]).unwrap();
        let dw = be.zeros::<f32>(l).unwrap();
        let s = LayerSumShape {
            n,
            l,
            d,
            first: 0,
            k: l,
            normalize: false,
        };
        group.throughput(Throughput::Bytes((n * l * d * 2 + n * d * 2) as u64));
        group.bench_function(format!("ws_forward_{name}"), |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::layer_sum_forward(&be, &x, &w, s).unwrap())
                })
            })
        });
        group.throughput(Throughput::Bytes((n * l * d * 2 + n * d * 4) as u64));
        group.bench_function(format!("ws_backward_{name}"), |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(
                        device::layer_sum_backward(&be, &x, &w, &dout, None, s, &dw, false)
                            .unwrap(),
                    )
                })
            })
        });
    }
    for (name, l, d) in [("base", 13usize, 768usize), ("large", 25, 1024)] {
        let n = 32 * 500;
        let plan = strata::models::interface::hconv_plan(l, d, 5, 3).unwrap();
        let x = be.upload(&vec![bf16::from_f32(0.5); n * l * d]).unwrap();
        let layers: Vec<_> = plan
            .convs
            .iter()
            .map(|g| {
                let w =
                    device::hconv_weight_for_kernel(&vec![0.01f32; g.c_out * g.c_in * g.kernel], g);
                (
                    be.upload(&w).unwrap(),
                    be.upload(&vec![0.0f32; g.c_out]).unwrap(),
                )
            })
            .collect();
        let macs: usize = plan
            .convs
            .iter()
            .map(|g| g.l_out() * g.c_out * g.c_in * g.kernel)
            .sum();
        group.throughput(Throughput::Elements((2 * macs * n) as u64)); // FLOPs
                                                                       // Both tensor-core paths (wgmma needs an sm_90 GPU: H100 / H200).
        for path in [TensorCorePath::MmaSync, TensorCorePath::Wgmma] {
            let tag = match path {
                TensorCorePath::MmaSync => format!("hconv_forward_{name}"),
                TensorCorePath::Wgmma => format!("hconv_forward_{name}_wgmma"),
            };
            group.bench_function(tag, |b| {
                b.iter_custom(|iters| {
                    timed(&be, iters, &mut || {
                        let last = plan.convs.len() - 1;
                        let mut h: Option<Buf<bf16>> = None;
                        for (i, g) in plan.convs.iter().enumerate() {
                            let input = h.as_ref().unwrap_or(&x);
                            let (w, b) = (&layers[i].0, &layers[i].1);
                            h = Some(
                                device::hconv_conv_forward_on(
                                    &be,
                                    path,
                                    input,
                                    n,
                                    g,
                                    w,
                                    b,
                                    i == last,
                                )
                                .unwrap(),
                            );
                        }
                    })
                })
            });
        }
    }
    // The whole HConv + PR-head step (HConv forward + backward, Linear, log-softmax, CTC, clip,
    // AdamW) at HuBERT-Base size: the device script compares it with PyTorch.
    {
        use strata::models::interface::InterfaceConfig;
        use strata::train::side_by_side::{HeadKind, Pair};
        let (utts, t, v, l, d) = (32usize, 500usize, 71usize, 13usize, 768usize);
        let pair = Pair::new(
            "hconv",
            &InterfaceConfig::hconv(l, d),
            HeadKind::Ctc { vocab: v },
            AdamConfig::adamw(1e-3),
            Some(1.0),
            0,
        )
        .unwrap();
        let mut dev = strata::train::device_step::DevicePair::from_pair(&be, &pair).unwrap();
        let x0 = be
            .upload(&vec![bf16::from_f32(0.1); utts * t * l * d])
            .unwrap();
        let batch = strata::PackedBatch::from_lengths(&vec![t; utts]).unwrap();
        let targets: Vec<Vec<usize>> = (0..utts)
            .map(|i| (0..120).map(|j| 1 + (i * 7 + j * 13) % (v - 1)).collect())
            .collect();
        group.throughput(Throughput::Elements((utts * t) as u64));
        group.bench_function("train_step_hconv_pr_base", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    dev.train_step_on(&be, &x0, &batch, &targets).unwrap();
                })
            })
        });
        // The head's row-wise kernels and the losses on the same 16000 x 71 logits.
        let rows = utts * t;
        let logits = be.upload(&vec![0.1f32; rows * v]).unwrap();
        let lp = device::log_softmax_forward(&be, &logits, rows, v).unwrap();
        group.throughput(Throughput::Bytes((2 * rows * v * 4) as u64));
        group.bench_function("log_softmax_16000x71", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::log_softmax_forward(&be, &logits, rows, v).unwrap())
                })
            })
        });
        group.bench_function("ctc_32x500", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(
                        device::ctc_loss(
                            &be,
                            &lp,
                            v,
                            &batch,
                            &targets,
                            strata::Reduction::Mean,
                            true,
                        )
                        .unwrap(),
                    )
                })
            })
        });
        let labels: Vec<usize> = (0..rows).map(|i| i % v).collect();
        group.bench_function("cross_entropy_16000x71", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(
                        device::cross_entropy(&be, &logits, v, &labels, strata::Reduction::Mean)
                            .unwrap(),
                    )
                })
            })
        });
        let feats = be.upload(&vec![0.1f32; rows * d]).unwrap();
        group.throughput(Throughput::Bytes((2 * rows * d * 4) as u64));
        group.bench_function("layernorm_16000x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::layernorm_forward(&be, &feats, rows, d, None, 1e-5).unwrap())
                })
            })
        });
        group.bench_function("dropout_16000x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::dropout(&be, &feats, 0.1, 7).unwrap())
                })
            })
        });
        group.bench_function("mean_pool_32x500x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::mean_pool_forward(&be, &feats, &batch, d).unwrap())
                })
            })
        });
        // The device step's glue on the same 16000 x 768 rows: casts, ReLU / GELU, residual add.
        let feats16 = be.upload(&vec![bf16::from_f32(0.1); rows * d]).unwrap();
        group.throughput(Throughput::Bytes((rows * d * 6) as u64));
        group.bench_function("cast_bf16_to_f32_16000x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::cast_to_f32(&be, &feats16).unwrap())
                })
            })
        });
        group.throughput(Throughput::Bytes((rows * d * 8) as u64));
        group.bench_function("gelu_16000x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::activation_forward(&be, &feats, true).unwrap())
                })
            })
        });
        group.throughput(Throughput::Bytes((rows * d * 12) as u64));
        group.bench_function("add_rows_16000x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::add_rows(&be, &feats, Some(&feats), None, rows, d).unwrap())
                })
            })
        });
        // Two uses' bf16 gradients summed into fp32 (the device tape's add_grads), and LayerNorm
        // from bf16 rows into bf16 (CLS pooling's over the stack's rows).
        group.throughput(Throughput::Bytes((rows * d * 8) as u64));
        group.bench_function("add_grads_bf16_16000x768", |b| {
            let g = device::AnyBuf::Bf16(&feats16);
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::add_grads(&be, g, g).unwrap())
                })
            })
        });
        group.throughput(Throughput::Bytes((rows * d * 4) as u64));
        group.bench_function("layernorm_bf16_16000x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    let x = device::AnyBuf::Bf16(&feats16);
                    drop(device::layernorm_forward_any(&be, x, rows, d, None, 1e-5, true).unwrap())
                })
            })
        });
        // The speaker head's own kernels (kernels/speaker.cu) on the same 32 x 500 frames of 768:
        // a TDNN's 5-frame windows, statistics pooling, row L2 normalization, the margin.
        let (idx, inv, _) = device::speaker_window_index(&batch, 5, 1).unwrap();
        let (idx, inv) = (be.upload(&idx).unwrap(), be.upload(&inv).unwrap());
        let windows = device::rows_gather(&be, &feats16, &idx, d).unwrap();
        let dwindows = be.upload(&vec![0.1f32; windows.len()]).unwrap();
        group.throughput(Throughput::Bytes((windows.len() * 4) as u64));
        group.bench_function("rows_gather_tdnn5_32x500x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::rows_gather(&be, &feats16, &idx, d).unwrap())
                })
            })
        });
        group.throughput(Throughput::Bytes((windows.len() * 4 + rows * d * 4) as u64));
        group.bench_function("rows_gather_sum_tdnn5_32x500x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::rows_gather_sum(&be, &dwindows, &inv, rows, 5, d).unwrap())
                })
            })
        });
        let stats = device::stats_pool_forward(&be, &feats, &batch, d).unwrap();
        group.throughput(Throughput::Bytes((rows * d * 4) as u64));
        group.bench_function("stats_pool_forward_32x500x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::stats_pool_forward(&be, &feats, &batch, d).unwrap())
                })
            })
        });
        group.throughput(Throughput::Bytes((rows * d * 8) as u64));
        group.bench_function("stats_pool_backward_32x500x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(
                        device::stats_pool_backward(&be, &feats, &stats, &stats, &batch, d)
                            .unwrap(),
                    )
                })
            })
        });
        group.throughput(Throughput::Bytes((rows * d * 8) as u64));
        group.bench_function("l2_normalize_16000x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::l2_normalize_forward(&be, &feats, rows, d).unwrap())
                })
            })
        });
        group.bench_function("l2_normalize_backward_16000x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::l2_normalize_backward(&be, &feats, &feats, rows, d).unwrap())
                })
            })
        });
        let labels = be
            .upload(&(0..rows as i32).map(|r| r % v as i32).collect::<Vec<_>>())
            .unwrap();
        group.throughput(Throughput::Bytes((rows * v * 8) as u64));
        group.bench_function("am_margin_16000x71", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(
                        device::am_margin(&be, &logits, Some(&labels), rows, v, 30.0, 0.4).unwrap(),
                    )
                })
            })
        });
    }
    // The ML-SUPERB head's self-attention: 8 utterances x 250 frames, 8 heads of 32, with its
    // dropout on the probabilities, forward and backward (~0.26 GFLOP each way).
    {
        let batch = strata::PackedBatch::from_lengths(&[250; 8]).unwrap();
        let n = 2000 * 256;
        let x = be.upload(&vec![0.01f32; n]).unwrap();
        let attn = device::PackedAttn {
            q: &x,
            k: &x,
            v: &x,
            batch: &batch,
            heads: 8,
            head_dim: 32,
            dropout: Some(strata::ops::attention::ProbDropout { p: 0.1, seed: 1 }),
        };
        let (_, probs) = attn.forward(&be).unwrap();
        group.throughput(Throughput::Elements(2000));
        // The tiled kernels (the default) and the per-row ones they replaced.
        for (kernels, tag) in [
            (device::PackedAttnKernels::Tiled, ""),
            (device::PackedAttnKernels::Rows, "_rows"),
        ] {
            group.bench_function(format!("packed_attention{tag}_forward_8x250_8x32"), |b| {
                b.iter_custom(|iters| {
                    timed(&be, iters, &mut || {
                        drop(attn.forward_on(&be, kernels).unwrap())
                    })
                })
            });
            group.bench_function(format!("packed_attention{tag}_backward_8x250_8x32"), |b| {
                b.iter_custom(|iters| {
                    timed(&be, iters, &mut || {
                        drop(attn.backward_on(&be, &probs, &x, kernels).unwrap())
                    })
                })
            });
        }
    }
    // The ML-SUPERB head's data movement at 32 x 500 frames: the second convolution's im2col
    // patches and their adjoint, centering, SpecAugment's time warp and masks over [16000, 768].
    {
        use strata::models::mlsuperb_head::{specaug_spans, time_warp, SpecAugmentConfig};
        let batch = strata::PackedBatch::from_lengths(&[500; 32]).unwrap();
        let b1 = strata::PackedBatch::from_lengths(&[249; 32]).unwrap();
        let g = strata::ops::conv2d::PatchGeom {
            freq: 39,
            channels: 256,
            kernel: 3,
            stride: 1,
        };
        let x = be
            .upload(&vec![bf16::from_f32(0.5); b1.total_frames() * 39 * 256])
            .unwrap();
        let (patches, _) = device::conv2d_patches(&be, &x, &b1, &g).unwrap();
        group.throughput(Throughput::Bytes(((x.len() + patches.len()) * 2) as u64));
        group.bench_function("conv2d_patches_mlsuperb", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::conv2d_patches(&be, &x, &b1, &g).unwrap())
                })
            })
        });
        group.bench_function("conv2d_patches_adjoint_mlsuperb", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::conv2d_patches_adjoint(&be, &patches, &b1, &g).unwrap())
                })
            })
        });
        drop(patches);
        let (n, d) = (batch.total_frames(), 768);
        let feats = be.upload(&vec![0.5f32; n * d]).unwrap();
        group.throughput(Throughput::Bytes((2 * n * d * 4) as u64));
        group.bench_function("utterance_center_32x500x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::utterance_center(&be, &feats, &batch, d).unwrap())
                })
            })
        });
        let warp = device::DeviceTimeWarp::upload(&be, &time_warp(5, &batch, 1), n).unwrap();
        group.bench_function("time_warp_32x500x768", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(warp.forward(&be, &feats, d).unwrap())
                })
            })
        });
        let spans = specaug_spans(&SpecAugmentConfig::default(), &batch, d, 2);
        let mask = device::DeviceSpecMask::upload(&be, &spans, &batch, d).unwrap();
        group.bench_function("specaug_mask_32x500x768", |b| {
            b.iter_custom(|iters| timed(&be, iters, &mut || drop(mask.apply(&be, &feats).unwrap())))
        });
    }
    // One LSTM direction's recurrence at s3prl's 1024 units, 8 utterances x 150 frames (the CPU
    // bench's batch, benches/heads.rs): 150 launches forward, a transpose and 150 backward.
    {
        let (batch, hidden) = (strata::PackedBatch::from_lengths(&[150; 8]).unwrap(), 1024);
        let n = batch.total_frames();
        let sched = device::DeviceLstmSchedule::upload(&be, &batch, false).unwrap();
        let pre = be.upload(&vec![0.1f32; n * 4 * hidden]).unwrap();
        let w = be.upload(&vec![0.01f32; 4 * hidden * hidden]).unwrap();
        let h = be.zeros::<f32>(n * hidden).unwrap();
        let cols = device::Cols::own(hidden);
        let states = device::lstm_forward(&be, &pre, &w, &sched, hidden, (&h, cols)).unwrap();
        // W_hh read once a step (fp32), forward.
        group.throughput(Throughput::Bytes((150 * 4 * hidden * hidden * 4) as u64));
        group.bench_function("lstm_forward_8x150x1024", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::lstm_forward(&be, &pre, &w, &sched, hidden, (&h, cols)).unwrap())
                })
            })
        });
        group.bench_function("lstm_backward_8x150x1024", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(
                        device::lstm_backward(&be, (&h, cols), &states, &w, &sched, hidden)
                            .unwrap(),
                    )
                })
            })
        });
    }
    // `normalize` of a Base stack (bf16 row LayerNorm over 16000 x 13 rows of 768) and CLS
    // pooling's attention (8 heads over 14 tokens per frame), forward and backward.
    {
        let (n, l, d, heads) = (32 * 500usize, 13usize, 768usize, 8usize);
        let x = be.upload(&vec![bf16::from_f32(0.5); n * l * d]).unwrap();
        group.throughput(Throughput::Bytes((n * l * d * 4) as u64));
        group.bench_function("layernorm_rows_bf16_base", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::layernorm_rows_bf16(&be, &x, n * l, d).unwrap())
                })
            })
        });
        let q = be.upload(&vec![0.1f32; d]).unwrap();
        let row = be.upload(&vec![bf16::from_f32(0.2); d]).unwrap();
        let shape = device::ClsAttnShape { n, l, d, heads };
        let inputs = device::ClsAttnInputs {
            q: &q,
            k_cls: &row,
            v_cls: &row,
            k: &x,
            v: &x,
        };
        let (_, probs) = device::cls_attention_forward(&be, shape, &inputs).unwrap();
        let dout = be.upload(&vec![0.01f32; n * d]).unwrap();
        // K and V read once each.
        group.throughput(Throughput::Bytes((2 * n * l * d * 2) as u64));
        group.bench_function("cls_attention_forward_base", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(device::cls_attention_forward(&be, shape, &inputs).unwrap())
                })
            })
        });
        group.bench_function("cls_attention_backward_base", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    drop(
                        device::cls_attention_backward(&be, shape, &inputs, &probs, &dout).unwrap(),
                    )
                })
            })
        });
    }
    // Multi-tensor AdamW over an HConv (Base) + PR-head pair's tensors: one launch.
    {
        use strata::models::interface::InterfaceConfig;
        use strata::train::side_by_side::{HeadKind, Pair};
        let pair = Pair::new(
            "hconv",
            &InterfaceConfig::hconv(13, 768),
            HeadKind::Ctc { vocab: 71 },
            AdamConfig::adamw(1e-3),
            None,
            0,
        )
        .unwrap();
        let bufs: Vec<_> = pair
            .store
            .iter()
            .map(|q| {
                let k = q.value.numel();
                (
                    be.upload(&vec![0.1f32; k]).unwrap(),
                    be.upload(&vec![0.01f32; k]).unwrap(),
                    be.zeros::<f32>(k).unwrap(),
                    be.zeros::<f32>(k).unwrap(),
                    be.zeros::<bf16>(k).unwrap(),
                )
            })
            .collect();
        let table = device::AdamTensors::new(
            &be,
            &bufs
                .iter()
                .map(|(p, g, m, v, c)| (p, g, m, v, Some(c)))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let total: usize = bufs.iter().map(|b| b.0.len()).sum();
        let cfg = AdamConfig::adamw(1e-3);
        let mut step = 0;
        group.throughput(Throughput::Bytes((total * 30) as u64));
        group.bench_function("adamw_multi_hconv_base", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    step += 1;
                    device::adam_step_multi(&be, &cfg, step, &table, None, false).unwrap()
                })
            })
        });
        // The global gradient norm for clipping over the same tensors: reads every gradient once.
        group.throughput(Throughput::Bytes((total * 4) as u64));
        group.bench_function("clip_norm_hconv_base", |b| {
            b.iter_custom(|iters| {
                timed(&be, iters, &mut || {
                    device::clip_coefficient_table(&be, &table, 1.0).unwrap();
                })
            })
        });
    }
    let n = 100_000_000usize;
    let p = be.upload(&vec![0.1f32; n]).unwrap();
    let g = be.upload(&vec![0.01f32; n]).unwrap();
    let (m, v) = (be.zeros::<f32>(n).unwrap(), be.zeros::<f32>(n).unwrap());
    let cfg = AdamConfig::adamw(1e-3);
    group.throughput(Throughput::Bytes((n * 28) as u64));
    let mut step = 0;
    group.bench_function("adamw_100M", |b| {
        b.iter_custom(|iters| {
            timed(&be, iters, &mut || {
                step += 1;
                device::adam_step(&be, &cfg, step, &p, &g, &m, &v, None, None).unwrap()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
