//! GPU benchmark of strata's kernels (the device script runs it; it needs a GPU). Times with CUDA
//! events after warm-up, with an L2 flush (a 256 MB write) before each repetition, median of 20.
//! Prints one JSON object per line: {"name", "ms", "bytes"} for tools/gpu_table.py.
//!
//!   cargo build --release --example gpu_bench && target/release/examples/gpu_bench [section]
//!
//! `gpu_bench precompile` needs no GPU, only NVRTC: it fills the kernel disk cache in parallel
//! (see [`precompile`]).

use cudarc::driver::CudaSlice;
use half::bf16;
use strata::ops::device::{self, LayerSumShape};
use strata::ops::layer_conv::ConvGeom;
use strata::optim::AdamConfig;
use strata::runtime::{Backend, Buf};

fn time_ms(be: &Backend, flush: &mut CudaSlice<f32>, mut f: impl FnMut()) -> f64 {
    let Backend::Cuda(rt) = be else {
        panic!("GPU only")
    };
    for _ in 0..3 {
        f();
    }
    let mut times = Vec::new();
    for _ in 0..20 {
        rt.stream.memset_zeros(flush).unwrap();
        let (a, b) = (
            rt.ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap(),
            rt.ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap(),
        );
        a.record(&rt.stream).unwrap();
        f();
        b.record(&rt.stream).unwrap();
        times.push(a.elapsed_ms(&b).unwrap() as f64);
    }
    times.sort_by(|x, y| x.partial_cmp(y).unwrap());
    times[times.len() / 2]
}

/// The CTC row's log-probabilities, utterance-major [n * t, v] (strata's packed frames): the
/// log-softmax over v of 2 sin(0.37 t + 1.3 c + 0.11 u), in f64, rounded to f32. The same
/// formula as tools/gpu_bench_torch.py's `bench_log_probs` (there [t, n, v]).
fn bench_log_probs(n: usize, t: usize, v: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * t * v);
    for u in 0..n {
        for f in 0..t {
            let z: Vec<f64> = (0..v)
                .map(|c| 2.0 * (0.37 * f as f64 + 1.3 * c as f64 + 0.11 * u as f64).sin())
                .collect();
            let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            out.extend(z.iter().map(|x| (x - lse) as f32));
        }
    }
    out
}

/// The cross-entropy row's logits [rows, classes]: 3 sin(0.013 r + 0.7 c), as
/// tools/gpu_bench_torch.py's `bench_logits`.
fn bench_logits(rows: usize, classes: usize) -> Vec<f32> {
    (0..rows * classes)
        .map(|i| {
            let (r, c) = ((i / classes) as f64, (i % classes) as f64);
            (3.0 * (0.013 * r + 0.7 * c).sin()) as f32
        })
        .collect()
}

/// A gradient's sum weighted by cos(1.3 i) over its elements in memory order (f64): one number
/// that moves with any element, compared with PyTorch's for the same layout.
fn weighted_sum(g: &[f32]) -> f64 {
    g.iter()
        .enumerate()
        .map(|(i, &x)| x as f64 * (1.3 * i as f64).cos())
        .sum()
}

/// A profile's kernels, the largest first, with their share of the summed kernel time, against the
/// step's timed median (the difference: launch gaps, copies and host work).
fn print_profile(label: &str, timed_ms: f64, kernels: &[strata::runtime::cuda::KernelTime]) {
    let total: f64 = kernels.iter().map(|k| k.ms).sum();
    eprintln!("profile {label}: kernels {total:.3} ms of GPU time in one step; the step's timed median {timed_ms:.3} ms");
    for k in kernels.iter().take(15) {
        eprintln!(
            "  {:<36} {:>5} launches {:>9.3} ms {:>5.1}%",
            k.kernel,
            k.launches,
            k.ms,
            100.0 * k.ms / total.max(1e-12)
        );
    }
}

/// Multiply-adds of one conv per frame that touch a layer: the (output position, tap) pairs whose
/// input position exists, times c_out x c_in. The rest multiply zero padding: the roofline does
/// not count them (HuBERT-Base's first conv: 21 of its 25 pairs; runs before 2026-12-07 counted
/// all). The kernels skip them: the forward's (kernels/hconv.cu's HcFwdTile), dW's (hc_dw_rows,
/// but for its bias blocks) and dx's (HcDxPhase, in part).
fn conv_macs(g: &ConvGeom) -> usize {
    let pairs = (0..g.l_out())
        .flat_map(|lo| (0..g.kernel).map(move |kw| (lo * g.stride + kw) as isize - g.pad as isize))
        .filter(|&li| li >= 0 && (li as usize) < g.l_in)
        .count();
    pairs * g.c_out * g.c_in
}

/// Multiply-adds of HConv's convs per frame ([`conv_macs`]): (all convs, the convs after the first).
/// Forward costs the first; a frozen-upstream backward costs the first again (dW) plus the second
/// (dx).
fn hconv_macs(plan: &strata::models::interface::HConvPlan) -> (usize, usize) {
    (
        plan.convs.iter().map(conv_macs).sum(),
        plan.convs.iter().skip(1).map(conv_macs).sum(),
    )
}

/// HConv stacks (layers, dim, kernel, stride) whose convs the device script's processes launch:
/// HuBERT-Base and -Large (kernel tests, benches, steps) and the small stacks of the kernel,
/// device-step and demo tests.
const PRECOMPILED_STACKS: &[(usize, usize, usize, usize)] = &[
    (13, 768, 5, 3),
    (25, 1024, 5, 3),
    (13, 200, 5, 3),
    (13, 96, 5, 3),
    (13, 64, 5, 3),
    (7, 40, 3, 2),
    (7, 16, 5, 3),
    (4, 24, 3, 2),
];

/// Compiles (PTX and machine code) every kernel file, and hconv.cu's two builds (mma.sync for sm_90, wgmma for sm_90a)
/// specialized to each conv of [`PRECOMPILED_STACKS`] (and the mma.sync build at pipeline depth 2
/// for the script's comparison), into the disk cache, on all cores at once. Each process would
/// otherwise compile the variants it meets one after another, ~5 s apiece for hconv.cu, out of the
/// GPU machine's few minutes. A variant missing here still compiles on first
/// use; a cached one is checked, not trusted (crate::runtime::cuda::compile_with).
fn precompile() -> std::process::ExitCode {
    use strata::runtime::{cuda, kernels};
    if let Err(why) = cuda::nvrtc_version() {
        eprintln!("precompile: {why}");
        return std::process::ExitCode::FAILURE;
    }
    let start = std::time::Instant::now();
    let mut jobs: Vec<(&'static kernels::KernelFile, Vec<(&'static str, i64)>)> =
        kernels::FILES.iter().map(|f| (f, Vec::new())).collect();
    let mut convs: Vec<ConvGeom> = PRECOMPILED_STACKS
        .iter()
        .flat_map(|&(l, d, k, s)| {
            strata::models::interface::hconv_plan(l, d, k, s)
                .unwrap()
                .convs
        })
        .collect();
    // tests/device_tape.rs's single conv.
    convs.push(ConvGeom {
        l_in: 7,
        c_in: 24,
        c_out: 8,
        kernel: 5,
        stride: 3,
        pad: 2,
    });
    // The heads' Linear layers in the step benchmark (one layer, kernel 1): the PR head on Base
    // and Large, the ML-SUPERB head's (preencoder, conv2 and embed.out over patches, attention
    // and FFN, ctc_lo), the ASR head's (projector, both layers' input products, linear).
    for (c_in, c_out) in [
        (768, 256),
        (1024, 256),
        (256, 71),
        (768, 80),
        (2304, 256),
        (9472, 256),
        (256, 256),
        (256, 1024),
        (1024, 256),
        (768, 1024),
        (1024, 4096),
        (2048, 4096),
        (2048, 71),
    ] {
        convs.push(ConvGeom {
            l_in: 1,
            c_in,
            c_out,
            kernel: 1,
            stride: 1,
            pad: 0,
        });
    }
    // Only the vectorized kernels (input channels a multiple of 8) are specialized.
    for g in convs.iter().filter(|g| g.c_in % 8 == 0) {
        for kernel in ["hconv_conv_forward_vec", "hconv_conv_forward_wgmma"] {
            let file = kernels::file_of(kernel).unwrap();
            let defines = device::hconv_defines(g).to_vec();
            if !jobs
                .iter()
                .any(|(f, d)| std::ptr::eq(*f, file) && *d == defines)
            {
                jobs.push((file, defines));
            }
        }
    }
    // The device script's comparison at pipeline depth 2 (STRATA_HV_STAGES=2, gpu_bench hconv):
    // the mma.sync build specialized to the Base and Large convs (the first two stacks), and
    // unspecialized (dW).
    let mma = kernels::file_of("hconv_conv_forward_vec").unwrap();
    jobs.push((mma, vec![("HV_STAGES", 2)]));
    for &(l, d, k, s) in &PRECOMPILED_STACKS[..2] {
        for g in strata::models::interface::hconv_plan(l, d, k, s)
            .unwrap()
            .convs
        {
            let mut defines = device::hconv_defines(&g).to_vec();
            defines.push(("HV_STAGES", 2));
            jobs.push((mma, defines));
        }
    }
    // Longest sources first, so that no large compile starts last on an otherwise idle machine.
    jobs.sort_by_key(|(f, _)| std::cmp::Reverse(f.source.len()));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let hits = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(jobs.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((file, defines)) = jobs.get(i) else {
                    break;
                };
                match cuda::compile_cubin_with(file, cuda::arch_of(file), defines) {
                    Ok((_, hit)) => {
                        hits.fetch_add(hit as usize, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        eprintln!("precompile: {e}");
                    }
                }
            });
        }
    });
    eprintln!(
        "precompiled {} kernel variants ({} already cached) in {:.1} s on {threads} threads",
        jobs.len(),
        hits.into_inner(),
        start.elapsed().as_secs_f64()
    );
    if failed.into_inner() == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

fn main() -> std::process::ExitCode {
    // `gpu_bench [ws|hconv|losses|mlsuperb|heads|step|adamw]` runs one section; no argument runs
    // them all.
    let only = std::env::args().nth(1);
    if only.as_deref() == Some("precompile") {
        return precompile();
    }
    let run = |section: &str| only.as_deref().is_none_or(|o| o == section);
    let be = Backend::cuda().unwrap_or_else(|why| panic!("gpu_bench needs a GPU: {why}"));
    let Backend::Cuda(rt) = &be else {
        unreachable!()
    };
    let mut flush: CudaSlice<f32> = rt.stream.alloc_zeros(64 << 20).unwrap();
    eprintln!("device: {}", be.name());
    if run("ws") {
        for (name, l, d) in [("base", 13usize, 768usize), ("large", 25, 1024)] {
            let n = 32 * 500;
            let x = be.upload(&vec![bf16::from_f32(0.5); n * l * d]).unwrap();
            let w = be.upload(&vec![0.1f32; l]).unwrap();
            let dout = be.upload(&vec![0.01f32; n * d]).unwrap();
            let dw = be.zeros::<f32>(l).unwrap();
            for normalize in [false, true] {
                let s = LayerSumShape {
                    n,
                    l,
                    d,
                    first: 0,
                    k: l,
                    normalize,
                };
                let tag = format!("ws_{name}{}", if normalize { "_norm" } else { "" });
                let fwd = time_ms(&be, &mut flush, || {
                    device::layer_sum_forward(&be, &x, &w, s).unwrap();
                });
                // Bytes: read the bf16 stack once (with the norm too, since its rows are staged in
                // shared memory: runs before 2026-12-07 read it, and counted it, twice), write bf16 out.
                println!(
                    "{{\"name\": \"{tag}_fwd\", \"ms\": {fwd:.4}, \"bytes\": {}}}",
                    n * l * d * 2 + n * d * 2
                );
                let (_, stats) = device::layer_sum_forward(&be, &x, &w, s).unwrap();
                let bwd = time_ms(&be, &mut flush, || {
                    device::layer_sum_backward(&be, &x, &w, &dout, stats.as_ref(), s, &dw, false)
                        .unwrap();
                });
                println!(
                    "{{\"name\": \"{tag}_bwd_dw\", \"ms\": {bwd:.4}, \"bytes\": {}}}",
                    n * l * d * 2 + n * d * 4
                );
            }
        }
    }
    // HConv forward (all convs, bias + ReLU, flatten): FLOPs = 2 * MACs.
    if run("hconv") {
        for (name, l, d) in [("base", 13usize, 768usize), ("large", 25, 1024)] {
            let n = 32 * 500;
            let plan = strata::models::interface::hconv_plan(l, d, 5, 3).unwrap();
            // Random data, as PyTorch's side draws (tensor cores can run faster on constants).
            let mut rng = strata::rng::Rng::new(17);
            let random_bf16 = |rng: &mut strata::rng::Rng, len: usize, scale: f32| -> Vec<bf16> {
                (0..len)
                    .map(|_| bf16::from_f32(scale * rng.normal()))
                    .collect()
            };
            let x = be.upload(&random_bf16(&mut rng, n * l * d, 1.0)).unwrap();
            let mut layers = Vec::new();
            let (macs, dx_macs) = hconv_macs(&plan);
            for g in &plan.convs {
                let bound = 1.0 / ((g.c_in * g.kernel) as f64).sqrt();
                let w = rng.uniform_vec(g.c_out * g.c_in * g.kernel, bound);
                layers.push((
                    be.upload(&device::hconv_weight_for_kernel(&w, g)).unwrap(),
                    be.upload(&rng.uniform_vec(g.c_out, bound)).unwrap(),
                ));
            }
            let t = time_ms(&be, &mut flush, || {
                let mut h = device::hconv_conv_forward(
                    &be,
                    &x,
                    n,
                    &plan.convs[0],
                    &layers[0].0,
                    &layers[0].1,
                    plan.convs.len() == 1,
                )
                .unwrap();
                for (i, g) in plan.convs.iter().enumerate().skip(1) {
                    h = device::hconv_conv_forward(
                        &be,
                        &h,
                        n,
                        g,
                        &layers[i].0,
                        &layers[i].1,
                        i + 1 == plan.convs.len(),
                    )
                    .unwrap();
                }
            });
            println!(
                "{{\"name\": \"hconv_{name}_fwd\", \"ms\": {t:.4}, \"flops\": {}}}",
                2 * macs * n
            );
            // Forward + backward for a frozen upstream: every conv's dW and db, dx for all but the
            // first conv. FLOPs: forward + dW (each as many as the forward) + those dx.
            let grads: Vec<(Buf<f32>, Buf<f32>)> = plan
                .convs
                .iter()
                .map(|g| {
                    (
                        be.zeros::<f32>(g.c_out * g.c_in * g.kernel).unwrap(),
                        be.zeros::<f32>(g.c_out).unwrap(),
                    )
                })
                .collect();
            let dout = be
                .upload(&random_bf16(&mut rng, n * plan.output_dim(), 0.01))
                .unwrap();
            let t = time_ms(&be, &mut flush, || {
                let mut acts = Vec::new();
                for (i, g) in plan.convs.iter().enumerate() {
                    let input = if i == 0 { &x } else { &acts[i - 1] };
                    let h = device::hconv_conv_forward(
                        &be,
                        input,
                        n,
                        g,
                        &layers[i].0,
                        &layers[i].1,
                        i + 1 == plan.convs.len(),
                    )
                    .unwrap();
                    acts.push(h);
                }
                let mut dy: Option<Buf<bf16>> = None;
                for (i, g) in plan.convs.iter().enumerate().rev() {
                    let saved = device::HConvSaved {
                        x: if i == 0 { &x } else { &acts[i - 1] },
                        y: &acts[i],
                        w: &layers[i].0,
                        flatten: i + 1 == plan.convs.len(),
                    };
                    let d = dy.as_ref().unwrap_or(&dout);
                    let next = device::hconv_conv_backward(
                        &be,
                        &saved,
                        n,
                        g,
                        d,
                        (&grads[i].0, &grads[i].1),
                        i > 0,
                    )
                    .unwrap();
                    dy = next;
                }
            });
            println!(
                "{{\"name\": \"hconv_{name}_fwd_bwd\", \"ms\": {t:.4}, \"flops\": {}}}",
                2 * (2 * macs + dx_macs) * n
            );
            // The backward conv by conv, dW + db alone and with dx: which launch the time goes to.
            let mut acts: Vec<Buf<bf16>> = Vec::new();
            for (i, g) in plan.convs.iter().enumerate() {
                let input = if i == 0 { &x } else { &acts[i - 1] };
                let last = i + 1 == plan.convs.len();
                let h =
                    device::hconv_conv_forward(&be, input, n, g, &layers[i].0, &layers[i].1, last)
                        .unwrap();
                acts.push(h);
            }
            for (i, g) in plan.convs.iter().enumerate() {
                let saved = device::HConvSaved {
                    x: if i == 0 { &x } else { &acts[i - 1] },
                    y: &acts[i],
                    w: &layers[i].0,
                    flatten: i + 1 == plan.convs.len(),
                };
                let dy = be
                    .upload(&random_bf16(&mut rng, n * g.l_out() * g.c_out, 0.01))
                    .unwrap();
                let macs = n * conv_macs(g);
                for want_dx in [false, true] {
                    let t = time_ms(&be, &mut flush, || {
                        let grads = (&grads[i].0, &grads[i].1);
                        device::hconv_conv_backward(&be, &saved, n, g, &dy, grads, want_dx)
                            .unwrap();
                    });
                    println!(
                        "{{\"name\": \"hconv_{name}_bwd_conv{i}_{}\", \"ms\": {t:.4}, \"flops\": {}}}",
                        if want_dx { "dw_dx" } else { "dw" },
                        2 * macs * (1 + want_dx as usize)
                    );
                }
            }
        }
    }
    // CTC loss + gradient (one call: upload of the targets, the kernel, the per-utterance losses
    // back to the host): 32 utterances x 500 frames, 71 symbols, 120 labels each. The inputs are
    // formulas that tools/gpu_bench_torch.py evaluates alike (`bench_log_probs`, `bench_logits`),
    // so each row also carries the loss and a weighted sum of the gradient, which tools/gpu_table.py
    // sets against PyTorch's: the values, at real size, on the GPU.
    if run("losses") {
        let (n, t, v, u) = (32usize, 500usize, 71usize, 120usize);
        let batch = strata::PackedBatch::from_lengths(&vec![t; n]).unwrap();
        let lp_host = bench_log_probs(n, t, v);
        let lp = be.upload(&lp_host).unwrap();
        let targets: Vec<Vec<usize>> = (0..n)
            .map(|i| (0..u).map(|j| 1 + (i * 7 + j * 13) % (v - 1)).collect())
            .collect();
        let ms = time_ms(&be, &mut flush, || {
            device::ctc_loss(&be, &lp, v, &batch, &targets, strata::Reduction::Mean, true).unwrap();
        });
        let out =
            device::ctc_loss(&be, &lp, v, &batch, &targets, strata::Reduction::Mean, true).unwrap();
        // strata's gradient is the derivative w.r.t. the log-probabilities; PyTorch's ctc_loss
        // returns the logits' (it assumes a log_softmax before it: src/ops/ctc.rs). Through the
        // log_softmax: dz = dlp - softmax * sum(dlp), per frame.
        let mut grad = be.download(&out.grad).unwrap();
        for (g, l) in grad.chunks_exact_mut(v).zip(lp_host.chunks_exact(v)) {
            let total: f64 = g.iter().map(|&x| x as f64).sum();
            for (gi, &li) in g.iter_mut().zip(l) {
                *gi = (*gi as f64 - (li as f64).exp() * total) as f32;
            }
        }
        println!(
            "{{\"name\": \"ctc_32x500\", \"ms\": {ms:.4}, \"bytes\": {}, \"loss\": {:e}, \"grad_sum\": {:e}}}",
            2 * n * t * v * 4,
            out.loss,
            weighted_sum(&grad)
        );
    }
    // Fused softmax cross-entropy + dlogits: 4096 rows x 1251 classes (VoxCeleb1 speakers).
    if run("losses") {
        let (rows, classes) = (4096usize, 1251usize);
        let logits = be.upload(&bench_logits(rows, classes)).unwrap();
        let labels: Vec<usize> = (0..rows).map(|i| (i * 31) % classes).collect();
        let ms = time_ms(&be, &mut flush, || {
            device::cross_entropy(&be, &logits, classes, &labels, strata::Reduction::Mean).unwrap();
        });
        let (loss, grad) =
            device::cross_entropy(&be, &logits, classes, &labels, strata::Reduction::Mean).unwrap();
        let grad = be.download(&grad).unwrap();
        println!(
            "{{\"name\": \"cross_entropy_4096x1251\", \"ms\": {ms:.4}, \"bytes\": {}, \"loss\": {loss:e}, \"grad_sum\": {:e}}}",
            3 * rows * classes * 4,
            weighted_sum(&grad)
        );
    }
    // The ML-SUPERB head's data movement at 32 x 500 frames (strata only: bandwidth against the
    // measured copy): the second convolution's im2col patches (bf16 [7904 x 37, 2304] from
    // [7968 x 39 x 256]) and their adjoint, centering, SpecAugment's time warp and masks over the
    // fp32 features [16000, 768], and the positions over [7904, 256].
    if run("mlsuperb") {
        use strata::models::mlsuperb_head::{specaug_spans, time_warp, SpecAugmentConfig};
        use strata::ops::conv2d::PatchGeom;
        let (utts, d) = (32usize, 768usize);
        let batch = strata::PackedBatch::from_lengths(&vec![500; utts]).unwrap();
        let b1 = strata::PackedBatch::from_lengths(&vec![249; utts]).unwrap();
        let b2 = strata::PackedBatch::from_lengths(&vec![247; utts]).unwrap();
        let g = PatchGeom {
            freq: 39,
            channels: 256,
            kernel: 3,
            stride: 1,
        };
        let x = be
            .upload(&vec![bf16::from_f32(0.5); b1.total_frames() * 39 * 256])
            .unwrap();
        let (patches, _) = device::conv2d_patches(&be, &x, &b1, &g).unwrap();
        let (xb, pb) = (x.len() * 2, patches.len() * 2);
        let ms = time_ms(&be, &mut flush, || {
            device::conv2d_patches(&be, &x, &b1, &g).unwrap();
        });
        println!(
            "{{\"name\": \"conv2d_patches_mlsuperb\", \"ms\": {ms:.4}, \"bytes\": {}}}",
            xb + pb
        );
        let ms = time_ms(&be, &mut flush, || {
            device::conv2d_patches_adjoint(&be, &patches, &b1, &g).unwrap();
        });
        println!(
            "{{\"name\": \"conv2d_patches_adjoint_mlsuperb\", \"ms\": {ms:.4}, \"bytes\": {}}}",
            pb + 2 * xb
        );
        drop(patches);
        let n = batch.total_frames();
        let feats = be.upload(&vec![0.5f32; n * d]).unwrap();
        let rw = 2 * n * d * 4;
        let ms = time_ms(&be, &mut flush, || {
            device::utterance_center(&be, &feats, &batch, d).unwrap();
        });
        println!(
            "{{\"name\": \"utterance_center_32x500x768\", \"ms\": {ms:.4}, \"bytes\": {}}}",
            rw + n * d * 4
        );
        let warp = device::DeviceTimeWarp::upload(&be, &time_warp(5, &batch, 1), n).unwrap();
        let ms = time_ms(&be, &mut flush, || {
            warp.forward(&be, &feats, d).unwrap();
        });
        println!("{{\"name\": \"time_warp_32x500x768\", \"ms\": {ms:.4}, \"bytes\": {rw}}}");
        let spans = specaug_spans(&SpecAugmentConfig::default(), &batch, d, 2);
        let mask = device::DeviceSpecMask::upload(&be, &spans, &batch, d).unwrap();
        let ms = time_ms(&be, &mut flush, || {
            mask.apply(&be, &feats).unwrap();
        });
        println!("{{\"name\": \"specaug_mask_32x500x768\", \"ms\": {ms:.4}, \"bytes\": {rw}}}");
        let h = be.upload(&vec![0.5f32; b2.total_frames() * 256]).unwrap();
        let ms = time_ms(&be, &mut flush, || {
            device::scale_add_positions(&be, &h, &b2, 256, 16.0).unwrap();
        });
        println!(
            "{{\"name\": \"scale_add_positions_32x247x256\", \"ms\": {ms:.4}, \"bytes\": {}}}",
            2 * h.len() * 4
        );
    }
    // A whole interface + PR-head training step on a bf16 stack already on the GPU (forward, CTC,
    // backward, clip, AdamW; the loss comes back to the host): 32 utterances x 500 frames. HConv
    // on the Base and Large stacks; WS and CLS pooling (8 heads, FFN 3072, GELU: `--interfaces
    // cls`) on Base. HConv and CLS report the flops of their GEMMs (CLS: K, V over every layer
    // token, out_proj, FFN, head; 6 x rows x in x out each for forward + both backward products);
    // WS is bandwidth-bound: bytes = the stack read forward and backward.
    if run("step") {
        use strata::models::interface::{ClsActivation, InterfaceConfig, InterfaceKind};
        use strata::train::side_by_side::{HeadKind, Pair};
        let (utts, t, v, u) = (32usize, 500usize, 71usize, 120usize);
        let n = utts * t;
        let batch = strata::PackedBatch::from_lengths(&vec![t; utts]).unwrap();
        let targets: Vec<Vec<usize>> = (0..utts)
            .map(|i| (0..u).map(|j| 1 + (i * 7 + j * 13) % (v - 1)).collect())
            .collect();
        let head_macs = |d_feat: usize| d_feat * 256 + 256 * v;
        let hconv = |l: usize, d: usize| {
            let plan = strata::models::interface::hconv_plan(l, d, 5, 3).unwrap();
            let (macs, dx_macs) = hconv_macs(&plan);
            let flops = 2 * n * (2 * macs + dx_macs + 3 * head_macs(plan.output_dim()));
            (
                InterfaceKind::HConv {
                    kernel: 5,
                    stride: 3,
                    depth: None,
                },
                ("flops", flops),
            )
        };
        let (l, d) = (13usize, 768usize);
        let cls = InterfaceKind::ClsPool {
            heads: 8,
            ffn_dim: 4 * d,
            activation: ClsActivation::Gelu,
        };
        let cls_flops = 6 * (2 * n * l * d * d + n * d * d + 2 * n * d * 4 * d + n * head_macs(d));
        let rows = [
            ("step_base", 13usize, 768usize, hconv(13, 768)),
            ("step_large", 25, 1024, hconv(25, 1024)),
            (
                "step_ws_base",
                l,
                d,
                (InterfaceKind::WeightedSum, ("bytes", 2 * n * l * d * 2)),
            ),
            ("step_cls_base", l, d, (cls, ("flops", cls_flops))),
        ];
        // One step's time for `pair` over an [n, l, d] stack; with STRATA_PROFILE=1 also one more
        // step's GPU time per kernel and its host-side counts (launches, copies, allocations), on
        // stderr.
        let mut time_step = |pair: &Pair, l: usize, d: usize| {
            let mut dev = strata::train::device_step::DevicePair::from_pair(&be, pair).unwrap();
            let x: Vec<bf16> = (0..n * l * d)
                .map(|i| bf16::from_f32(((i % 17) as f32 - 8.0) * 0.1))
                .collect();
            let x0 = be.upload(&x).unwrap();
            let ms = time_ms(&be, &mut flush, || {
                dev.train_step_on(&be, &x0, &batch, &targets).unwrap();
            });
            if std::env::var("STRATA_PROFILE").is_ok_and(|v| v == "1") {
                rt.profile_start();
                let started = std::time::Instant::now();
                let (r, traffic) =
                    strata::runtime::traffic_of(|| dev.train_step_on(&be, &x0, &batch, &targets));
                let wall = started.elapsed().as_secs_f64() * 1e3;
                r.unwrap();
                print_profile(&pair.name, ms, &rt.profile_take().unwrap());
                eprintln!(
                    "  host side: {} launches, {} uploads ({} B), {} downloads ({} B), {} allocations ({:.1} MB)",
                    traffic.total_launches(),
                    traffic.uploads,
                    traffic.upload_bytes,
                    traffic.downloads,
                    traffic.download_bytes,
                    traffic.allocations,
                    traffic.allocation_bytes as f64 / 1e6
                );
                // Where the host's time went (this profiled step: its launches also record
                // events). The GPU idles while the host prepares what comes next: a step whose
                // timed median is near its host time, less the wait inside the loss download, is
                // host-bound.
                let h = traffic.host;
                let ms_of = |d: std::time::Duration| d.as_secs_f64() * 1e3;
                eprintln!(
                    "  host time {wall:.3} ms: launching {:.3}, uploads {:.3}, allocations {:.3}, \
                     downloads (waiting for the GPU) {:.3}, synchronizes {:.3}, the rest (strata's \
                     host code) {:.3}",
                    ms_of(h.launch),
                    ms_of(h.upload),
                    ms_of(h.allocate),
                    ms_of(h.download),
                    ms_of(h.synchronize),
                    wall - ms_of(h.total())
                );
                // The memory pool after these steps (each ends waiting for the loss): what it
                // holds, and its release threshold (u64::MAX: keep everything). Near the step's
                // allocations: freed buffers are reused; near zero: each step maps them again.
                if let Some((held, threshold)) = rt.pool_state() {
                    eprintln!(
                        "  memory pool: {:.1} MB held, release threshold {threshold}",
                        held as f64 / 1e6
                    );
                }
            }
            ms
        };
        for (name, l, d, (kind, (metric, amount))) in rows {
            let pair = Pair::new(
                name,
                &InterfaceConfig::new(l, d, kind),
                HeadKind::Ctc { vocab: v },
                AdamConfig::adamw(1e-3),
                Some(1.0),
                0,
            )
            .unwrap();
            let ms = time_step(&pair, l, d);
            println!("{{\"name\": \"{name}\", \"ms\": {ms:.4}, \"{metric}\": {amount}}}");
        }
        use strata::models::asr_head::AsrHeadConfig;
        use strata::models::mlsuperb_head::MlSuperbHeadConfig;
        use strata::train::side_by_side::{CtcHead, PairSpec};
        let (l, d) = (13usize, 768usize);
        // WS (Base) with another CTC head: the step's time and the row.
        let mut head_row = |name: &str, head: CtcHead, flops: usize| {
            let mut spec = PairSpec::new(name, InterfaceConfig::weighted_sum(l, d));
            spec.ctc_head = head;
            let kind = HeadKind::Ctc { vocab: v };
            let pair = Pair::from_spec(&spec, kind, AdamConfig::adamw(1e-3), Some(1.0), 0).unwrap();
            let ms = time_step(&pair, l, d);
            println!("{{\"name\": \"{name}\", \"ms\": {ms:.4}, \"flops\": {flops}}}");
        };
        // WS (Base) + the ML-SUPERB head on the same batch, without dropout and SpecAugment (as
        // the PyTorch row, tools/bench_heads_torch.py): 500 -> 249 -> 247 frames per utterance.
        // Flops: its GEMMs and the attention's two products per head, 6 x their MACs (forward,
        // and the two products of each backward).
        {
            let c = MlSuperbHeadConfig {
                dropout: 0.0,
                attention_dropout: 0.0,
                specaug: None,
                ..MlSuperbHeadConfig::default()
            };
            let (w, (t1, t2)) = (c.width, (249usize, 247usize));
            let (n1, n2) = (utts * t1, utts * t2);
            let macs = n * d * 80
                + n1 * 39 * 9 * w
                + n2 * 37 * 9 * w * w
                + n2 * 37 * w * w
                + c.blocks * (4 * n2 * w * w + 2 * n2 * w * c.ffn + 2 * utts * t2 * t2 * w)
                + n2 * w * v;
            head_row("step_mlsuperb_ws_base", CtcHead::MlSuperb(c), 6 * macs);
        }
        // WS (Base) + the SUPERB ASR head (s3prl's sizes, no dropout, as the PyTorch row) on the
        // same batch: 500 steps of each direction's recurrence, one launch a step. Flops: the
        // projector, both layers' input and recurrent products, the output Linear; 6 x MACs.
        {
            let c = AsrHeadConfig {
                dropout: 0.0,
                ..AsrHeadConfig::default()
            };
            let h4 = 4 * c.hidden;
            let macs = n
                * (d * c.project_dim
                    + 2 * h4 * (c.project_dim + c.hidden)
                    + 2 * h4 * (2 * c.hidden + c.hidden)
                    + 2 * c.hidden * v);
            head_row("step_asr_ws_base", CtcHead::Asr(c), 6 * macs);
        }
    }
    if run("adamw") {
        for n in [4_424_832usize + 768 * 256 + 256 * 43, 100_000_000] {
            let p = be.upload(&vec![0.1f32; n]).unwrap();
            let g = be.upload(&vec![0.01f32; n]).unwrap();
            let (m, v) = (be.zeros::<f32>(n).unwrap(), be.zeros::<f32>(n).unwrap());
            let copy = be.zeros::<bf16>(n).unwrap();
            let cfg = AdamConfig::adamw(1e-3);
            let mut step = 0;
            let t = time_ms(&be, &mut flush, || {
                step += 1;
                device::adam_step(&be, &cfg, step, &p, &g, &m, &v, Some(&copy), None).unwrap();
            });
            // Read param, grad, m, v; write param, m, v, bf16 copy.
            println!(
                "{{\"name\": \"adamw_{n}\", \"ms\": {t:.4}, \"bytes\": {}}}",
                n * (4 * 4 + 3 * 4 + 2)
            );
        }
    }
    // Multi-tensor AdamW over the tensors of an HConv (Base) + PR-head pair, as the device step
    // runs it: one launch over the table of buffers.
    if run("adamw") {
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
        let sizes: Vec<usize> = pair.store.iter().map(|q| q.value.numel()).collect();
        let n: usize = sizes.iter().sum();
        let bufs: Vec<_> = sizes
            .iter()
            .map(|&k| {
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
        let cfg = AdamConfig::adamw(1e-3);
        let mut step = 0;
        let t = time_ms(&be, &mut flush, || {
            step += 1;
            device::adam_step_multi(&be, &cfg, step, &table, None, false).unwrap();
        });
        println!(
            "{{\"name\": \"adamw_multi_hconv_base\", \"ms\": {t:.4}, \"bytes\": {}}}",
            n * (4 * 4 + 3 * 4 + 2)
        );
        // The global gradient norm for clipping over the same tensors (reads every gradient).
        let t = time_ms(&be, &mut flush, || {
            device::clip_coefficient_table(&be, &table, 1.0).unwrap();
        });
        println!(
            "{{\"name\": \"clip_norm_hconv_base\", \"ms\": {t:.4}, \"bytes\": {}}}",
            n * 4
        );
    }
    be.synchronize().unwrap();
    // Last, so that a failure here costs no other row. The heads' kernels changed on 2026-12-07
    // without a GPU (RESULTS.md), each on its own at the step's size: the general weight gradient
    // of a Linear over 9-wide patches (the ML-SUPERB head's first conv, split over rows),
    // LayerNorm's backward with its affine reduce (the ML-SUPERB head's width), CLS pooling's
    // column sum, the packed self-attention, and one bidirectional LSTM layer of the ASR head
    // (both directions stepped together, 500 steps forward, then backward).
    if run("heads") {
        let rows = 32 * 249 * 39;
        let (in_f, out_f) = (9usize, 256usize);
        let x = be.upload(&vec![bf16::from_f32(0.5); rows * in_f]).unwrap();
        let w = be
            .upload(&vec![bf16::from_f32(0.01); out_f * in_f])
            .unwrap();
        let dy = be.upload(&vec![bf16::from_f32(0.1); rows * out_f]).unwrap();
        let (dw, db) = (
            be.zeros::<f32>(out_f * in_f).unwrap(),
            be.zeros::<f32>(out_f).unwrap(),
        );
        let ms = time_ms(&be, &mut flush, || {
            device::linear_backward(&be, &x, rows, in_f, out_f, &w, &dy, (&dw, &db), true).unwrap();
        });
        println!(
            "{{\"name\": \"linear_9_to_256_backward_{rows}\", \"ms\": {ms:.4}, \"bytes\": {}}}",
            2 * rows * (in_f + out_f) * 2
        );
        let (rows, d) = (32 * 247, 256usize);
        let xs = be.upload(&vec![0.5f32; rows * d]).unwrap();
        let (lw, lb) = (
            be.upload(&vec![1.0f32; d]).unwrap(),
            be.zeros::<f32>(d).unwrap(),
        );
        let (_, saved) =
            device::layernorm_forward(&be, &xs, rows, d, Some((&lw, &lb)), 1e-5).unwrap();
        let (gw, gb) = (be.zeros::<f32>(d).unwrap(), be.zeros::<f32>(d).unwrap());
        let ms = time_ms(&be, &mut flush, || {
            device::layernorm_backward(&be, &xs, rows, d, Some(&lw), &saved, &xs, Some((&gw, &gb)))
                .unwrap();
        });
        println!(
            "{{\"name\": \"layernorm_backward_{rows}x{d}\", \"ms\": {ms:.4}, \"bytes\": {}}}",
            3 * rows * d * 4
        );
        // CLS pooling's rows (32 x 500 frames of 13 layers of 768): LayerNorm from bf16 into bf16
        // (read + write 2 bytes each), and its K and V projections' bf16 gradients summed into
        // fp32 (read 2 + 2, write 4).
        let (rows, d) = (16000 * 13, 768usize);
        let x16 = be.upload(&vec![bf16::from_f32(0.5); rows * d]).unwrap();
        let x = device::AnyBuf::Bf16(&x16);
        let (lw, lb) = (
            be.upload(&vec![1.0f32; d]).unwrap(),
            be.zeros::<f32>(d).unwrap(),
        );
        let ms = time_ms(&be, &mut flush, || {
            device::layernorm_forward_any(&be, x, rows, d, Some((&lw, &lb)), 1e-5, true).unwrap();
        });
        println!(
            "{{\"name\": \"layernorm_bf16_{rows}x{d}\", \"ms\": {ms:.4}, \"bytes\": {}}}",
            4 * rows * d
        );
        let ms = time_ms(&be, &mut flush, || {
            device::add_grads(&be, x, x).unwrap();
        });
        println!(
            "{{\"name\": \"add_grads_bf16_{rows}x{d}\", \"ms\": {ms:.4}, \"bytes\": {}}}",
            8 * rows * d
        );
        drop(x16);
        let (rows, c) = (16000usize, 768usize);
        let xs = be.upload(&vec![0.5f32; rows * c]).unwrap();
        let out = be.zeros::<f32>(c).unwrap();
        let ms = time_ms(&be, &mut flush, || {
            device::col_sum_accumulate(&be, &xs, rows, c, &out).unwrap();
        });
        println!(
            "{{\"name\": \"col_sum_{rows}x{c}\", \"ms\": {ms:.4}, \"bytes\": {}}}",
            rows * c * 4
        );
        let batch = strata::PackedBatch::from_lengths(&vec![247; 32]).unwrap();
        let (heads, dh) = (8usize, 32usize);
        let n = batch.total_frames() * heads * dh;
        let q = be.upload(&vec![0.1f32; n]).unwrap();
        let attn = device::PackedAttn {
            q: &q,
            k: &q,
            v: &q,
            batch: &batch,
            heads,
            head_dim: dh,
            dropout: None,
        };
        // Scores and the weighted sums, forward and the backward's two passes: 6 products. The
        // tiled kernels (the default since 2026-12-07) and the per-row ones they replaced.
        let flops = 6 * 2 * 32 * heads * 247 * 247 * dh;
        for (kernels, name) in [
            (device::PackedAttnKernels::Tiled, "packed_attention"),
            (device::PackedAttnKernels::Rows, "packed_attention_rows"),
        ] {
            let ms = time_ms(&be, &mut flush, || {
                let (_, probs) = attn.forward_on(&be, kernels).unwrap();
                attn.backward_on(&be, &probs, &q, kernels).unwrap();
            });
            println!(
                "{{\"name\": \"{name}_fwd_bwd_32x247_8x32\", \"ms\": {ms:.4}, \"flops\": {flops}}}"
            );
        }
        let batch = strata::PackedBatch::from_lengths(&vec![500; 32]).unwrap();
        let (frames, hidden) = (batch.total_frames(), 1024usize);
        let pre = be.upload(&vec![0.01f32; frames * 4 * hidden]).unwrap();
        let w_hh = be.upload(&vec![0.001f32; 4 * hidden * hidden]).unwrap();
        let h = be.zeros::<f32>(frames * 2 * hidden).unwrap();
        let scheds = [false, true]
            .map(|reverse| device::DeviceLstmSchedule::upload(&be, &batch, reverse).unwrap());
        let dirs: Vec<device::LstmDirection> = scheds
            .iter()
            .enumerate()
            .map(|(d, sched)| device::LstmDirection {
                pre: &pre,
                w_hh: &w_hh,
                sched,
                cols: device::Cols {
                    stride: 2 * hidden,
                    offset: d * hidden,
                },
            })
            .collect();
        // The recurrent products of both directions, forward and backward: 2 x 2 x 2 x frames x
        // 4H x H.
        let flops = 8 * frames * 4 * hidden * hidden;
        let ms = time_ms(&be, &mut flush, || {
            let states = device::lstm_forward_directions(&be, &dirs, hidden, &h).unwrap();
            let back: Vec<device::LstmBackDirection> = dirs
                .iter()
                .zip(&states)
                .map(|(d, states)| device::LstmBackDirection {
                    w_hh: d.w_hh,
                    sched: d.sched,
                    cols: d.cols,
                    states,
                })
                .collect();
            device::lstm_backward_directions(&be, &h, &back, hidden).unwrap();
        });
        println!(
            "{{\"name\": \"lstm_layer_fwd_bwd_32x500x1024\", \"ms\": {ms:.4}, \"flops\": {flops}}}"
        );
    }
    std::process::ExitCode::SUCCESS
}
