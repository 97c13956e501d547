//! Study for instruction tuning: how far can a bias on the final hidden state move the
//! response NLL, and can forward gradients find it? With only that bias trainable, the logits
//! of every response token become `z + W·u` (W = the output head, u ∈ R^n_embd), so the base
//! logits are fixed per example and a perturbation costs one `W·v` product plus a
//! log-softmax per token, not a forward pass. This computes the base logits of a task's
//! train/dev/held-out split once (tail path, no adapter), then trains `u` by SGD with the exact
//! gradient `Wᵀ Σ (softmax − onehot)` (the backprop reference) and with forward gradients
//! (`directions` exact directional derivatives, the ε → 0 limit of what the engine measures),
//! printing dev and held-out NLL per token against the base model's.
//!
//! `--vocab-bias true` trains a bias on the logits themselves (one value per vocabulary word).
//!
//! `--rank R` studies a rank-R linear map on the final hidden state instead (`n → n + P·Q·n`,
//! P fixed, Q trainable; the hidden states are recovered from the logits by least squares).
//!
//! `cargo run --release -p fwdllm-bench --example probe_sft_bias -- --train 400 [--rank 8]`
//! `SFT_GRID` lists the configurations, `;`-separated, each `directions,batch,steps,lr1|lr2`
//! (directions 0 = the exact batch gradient). docs/RESULTS.md "Instruction tuning (SFT)" has the results.

use std::path::PathBuf;

use anyhow::Context;
use fwdllm_agent::data::{self, SftExample, TaskFile};
use fwdllm_agent::engine::{token_nll, Engine, EngineConfig, TrainConfig};
use fwdllm_shared::gguf::read_gguf;
use fwdllm_shared::perturb::{direction, SplitMix64};

/// Base logits of one example's response tokens, flattened, with their targets.
struct Scored {
    logits: Vec<f32>,
    targets: Vec<u32>,
}

fn logits_of(e: &mut Engine, xs: &[SftExample], n_vocab: usize) -> anyhow::Result<Vec<Scored>> {
    let mut out: Vec<Scored> = xs
        .iter()
        .map(|_| Scored {
            logits: Vec::new(),
            targets: Vec::new(),
        })
        .collect();
    for (c, chunk) in xs.chunks(8).enumerate() {
        e.sft_response_logits(chunk, &mut |i, z, t| {
            assert_eq!(z.len(), n_vocab);
            let s = &mut out[c * 8 + i];
            s.logits.extend_from_slice(z);
            s.targets.push(t as u32);
        })?;
    }
    Ok(out)
}

/// `W·u` for the head `w` (n_vocab rows of n_embd).
fn head_times(w: &[f32], u: &[f32]) -> Vec<f32> {
    w.chunks_exact(u.len())
        .map(|row| row.iter().zip(u).map(|(a, b)| a * b).sum())
        .collect()
}

/// Mean NLL per token of `set` with logit bias `b`; with `grad`, also accumulates
/// `Σ (softmax − onehot)` over the tokens into it (length n_vocab). Returns (sum, tokens).
fn nll(set: &[&Scored], b: &[f32], mut grad: Option<&mut Vec<f64>>) -> (f64, usize) {
    let (mut sum, mut n) = (0.0, 0);
    let mut z = vec![0f32; b.len()];
    for s in set {
        for (row, &t) in s.logits.chunks_exact(b.len()).zip(&s.targets) {
            for ((o, a), c) in z.iter_mut().zip(row).zip(b) {
                *o = a + c;
            }
            let l = token_nll(&z, t as i32);
            sum += l;
            n += 1;
            if let Some(g) = grad.as_deref_mut() {
                // softmax = exp(z − lse), lse = z[t] + l.
                let lse = z[t as usize] as f64 + l;
                for (gi, &zi) in g.iter_mut().zip(&z) {
                    *gi += (zi as f64 - lse).exp();
                }
                g[t as usize] -= 1.0;
            }
        }
    }
    (sum, n)
}

fn mean_nll(set: &[Scored], w: &[f32], u: &[f32]) -> f64 {
    let b = head_times(w, u);
    let refs: Vec<&Scored> = set.iter().collect();
    let (s, n) = nll(&refs, &b, None);
    s / n as f64
}

fn main() -> anyhow::Result<()> {
    let mut task_path = PathBuf::from("edge-agent/tasks/ag_news_headline.toml");
    let mut n_train = 400usize;
    let mut threads = 2u32;
    let mut prepared = PathBuf::from(".cache/prepared/SmolLM2-135M-Instruct.Q4_1.f32.gguf");
    let mut rank = 0usize;
    let mut vocab_bias = false;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--task" => task_path = v.into(),
            "--train" => n_train = v.parse()?,
            "--threads" => threads = v.parse()?,
            "--prepared" => prepared = v.into(),
            "--rank" => rank = v.parse()?,
            "--vocab-bias" => vocab_bias = v.parse()?,
            _ => anyhow::bail!("unknown flag {k}"),
        }
    }
    let TaskFile::Sft(task) = TaskFile::from_file(&task_path)? else {
        anyhow::bail!("{} is not an sft task", task_path.display());
    };
    let recipe = TrainConfig::sft_recipe();
    let cfg = EngineConfig {
        threads,
        ..EngineConfig::default()
    }
    .for_lora(&recipe.lora);
    let mut e = Engine::load(&cfg)?;
    let root = std::env::current_dir()?;
    let examples = task.load_examples(&root, &|t, n| e.truncate_text(t, n))?;
    let split = data::sft::split_sft(examples, &task);
    let file =
        read_gguf(&std::fs::read(&prepared).with_context(|| prepared.display().to_string())?)?;
    let w = file
        .tensor_f32("output.weight")
        .or_else(|| file.tensor_f32("token_embd.weight"))
        .context("the prepared model has no f32 head")?;
    let n_embd = file.model_shape()?.n_embd as usize;
    let n_vocab = w.len() / n_embd;
    let t0 = std::time::Instant::now();
    let train = logits_of(
        &mut e,
        &split.train[..n_train.min(split.train.len())],
        n_vocab,
    )?;
    let dev = logits_of(&mut e, &split.dev, n_vocab)?;
    let held = logits_of(&mut e, &split.heldout, n_vocab)?;
    eprintln!("base logits in {:.0} s", t0.elapsed().as_secs_f64());
    let zero = vec![0f32; n_embd];
    let (dev0, held0) = (mean_nll(&dev, &w, &zero), mean_nll(&held, &w, &zero));
    println!("{{\"base_dev_nll\":{dev0:.4},\"base_heldout_nll\":{held0:.4}}}");

    if vocab_bias {
        return logit_bias(n_vocab, &train, &dev, &held, held0);
    }
    if rank > 0 {
        return final_adapter(&w, n_embd, rank, &train, &dev, &held, held0);
    }
    let grid = std::env::var("SFT_GRID")
        .unwrap_or_else(|_| "0,8,300,0.3|1|3;64,8,300,0.3|1|3;256,8,300,1".into());
    for conf in grid.split(';').filter(|c| !c.trim().is_empty()) {
        let f: Vec<&str> = conf.split(',').collect();
        anyhow::ensure!(
            f.len() == 4,
            "SFT_GRID entry {conf:?}: directions,batch,steps,lr1|lr2"
        );
        let (dirs, batch, steps): (usize, usize, usize) =
            (f[0].parse()?, f[1].parse()?, f[2].parse()?);
        for lr in f[3].split('|') {
            let lr: f32 = lr.parse()?;
            let mut u = vec![0f32; n_embd];
            let mut rng = SplitMix64::new(7);
            let mut best = (f64::INFINITY, 0usize, 0f64);
            let t = std::time::Instant::now();
            for step in 1..=steps {
                let pick: Vec<&Scored> = (0..batch)
                    .map(|_| &train[rng.below(train.len() as u64) as usize])
                    .collect();
                let b = head_times(&w, &u);
                let mut gv = vec![0f64; n_vocab];
                let (_, n) = nll(&pick, &b, Some(&mut gv));
                // ∇_u = Wᵀ·(Σ softmax − onehot) / n
                let mut grad = vec![0f32; n_embd];
                for (row, &g) in w.chunks_exact(n_embd).zip(&gv) {
                    let g = (g / n as f64) as f32;
                    for (o, r) in grad.iter_mut().zip(row) {
                        *o += g * r;
                    }
                }
                if dirs == 0 {
                    for (x, g) in u.iter_mut().zip(&grad) {
                        *x -= lr * g;
                    }
                } else {
                    let mut v = vec![0f32; n_embd];
                    for k in 0..dirs {
                        direction((step * 100_003 + k) as u64, &mut v);
                        let g: f32 = v.iter().zip(&grad).map(|(a, b)| a * b).sum();
                        for (x, vi) in u.iter_mut().zip(&v) {
                            *x -= lr * g * vi / dirs as f32;
                        }
                    }
                }
                if step % 25 == 0 || step == steps {
                    let d = mean_nll(&dev, &w, &u);
                    if d < best.0 {
                        best = (d, step, mean_nll(&held, &w, &u));
                    }
                }
            }
            let norm = u.iter().map(|x| x * x).sum::<f32>().sqrt();
            println!(
                "{{\"directions\":{dirs},\"batch\":{batch},\"steps\":{steps},\"lr\":{lr},\"best_dev_nll\":{:.4},\"best_step\":{},\"heldout_nll\":{:.4},\"rel_drop\":{:.4},\"u_norm\":{norm:.3},\"secs\":{:.1}}}",
                best.0,
                best.1,
                best.2,
                (held0 - best.2) / held0,
                t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// Final hidden states recovered from the logits: `n = (WᵀW)⁻¹ Wᵀ z` (the head has full
/// column rank, and the tied head adds no bias, so `z = W·n` exactly up to rounding).
fn hidden_of(w: &[f32], n_embd: usize, sets: &[&[Scored]]) -> Vec<Vec<Vec<f32>>> {
    let d = n_embd;
    let mut g = vec![0f64; d * d];
    for row in w.chunks_exact(d) {
        for i in 0..d {
            let ri = row[i] as f64;
            for j in 0..=i {
                g[i * d + j] += ri * row[j] as f64;
            }
        }
    }
    // Cholesky, lower triangle in place.
    for j in 0..d {
        let mut s = g[j * d + j];
        for k in 0..j {
            s -= g[j * d + k] * g[j * d + k];
        }
        let l = s.sqrt();
        g[j * d + j] = l;
        for i in j + 1..d {
            let mut s = g[i * d + j];
            for k in 0..j {
                s -= g[i * d + k] * g[j * d + k];
            }
            g[i * d + j] = s / l;
        }
    }
    let solve = |b: &mut [f64]| {
        for i in 0..d {
            let mut s = b[i];
            for k in 0..i {
                s -= g[i * d + k] * b[k];
            }
            b[i] = s / g[i * d + i];
        }
        for i in (0..d).rev() {
            let mut s = b[i];
            for k in i + 1..d {
                s -= g[k * d + i] * b[k];
            }
            b[i] = s / g[i * d + i];
        }
    };
    let n_vocab = w.len() / d;
    sets.iter()
        .map(|set| {
            set.iter()
                .map(|s| {
                    let mut out = Vec::with_capacity(s.targets.len() * d);
                    for z in s.logits.chunks_exact(n_vocab) {
                        let mut b = vec![0f64; d];
                        for (row, &zi) in w.chunks_exact(d).zip(z) {
                            for (o, r) in b.iter_mut().zip(row) {
                                *o += zi as f64 * *r as f64;
                            }
                        }
                        solve(&mut b);
                        out.extend(b.iter().map(|&x| x as f32));
                    }
                    out
                })
                .collect()
        })
        .collect()
}

/// A rank-`r` linear adapter on the final hidden state, `n → n + P·Q·n` with P fixed
/// (seeded ±1/√n_embd) and Q trainable: logits gain `(W·P)·(Q·n)`, so with `W·P` precomputed a
/// perturbation costs `n_vocab·r` per token.
fn final_adapter(
    w: &[f32],
    d: usize,
    r: usize,
    train: &[Scored],
    dev: &[Scored],
    held: &[Scored],
    held0: f64,
) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let hid = hidden_of(w, d, &[train, dev, held]);
    let n_vocab = w.len() / d;
    // Check the recovery on the first dev token: ‖W·n − z‖∞.
    let z0 = &dev[0].logits[..n_vocab];
    let n0 = &hid[1][0][..d];
    let err = w
        .chunks_exact(d)
        .zip(z0)
        .map(|(row, &z)| (row.iter().zip(n0).map(|(a, b)| a * b).sum::<f32>() - z).abs())
        .fold(0f32, f32::max);
    eprintln!(
        "hidden states in {:.0} s, max |W·n − z| {err:.2e}",
        t0.elapsed().as_secs_f64()
    );
    let mut p = vec![0f32; d * r];
    direction(0xF1A1, &mut p);
    let scale = 1.0 / (d as f32).sqrt();
    p.iter_mut().for_each(|x| *x *= scale);
    // wp[v*r + j] = Σ_i W[v,i]·P[i,j]
    let mut wp = vec![0f32; n_vocab * r];
    for (row, out) in w.chunks_exact(d).zip(wp.chunks_exact_mut(r)) {
        for (i, &wi) in row.iter().enumerate() {
            for j in 0..r {
                out[j] += wi * p[i * r + j];
            }
        }
    }
    // Mean NLL of `set` under Q; with `grad`, accumulates ∂(Σ NLL)/∂Q.
    let eval = |set: &[&Scored], hs: &[&Vec<f32>], q: &[f32], mut grad: Option<&mut Vec<f32>>| {
        let (mut sum, mut n) = (0.0f64, 0usize);
        let mut z = vec![0f32; n_vocab];
        let mut a = vec![0f32; r];
        for (s, h) in set.iter().zip(hs) {
            for ((zb, hn), &t) in s
                .logits
                .chunks_exact(n_vocab)
                .zip(h.chunks_exact(d))
                .zip(&s.targets)
            {
                for j in 0..r {
                    a[j] = q[j * d..(j + 1) * d]
                        .iter()
                        .zip(hn)
                        .map(|(x, y)| x * y)
                        .sum();
                }
                for ((o, &b), wpr) in z.iter_mut().zip(zb).zip(wp.chunks_exact(r)) {
                    *o = b + wpr.iter().zip(&a).map(|(x, y)| x * y).sum::<f32>();
                }
                let l = token_nll(&z, t as i32);
                sum += l;
                n += 1;
                if let Some(g) = grad.as_deref_mut() {
                    let lse = z[t as usize] as f64 + l;
                    let mut e = vec![0f32; r];
                    for (v, (&zi, wpr)) in z.iter().zip(wp.chunks_exact(r)).enumerate() {
                        let pv = (zi as f64 - lse).exp() as f32
                            - if v == t as usize { 1.0 } else { 0.0 };
                        for j in 0..r {
                            e[j] += pv * wpr[j];
                        }
                    }
                    for j in 0..r {
                        for (gi, &hi) in g[j * d..(j + 1) * d].iter_mut().zip(hn) {
                            *gi += e[j] * hi;
                        }
                    }
                }
            }
        }
        (sum, n)
    };
    let all = |set: &[Scored], hs: &[Vec<f32>], q: &[f32]| {
        let sr: Vec<&Scored> = set.iter().collect();
        let hr: Vec<&Vec<f32>> = hs.iter().collect();
        let (s, n) = eval(&sr, &hr, q, None);
        s / n as f64
    };
    let grid = std::env::var("SFT_GRID").unwrap_or_else(|_| "0,8,300,0.01|0.03|0.1".into());
    for conf in grid.split(';').filter(|c| !c.trim().is_empty()) {
        let f: Vec<&str> = conf.split(',').collect();
        anyhow::ensure!(
            f.len() == 4,
            "SFT_GRID entry {conf:?}: directions,batch,steps,lr1|lr2"
        );
        let (dirs, batch, steps): (usize, usize, usize) =
            (f[0].parse()?, f[1].parse()?, f[2].parse()?);
        for lr in f[3].split('|') {
            let lr: f32 = lr.parse()?;
            let mut q = vec![0f32; r * d];
            let mut rng = SplitMix64::new(7);
            let mut best = (f64::INFINITY, 0usize, 0f64);
            let t = std::time::Instant::now();
            for step in 1..=steps {
                let idx: Vec<usize> = (0..batch)
                    .map(|_| rng.below(train.len() as u64) as usize)
                    .collect();
                let sr: Vec<&Scored> = idx.iter().map(|&i| &train[i]).collect();
                let hr: Vec<&Vec<f32>> = idx.iter().map(|&i| &hid[0][i]).collect();
                let mut g = vec![0f32; r * d];
                let (_, n) = eval(&sr, &hr, &q, Some(&mut g));
                g.iter_mut().for_each(|x| *x /= n as f32);
                if dirs == 0 {
                    q.iter_mut().zip(&g).for_each(|(x, gi)| *x -= lr * gi);
                } else {
                    let mut v = vec![0f32; r * d];
                    for k in 0..dirs {
                        direction((step * 100_003 + k) as u64, &mut v);
                        let gv: f32 = v.iter().zip(&g).map(|(a, b)| a * b).sum();
                        q.iter_mut()
                            .zip(&v)
                            .for_each(|(x, vi)| *x -= lr * gv * vi / dirs as f32);
                    }
                }
                if step % 25 == 0 || step == steps {
                    let dv = all(dev, &hid[1], &q);
                    if dv < best.0 {
                        best = (dv, step, all(held, &hid[2], &q));
                    }
                }
            }
            println!(
                "{{\"final_rank\":{r},\"directions\":{dirs},\"batch\":{batch},\"steps\":{steps},\"lr\":{lr},\"best_dev_nll\":{:.4},\"best_step\":{},\"heldout_nll\":{:.4},\"rel_drop\":{:.4},\"secs\":{:.1}}}",
                best.0, best.1, best.2, (held0 - best.2) / held0, t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// A bias on the logits themselves (one value per vocabulary word, a unigram shift): the exact
/// gradient is `Σ (softmax − onehot)` per token, no head product at all.
fn logit_bias(
    n_vocab: usize,
    train: &[Scored],
    dev: &[Scored],
    held: &[Scored],
    held0: f64,
) -> anyhow::Result<()> {
    let all = |set: &[Scored], b: &[f32]| {
        let refs: Vec<&Scored> = set.iter().collect();
        let (s, n) = nll(&refs, b, None);
        s / n as f64
    };
    let grid = std::env::var("SFT_GRID").unwrap_or_else(|_| "0,8,300,0.3|1|3".into());
    for conf in grid.split(';').filter(|c| !c.trim().is_empty()) {
        let f: Vec<&str> = conf.split(',').collect();
        anyhow::ensure!(
            f.len() == 4,
            "SFT_GRID entry {conf:?}: directions,batch,steps,lr1|lr2"
        );
        let (dirs, batch, steps): (usize, usize, usize) =
            (f[0].parse()?, f[1].parse()?, f[2].parse()?);
        for lr in f[3].split('|') {
            let lr: f32 = lr.parse()?;
            let mut b = vec![0f32; n_vocab];
            let mut rng = SplitMix64::new(7);
            let mut best = (f64::INFINITY, 0usize, 0f64);
            let t = std::time::Instant::now();
            for step in 1..=steps {
                let pick: Vec<&Scored> = (0..batch)
                    .map(|_| &train[rng.below(train.len() as u64) as usize])
                    .collect();
                let mut gv = vec![0f64; n_vocab];
                let (_, n) = nll(&pick, &b, Some(&mut gv));
                let g: Vec<f32> = gv.iter().map(|x| (x / n as f64) as f32).collect();
                if dirs == 0 {
                    b.iter_mut().zip(&g).for_each(|(x, gi)| *x -= lr * gi);
                } else {
                    let mut v = vec![0f32; n_vocab];
                    for k in 0..dirs {
                        direction((step * 100_003 + k) as u64, &mut v);
                        let gd: f32 = v.iter().zip(&g).map(|(a, c)| a * c).sum();
                        b.iter_mut()
                            .zip(&v)
                            .for_each(|(x, vi)| *x -= lr * gd * vi / dirs as f32);
                    }
                }
                if step % 25 == 0 || step == steps {
                    let d = all(dev, &b);
                    if d < best.0 {
                        best = (d, step, all(held, &b));
                    }
                }
            }
            println!(
                "{{\"logit_bias\":true,\"directions\":{dirs},\"batch\":{batch},\"steps\":{steps},\"lr\":{lr},\"best_dev_nll\":{:.4},\"best_step\":{},\"heldout_nll\":{:.4},\"rel_drop\":{:.4},\"secs\":{:.1}}}",
                best.0, best.1, best.2, (held0 - best.2) / held0, t.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
