//! Training curves as a PNG, drawn from a run's `log.jsonl`: the training loss of each pair (a
//! moving average over ~1% of the run, raw points when short) with its dev loss where logged (CTC
//! tasks), and its dev error rate (PER / CER, or 1 - accuracy), one colour per pair, with axis ranges and a legend in a small built-in bitmap
//! font (no font files, no plotting library: the `png` crate only encodes).

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

const W: usize = 900;
const H: usize = 640;
const COLOURS: [[u8; 3]; 8] = [
    [31, 119, 180],
    [214, 39, 40],
    [44, 160, 44],
    [148, 103, 189],
    [255, 127, 14],
    [23, 190, 207],
    [140, 86, 75],
    [127, 127, 127],
];

/// 3x5 glyphs (letters in capital shapes), row-major, '#' = ink. Unknown characters draw as '?'.
fn glyph(c: char) -> &'static str {
    match c.to_ascii_lowercase() {
        '0' => "####.##.##.####",
        '1' => ".#.##..#..#.###",
        '2' => "###..#####..###",
        '3' => "###..####..####",
        '4' => "#.##.####..#..#",
        '5' => "####..###..####",
        '6' => "####..####.####",
        '7' => "###..#..#..#..#",
        '8' => "####.#####.####",
        '9' => "####.####..####",
        '.' => ".............#.",
        ',' => "..........#.#..",
        '-' => "......###......",
        '+' => "....#.###.#....",
        '%' => "#.#..#.#.#..#.#",
        '/' => "..#..#.#.#..#..",
        '(' => ".#.#..#..#...#.",
        ')' => ".#...#..#..#.#.",
        ':' => "....#.....#....",
        '_' => "............###",
        '=' => "...###...###...",
        ' ' => "...............",
        'a' => ".#.#.#####.##.#",
        'b' => "##.#.###.#.###.",
        'c' => ".###..#..#...##",
        'd' => "##.#.##.##.###.",
        'e' => "####..####..###",
        'f' => "####..####..#..",
        'g' => ".###..#.##.#.##",
        'h' => "#.##.#####.##.#",
        'i' => "###.#..#..#.###",
        'j' => "..#..#..##.#.#.",
        'k' => "#.##.###.#.##.#",
        'l' => "#..#..#..#..###",
        'm' => "#.########.##.#",
        'n' => "##.#.##.##.##.#",
        'o' => ".#.#.##.##.#.#.",
        'p' => "##.#.###.#..#..",
        'q' => ".#.#.##.###..##",
        'r' => "##.#.###.#.##.#",
        's' => ".###...#...###.",
        't' => "###.#..#..#..#.",
        'u' => "#.##.##.##.####",
        'v' => "#.##.##.##.#.#.",
        'w' => "#.##.########.#",
        'x' => "#.##.#.#.#.##.#",
        'y' => "#.##.#.#..#..#.",
        'z' => "###..#.#.#..###",
        _ => "###..#.#.....#.",
    }
}

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            for (dx, dy) in [(0, 0), (1, 0), (0, 1)] {
                self.set(x.round() as i64 + dx, y.round() as i64 + dy, c);
            }
        }
    }
    /// Text at scale 2 (6 x 10 pixels per glyph, 8 px advance).
    fn text(&mut self, x: i64, y: i64, s: &str, c: [u8; 3]) {
        for (k, ch) in s.chars().enumerate() {
            for (i, b) in glyph(ch).bytes().enumerate() {
                if b == b'#' {
                    let (gx, gy) = (
                        x + 8 * k as i64 + 2 * (i % 3) as i64,
                        y + 2 * (i / 3) as i64,
                    );
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        self.set(gx + dx, gy + dy, c);
                    }
                }
            }
        }
    }
}

fn tick(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

/// One panel: series of (x, y) per pair in the box (left, top, width, height).
fn panel(
    cv: &mut Canvas,
    rect: (f64, f64, f64, f64),
    title: &str,
    series: &[(String, Vec<(f64, f64)>)],
) {
    let (left, top, w, h) = rect;
    let grey = [90, 90, 90];
    cv.text(left as i64, top as i64 - 16, title, [0, 0, 0]);
    cv.line((left, top), (left, top + h), grey);
    cv.line((left, top + h), (left + w, top + h), grey);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|p| p.1.is_finite())
        .collect();
    if pts.is_empty() {
        cv.text(
            left as i64 + 10,
            (top + h / 2.0) as i64,
            "no data yet",
            grey,
        );
        return;
    }
    let fold = |f: fn(f64, f64) -> f64, init: f64, sel: fn(&(f64, f64)) -> f64| {
        pts.iter().map(sel).fold(init, f)
    };
    let (x0, x1) = (
        fold(f64::min, f64::INFINITY, |p| p.0),
        fold(f64::max, f64::NEG_INFINITY, |p| p.0),
    );
    let (mut y0, mut y1) = (
        fold(f64::min, f64::INFINITY, |p| p.1),
        fold(f64::max, f64::NEG_INFINITY, |p| p.1),
    );
    if y1 - y0 < 1e-12 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let xs = (x1 - x0).max(1e-12);
    let map = |(x, y): (f64, f64)| (left + (x - x0) / xs * w, top + h - (y - y0) / (y1 - y0) * h);
    cv.text(left as i64 - 70, top as i64, &tick(y1), grey);
    cv.text(left as i64 - 70, (top + h) as i64 - 10, &tick(y0), grey);
    cv.text(
        left as i64,
        (top + h) as i64 + 6,
        &format!("step {}", x0),
        grey,
    );
    let end = format!("{}", x1);
    cv.text(
        (left + w) as i64 - 8 * end.len() as i64,
        (top + h) as i64 + 6,
        &end,
        grey,
    );
    for (k, (name, s)) in series.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let finite: Vec<(f64, f64)> = s.iter().copied().filter(|p| p.1.is_finite()).collect();
        if finite.len() == 1 {
            let (x, y) = map(finite[0]);
            cv.line((x - 3.0, y), (x + 3.0, y), c);
        }
        for pair in finite.windows(2) {
            cv.line(map(pair[0]), map(pair[1]), c);
        }
        let ly = top as i64 + 8 + 14 * k as i64;
        cv.line(
            (left + w - 150.0, ly as f64 + 4.0),
            (left + w - 130.0, ly as f64 + 4.0),
            c,
        );
        cv.text((left + w - 124.0) as i64, ly, name, c);
    }
}

/// Moving average over `win` points.
fn smooth(v: &[(f64, f64)], win: usize) -> Vec<(f64, f64)> {
    if win <= 1 {
        return v.to_vec();
    }
    let mut out = Vec::new();
    let mut sum = 0.0;
    for i in 0..v.len() {
        sum += v[i].1;
        if i >= win {
            sum -= v[i - win].1;
        }
        if i + 1 >= win {
            out.push((v[i].0, sum / win as f64));
        }
    }
    out
}

/// Redraws `out/curves.png` from `out/log.jsonl`.
pub fn write_curves(out: &Path) -> Result<()> {
    let log = out.join("log.jsonl");
    let text = std::fs::read_to_string(&log).map_err(|e| Error::Io {
        path: log.display().to_string(),
        detail: format!("cannot read the log: {e}"),
    })?;
    let mut loss: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut dev: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut dev_loss: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut accuracy = false;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(pair), Some(step)) = (v["pair"].as_str(), v["step"].as_f64()) else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            loss.entry(pair.to_string()).or_default().push((step, l));
        }
        if let Some(l) = v["dev_loss"].as_f64() {
            dev_loss
                .entry(format!("{pair} dev"))
                .or_default()
                .push((step, l));
        }
        if let Some(a) = v["dev_accuracy"].as_f64() {
            accuracy = true;
            dev.entry(pair.to_string())
                .or_default()
                .push((step, 100.0 * a));
        } else if let Some(e) = v["dev_error_rate"].as_f64() {
            dev.entry(pair.to_string())
                .or_default()
                .push((step, 100.0 * e));
        }
    }
    let steps = loss.values().map(Vec::len).max().unwrap_or(0);
    let win = (steps / 100).max(1);
    // The dev losses (CTC tasks) beside the training losses they are the dev set's share of.
    let with_dev = !dev_loss.is_empty();
    let loss: Vec<(String, Vec<(f64, f64)>)> = loss
        .into_iter()
        .map(|(k, v)| (k, smooth(&v, win)))
        .chain(dev_loss)
        .collect();
    let dev: Vec<(String, Vec<(f64, f64)>)> = dev.into_iter().collect();
    let mut cv = Canvas::new();
    let mut title = if win > 1 {
        format!("training loss (moving average of {win} steps)")
    } else {
        "training loss".to_string()
    };
    if with_dev {
        title.push_str(" and dev loss");
    }
    panel(&mut cv, (90.0, 40.0, 780.0, 240.0), &title, &loss);
    let dev_title = if accuracy {
        "dev accuracy (%)"
    } else {
        "dev error rate (%)"
    };
    panel(&mut cv, (90.0, 360.0, 780.0, 240.0), dev_title, &dev);
    let path = out.join("curves.png");
    let tmp = out.join("curves.png.tmp");
    let err = |e: String| Error::Io {
        path: path.display().to_string(),
        detail: format!("cannot write the curves: {e}"),
    };
    let file = std::fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| err(e.to_string()))?;
    writer
        .write_image_data(&cv.px)
        .map_err(|e| err(e.to_string()))?;
    writer.finish().map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))
}
