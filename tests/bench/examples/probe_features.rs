//! Feature study for the verbalizer head: which frozen features a linear probe can use.
//! Computes, for a task's train/dev/held-out split, the final hidden state at the prompt's
//! last position and its mean over all prompt positions (through the tail path), then fits a
//! softmax probe on each feature set by full-batch gradient descent (the backprop reference
//! for a probe on those features) and prints held-out accuracy at the best dev epoch.
//!
//! `cargo run --release -p fwdllm-bench --example probe_features -- --task edge-agent/tasks/ag_news.toml --train 2000`
//!
//! `--fg-grid` first sweeps the head's forward-gradient optimiser with exact directional
//! derivatives; `FG_GRID` lists the configurations, `;`-separated, each
//! `directions,batch,steps,adam(0|1),lr_half_life(0 = constant),lr1|lr2|...` (directions 0 =
//! the exact batch gradient), e.g.
//! `FG_GRID="0,8,3000,0,2000,0.1|0.3;1024,32,3000,0,2000,0.01" probe_features --train 7000 --fg-grid`
//! (`FG_CENTRED=1` also runs every configuration on features centred on the empty prompt's).

use std::path::PathBuf;

use anyhow::Context;
use fwdllm_agent::data::{self, TaskConfig};
use fwdllm_agent::engine::{Engine, EngineConfig, PooledHidden, TrainConfig};

struct Args {
    task: PathBuf,
    model: PathBuf,
    train: usize,
    threads: u32,
    epochs: usize,
    /// Also simulate forward-gradient training of the head on the fixed features.
    fg: bool,
    /// Sweep the forward-gradient optimiser (directions, batch, Adam, steps) with exact
    /// directional derivatives (the limit ε → 0 of what the engine measures).
    fg_grid: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        task: "edge-agent/tasks/bbc.toml".into(),
        model: ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        train: 1000,
        threads: 2,
        epochs: 400,
        fg: false,
        fg_grid: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--fg" {
            a.fg = true;
            continue;
        }
        if k == "--fg-grid" {
            a.fg_grid = true;
            continue;
        }
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--task" => a.task = v.into(),
            "--model" => a.model = v.into(),
            "--train" => a.train = v.parse()?,
            "--threads" => a.threads = v.parse()?,
            "--epochs" => a.epochs = v.parse()?,
            _ => anyhow::bail!("unknown argument {k}"),
        }
    }
    Ok(a)
}

type Feats = Vec<PooledHidden>;

fn features(e: &mut Engine, ex: &[data::Example]) -> anyhow::Result<Feats> {
    let task = e.task().cloned().context("task")?;
    let mut out = Vec::new();
    for chunk in ex.chunks(8) {
        let texts: Vec<&str> = chunk.iter().map(|x| x.text.as_str()).collect();
        out.extend(e.pooled_hidden(&task, &texts)?);
    }
    Ok(out)
}

/// Standard normal variates from SplitMix64 + Box-Muller (the study needs no bit-exactness).
struct Normal(fwdllm_shared::perturb::SplitMix64);

impl Normal {
    fn next(&mut self) -> f64 {
        let u1 = ((self.0.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = ((self.0.next_u64() >> 11) as f64) / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Softmax loss of head rows `w` (K x (d+1), bias last) on rows `idx` of `x`, and accuracy.
fn head_loss(w: &[f64], x: &[Vec<f64>], y: &[usize], idx: &[usize], k: usize) -> (f64, f64) {
    let d = x[0].len();
    let (mut loss, mut correct) = (0.0, 0);
    for &i in idx {
        let z: Vec<f64> = (0..k)
            .map(|c| {
                let row = &w[c * (d + 1)..(c + 1) * (d + 1)];
                row[d] + row[..d].iter().zip(&x[i]).map(|(a, b)| a * b).sum::<f64>()
            })
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        loss += lse - z[y[i]];
        let best = (0..k).fold(0, |b, c| if z[c] > z[b] { c } else { b });
        correct += usize::from(best == y[i]);
    }
    (loss / idx.len() as f64, correct as f64 / idx.len() as f64)
}

/// Forward-gradient SGD on the head (one-sided, `dirs` directions of batch 8 per step), the
/// features shifted by `center`. Returns (held-out at the best dev, best dev, best lr).
fn fg_sim(
    x: [&Vec<Vec<f32>>; 3],
    y: [&Vec<usize>; 3],
    k: usize,
    center: &[f32],
    steps: usize,
) -> (f64, f64, f64) {
    let xs: Vec<Vec<Vec<f64>>> = x
        .iter()
        .map(|s| {
            s.iter()
                .map(|r| {
                    r.iter()
                        .zip(center)
                        .map(|(a, c)| f64::from(a - c))
                        .collect()
                })
                .collect()
        })
        .collect();
    let d = xs[0][0].len();
    let n = k * (d + 1);
    let all = |s: usize| (0..xs[s].len()).collect::<Vec<_>>();
    let (dev_idx, held_idx) = (all(1), all(2));
    let mut best = (0.0, -1.0, 0.0);
    for lr in [0.001, 0.003, 0.01, 0.03, 0.1] {
        let mut rng = Normal(fwdllm_shared::perturb::SplitMix64::new(7));
        let mut w = vec![0f64; n];
        let mut v = vec![0f64; n];
        let mut step_dir = vec![0f64; n];
        let mut pick = fwdllm_shared::perturb::SplitMix64::new(11);
        let (mut run_dev, mut run_held) = (-1.0, 0.0);
        for step in 1..=steps {
            let batch: Vec<usize> = (0..8)
                .map(|_| (pick.next_u64() % xs[0].len() as u64) as usize)
                .collect();
            let (l0, _) = head_loss(&w, &xs[0], y[0], &batch, k);
            step_dir.iter_mut().for_each(|s| *s = 0.0);
            for _ in 0..64 {
                v.iter_mut().for_each(|e| *e = rng.next());
                let wp: Vec<f64> = w.iter().zip(&v).map(|(a, b)| a + 0.01 * b).collect();
                let g = (head_loss(&wp, &xs[0], y[0], &batch, k).0 - l0) / 0.01;
                for (s, e) in step_dir.iter_mut().zip(&v) {
                    *s += g * e / 64.0;
                }
            }
            for (a, s) in w.iter_mut().zip(&step_dir) {
                *a -= lr * s;
            }
            if step % 100 == 0 {
                let (dl, da) = head_loss(&w, &xs[1], y[1], &dev_idx, k);
                if !dl.is_finite() {
                    break;
                }
                if da > run_dev {
                    run_dev = da;
                    run_held = head_loss(&w, &xs[2], y[2], &held_idx, k).1;
                }
            }
        }
        eprintln!("  lr {lr}: dev {run_dev:.3} held-out {run_held:.3}");
        if run_dev > best.1 {
            best = (run_held, run_dev, lr);
        }
    }
    best
}

/// One optimiser configuration of the grid.
#[derive(Clone, Copy, Debug)]
struct FgRecipe {
    dirs: usize,
    batch: usize,
    steps: usize,
    lr: f64,
    adam: bool,
    /// Halving time of the learning rate in steps (0 = constant).
    half_life: f64,
}

/// Batch gradient of the softmax head (K x (d+1), bias last) on rows `idx`, accumulated in `g`.
fn head_grad(w: &[f64], x: &[Vec<f64>], y: &[usize], idx: &[usize], k: usize, g: &mut [f64]) {
    let d = x[0].len();
    g.iter_mut().for_each(|v| *v = 0.0);
    let inv = 1.0 / idx.len() as f64;
    for &i in idx {
        let z: Vec<f64> = (0..k)
            .map(|c| {
                let row = &w[c * (d + 1)..(c + 1) * (d + 1)];
                row[d] + row[..d].iter().zip(&x[i]).map(|(a, b)| a * b).sum::<f64>()
            })
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        for c in 0..k {
            let r = (e[c] / s - f64::from(u8::from(c == y[i]))) * inv;
            let row = &mut g[c * (d + 1)..(c + 1) * (d + 1)];
            for (gj, xj) in row[..d].iter_mut().zip(&x[i]) {
                *gj += r * xj;
            }
            row[d] += r;
        }
    }
}

/// Forward-gradient training of the head with exact directional derivatives `g_v = v·∇L`
/// (Rademacher v, what the engine's finite differences converge to): returns (held-out at
/// the best dev, best dev, step of the best dev).
fn fg_exact(x: &[Vec<Vec<f64>>], y: [&Vec<usize>; 3], k: usize, r: FgRecipe) -> (f64, f64, usize) {
    let d = x[0][0].len();
    let n = k * (d + 1);
    let (dev_idx, held_idx): (Vec<usize>, Vec<usize>) =
        ((0..x[1].len()).collect(), (0..x[2].len()).collect());
    let mut rng = fwdllm_shared::perturb::SplitMix64::new(7);
    let mut pick = fwdllm_shared::perturb::SplitMix64::new(11);
    let (mut w, mut grad, mut est, mut v) =
        (vec![0f64; n], vec![0f64; n], vec![0f64; n], vec![0f64; n]);
    let (mut m1, mut m2) = (vec![0f64; n], vec![0f64; n]);
    let mut best = (0.0, -1.0, 0);
    let every = (r.steps / 40).max(50);
    for step in 1..=r.steps {
        let batch: Vec<usize> = (0..r.batch)
            .map(|_| (pick.next_u64() % x[0].len() as u64) as usize)
            .collect();
        head_grad(&w, &x[0], y[0], &batch, k, &mut grad);
        est.iter_mut().for_each(|e| *e = 0.0);
        if r.dirs == 0 {
            // The backprop reference: the exact batch gradient.
            est.copy_from_slice(&grad);
        }
        for _ in 0..r.dirs {
            let mut bits = 0u64;
            for (i, e) in v.iter_mut().enumerate() {
                if i % 64 == 0 {
                    bits = rng.next_u64();
                }
                *e = if bits & 1 == 1 { 1.0 } else { -1.0 };
                bits >>= 1;
            }
            let g: f64 = v.iter().zip(&grad).map(|(a, b)| a * b).sum();
            for (s, e) in est.iter_mut().zip(&v) {
                *s += g * e / r.dirs as f64;
            }
        }
        let lr = if r.half_life > 0.0 {
            r.lr / (1.0 + step as f64 / r.half_life)
        } else {
            r.lr
        };
        if r.adam {
            let t = step as i32;
            for i in 0..n {
                m1[i] = 0.9 * m1[i] + 0.1 * est[i];
                m2[i] = 0.999 * m2[i] + 0.001 * est[i] * est[i];
                let mh = m1[i] / (1.0 - 0.9f64.powi(t));
                let vh = m2[i] / (1.0 - 0.999f64.powi(t));
                w[i] -= lr * mh / (vh.sqrt() + 1e-8);
            }
        } else {
            for (a, s) in w.iter_mut().zip(&est) {
                *a -= lr * s;
            }
        }
        if step % every == 0 || step == r.steps {
            let (dl, da) = head_loss(&w, &x[1], y[1], &dev_idx, k);
            if !dl.is_finite() {
                break;
            }
            if da > best.1 {
                best = (head_loss(&w, &x[2], y[2], &held_idx, k).1, da, step);
            }
        }
    }
    best
}

/// The optimiser grid on last-position features, raw and centred on the empty prompt's.
fn fg_grid(x: [&Vec<Vec<f32>>; 3], y: [&Vec<usize>; 3], k: usize, center: &[f32], task: &str) {
    let shift = |c: &[f32]| -> Vec<Vec<Vec<f64>>> {
        x.iter()
            .map(|s| {
                s.iter()
                    .map(|r| r.iter().zip(c).map(|(a, b)| f64::from(a - b)).collect())
                    .collect()
            })
            .collect()
    };
    let zero = vec![0f32; center.len()];
    let grid_env = std::env::var("FG_GRID").unwrap_or_default();
    let variants = match std::env::var("FG_CENTRED").as_deref() {
        Ok("1") => vec![("raw", shift(&zero)), ("centred", shift(center))],
        _ => vec![("raw", shift(&zero))],
    };
    for (fname, xs) in variants {
        for spec in grid_env.split(';').filter(|s| !s.is_empty()) {
            // dirs,batch,steps,adam(0/1),half_life,lr1|lr2|...
            let f: Vec<&str> = spec.split(',').collect();
            for lr in f[5].split('|') {
                let r = FgRecipe {
                    dirs: f[0].parse().unwrap(),
                    batch: f[1].parse().unwrap(),
                    steps: f[2].parse().unwrap(),
                    adam: f[3] == "1",
                    half_life: f[4].parse().unwrap(),
                    lr: lr.parse().unwrap(),
                };
                let t = std::time::Instant::now();
                let (h, dv, at) = fg_exact(&xs, y, k, r);
                println!(
                    "{{\"task\":\"{task}\",\"features\":\"{fname}\",\"dirs\":{},\"batch\":{},\"steps\":{},\"adam\":{},\"half_life\":{},\"lr\":{},\"dev_acc\":{dv:.4},\"heldout_acc\":{h:.4},\"best_step\":{at},\"sim_s\":{:.1}}}",
                    r.dirs, r.batch, r.steps, r.adam, r.half_life, r.lr, t.elapsed().as_secs_f64()
                );
            }
        }
    }
}

/// Softmax regression with standardised inputs; returns held-out accuracy at the epoch with
/// the best dev accuracy, and that dev accuracy.
fn fit(x: [&Vec<Vec<f32>>; 3], y: [&Vec<usize>; 3], k: usize, epochs: usize) -> (f64, f64, usize) {
    let d = x[0][0].len();
    let n = x[0].len() as f64;
    let mut mu = vec![0f64; d];
    let mut sd = vec![0f64; d];
    for r in x[0] {
        for j in 0..d {
            mu[j] += r[j] as f64 / n;
        }
    }
    for r in x[0] {
        for j in 0..d {
            sd[j] += (r[j] as f64 - mu[j]).powi(2) / n;
        }
    }
    let sd: Vec<f64> = sd.iter().map(|v| v.sqrt().max(1e-6)).collect();
    let z = |r: &Vec<f32>| -> Vec<f64> { (0..d).map(|j| (r[j] as f64 - mu[j]) / sd[j]).collect() };
    let xs: Vec<Vec<Vec<f64>>> = x.iter().map(|s| s.iter().map(z).collect()).collect();
    let mut w = vec![0f64; k * (d + 1)];
    let (mut m1, mut m2) = (vec![0f64; w.len()], vec![0f64; w.len()]);
    let acc = |w: &[f64], s: usize| -> f64 {
        let mut c = 0;
        for (r, &t) in xs[s].iter().zip(y[s]) {
            let mut best = (f64::NEG_INFINITY, 0);
            for c_ in 0..k {
                let row = &w[c_ * (d + 1)..(c_ + 1) * (d + 1)];
                let v: f64 = row[d] + row[..d].iter().zip(r).map(|(a, b)| a * b).sum::<f64>();
                if v > best.0 {
                    best = (v, c_);
                }
            }
            c += usize::from(best.1 == t);
        }
        c as f64 / xs[s].len() as f64
    };
    let (mut best_dev, mut best_held, mut best_ep) = (-1.0, 0.0, 0);
    for ep in 1..=epochs {
        let mut g = vec![0f64; w.len()];
        for (r, &t) in xs[0].iter().zip(y[0]) {
            let logits: Vec<f64> = (0..k)
                .map(|c_| {
                    let row = &w[c_ * (d + 1)..(c_ + 1) * (d + 1)];
                    row[d] + row[..d].iter().zip(r).map(|(a, b)| a * b).sum::<f64>()
                })
                .collect();
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let s: f64 = e.iter().sum();
            for c_ in 0..k {
                let p = e[c_] / s - f64::from(u8::from(c_ == t));
                let row = &mut g[c_ * (d + 1)..(c_ + 1) * (d + 1)];
                for j in 0..d {
                    row[j] += p * r[j] / n;
                }
                row[d] += p / n;
            }
        }
        for i in 0..w.len() {
            g[i] += 1e-4 * w[i];
            m1[i] = 0.9 * m1[i] + 0.1 * g[i];
            m2[i] = 0.999 * m2[i] + 0.001 * g[i] * g[i];
            let mh = m1[i] / (1.0 - 0.9f64.powi(ep as i32));
            let vh = m2[i] / (1.0 - 0.999f64.powi(ep as i32));
            w[i] -= 1e-2 * mh / (vh.sqrt() + 1e-8);
        }
        if ep % 10 == 0 {
            let dv = acc(&w, 1);
            if dv > best_dev {
                best_dev = dv;
                best_held = acc(&w, 2);
                best_ep = ep;
            }
        }
    }
    (best_held, best_dev, best_ep)
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    let task = TaskConfig::from_file(&a.task)?;
    let root = std::env::current_dir()?;
    let split = data::split(
        task.load_examples(&root)?,
        task.split_seed,
        task.heldout,
        task.dev,
    );
    let train: Vec<_> = split.train.into_iter().take(a.train).collect();
    let recipe = TrainConfig::head_rows_recipe(task.labels.len());
    let cfg = EngineConfig {
        model: a.model.clone(),
        threads: a.threads,
        ..EngineConfig::default()
    }
    .for_lora(&recipe.lora);
    let mut e = Engine::load(&cfg)?;
    e.set_task(&task)?;
    let t0 = std::time::Instant::now();
    let sets = [&train, &split.dev, &split.heldout];
    let mut f = Vec::new();
    for s in sets {
        f.push(features(&mut e, s)?);
        eprintln!(
            "features of {} examples, {:.0} s",
            s.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    let y: Vec<Vec<usize>> = sets
        .iter()
        .map(|s| s.iter().map(|x| x.label).collect())
        .collect();
    let k = task.labels.len();
    let pick = |which: &dyn Fn(&PooledHidden) -> Vec<f32>| -> Vec<Vec<Vec<f32>>> {
        f.iter().map(|s| s.iter().map(which).collect()).collect()
    };
    let last = pick(&|p| p.last.clone());
    let mean = pick(&|p| p.mean.clone());
    let both = pick(&|p| p.last.iter().chain(&p.mean).copied().collect());
    for (name, x) in [("last", &last), ("mean", &mean)] {
        // Conditioning of the raw features: a forward-gradient probe on unscaled features
        // moves every dimension with one learning rate.
        let d = x[0][0].len();
        let n = x[0].len() as f64;
        let mut sd: Vec<f64> = (0..d)
            .map(|j| {
                let m = x[0].iter().map(|r| r[j] as f64).sum::<f64>() / n;
                (x[0].iter().map(|r| (r[j] as f64 - m).powi(2)).sum::<f64>() / n).sqrt()
            })
            .collect();
        let rms: Vec<f64> = (0..d)
            .map(|j| (x[0].iter().map(|r| (r[j] as f64).powi(2)).sum::<f64>() / n).sqrt())
            .collect();
        let mut r2 = rms.clone();
        r2.sort_by(f64::total_cmp);
        sd.sort_by(f64::total_cmp);
        println!(
            "{{\"features\":\"{name}\",\"sd_min\":{:.4},\"sd_median\":{:.4},\"sd_p99\":{:.4},\"sd_max\":{:.4},\"rms_median\":{:.4},\"rms_max\":{:.4}}}",
            sd[0], sd[d / 2], sd[d * 99 / 100], sd[d - 1], r2[d / 2], r2[d - 1]
        );
    }
    if a.fg_grid {
        let t = e.task().cloned().context("task")?;
        let empty = e.pooled_hidden(&t, &[""])?.remove(0);
        fg_grid(
            [&last[0], &last[1], &last[2]],
            [&y[0], &y[1], &y[2]],
            k,
            &empty.last,
            &task.name,
        );
    }
    if a.fg {
        let t = e.task().cloned().context("task")?;
        let empty = e.pooled_hidden(&t, &[""])?.remove(0);
        let d = last[0][0].len();
        let train_mean: Vec<f32> = (0..d)
            .map(|j| last[0].iter().map(|r| r[j]).sum::<f32>() / last[0].len() as f32)
            .collect();
        let zero = vec![0f32; d];
        for (name, c) in [
            ("raw", &zero),
            ("empty-prompt centred", &empty.last),
            ("train-mean centred", &train_mean),
        ] {
            eprintln!("forward-gradient head, last features, {name}:");
            let (h, dv, lr) = fg_sim(
                [&last[0], &last[1], &last[2]],
                [&y[0], &y[1], &y[2]],
                k,
                c,
                3000,
            );
            println!(
                "{{\"task\":\"{}\",\"fg\":\"{name}\",\"heldout_acc\":{h:.4},\"dev_acc\":{dv:.4},\"lr\":{lr}}}",
                task.name
            );
        }
    }
    for (name, x) in [("last", &last), ("mean", &mean), ("last+mean", &both)] {
        let (h, d, ep) = fit([&x[0], &x[1], &x[2]], [&y[0], &y[1], &y[2]], k, a.epochs);
        println!(
            "{{\"task\":\"{}\",\"features\":\"{name}\",\"train\":{},\"heldout_acc\":{h:.4},\"dev_acc\":{d:.4},\"epoch\":{ep}}}",
            task.name,
            train.len()
        );
    }
    Ok(())
}
