//! The strata command line: `demo` (the built-in default), `extract`, `train`, `eval`.
//! Usage text below; each command lives in its own module.

mod demo;
mod extract;
mod train;

use std::path::Path;
use std::process::ExitCode;

pub const USAGE: &str = "usage: strata demo [--steps N] [--seed S] [--lr X] [--device auto|cpu|cuda|emulator]
       strata extract --model DIR --out FEATS.safetensors [--dtype f32|f16] [--normalize auto|on|off] [--overwrite] A.wav|A.flac [B ...]
       strata extract --model DIR --data DATA --out CACHE_DIR [--dtype f32|f16] [--normalize auto|on|off] [--skip-bad] [--overwrite]
       strata train [--config RUN.toml] --model DIR --train DATA --dev DATA --out DIR [options]
       strata eval --model DIR|--features DIR --run OUT --pair NAME[,NAME..]|all --data DATA [--which best|latest|averaged] [--hyp FILE]
                   [--task units|chars|classify|sv] [--normalize auto|on|off] [--skip-bad]
                   [--device auto|cpu|cuda|emulator] [--lexicon FILE[,FILE..]]

  demo   makes a deterministic speech-like corpus in memory (16 phone-like units with transcripts),
         runs a tiny random-init HuBERT-shaped upstream (13 states x 64 dims) over it once, trains the
         weighted-sum (WS) and hierarchical-convolution (HConv) interfaces side by side, each with a
         SUPERB phone-recognition head (CTC), and prints dev PER, training speed and parameter counts.
         No downloads, about 10 s on the CPU; --device cuda trains on the GPU (the bf16 device
         step), --device picks as for train.

  extract  runs a Hugging Face HuBERT / wav2vec2 / WavLM model directory (config.json +
         safetensors) on 16 kHz mono WAV or FLAC files and writes, for each file, a tensor named by the
         file's stem with shape [frames, layers + 1, hidden] (every hidden state, as transformers'
         output_hidden_states). With --data, every utterance of a data set goes into a feature cache
         folder (safetensors shards + index.json) for `train --features`. --normalize auto follows
         the model directory's preprocessor_config.json (do_normalize), off when it has none. An
         existing output (file or cache) is replaced only with --overwrite.

  train  trains one or several interfaces, each with its head, side by side from ONE upstream pass
         per batch. DATA is a Kaldi-style folder (wav.scp + text, or utt2label for classify, or
         utt2spk for sv), a LibriSpeech folder as it ships (*.trans.txt beside the .flac files;
         units or chars), a VoxCeleb folder as it ships (wav/SPEAKER/VIDEO/UTT.wav; sv), Fluent
         Speech Commands' data/*.csv (classify: action+object+location) or a TSV manifest
         (path<TAB>label); an sv dev or test set is a folder with wav.scp and trials
         (\"1 idA idB\" / \"0 idA idB\", or Kaldi's \"idA idB target|nontarget\"), or VoxCeleb's
         audio with its trial list (veri_test2.txt, entries paths below wav/) saved as trials.
         Writes OUT/run.json, OUT/vocab.txt, OUT/log.jsonl (loss per pair per step, dev metric per
         evaluation), OUT/curves.png and OUT/<pair>/{latest,best}/ checkpoints. Options (defaults
         in brackets):
           --task units|chars|classify|sv  phones (space-separated) or characters with CTC + PR
                                        head, or one class per utterance with the utterance
                                        classifier, or speaker verification (SUPERB SV: x-vector
                                        head, AM-softmax on the training speakers, EER of cosine
                                        scores on the dev trials) [units]
           --head superb|mlsuperb|asr  the CTC tasks' head: SUPERB PR's two Linear layers, or
                                   ML-SUPERB's ESPnet downstream (Conv2d subsampling to half
                                   the frame rate, 2 transformer blocks, CTC summed over the
                                   batch / its utterances, SpecAugment, dropout 0.1), or
                                   SUPERB ASR's (Linear to 1024, 2 bidirectional LSTM layers of
                                   1024 per direction, dropout 0.2; s3prl trains it with Adam
                                   at 1e-4: give --optimizer adam --lr 1e-4)
                                   [superb]
           --interfaces LIST  comma-separated [ws,hconv]: ws, hconv (kernel 5, stride 3, depth
                              floor(log3 L)), hconv-kKsSdD with any of kernel, stride, depth
                              (e.g. hconv-k3s2, hconv-d1), concat, groupwsN (N groups), single
                              (last layer), single-N (layer N; 0 = CNN features), cls, ws-large
                              (WS with a head widened to the hconv pair's parameter count:
                              \"WS + Large DS\"),
                              pca (PCA + Concat, D/L components per layer, fitted on the first
                              100000 training frames) or pcaN (N components per layer)
           --steps N [1000]  --lr X [1e-3]  --schedule constant|linear|cosine [constant]  --warmup N [0]
           --optimizer adamw|adam [adamw]  --weight-decay X [0.01 adamw, 0 adam]  --clip C (0: off) [1]
           --batch-seconds S  audio per micro-batch [60]   --accum N  micro-batches per step [1]
           --crop-seconds S  train on a random S-second window of each longer utterance, drawn
                             anew at every step (s3prl's SV: 8); needs the upstream, not --features
           --eval-every N  dev evaluation and checkpoints every N steps and at the end (0: at the
                           end only) [100]
           --save-every N  also the latest checkpoints every N steps in between, so a stopped run
                           loses at most N steps (0: with the evaluations only) [0]
           --average-best N  keep the parameters of the N evaluations of lowest dev error
                             (OUT/<pair>/nbest) and at the end score their average
                             (OUT/<pair>/averaged; `eval --which averaged`): ESPnet's model
                             averaging (ML-SUPERB's recipe: 5 by dev loss) [0: off]
           --average-by error|loss  what ranks the evaluations: the dev error rate, or the dev loss
                                    (CTC tasks; logged as dev_loss at each evaluation) [error]
           --seed S [0]  --no-shuffle
           --device auto|cpu|cuda|emulator  where the step runs: cpu = the f32 reference engine;
                    cuda = the GPU kernels (bf16); emulator = the GPU kernels emulated on the CPU,
                    slow, for testing; auto = cpu until the device step is verified on a GPU
                    (then cuda when one is usable) [auto]
           --normalize auto|on|off [auto]  --vocab FILE  --skip-bad (count and skip bad utterances)
           --lexicon FILE[,FILE..]  word transcripts to phones for --task units, as s3prl's PR
                                    prepares LibriSpeech (lines WORD PHONE PHONE.., the first
                                    pronunciation of a word kept, words looked up upper-cased;
                                    eval uses the run's unless given another)
           --features DIR  hidden states from feature caches DIR/<train stem>, DIR/<dev stem>,
                           extracted first (with --model) when missing
           --resume  continue bit for bit from OUT/<pair>/latest
           --save-init FILE  write every pair's initial parameters (<pair>.<parameter>)
           --init-from FILE  start from such a file instead of a random init
           --config RUN.toml  the same settings as TOML keys (batch_seconds = 60,
                              interfaces = [\"ws\", \"hconv\"], resume = true); flags override it

  eval   decodes DATA with a pair trained by `train` (OUT/<pair>/best by default, with
         OUT/vocab.txt and the task and normalization recorded in OUT/run.json), prints its error
         rate (PER, CER and WER), accuracy or EER (sv, on DATA's trials) and writes every utterance's
         hypothesis, or every trial's score, to --hyp (default OUT/<pair>/hyp-<which>.tsv: id,
         hypothesis, reference). With --features DIR the hidden
         states come from the feature cache DIR/<data stem> (extracted first when --model is given
         too). The upstream and normalization must be the ones the run trained on. Several pairs
         (a list, or all of the run's) are scored from one upstream pass per batch.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `strata train --help` and the like: the usage text, not an unknown-option error.
    if args.len() > 1 && args[1..].iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let result = match args.first().map(String::as_str) {
        Some("demo") => {
            demo::parse_demo(&args[1..]).and_then(|a| demo::demo(&a).map_err(|e| e.to_string()))
        }
        Some("extract") => extract::extract(&args[1..]),
        Some("train") => train::train_cmd(&args[1..]),
        Some("eval") => train::eval_cmd(&args[1..]),
        Some("--version") | Some("-V") => {
            println!(
                "strata {} ({})",
                env!("CARGO_PKG_VERSION"),
                strata::GIT_COMMIT
            );
            Ok(())
        }
        Some("--help") | Some("-h") | Some("help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command '{other}'\n\n{USAGE}")),
        None => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `--normalize auto|on|off` (auto: None).
pub fn parse_normalize(v: &str) -> Result<Option<bool>, String> {
    match v {
        "auto" => Ok(None),
        "on" => Ok(Some(true)),
        "off" => Ok(Some(false)),
        other => Err(format!("--normalize takes auto, on or off, got '{other}'")),
    }
}

/// The input normalization for a model directory: `requested`, or its preprocessor_config.json's
/// do_normalize (off when it has none).
pub fn model_normalize(dir: &Path, requested: Option<bool>) -> Result<bool, String> {
    if let Some(n) = requested {
        return Ok(n);
    }
    let p = dir.join("preprocessor_config.json");
    if !p.exists() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", p.display()))?;
    Ok(v.get("do_normalize")
        .and_then(|b| b.as_bool())
        .unwrap_or(false))
}
